"""K-FROG: Kronecker FROG, the "legacy version" the FROG README keeps (public code: Fullfix/frog-optimizer, kfrog.py).

Per preconditioned layer (nn.Conv2d, nn.Linear) with weight rows W_r (R rows of D = C_in/groups kh kw entries, or
in_features; with `fold_bias=True` a bias is an extra input column of ones), on every step:

    g = per-sample output gradient of the summed loss, N samples this step (all of them, not only the sampled ones)
    y_r   = sum_{n, l} g[n, r, l]^2 / N                  optional EMA: v <- b v + (1 - b) y, y^ = v / (1 - b^t)
    m    <- mu m + grad                                   (momentum first; Nesterov: grad + mu m)
    P1_r  = m_r / sqrt(y^_r + eps)
    A     = sum_{n in S, l} x_{n,l} x_{n,l}^T / s + eps I   S: s whole samples drawn afresh per layer and step
    Z_r   = CG(A, P1_r)                                   cg_iters iterations from zero, all rows at once
    U_r   = Z_r * sqrt(diag(A - eps I))                   entrywise: the post-scaling that imitates A^{-1/2}
    nu    = min(1, sqrt(kl_clip / sum_layers lr^2 sum_r q_r)),                                    (trust region)
            q_r = (y^_r + eps) U_r^T A U_r / L + kl_damping |U_r|^2
    W_r  <- (1 - lr wd) W_r - nu lr U_r

x_{n,l} is the input patch at output position l (Linear: the input row at position l of a (N, ..., in) input). A
grouped conv's row r sees only its group's input channels, so A is per group. A is applied matrix-free: Conv2d as
a conv and a weight-gradient conv over the s sampled inputs (fop.frog.ConvSystems, no im2col), Linear through
fop_kernels.batched_cg. Every other parameter: the grafted step (unpreconditioned="graft", as FROG's: an Adam-like
direction at the RMS per entry of the preconditioned updates) or SGD times nu ("sgd", the public code), with
momentum mu, coupled weight decay and learning rate lr lr_other_ratio.

q_r is the squared norm of row r's step in K-FROG's damped Kronecker row Fisher (y^_r + eps) A / L, L the output
positions per sample (conv: Ho Wo; Linear: the positions of a (N, ..., in) input): y_r / L is the mean squared output
gradient per position and A sums x x^T over the positions, so that is FROG's F_r = sum_{n,l} g^2 x x^T / s with g^2
and x independent. nu bounds the step's predicted KL divergence by kl_clip as K-FAC's and FROG's clips do
(kl_clip=None: nu = 1, the public algorithm). It costs one more product with A (a conv over the s samples).
kl_damping (off by default; FROG's 1e-3 is the natural value) is an absolute damping of that metric: as the samples
are fitted, y_r and with it the metric shrink and the clip alone lets the step grow as 1 / y
(tests/test_optim_kfrog.py); the damping caps the step's squared Euclidean norm at kl_clip / kl_damping. At 1e-3, on
digits at a constant lr 1 for 10 epochs, the final training losses were 0.001-0.008 against 0.024-0.39 without it,
but the first epochs were slower (one more epoch to 95% in 5 of 12 cells, one fewer in 2) and seven small unseen
models ended the same; so it is not the default (bench/RESULTS.md, "K-FROG").

With a mean-reduced loss the autograd output gradient is dy = g / N, so y_r = N sum dy^2 as in the public code
(which multiplies by the subsample count s; the two agree when s >= N, the public default s 256 at batch <= 256).
"""

from __future__ import annotations

import torch
from torch import nn

import fop_kernels
from fop._base import check_float, check_int, check_outer_hyperparameters
from fop._layers import Conv2dType, _rows, conv_output_size
from fop.distributed_rows import lockstep_row_cg
from fop.frog import (
    TRACE_EPS,
    ConvSystems,
    FROGBase,
    LinearSystems,
    _covering,
    check_nesterov,
    frog_layer_support,
    row_cg,
    rowdot,
)

__all__ = ["KFROG", "conv_input_diag", "conv_input_sq", "expand_input_diag", "kfrog_conv_solve", "kfrog_linear_solve",
           "kfrog_step_quadratic", "linear_input_diag"]


def conv_input_sq(x_s: torch.Tensor, weight_shape, stride, padding, dilation) -> tuple[torch.Tensor, int]:
    """(sum_{n,l} of the squared input each entry (c, i, j) of a kernel over all C input channels multiplies,
    C x kh x kw; the number of output positions L), without im2col: the weight gradient of sum_n x_n^2 (one input)
    against an all-ones output gradient."""
    s, C, H, W = x_s.shape
    _, _, kh, kw = weight_shape
    Ho, Wo = conv_output_size(H, W, (kh, kw), stride, padding, dilation)
    sq = x_s.square().sum(0, keepdim=True)
    ones = sq.new_ones(1, 1, Ho, Wo)
    return torch.nn.grad.conv2d_weight(sq, (1, C, kh, kw), ones, stride, padding, dilation, 1)[0], Ho * Wo


def expand_input_diag(sq: torch.Tensor, s: int, R: int, groups: int, bias: bool, positions) -> torch.Tensor:
    """diag(A - eps I) per row (R x D) from conv_input_sq's sums over s samples: row r takes its group's channels;
    the bias entry is the number of output positions (a number, or a 0-d tensor: no host sync)."""
    d = (sq / s).reshape(groups, -1).repeat_interleave(R // groups, dim=0)
    if bias:
        d = torch.cat([d, d.new_ones(R, 1) * positions], dim=1)
    return d


def conv_input_diag(x_s: torch.Tensor, weight_shape, stride, padding, dilation, groups: int,
                    bias: bool) -> torch.Tensor:
    """diag(sum_{n,l} x_{n,l} x_{n,l}^T) / s for every row (R x D), without im2col (conv_input_sq, expanded)."""
    sq, positions = conv_input_sq(x_s, weight_shape, stride, padding, dilation)
    return expand_input_diag(sq, x_s.shape[0], weight_shape[0], groups, bias, positions)


def linear_input_diag(X: torch.Tensor, s: int) -> torch.Tensor:
    """diag(X^T X) / s (D) for the input rows X (rows x D, a bias column included) of s samples."""
    return X.square().sum(0).div_(s)


def kfrog_conv_solve(x_s: torch.Tensor, B: torch.Tensor, weight_shape, stride, padding, dilation, groups: int,
                     bias: bool, eps: float, iters: int) -> torch.Tensor:
    """CG from zero, `iters` iterations, on (sum_{n,l} x x^T / s + eps I) z_r = b_r for every row r of B (R x D):
    fop.frog.ConvSystems with the constant weight 1/s."""
    systems = ConvSystems(x_s, 1.0 / x_s.shape[0], weight_shape, stride, padding, dilation, groups, bias, eps)
    return row_cg(systems.matvec, systems.quad, B, iters)


def kfrog_linear_solve(X: torch.Tensor, s: int, B: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """The same for a Linear layer with input rows X (rows x D) of s samples, through fop_kernels.batched_cg.

    batched_cg solves (F / t' + damping I) z = b with F = X^T diag(w) X / rows, t' = tr(F) / D + 1e-10. With
    w = rows / s (so that F = A - eps I and t' is KFROG's t), damping = eps / t' and b = B / t' that is A z = B up
    to the factor 1 / t' on both sides, which leaves every CG iterate unchanged."""
    rows = X.shape[0]
    t = X.square().sum() / (s * X.shape[1]) + TRACE_EPS
    w = X.new_full((rows, B.shape[0]), rows / s)
    z, _ = fop_kernels.batched_cg(X, w, B / t, eps / t, iters=iters)  # a device scalar: no host sync
    return z


def _system_rows(systems) -> int:
    """The input rows (samples times output positions) of this rank's part of a ConvSystems or LinearSystems."""
    if isinstance(systems, ConvSystems):
        s, _, H, W = systems.x_s.shape
        (kh, kw), (stride, padding, dilation, _) = systems.weight_shape[2:], systems.geometry
        Ho, Wo = conv_output_size(H, W, (kh, kw), stride, padding, dilation)
        return s * Ho * Wo
    return systems.X.shape[0]


def kfrog_step_quadratic(quad: torch.Tensor, y: torch.Tensor, eps: float, positions, U: torch.Tensor,
                         kl_damping: float) -> torch.Tensor:
    """sum_r (y_r + eps) quad_r / L + kl_damping |U_r|^2, quad_r = U_r^T A U_r of the step rows U and L the output
    positions per sample: the squared norm of U in the damped Kronecker row Fisher (y_r + eps) A / L plus
    kl_damping I. A 0-d tensor."""
    return ((y + eps) * quad).sum() / positions + kl_damping * U.square().sum()


class KFROG(FROGBase):
    r"""K-FROG: the row scaling from squared output gradients, CG on the input factor, diagonal post-scaling (see
    the module docstring for the formulas).

    Args:
        params_or_model: the model, or parameters / param groups with `model=` given (hooks go on its layers).
        lr: learning rate (0.1, ours, the middle of a flat range on the digits CNN: 8 epochs, 3 seeds, mean test
            accuracy 0.980 / 0.989 / 0.991 at 0.03 / 0.1 / 0.3, 0.951 at 0.01, 0.319 at the public default 1e-3;
            the public code publishes no K-FROG run). docs/frog_adafisher.md has the sweep.
        momentum, nesterov: heavy-ball momentum applied to the gradient before preconditioning (0, False: public).
        weight_decay: decoupled `W <- (1 - lr wd) W` on preconditioned layers, coupled `g + wd p` elsewhere
            (0; the public code has none).
        y_momentum: b of the EMA of y_r with Adam-style bias correction (0: this step's y_r alone, public default).
        sample_size: s, whole samples drawn afresh per layer and step for the input factor A (256, public; None:
            the whole batch). y_r always uses every sample of the step.
        cg_iters: CG iterations from zero (4, public; no convergence test).
        eps: added to y_r under the square root and to A's diagonal (1e-6, public).
        lr_other_ratio: parameters without a preconditioner (norm layers, embeddings, excluded modules, the biases
            when `fold_bias=False`) take the `unpreconditioned` step at `lr * lr_other_ratio` (1.0: the public code
            uses lr for all).
        exclude: modules or module names left to the other parameters' path (`unpreconditioned`).
        fold_bias: solve a layer's bias with its weight rows as an input column of ones (False: the bias takes the
            other parameters' path, as in the public code).
        kl_clip: the trust region (module docstring): the step, the other parameters' included, is scaled so that its
            predicted KL divergence in the damped Kronecker row Fisher is at most kl_clip (1e-3, as K-FAC's; None:
            the public algorithm).
        kl_damping: lambda >= 0, an absolute damping of the trust region's metric (0: the damped row Fisher alone,
            the default; 1e-3 as FROG's): it bounds the step's Euclidean norm by sqrt(kl_clip / kl_damping) once the
            Fisher vanishes (a fitted model; module docstring). Unused with kl_clip=None.
        unpreconditioned: "graft" (default) or "sgd" (the public code), as for FROG.
        seed: seed of the sample draws (default: drawn from torch's global generator at construction); the
            generator's state is part of `state_dict`. Per step, the layers draw in order.
        loss_reduction, check_finite, grad_scaler: see CurvatureOptimizer.
        distributed: as for FROG (fop.distributed_rows): y_r, diag(A) and every CG matvec summed over ranks, the
            s samples drawn out of the global batch.
    """

    layer_support = staticmethod(frog_layer_support)
    layer_state_keys = ("y_ema", "y_updates")  # each layer's row-scale EMA and its update count (y_momentum > 0)

    def _layer_state_shape(self, i, key):
        return (self.layers[i].out_dim,)

    def __init__(self, params_or_model, lr: float = 0.1, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, y_momentum: float = 0.0, sample_size: int | None = 256,
                 cg_iters: int = 4, eps: float = 1e-6, lr_other_ratio: float = 1.0, exclude=(), *,
                 fold_bias: bool = False, kl_clip: float | None = 1e-3, kl_damping: float = 0.0,
                 unpreconditioned: str = "graft",
                 seed: int | None = None, model: nn.Module | None = None,
                 loss_reduction: str = "mean", check_finite: bool = True, grad_scaler=None, distributed=None):
        check_outer_hyperparameters(lr, momentum, weight_decay)
        check_nesterov(nesterov, momentum)
        check_float("y_momentum", y_momentum, low=0.0, high=1.0, high_open=True)
        self.sample_size = None if sample_size is None else check_int("sample_size", sample_size)
        self.kl_clip = None if kl_clip is None else check_float("kl_clip", kl_clip, low=0.0, low_open=True)
        self.kl_damping = check_float("kl_damping", kl_damping, low=0.0)
        check_int("cg_iters", cg_iters)
        check_float("eps", eps, low=0.0, low_open=True)
        check_float("lr_other_ratio", lr_other_ratio, low=0.0)
        if not isinstance(fold_bias, bool):
            raise ValueError(f"fold_bias must be a bool, got {fold_bias!r}")
        self.fold_bias = fold_bias
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        y_momentum=y_momentum, cg_iters=cg_iters, eps=eps, lr_other_ratio=lr_other_ratio)
        super().__init__(params_or_model, defaults, seed=seed, model=model, exclude=exclude or None,
                         loss_reduction=loss_reduction, check_finite=check_finite, grad_scaler=grad_scaler,
                         distributed=distributed, unpreconditioned=unpreconditioned)
        self._arm()

    def _arm(self) -> None:
        if self.layers:  # whole batches: y_r needs every output gradient; the inputs are sampled in the step
            self.capture.arm(full=True)

    def _validate_before_step(self) -> None:
        for group in self.param_groups:
            check_float("y_momentum", group["y_momentum"], low=0.0, high=1.0, high_open=True)
            check_float("eps", group["eps"], low=0.0, low_open=True)
            check_int("cg_iters", group["cg_iters"])

    # -- the step --------------------------------------------------------------------------------------------------
    def _row_scale(self, layer, recs, inv_scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """y_r = sum_{n,l} g[n,r,l]^2 / N over every record of the step (g = N dy for a mean loss, else dy)."""
        n_total = sum(r.n for r in recs)
        coef = float(n_total) if self.capture.loss_reduction == "mean" else 1.0
        y = None
        for r in recs:
            sq = r.dy.to(dtype).square()
            part = sq.sum((0, 2, 3)) if isinstance(layer.type, Conv2dType) else sq.reshape(-1, sq.shape[-1]).sum(0)
            y = part if y is None else y.add_(part)
        y.mul_(coef * coef / n_total)
        if inv_scale is not None:
            y.mul_(inv_scale.to(device=y.device, dtype=dtype).square())
        return y

    def _smoothed(self, i: int, y: torch.Tensor, beta: float) -> torch.Tensor:
        """Layer i's v <- b v + (1 - b) y (v = 0 before the first update), returned as v / (1 - b^t); y itself when
        b = 0."""
        if beta == 0:
            return y
        state = self.layer_state[i]
        v = state.get("y_ema")
        t = state.get("y_updates", 0) + 1
        # new tensors, never in place: a step that fails later restores the old state (CurvatureOptimizer.step)
        state["y_ema"] = v = y.mul(1.0 - beta) if v is None else v.mul(beta).add_(y, alpha=1.0 - beta)
        state["y_updates"] = t
        return v / (1.0 - beta**t)

    def _sampled_inputs(self, recs, dtype: torch.dtype) -> torch.Tensor:
        """The inputs of s whole samples drawn from this step's records (those shaped like the first record)."""
        xs = [r.a for r in recs if r.a.shape[1:] == recs[0].a.shape[1:]]
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        idx = self._sample_rows(x.shape[0], x.device)
        return (x if idx is None else x.index_select(0, idx)).to(dtype)

    def _curvature_step(self, inv_scale: torch.Tensor | None) -> dict[int, torch.Tensor]:
        """Momentum, row scaling, CG on the input factor and the diagonal post-scaling of every layer."""
        if self.comm.active:
            return self._curvature_step_distributed(inv_scale)
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        directions: dict[int, torch.Tensor] = {}
        terms: list[tuple[float, torch.Tensor]] = []
        for i, layer in enumerate(self.layers):
            W, b = layer.weight, layer.bias if self.fold_bias else None
            recs = self.capture.done(i)
            if W.grad is None or not recs:  # no forward with grad this step: the other parameters' path
                continue
            group = group_of[id(W)]
            eps, iters = group["eps"], group["cg_iters"]
            dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
            y = self._smoothed(i, self._row_scale(layer, recs, inv_scale, dtype), group["y_momentum"])
            x_s = self._sampled_inputs(recs, dtype)
            P1 = self._momentum_rows(layer, b, group, dtype) / (y + eps).sqrt_()[:, None]  # m may be .grad
            bias = b is not None
            s = x_s.shape[0]
            if isinstance(layer.type, Conv2dType):
                c = layer.conv
                geometry = (c["stride"], c["padding"], c["dilation"], c["groups"])
                Z = kfrog_conv_solve(x_s, P1, W.shape, *geometry, bias, eps, iters)
                diag = conv_input_diag(x_s, W.shape, *geometry, bias)
                systems = ConvSystems(x_s, 1.0 / s, W.shape, *geometry, bias, eps)
            else:
                X = _rows(x_s, bias)
                Z = kfrog_linear_solve(X, s, P1, eps, iters)
                diag = linear_input_diag(X, s)
                systems = LinearSystems(X, 1.0 / s, eps)
            U = Z.mul_(diag.sqrt_())
            if self.kl_clip is not None:
                L = _system_rows(systems) / s
                terms.append((group["lr"], kfrog_step_quadratic(systems.quad(U), y, eps, L, U, self.kl_damping)))
            self._set_directions(directions, U, layer, b)
        return self._trust_region(directions, terms)

    def _curvature_step_distributed(self, inv_scale: torch.Tensor | None) -> dict[int, torch.Tensor]:
        """The same across ranks (fop.distributed_rows): every rank's part of y_r (all its samples) and of diag(A)
        (its sampled ones) summed in one round, then the CG rounds of all layers in lockstep."""
        comm = self.comm
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        jobs = self._distributed_jobs()
        if not jobs:
            return {}
        info = []  # per job: layer, W, b, group, dtype, (R, D), length of the diagonal's data part
        for i, _ in jobs:
            layer = self.layers[i]
            W, b = layer.weight, layer.bias if self.fold_bias else None
            dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
            conv = isinstance(layer.type, Conv2dType)
            d_data = (W.shape[1] * layer.conv["groups"] * W.shape[2] * W.shape[3] + 1 if conv
                      else layer.type.weight_columns(layer) + int(b is not None))
            info.append((layer, W, b, group_of[id(W)], dtype,
                         (layer.out_dim, layer.type.weight_columns(layer) + int(b is not None)), d_data))
        round_dtype = torch.float64 if any(it[4] == torch.float64 for it in info) else torch.float32
        local: list = []  # per job: this rank's sampled inputs (conv: s_r x C x H x W; Linear: rows x D)

        def stats():
            out = []
            for (i, draw), (layer, W, b, _, dtype, (R, _), _) in zip(jobs, info):
                recs = self._records(i)
                N = sum(comm.counts[i])
                n_local = comm.counts[i][comm.rank]
                coef = float(n_local) if self.capture.loss_reduction == "mean" else 1.0
                y = W.new_zeros(R, dtype=dtype)
                for r in recs:
                    sq = r.dy.to(dtype).square()
                    conv = isinstance(layer.type, Conv2dType)
                    y += sq.sum((0, 2, 3)) if conv else sq.reshape(-1, sq.shape[-1]).sum(0)
                y.mul_(coef * coef / N)
                if inv_scale is not None:
                    y.mul_(inv_scale.to(device=y.device, dtype=dtype).square())
                idx = comm.local_indices(draw, i)
                if isinstance(layer.type, Conv2dType):
                    c = layer.conv
                    x = torch.cat([r.a for r in recs]) if recs else \
                        W.new_zeros((0, c["groups"] * W.shape[1], *_covering(c)), dtype=dtype)
                    x_s = x.index_select(0, idx.to(x.device)).to(dtype)
                    sq, positions = conv_input_sq(x_s, W.shape, c["stride"], c["padding"], c["dilation"])
                    local.append(x_s)  # the last entry: positions per sample summed over samples (the bias entry)
                    out += [y, torch.cat([sq.reshape(-1), sq.new_full((1,), float(positions * x_s.shape[0]))])]
                else:
                    x = torch.cat([r.a for r in recs]) if recs else \
                        W.new_zeros((0, layer.type.weight_columns(layer)), dtype=dtype)
                    X = _rows(x.index_select(0, idx.to(x.device)).to(dtype), b is not None)
                    local.append(X)
                    out += [y, X.square().sum(0)]
            return out

        shapes = [shape for it in info for shape in ((it[5][0],), (it[6],))]
        summed = comm.round("stats", shapes, round_dtype, stats)
        ys, sqs = summed[0::2], summed[1::2]
        sizes = [len(draw) if draw is not None else sum(comm.counts[i]) for i, draw in jobs]
        P1s: list = []
        built: list = []  # per job: (systems, y^)

        def build():
            items = []
            for (i, _), (layer, W, b, group, dtype, _, _), data, y, s in zip(jobs, info, local, ys, sizes):
                eps = group["eps"]
                y = self._smoothed(i, y.to(dtype), group["y_momentum"])
                P1 = self._momentum_rows(layer, b, group, dtype) / (y + eps).sqrt_()[:, None]
                if isinstance(layer.type, Conv2dType):
                    c = layer.conv
                    systems = ConvSystems(data, 1.0 / s, W.shape, c["stride"], c["padding"], c["dilation"],
                                          c["groups"], b is not None, eps)
                else:
                    systems = LinearSystems(data, 1.0 / s, eps)
                items.append((systems, P1, None))
                P1s.append(P1)
                built.append((systems, y))
            return items

        Zs = lockstep_row_cg(comm, [it[5] for it in info], [it[3]["cg_iters"] for it in info],
                             [False] * len(info), round_dtype, build)
        Us = []
        for (layer, W, b, _, dtype, _, _), Z, sq, s in zip(info, Zs, sqs, sizes):
            sq = sq.to(dtype)
            if isinstance(layer.type, Conv2dType):
                diag = expand_input_diag(sq[:-1], s, W.shape[0], layer.conv["groups"], b is not None, sq[-1] / s)
            else:
                diag = (sq / s).expand(layer.out_dim, -1)
            Us.append(Z.to(dtype).mul_(diag.sqrt()))
        terms: list[tuple[float, torch.Tensor]] = []
        if self.kl_clip is not None:  # one more round: every rank's part of U^T A U and of its input rows
            def quads():
                return [torch.cat([systems.quad_data(U), U.new_full((1,), float(_system_rows(systems)))])
                        for (systems, _), U in zip(built, Us)]

            summed_q = comm.round("kl", [(it[5][0] + 1,) for it in info], round_dtype, quads)
            for (_, _, _, group, dtype, _, _), (systems, y), U, q, s in zip(info, built, Us, summed_q, sizes):
                q = q.to(dtype)
                quad = q[:-1] + systems.damping * rowdot(U, U)
                terms.append((group["lr"], kfrog_step_quadratic(quad, y, group["eps"], q[-1] / s, U,
                                                                 self.kl_damping)))
        directions: dict[int, torch.Tensor] = {}
        for (layer, _, b, _, _, _, _), U in zip(info, Us):
            self._set_directions(directions, U, layer, b)
        return self._trust_region(directions, terms)
