"""FROG: Fisher ROw-wise preconditioninG with batched conjugate gradient (docs/design.md, section FROG).

Per preconditioned layer (nn.Linear, nn.Conv2d) with weight rows W_r (a bias is an extra input column of ones,
folded into the row when `fold_bias=True`), on every step:

    y2[n, r, l] = g[n, r, l]^2 / s           g: per-sample output gradient of the summed loss on s sampled samples
    F_r  = sum_{n, l} y2[n, r, l] x_{n,l} x_{n,l}^T        x_{n,l}: the input patch at output position l (D entries)
    t_r  = tr(F_r) / D,    F^_r = F_r / (t_r + 1e-10) + tau I      (tau: `tau` for Conv2d, `tau_linear` for Linear)
    m   <- mu m + g                                        (momentum before preconditioning; Nesterov: g + mu m)
    z_r  = CG(F^_r, m_r)                                   cg_iters iterations from 0 (or the last z: warm_start)
    U_r  = z_r / sqrt(<z_r, m_r> + 1e-10)                 (every row moves an F^-norm of lr: the public step)
    nu   = min(1, sqrt(kl_clip / sum_layers lr^2 sum_r q_r)),  q_r = (t_r + 1e-10) U_r^T F^_r U_r + lambda |U_r|^2
    W_r <- (1 - lr wd) W_r - nu lr U_r                    (trust region; lambda: kl_damping)

Every other parameter: unpreconditioned="graft" (default) the Adam-like direction g / (sqrt(v^) + 1e-8) times the RMS
per entry of this step's preconditioned updates (K-FAC's graft), or "sgd" (the public code) the gradient times nu;
then coupled weight decay, momentum mu and learning rate lr lr_other_ratio.

q_r is the squared norm of row r's step in its damped Fisher (t_r + 1e-10) F^_r + lambda I = F_r + ((t_r + 1e-10) tau
+ lambda) I, so nu bounds the whole step's predicted KL divergence lr^2 sum q_r by kl_clip as K-FAC's clip does
(kl_clip=None: nu = 1, the public algorithm). tau is relative to the Fisher's scale, lambda is not: as the model
fits, the Fisher shrinks and without lambda the clipped step grows without bound (sqrt(kl_clip / sum t_r)); lambda
caps its Euclidean norm at sqrt(kl_clip / lambda) as K-FAC's absolute damping does. CG from zero keeps z_r^T F^_r z_r
= <z_r, m_r>, so q_r = (t_r + 1e-10) c_r / (c_r + 1e-10) + lambda |z_r|^2 / (c_r + 1e-10) with
c_r = max(<z_r, m_r>, 0) (`normalized_step_quadratic`; with warm_start the identity is approximate).

With a mean-reduced loss the autograd output gradient is dy = g / B, so y2 = dy^2 B^2 / s as in the public code;
the scale cancels in F^_r (trace normalization) except against the 1e-10 guard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F_nn
from torch import nn

import fop_kernels
from fop._base import (
    UNPRECONDITIONED,
    CurvatureOptimizer,
    check_choice,
    check_float,
    check_int,
    check_outer_hyperparameters,
    check_schedule,
    eval_schedule,
    grafted_direction,
    rms_per_entry,
)
from fop._layers import Conv2dType, _rows, support_for
from fop.distributed_rows import lockstep_row_cg, make_rows_comm, rows_view_of
from fop.row_cg import cg_schedule, row_cg, row_cg_requests, rowdot

TRACE_EPS = 1e-10
NORM_EPS = 1e-10
CHANNELS_LAST_MIN_PIXELS = 1024  # CPU: ConvSystems runs its convs channels-last on inputs of at least 32 x 32

__all__ = ["FROG", "FROGBase", "ConvRowSystems", "ConvSystems", "LinearSystems", "cg_schedule", "conv_row_trace",
           "linear_row_trace", "normalized_step_quadratic", "row_cg", "row_cg_requests", "row_normalized_step",
           "trust_region_factor"]


def row_normalized_step(z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """z_r / sqrt(<z_r, m_r> + 1e-10): each row of the step has F^-norm 1 when z_r = F^_r^-1 m_r.

    (CG from zero keeps z_r^T F^_r z_r = z_r^T m_r after any number of iterations, so this holds for inexact
    solves too.) A row with <z_r, m_r> < 0 (impossible in exact arithmetic) is treated as 0."""
    return z * (rowdot(z, m).clamp_min(0.0) + NORM_EPS).rsqrt()[:, None]


def normalized_step_quadratic(z: torch.Tensor, m: torch.Tensor, t: torch.Tensor, kl_damping: float) -> torch.Tensor:
    """sum_r (t_r + 1e-10) c_r / (c_r + 1e-10) + kl_damping |z_r|^2 / (c_r + 1e-10), c_r = max(<z_r, m_r>, 0): the
    squared norm of U = row_normalized_step(z, m) in the metric (t_r + 1e-10) F^_r + kl_damping I, since CG from
    zero keeps z_r^T F^_r z_r = <z_r, m_r> and |U_r|^2 = |z_r|^2 / (c_r + 1e-10) (the first term counts a row
    treated as 0 as 0; the second counts the step that row takes). A 0-d tensor."""
    c = rowdot(z, m).clamp_min(0.0)
    return ((t + TRACE_EPS) * c / (c + NORM_EPS)).sum() + kl_damping * (rowdot(z, z) / (c + NORM_EPS)).sum()


def trust_region_factor(terms: list[tuple[float, torch.Tensor]], kl_clip: float) -> torch.Tensor:
    """nu = min(1, sqrt(kl_clip / sum_l lr_l^2 q_l)) from (lr_l, q_l) per layer, q_l the squared norm of layer l's
    step in its metric: scaled by nu, the step's predicted KL divergence is at most kl_clip (as fop.kfac's clip).
    A 0-d tensor in float64 when any q_l is, else float32 (no host sync)."""
    dtype = torch.float64 if any(q.dtype == torch.float64 for _, q in terms) else torch.float32
    total = torch.stack([q.to(dtype) * (lr * lr) for lr, q in terms]).sum()
    return torch.sqrt(kl_clip / total.clamp_min(1e-30)).clamp(max=1.0)


def conv_row_trace(x_s: torch.Tensor, y2: torch.Tensor, weight_shape, stride, padding, dilation, groups: int,
                   bias: bool) -> torch.Tensor:
    """t_r = tr(F_r) / D = sum_{n,l} y2[n, r, l] (|x_{n,l}|^2 [+ 1 with a bias]) / D without im2col.

    |x_{n,l}|^2 (the squared norm of a patch, over the channels of row r's group) is a box-sum conv of the
    per-pixel channel sum of squares. x_s: s x C x H x W, y2: s x R x Ho x Wo."""
    s, C, H, W = x_s.shape
    R, c_g, kh, kw = weight_shape
    sq = x_s.square().reshape(s, groups, C // groups, H, W).sum(2)
    box = sq.new_ones(groups, 1, kh, kw)
    patch_sq = F_nn.conv2d(sq, box, None, stride, padding, dilation, groups)  # s x groups x Ho x Wo
    if bias:
        patch_sq = patch_sq + 1.0
    L = patch_sq.shape[2] * patch_sq.shape[3]
    weighted = y2.reshape(s, groups, R // groups, L) * patch_sq.reshape(s, groups, 1, L)
    return weighted.sum((0, 3)).reshape(R) / (c_g * kh * kw + int(bias))


class ConvSystems:
    """Row systems of a Conv2d layer on s sampled whole samples, applied as convolutions (no im2col).

    Row r (output channel) with D = C_in/groups kh kw (+1): A_r = sum_{n,l} w[n,r,l] x_{n,l} x_{n,l}^T + damping I,
    w a tensor broadcastable to the conv output (s x R x Ho x Wo) or a number.
    matvec(P) = conv_weight_grad(x_s, conv(x_s, P) * w) + damping P, quad(P) = sum w conv(x_s, P)^2 + damping |P|^2
    (the bias part of P is the conv's bias; its gradient the sum of the weighted output). `matvec_data` and
    `quad_data` are the sample sums alone, which add up over ranks that hold disjoint samples."""

    def __init__(self, x_s: torch.Tensor, weights, weight_shape, stride, padding, dilation, groups: int, bias: bool,
                 damping: float):
        if x_s.device.type == "cpu" and x_s.dim() == 4 and x_s.shape[2] * x_s.shape[3] >= CHANNELS_LAST_MIN_PIXELS:
            x_s = x_s.contiguous(memory_format=torch.channels_last)  # oneDNN: faster convs on large images
            if isinstance(weights, torch.Tensor) and weights.dim() == 4:
                weights = weights.contiguous(memory_format=torch.channels_last)
        self.x_s, self.weights, self.damping, self.bias = x_s, weights, damping, bias
        self.weight_shape = tuple(weight_shape)
        self.geometry = (tuple(stride), tuple(padding), tuple(dilation), int(groups))
        self.d_weight = self.weight_shape[1] * self.weight_shape[2] * self.weight_shape[3]

    def _split(self, P: torch.Tensor):
        w = P[:, : self.d_weight].reshape(self.weight_shape)
        return w, (P[:, -1] if self.bias else None)

    def _conv(self, P: torch.Tensor) -> torch.Tensor:
        w, b = self._split(P)
        stride, padding, dilation, groups = self.geometry
        return F_nn.conv2d(self.x_s, w, b, stride, padding, dilation, groups)

    def matvec_data(self, P: torch.Tensor) -> torch.Tensor:
        """sum_{n,l} w x x^T p_r for every row (R x D), without the damping."""
        Z = self._conv(P).mul_(self.weights)
        stride, padding, dilation, groups = self.geometry
        w, _ = self._split(P)
        _, gw, gb = torch.ops.aten.convolution_backward(
            Z, self.x_s, w, [P.shape[0]] if self.bias else None, stride, padding, dilation, False, [0, 0], groups,
            [False, True, self.bias])
        out = gw.reshape(P.shape[0], -1)
        if self.bias:
            out = torch.cat([out, gb[:, None]], dim=1)
        return out

    def quad_data(self, P: torch.Tensor) -> torch.Tensor:
        """sum_{n,l} w (p_r^T x)^2 for every row (R), without the damping."""
        Z = self._conv(P)
        return (Z.square_() * self.weights).sum((0, 2, 3))

    def matvec(self, P: torch.Tensor) -> torch.Tensor:
        return self.matvec_data(P).add_(P, alpha=self.damping)

    def quad(self, P: torch.Tensor) -> torch.Tensor:
        return self.quad_data(P) + self.damping * rowdot(P, P)


class ConvRowSystems(ConvSystems):
    """FROG's row systems of a Conv2d layer: F^_r = F_r / (tr F_r / D + 1e-10) + tau I with
    F_r = sum_{n,l} y2[n,r,l] x_{n,l} x_{n,l}^T, i.e. ConvSystems with w = y2^ = y2 / (t_r + 1e-10).
    `trace`: t_r when already known (summed over ranks); by default `conv_row_trace` of these samples."""

    def __init__(self, x_s: torch.Tensor, y2: torch.Tensor, weight_shape, stride, padding, dilation, groups: int,
                 bias: bool, tau: float, trace: torch.Tensor | None = None):
        R = weight_shape[0]
        if trace is None:
            trace = conv_row_trace(x_s, y2, weight_shape, stride, padding, dilation, groups, bias)
        self.trace = trace
        self.y2_hat = y2 / (self.trace + TRACE_EPS).reshape(1, R, 1, 1)
        super().__init__(x_s, self.y2_hat, weight_shape, stride, padding, dilation, groups, bias, tau)


def linear_row_trace(X: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
    """t_r = tr(F_r) / D = sum_n y2[n, r] |x_n|^2 / D for the input rows X (rows x D, bias column included)."""
    return (y2 * X.square().sum(1)[:, None]).sum(0) / X.shape[1]


class LinearSystems:
    """Row systems of a Linear layer in torch: A_r = sum_n w[n, r] x_n x_n^T + damping I over the input rows X
    (rows x D, a bias column included), w rows x R or a number. The same interface as ConvSystems; single-process
    FROG solves Linear rows with fop_kernels.batched_cg instead, this serves the distributed path."""

    def __init__(self, X: torch.Tensor, weights, damping: float):
        self.X, self.weights, self.damping = X, weights, damping

    def matvec_data(self, P: torch.Tensor) -> torch.Tensor:
        return ((self.X @ P.T) * self.weights).T @ self.X

    def quad_data(self, P: torch.Tensor) -> torch.Tensor:
        return ((self.X @ P.T).square_() * self.weights).sum(0)

    def matvec(self, P: torch.Tensor) -> torch.Tensor:
        return self.matvec_data(P).add_(P, alpha=self.damping)

    def quad(self, P: torch.Tensor) -> torch.Tensor:
        return self.quad_data(P) + self.damping * rowdot(P, P)


def _covering(conv: dict) -> tuple[int, int]:
    """An input height and width on which the conv `conv` (layer geometry) has an output."""
    return tuple(d * (k - 1) + 1 for d, k in zip(conv["dilation"], conv["kernel_size"]))


def check_nesterov(nesterov, momentum) -> None:
    """nesterov is a bool, and True only with momentum > 0."""
    if not isinstance(nesterov, bool):
        raise ValueError(f"nesterov must be a bool, got {nesterov!r}")
    if nesterov and momentum <= 0:
        raise ValueError("nesterov=True requires momentum > 0")


frog_layer_support = support_for("frog")
frog_layer_support.__doc__ = ("FROG preconditions nn.Linear, transformers' Conv1D and nn.Conv2d (any groups, stride, "
                              "padding, dilation; zero padding mode), subclasses included (fop._layers); None when "
                              "supported.")


class FROGBase(CurvatureOptimizer):
    """What FROG and K-FROG share: the optimizer's own sample generator (its state in `state_dict`), momentum applied
    to the gradient before preconditioning, the trust region (`_trust_region`) and the outer update: decoupled
    `W <- (1 - lr wd) W - nu lr U` on the preconditioned parameters, the grafted step or SGD (`unpreconditioned`;
    coupled weight decay, momentum, lr lr_other_ratio) on the others. Subclasses set `self.sample_size` and
    `self.kl_clip` and implement `_curvature_step`."""

    sample_size: int | None = None
    kl_clip: float | None = None
    _step_scale: torch.Tensor | None = None  # this step's nu (None: 1), set by _trust_region

    def __init__(self, params_or_model, defaults: dict, *, seed: int | None, distributed=None,
                 unpreconditioned: str = "graft", **kwargs):
        self.unpreconditioned = check_choice("unpreconditioned", unpreconditioned, UNPRECONDITIONED)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.generator = torch.Generator().manual_seed(check_int("seed", seed, low=0))
        super().__init__(params_or_model, defaults, **kwargs)
        model = params_or_model if isinstance(params_or_model, nn.Module) else kwargs.get("model")
        self.comm = make_rows_comm(rows_view_of(self), model, distributed)
        if self.comm.active:  # every rank draws the same global samples: rank 0's generator state
            state = self.generator.get_state()
            dist.broadcast(state, src=dist.get_global_rank(self.comm.group, 0), group=self.comm.group)
            self.generator.set_state(state)

    def _preconditioned_ids(self) -> set[int]:
        """The weights, and the biases when they are folded into the rows (fold_bias)."""
        return {id(p) for layer in self.layers for p in (layer.params if self.fold_bias else [layer.weight])}

    def _records(self, i: int) -> list:
        """Layer i's records of this step that are shaped like its first one (the ones whose samples are used)."""
        recs = self.capture.done(i)
        return [r for r in recs if r.a.shape[1:] == recs[0].a.shape[1:]] if recs else []

    def _local_sample_counts(self) -> list[int]:
        """Per layer, the samples this rank captured this step (the distributed agreement sums them)."""
        return [sum(r.n for r in self._records(i)) for i in range(len(self.layers))]

    def _distributed_jobs(self) -> list[tuple[int, torch.Tensor | None]]:
        """(layer index, global sample draw) of every layer preconditioned this step across ranks, in layer order:
        one draw of s indices out of the global batch N = sum_r n_r (None: all N) per layer, the same on every
        rank."""
        jobs = []
        for i, layer in enumerate(self.layers):
            N = sum(self.comm.counts[i])
            if layer.weight.grad is None or N == 0:
                continue
            jobs.append((i, self._sample_rows(N, torch.device("cpu"))))
        return jobs

    def _sample_rows(self, n: int, device: torch.device) -> torch.Tensor | None:
        """s sample indices out of n, drawn afresh (None: keep the whole batch)."""
        if self.sample_size is None or self.sample_size >= n:
            return None
        return torch.randperm(n, generator=self.generator)[: self.sample_size].to(device)

    def _momentum(self, p: torch.Tensor, grad: torch.Tensor, mu: float, nesterov: bool,
                  inplace: bool = True) -> torch.Tensor:
        """m <- mu m + g (m = g on the first step); returns m, or g + mu m with Nesterov. `inplace=False`: the new
        m is a new tensor (before the step commits, see CurvatureOptimizer.step)."""
        if mu == 0:
            return grad
        state = self.state[p]
        buf = state.get("momentum_buffer")
        if buf is None:
            state["momentum_buffer"] = buf = grad.detach().clone()
        elif inplace:
            buf.mul_(mu).add_(grad)
        else:
            state["momentum_buffer"] = buf = buf.mul(mu).add_(grad)
        return grad.add(buf, alpha=mu) if nesterov else buf

    def _momentum_rows(self, layer, b: torch.Tensor | None, group: dict, dtype: torch.dtype) -> torch.Tensor:
        """[m_W | m_b] of `layer` as an R x D matrix in `dtype`, one row per output (the layer type's gradient layout:
        a Conv1D's in x out weight is transposed; m_W alone when b is None; a bias without gradient counts 0); the
        new momentum buffers are new tensors, so a step that fails later restores the old ones."""
        mu, nesterov, W = group["momentum"], group["nesterov"], layer.weight
        m = layer.type.weight_matrix(layer, self._momentum(W, W.grad, mu, nesterov, inplace=False)).to(dtype)
        if b is None:
            return m
        gb = b.grad if b.grad is not None else torch.zeros_like(b)
        return torch.cat([m, self._momentum(b, gb, mu, nesterov, inplace=False).to(dtype)[:, None]], dim=1)

    @staticmethod
    def _set_directions(directions: dict, U: torch.Tensor, layer, b: torch.Tensor | None) -> None:
        """Split the R x D direction rows U back into the shape of `layer`'s weight (and the bias column when b is
        given)."""
        d_w = layer.type.weight_columns(layer)
        directions[id(layer.weight)] = layer.type.weight_from_matrix(layer, U[:, :d_w])
        if b is not None:
            directions[id(b)] = U[:, d_w]

    def _trust_region(self, directions: dict[int, torch.Tensor],
                      terms: list[tuple[float, torch.Tensor]]) -> dict[int, torch.Tensor]:
        """The directions times nu = trust_region_factor(terms, kl_clip) (terms: (lr, q) per preconditioned layer);
        nu is kept for the other parameters' path of this step. Unchanged, nu = 1, with kl_clip=None or no
        preconditioned layer."""
        self._step_scale = None
        if self.kl_clip is None or not terms:
            return directions
        nu = trust_region_factor(terms, self.kl_clip)
        self._step_scale = nu
        return {k: d * nu.to(d.dtype) for k, d in directions.items()}

    def _outer_update(self, directions: dict[int, torch.Tensor]) -> None:
        """Preconditioned: W <- (1 - lr wd) W - lr U (U already scaled by nu). Others, with coupled wd, momentum and
        learning rate lr lr_other_ratio: unpreconditioned="graft" the Adam-like direction g / (sqrt(v^) + 1e-8)
        times `rms_per_entry` of the preconditioned directions (their scale, nu included), as K-FAC grafts;
        "sgd" the gradient times nu (the momentum buffer itself is not scaled)."""
        nu = self._step_scale
        # the RMS per entry of the preconditioned directions (nu included); None: "sgd", or nothing preconditioned
        scale = rms_per_entry(list(directions.values())) if self.unpreconditioned == "graft" and directions else None
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = directions.get(id(p))
                if d is not None:
                    if wd != 0:
                        p.mul_(1 - lr * wd)
                    p.add_(d.to(p.dtype), alpha=-lr)
                    continue
                if scale is not None:
                    g = grafted_direction(self.state[p], p.grad, scale)
                    g = g if wd == 0 else g.add_(p, alpha=wd)
                    p.add_(self._momentum(p, g, mu, group["nesterov"]), alpha=-lr * group["lr_other_ratio"])
                    continue
                g = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                step = self._momentum(p, g, mu, group["nesterov"])
                p.add_(step if nu is None else step * nu.to(step.dtype), alpha=-lr * group["lr_other_ratio"])

    # -- extra state -----------------------------------------------------------------------------------------------
    def _extra_state(self) -> dict:
        extra = super()._extra_state()
        extra["generator"] = self.generator.get_state()
        return extra

    def _load_extra_state(self, extra: dict) -> dict:
        new = super()._load_extra_state(extra)
        generator = torch.Generator()
        try:
            generator.set_state(extra["generator"])
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"state_dict generator is not a CPU generator state: {err}") from err
        new["generator"] = generator
        return new


class FROG(FROGBase):
    r"""FROG: row-wise Fisher preconditioning solved by batched conjugate gradient (see the module docstring).

    Args:
        params_or_model: the model, or parameters / param groups with `model=` given (hooks go on its layers).
        lr: learning rate of the preconditioned layers; each row moves an F^-norm of `lr`, inside the trust region
            (0.1, ours, as K-FROG's; the public default 1e-3 hardly moves: docs/frog_adafisher.md; its CIFAR-10 runs
            use 0.01).
        momentum, nesterov: heavy-ball momentum applied to the gradient before preconditioning (0, False).
        weight_decay: decoupled `W <- (1 - lr wd) W` on preconditioned layers, coupled `g + wd p` elsewhere.
        sample_size: s, whole samples drawn afresh per layer and step for the Fisher (24; None: the whole batch).
        cg_iters: CG iterations from zero (4, no convergence test).
        tau: damping of the Conv2d rows relative to their mean Fisher diagonal (1e-2; the public code's 1e-6 lets a
            unit-F^-norm step grow ~1/sqrt(tau) in the directions the s samples do not span: one step multiplied the
            digits CNN's second conv rows by 6 at lr 0.1, docs/frog_adafisher.md), a float or a callable of the step
            count.
        tau_linear: the same for Linear rows (0.3). Beyond the public code (Conv2d only): a Linear row Fisher from
            s samples has rank <= s, usually below D, and with tau 1e-6 the unit-F^-norm step is huge in the
            directions no sample saw; 0.3 trained the digits CNN best (docs/frog_adafisher.md).
        lr_other_ratio: the other parameters (norm layers, embeddings, excluded modules, and the biases when
            `fold_bias=False`) take the `unpreconditioned` step with learning rate `lr * lr_other_ratio` (0.25).
        unpreconditioned: "graft" (default): the other parameters take an Adam-like diagonal direction scaled to
            the RMS per entry of this step's preconditioned updates, as K-FAC grafts (docs/frog_adafisher.md has
            the measurement); "sgd": the gradient times the trust region's nu (the public code).
        exclude: modules or module names left to the other parameters' path (`unpreconditioned`).
        fold_bias: solve a layer's bias together with its weight rows as an input column of ones (True); False
            sends biases to the other parameters' path as the public code does.
        warm_start: start CG from the previous step's solution (one extra matvec per step) instead of zero.
        kl_clip: the trust region (module docstring): the step is scaled so that its predicted KL divergence in the
            damped row Fishers is at most kl_clip (1e-3, as K-FAC's; None: the public step, every row moving lr).
            With kl_clip=None and tau=1e-6 FROG is the public algorithm.
        kl_damping: lambda, an absolute damping of the trust region's metric (1e-3, K-FAC's damping): it bounds
            the step's Euclidean norm by sqrt(kl_clip / kl_damping) when the Fisher vanishes (a fitted model), where
            the relative tau cannot. 0: the metric of the damped row Fishers alone. Unused with kl_clip=None.
        seed: seed of the sample draws (default: drawn from torch's global generator at construction); the
            generator's state is part of `state_dict`.
        loss_reduction, check_finite, grad_scaler: see CurvatureOptimizer.
        distributed: None (synchronize across ranks when a process group of more than one rank is initialized),
            False, True or a fop.distributed.DistributedOptions: see fop.distributed_rows. Across ranks the s
            samples are drawn out of the global batch (rank 0's generator), per layer in layer order, in step().
    """

    layer_support = staticmethod(frog_layer_support)
    layer_state_keys = ("cg_solution",)  # the last CG solution of each layer's row systems (warm_start)
    group_checks = {**CurvatureOptimizer.group_checks, "lr_other_ratio": dict(low=0.0)}

    def _layer_state_shape(self, i, key):
        layer = self.layers[i]
        return (layer.out_dim, layer.type.weight_columns(layer) + int(self.fold_bias and layer.bias is not None))

    def __init__(self, params_or_model, lr: float = 0.1, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, sample_size: int | None = 24, cg_iters: int = 4, tau=1e-2,
                 lr_other_ratio: float = 0.25, exclude=(), *, tau_linear=0.3, fold_bias: bool = True,
                 warm_start: bool = False, kl_clip: float | None = 1e-3, kl_damping: float = 1e-3,
                 unpreconditioned: str = "graft", seed: int | None = None, model: nn.Module | None = None,
                 loss_reduction: str = "mean", check_finite: bool = True, grad_scaler=None, distributed=None):
        check_outer_hyperparameters(lr, momentum, weight_decay)
        check_nesterov(nesterov, momentum)
        self.sample_size = None if sample_size is None else check_int("sample_size", sample_size)
        self.kl_clip = None if kl_clip is None else check_float("kl_clip", kl_clip, low=0.0, low_open=True)
        self.kl_damping = check_float("kl_damping", kl_damping, low=0.0)
        check_int("cg_iters", cg_iters)
        check_schedule("tau", tau)
        check_schedule("tau_linear", tau_linear)
        check_float("lr_other_ratio", lr_other_ratio, low=0.0)
        self.fold_bias = bool(fold_bias)
        self.warm_start = bool(warm_start)
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, cg_iters=cg_iters,
                        tau=tau, tau_linear=tau_linear, lr_other_ratio=lr_other_ratio)
        super().__init__(params_or_model, defaults, seed=seed, model=model, exclude=exclude or None,
                         loss_reduction=loss_reduction, check_finite=check_finite, grad_scaler=grad_scaler,
                         distributed=distributed, unpreconditioned=unpreconditioned)
        self._arm()

    def _arm(self) -> None:
        if self.layers:  # across ranks the samples are drawn in step(), out of the global batch
            self.capture.arm(full=True, rows=None if self.comm.active else self._sample_rows)

    def _validate_before_step(self) -> None:
        for group in self.param_groups:
            eval_schedule("tau", group["tau"], self.steps)
            eval_schedule("tau_linear", group["tau_linear"], self.steps)

    # -- the step --------------------------------------------------------------------------------------------------
    def _layer_samples(self, i: int, inv_scale: torch.Tensor | None, dtype: torch.dtype):
        """(x_s, y2) of layer i from this step's records: y2 = g^2 / s with g the per-sample output gradient."""
        recs = self.capture.done(i)
        if not recs:
            return None
        recs = [r for r in recs if r.a.shape[1:] == recs[0].a.shape[1:]]
        x_s = torch.cat([r.a for r in recs]).to(dtype)
        dy = torch.cat([r.dy for r in recs]).to(dtype)
        n_total = sum(r.n for r in recs)
        coef = float(n_total) if self.capture.loss_reduction == "mean" else 1.0
        y2 = dy.square_().mul_(coef * coef / dy.shape[0])
        if inv_scale is not None:
            y2.mul_(inv_scale.to(device=y2.device, dtype=dtype).square())
        return x_s, y2

    def _curvature_step(self, inv_scale: torch.Tensor | None) -> dict[int, torch.Tensor]:
        """Momentum, batched CG and the row-normalized direction of every preconditioned layer."""
        if self.comm.active:
            return self._curvature_step_distributed(inv_scale)
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        directions: dict[int, torch.Tensor] = {}
        terms: list[tuple[float, torch.Tensor]] = []
        for i, layer in enumerate(self.layers):
            W, b = layer.weight, layer.bias if self.fold_bias else None
            if W.grad is None:
                continue
            group = group_of[id(W)]
            dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
            samples = self._layer_samples(i, inv_scale, dtype)
            if samples is None:  # no forward with grad this step: the layer takes the other parameters' path
                continue
            x_s, y2 = samples
            m = self._momentum_rows(layer, b, group, dtype)
            key = "tau" if isinstance(layer.type, Conv2dType) else "tau_linear"
            tau = eval_schedule(key, group[key], self.steps)
            state = self.layer_state[i]
            x0 = state.get("cg_solution") if self.warm_start else None
            z, t = self._solve(layer, x_s, y2, m, tau, group["cg_iters"], b is not None, x0)
            if self.warm_start:
                state["cg_solution"] = z.clone()
            if self.kl_clip is not None:
                terms.append((group["lr"], normalized_step_quadratic(z, m, t, self.kl_damping)))
            self._set_directions(directions, row_normalized_step(z, m), layer, b)
        return self._trust_region(directions, terms)

    @staticmethod
    def _solve(layer, x_s, y2, m, tau, iters, bias, x0):
        """(z = CG(F^, m), the traces t) for the rows of one layer: convs for Conv2d, fop_kernels.batched_cg for
        Linear."""
        if isinstance(layer.type, Conv2dType):
            c = layer.conv
            rows = ConvRowSystems(x_s, y2, layer.weight.shape, c["stride"], c["padding"], c["dilation"],
                                  c["groups"], bias, tau)
            return row_cg(rows.matvec, rows.quad, m, iters, x0), rows.trace
        X = x_s.reshape(-1, x_s.shape[-1])
        if bias:
            X = torch.cat([X, X.new_ones(X.shape[0], 1)], dim=1)
        y2 = y2.reshape(-1, y2.shape[-1])
        z, _ = fop_kernels.batched_cg(X, y2 * X.shape[0], m, tau, iters=iters, x0=x0)  # it divides F_r by the rows
        return z, linear_row_trace(X, y2)

    def _curvature_step_distributed(self, inv_scale: torch.Tensor | None) -> dict[int, torch.Tensor]:
        """The same across ranks (fop.distributed_rows): each rank's sampled samples' parts of the traces and of
        every CG matvec, summed over ranks in one round per CG iteration, all layers in lockstep."""
        comm = self.comm
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        jobs = self._distributed_jobs()
        if not jobs:
            return {}
        info = []  # per job: layer, W, b, group, dtype, shape (R, D)
        for i, _ in jobs:
            layer = self.layers[i]
            W, b = layer.weight, layer.bias if self.fold_bias else None
            dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
            info.append((layer, W, b, group_of[id(W)], dtype,
                         (layer.out_dim, layer.type.weight_columns(layer) + int(b is not None))))
        round_dtype = torch.float64 if any(it[4] == torch.float64 for it in info) else torch.float32
        local: list = []

        def traces():
            out = []
            for (i, draw), (layer, W, b, _, dtype, (R, _)) in zip(jobs, info):
                recs = self._records(i)
                idx = comm.local_indices(draw, i)
                s = len(draw) if draw is not None else sum(comm.counts[i])
                if recs:
                    x = torch.cat([r.a for r in recs])
                    dy = torch.cat([r.dy for r in recs])
                    idx = idx.to(x.device)
                    x_s, dy_s = x.index_select(0, idx).to(dtype), dy.index_select(0, idx).to(dtype)
                else:  # this rank ran no forward of the layer: it holds none of the samples
                    x_s = W.new_zeros((0,), dtype=dtype)
                    dy_s = W.new_zeros((0,), dtype=dtype)
                n_local = comm.counts[i][comm.rank]
                coef = float(n_local) if self.capture.loss_reduction == "mean" else 1.0
                y2 = dy_s.square_().mul_(coef * coef / s)
                if inv_scale is not None:
                    y2.mul_(inv_scale.to(device=y2.device, dtype=dtype).square())
                if isinstance(layer.type, Conv2dType):
                    c = layer.conv
                    if not recs:  # no samples, shaped so that the convs run (on nothing)
                        x_s = W.new_zeros((0, c["groups"] * W.shape[1], *_covering(c)), dtype=dtype)
                        y2 = W.new_zeros((0, R, 1, 1), dtype=dtype)
                    t = conv_row_trace(x_s, y2, W.shape, c["stride"], c["padding"], c["dilation"], c["groups"],
                                       b is not None) if recs else W.new_zeros(R, dtype=dtype)
                    local.append((x_s, y2))
                else:
                    X = _rows(x_s.reshape(-1, layer.type.weight_columns(layer)), b is not None)
                    y2 = y2.reshape(-1, R)
                    t = linear_row_trace(X, y2)
                    local.append((X, y2))
                out.append(t)
            return out

        summed = comm.round("trace", [(it[5][0],) for it in info], round_dtype, traces)

        def build():
            items = []
            for (i, _), (layer, W, b, group, dtype, _), (data, y2), t in zip(jobs, info, local, summed):
                key = "tau" if isinstance(layer.type, Conv2dType) else "tau_linear"
                tau = eval_schedule(key, group[key], self.steps)
                t = t.to(dtype)
                if isinstance(layer.type, Conv2dType):
                    c = layer.conv
                    systems = ConvRowSystems(data, y2, W.shape, c["stride"], c["padding"], c["dilation"],
                                             c["groups"], b is not None, tau, trace=t)
                else:
                    systems = LinearSystems(data, y2 / (t + TRACE_EPS), tau)
                m = self._momentum_rows(layer, b, group, dtype)
                items.append((systems, m, self.layer_state[i].get("cg_solution") if self.warm_start else None))
                ms.append(m)
            return items

        ms: list = []
        warm = [self.warm_start and "cg_solution" in self.layer_state[i] for i, _ in jobs]
        zs = lockstep_row_cg(comm, [it[5] for it in info], [it[3]["cg_iters"] for it in info], warm, round_dtype,
                             build)
        directions: dict[int, torch.Tensor] = {}
        terms: list[tuple[float, torch.Tensor]] = []
        for (i, _), (layer, _, b, group, dtype, _), z, m, t in zip(jobs, info, zs, ms, summed):
            z = z.to(dtype)
            if self.warm_start:
                self.layer_state[i]["cg_solution"] = z.clone()
            if self.kl_clip is not None:
                terms.append((group["lr"], normalized_step_quadratic(z, m, t.to(dtype), self.kl_damping)))
            self._set_directions(directions, row_normalized_step(z, m), layer, b)
        return self._trust_region(directions, terms)
