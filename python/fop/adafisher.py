"""AdaFisher and AdaFisherW: a diagonal block-Kronecker Fisher in an Adam-like update (docs/design.md, AdaFisher).

Per supported module two diagonals, refreshed from the batch every `factor_interval` steps (from step 0):

    Linear, Conv2d (any groups) and the other Kronecker layer types (fop._layers): H_i = mean over rows of h_i^2
        (rows: samples x positions; conv h: the im2col patch entries, summed as a window over the input without
        im2col; embeddings: the one-hot or bag-count rows; a bias adds an entry of 1), S_j = mean of s_j^2 (s:
        gradient of the layer output). A grouped conv row j uses the H entries of its group's input channels.
    BatchNorm2d, LayerNorm (EFIM, paper Proposition 3.1): with u_c = sum over the reduced dims of h / T^2
        (T: positions per sample), H = [sum_c u_c^2, C] / N^2 (one entry for the scale, one for the shift) and
        S_c = (sum over the reduced dims of s_c)^2 / N.

Each fresh diagonal is min-max normalized over the layer (+inf -> 1, -inf -> 0; (x - min) / (max - min + 1e-6))
and folded into its running value (initially ones):

    ema="public":  cur <- 0.1 gamma cur + 0.01 gamma new      (the public code's constants)
    ema="average": cur <- gamma cur + (1 - gamma) new          (a proper exponential average)

The update, with F~[j, i] = S_j H_i + damping for a supported parameter (computed on the fly, never stored):

    AdaFisher:  g <- g + wd theta;  m <- beta m + (1 - beta) g;  theta <- theta - nu lr / (1 - beta^t) m / F~
    AdaFisherW: m <- beta m + (1 - beta) g;  theta <- (1 - lr wd) theta - nu lr / (1 - beta^t) m / F~

with the trust region nu = min(1, sqrt(kl_clip / sum lr_t^2 <m, m / F~>)), lr_t = lr / (1 - beta^t) (kl_clip=1e-3
by default: an SGD-scale lr, 10-1000x AdaFisher's own, trains; None: nu = 1, the public algorithm). A parameter no
layer preconditions takes, by default (unpreconditioned="graft"), m / (sqrt(v^) + 1e-8) s in place of m / F~: Adam's
direction at s, the RMS of m / F~ over the step's preconditioned entries (docs/frog_adafisher.md); the public code's
F~ = 1 (a step 1 / damping, about 1000x, shorter than a preconditioned entry's) is unpreconditioned="sgd".

With ema="public" a running diagonal after k refreshes is at most 0.08^k + 0.0087 (fixed point 0.008 / 0.92 of a
[0, 1] value), so from the third refresh on S_j H_i <= 8.5e-5 and F~ stays within 8.5% of `damping` (1e-3): see
`fisher_range()` and docs/frog_adafisher.md for the measured figures.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fop._base import UNPRECONDITIONED, CurvatureOptimizer, check_choice, check_float, check_int, graft_denominator
from fop._layers import NormType, support_for
from fop.distributed_rows import make_rows_comm, rows_view_of

EMA_MODES = ("public", "average")
MINMAX_EPS = 1e-6

__all__ = ["AdaFisher", "AdaFisherW", "adafisher_layer_support", "input_diagonal", "min_max_normalize",
           "output_diagonal", "running_update_"]


adafisher_layer_support = support_for("adafisher")
adafisher_layer_support.__doc__ = ("Linear (and transformers' Conv1D), Conv2d and Conv1d (any groups, zero padding "
                                   "mode), affine BatchNorm2d and LayerNorm, subclasses included (fop._layers); None "
                                   "when supported.")


# -- the diagonals ---------------------------------------------------------------------------------------------------
def _dtype_of(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def input_diagonal(layer, h: torch.Tensor) -> torch.Tensor:
    """The fresh H of one layer from its input h (float32; float64 for float64 inputs), see the module docstring."""
    dtype = _dtype_of(h)
    if not isinstance(layer.type, NormType):
        return layer.type.input_diagonal(layer, h, dtype)
    u, N, T = layer.type.reduced(h.to(dtype), layer.weight.numel())
    return _norm_input_diagonal(u.reshape(-1) / (T * T), N)


def _norm_input_diagonal(u: torch.Tensor, N: int) -> torch.Tensor:
    """H = [sum_c u_c^2, C] / N^2 of a norm layer from u (its input summed over the reduced dims / T^2)."""
    return torch.stack([u.square().sum(), torch.tensor(float(u.numel()), dtype=u.dtype, device=u.device)]) / (N * N)


def output_diagonal(layer, s: torch.Tensor) -> torch.Tensor:
    """The fresh S of one layer from its output gradient s, see the module docstring."""
    dtype = _dtype_of(s)
    if not isinstance(layer.type, NormType):
        return layer.type.output_diagonal(layer, s, dtype)
    u, N, _ = layer.type.reduced(s.to(dtype), layer.weight.numel())
    return u.reshape(-1).square() / N


def additive_sizes(layer) -> tuple[int, int]:
    """The lengths of a layer's two `additive_diagonals` (H and S; for a norm layer the sums u, one per feature)."""
    return layer.type.diagonal_sizes(layer)


def additive_diagonals(layer, recs, N: int, rank_n: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's additive parts of the fresh (H, S) of a layer whose global batch has N samples, rank_n of them
    here, so that their sums over ranks give one process's diagonals on the global batch (a mean-reduced loss:
    the rank's dy is N / rank_n times the global batch's). Linear and Conv2d: H_r n_r / N and S_r (n_r / N)^3 (H_r,
    S_r this rank's means); norm layers: the sums u before they are squared (input / T^2, and dy n_r / N)."""
    sizes = additive_sizes(layer)
    if not recs:
        return torch.zeros(sizes[0], dtype=dtype), torch.zeros(sizes[1], dtype=dtype)
    if not isinstance(layer.type, NormType):
        H = sum(input_diagonal(layer, r.a) * (r.n / rank_n) for r in recs)
        S = sum(output_diagonal(layer, r.dy) * (r.n / rank_n) for r in recs)
        return H * (rank_n / N), S * (rank_n / N) ** 3
    features = layer.weight.numel()
    u_in = u_out = 0
    for r in recs:
        u, _, T = layer.type.reduced(r.a.to(dtype), features)
        u_in = u_in + u.reshape(-1) / (T * T)
        u_out = u_out + layer.type.reduced(r.dy.to(dtype), features)[0].reshape(-1) * (rank_n / N)
    return u_in, u_out


def running_diagonal_shapes(layer) -> tuple[tuple[int], tuple[int]]:
    """The shapes of a layer's running (H, S): its factor diagonals, or for a norm layer H's two entries (the sum of
    squares and the feature count) and S one entry per feature."""
    h, s = additive_sizes(layer)
    return ((2,) if isinstance(layer.type, NormType) else (h,)), (s,)


def finish_diagonals(layer, H: torch.Tensor, S: torch.Tensor, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, S) from the sums over ranks of `additive_diagonals`."""
    if not isinstance(layer.type, NormType):
        return H, S
    return _norm_input_diagonal(H, N), S.square() / N


def min_max_normalize(t: torch.Tensor) -> torch.Tensor:
    """(t - min t) / (max t - min t + 1e-6) after +inf -> 1 and -inf -> 0 (NaN stays NaN)."""
    t = torch.nan_to_num(t, nan=float("nan"), posinf=1.0, neginf=0.0)
    lo, hi = t.min(), t.max()
    return (t - lo) / (hi - lo + MINMAX_EPS)


def running_update_(current: torch.Tensor, new: torch.Tensor, gamma: float, ema: str) -> torch.Tensor:
    """current <- 0.1 gamma current + 0.01 gamma new ("public") or gamma current + (1 - gamma) new ("average")."""
    if ema == "public":
        return current.mul_(0.1 * gamma).add_(new, alpha=0.01 * gamma)
    return current.mul_(gamma).add_(new, alpha=1.0 - gamma)


def _fisher_tilde(layer, which: str, H: torch.Tensor, S: torch.Tensor, damping: float, dtype) -> torch.Tensor:
    """F~ shaped like the parameter `which` of `layer`: S_j H_i + damping (a temporary of the step)."""
    return layer.type.diagonal_fisher(layer, which, H, S, damping, dtype)


class _AdaFisherBase(CurvatureOptimizer):
    """Shared by AdaFisher (coupled weight decay) and AdaFisherW (decoupled); see the module docstring."""

    layer_state_keys = ("fisher_H", "fisher_S")
    layer_support = staticmethod(adafisher_layer_support)
    decoupled_weight_decay = False
    group_checks = {"lr": dict(low=0.0), "beta": dict(low=0.0, high=1.0, high_open=True),
                    "damping": dict(low=0.0, low_open=True), "weight_decay": dict(low=0.0)}

    def __init__(self, params_or_model, lr: float = 1e-3, beta: float = 0.9, damping: float = 1e-3,
                 gamma: float = 0.8, factor_interval: int = 100, weight_decay: float = 0.0, *, ema: str = "public",
                 kl_clip: float | None = 1e-3, unpreconditioned: str = "graft", exclude=None,
                 model: nn.Module | None = None, check_finite: bool = True, grad_scaler=None, distributed=None):
        check_float("lr", lr, low=0.0)
        check_float("beta", beta, low=0.0, high=1.0, high_open=True)
        check_float("damping", damping, low=0.0, low_open=True)
        self.gamma = check_float("gamma", gamma, low=0.0, high=1.0, high_open=True)
        self.factor_interval = check_int("factor_interval", factor_interval)
        check_float("weight_decay", weight_decay, low=0.0)
        self.ema = check_choice("ema", ema, EMA_MODES)
        self.kl_clip = None if kl_clip is None else check_float("kl_clip", kl_clip, low=0.0, low_open=True)
        self.unpreconditioned = check_choice("unpreconditioned", unpreconditioned, UNPRECONDITIONED)
        defaults = dict(lr=lr, beta=beta, damping=damping, weight_decay=weight_decay)
        super().__init__(params_or_model, defaults, model=model, exclude=exclude, check_finite=check_finite,
                         grad_scaler=grad_scaler)
        given = params_or_model if isinstance(params_or_model, nn.Module) else model
        self.comm = make_rows_comm(rows_view_of(self), given, distributed)
        self._arm()

    # -- refresh schedule ----------------------------------------------------------------------------------------
    def is_refresh_step(self, step: int | None = None) -> bool:
        """Whether step `step` (default: the next one) refreshes the diagonals."""
        step = self.steps if step is None else step
        return bool(self.layers) and step % self.factor_interval == 0

    def _arm(self) -> None:
        if self.is_refresh_step():
            self.capture.arm(full=True)

    def diagonals(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(H, S) of layer i, or None before its first refresh."""
        state = self.layer_state[i]
        return (state["fisher_H"], state["fisher_S"]) if "fisher_H" in state else None

    def _layer_state_shape(self, i, key):
        return running_diagonal_shapes(self.layers[i])[key == "fisher_S"]

    def fisher_range(self) -> dict[str, tuple[float, float]]:
        """Per layer (min, max) of F~ / damping over its entries (host syncs: for logging and measurement)."""
        out = {}
        for i, layer in enumerate(self.layers):
            diag = self.diagonals(i)
            if diag is None:
                continue
            H, S = diag
            damping = next(g["damping"] for g in self.param_groups if any(p is layer.weight for p in g["params"]))
            Fs = [_fisher_tilde(layer, w, H, S, damping, H.dtype) for w in ("weight", "bias")[: len(layer.params)]]
            out[layer.name] = (min(float(F.min()) for F in Fs) / damping, max(float(F.max()) for F in Fs) / damping)
        return out

    # -- the step --------------------------------------------------------------------------------------------------
    def _curvature_step(self, inv_scale: torch.Tensor | None) -> dict[int, torch.Tensor]:
        """On refresh steps: fresh diagonals, min-max normalized, folded into the running ones. No directions:
        the preconditioner enters the fused update. S is unscaled by a GradScaler's factor first (the 1e-6 of the
        min-max normalization is not scale-free)."""
        if not self.capture.armed:
            return {}
        if self.comm.active:
            self._refresh_distributed(inv_scale)
            return {}
        for i, layer in enumerate(self.layers):
            recs = [r for r in self.capture.done(i) if r.full]
            if not recs:
                continue
            n_total = sum(r.n for r in recs)
            H = sum(input_diagonal(layer, r.a) * (r.n / n_total) for r in recs)
            S = sum(output_diagonal(layer, r.dy) * (r.n / n_total) for r in recs)
            if inv_scale is not None:
                S = S * inv_scale.to(device=S.device, dtype=S.dtype).square()
            self._fold_in(i, H, S)
        return {}

    def _local_sample_counts(self) -> list[int]:
        """Per layer, the samples of this rank's full records (the distributed agreement sums them)."""
        return [sum(r.n for r in self.capture.done(i) if r.full) for i in range(len(self.layers))]

    def _fold_in(self, i: int, H: torch.Tensor, S: torch.Tensor) -> None:
        """Min-max normalize layer i's fresh diagonals and fold them into the running ones (ones before the first),
        as new tensors, not in place: the step commits only once everything is computed (CurvatureOptimizer.step)."""
        layer, state = self.layers[i], self.layer_state[i]
        H_run, S_run = ((state[k].clone() for k in ("fisher_H", "fisher_S")) if "fisher_H" in state
                        else (torch.ones_like(H), torch.ones_like(S)))
        state["fisher_H"] = running_update_(H_run, min_max_normalize(H), self.gamma, self.ema)
        state["fisher_S"] = running_update_(S_run, min_max_normalize(S), self.gamma, self.ema)
        self._to_check += [(f"Fisher diagonal H of layer {layer.name}", state["fisher_H"]),
                           (f"Fisher diagonal S of layer {layer.name}", state["fisher_S"])]

    def _refresh_distributed(self, inv_scale: torch.Tensor | None) -> None:
        """The refresh across ranks (fop.distributed_rows): every layer's additive diagonal parts in one bucketed
        all-reduce, then the same normalization and running update on every rank."""
        comm = self.comm
        jobs = [i for i in range(len(self.layers)) if sum(comm.counts[i]) > 0]
        if not jobs:
            return
        dtype = torch.float64 if any(self.layers[i].weight.dtype == torch.float64 for i in jobs) else torch.float32

        def parts():
            out = []
            for i in jobs:
                recs = [r for r in self.capture.done(i) if r.full]
                out += additive_diagonals(self.layers[i], recs, sum(comm.counts[i]), comm.counts[i][comm.rank],
                                          dtype)
            return out

        shapes = [(n,) for i in jobs for n in additive_sizes(self.layers[i])]
        summed = comm.round("diagonals", shapes, dtype, parts)
        for k, i in enumerate(jobs):
            layer = self.layers[i]
            H, S = finish_diagonals(layer, summed[2 * k], summed[2 * k + 1], sum(comm.counts[i]))
            if inv_scale is not None:
                S = S * inv_scale.to(device=S.device, dtype=S.dtype).square()
            like = dict(device=layer.weight.device,
                        dtype=torch.float64 if layer.weight.dtype == torch.float64 else torch.float32)
            self._fold_in(i, H.to(**like), S.to(**like))

    def _outer_update(self, directions: dict[int, torch.Tensor]) -> None:
        """m <- beta m + (1-beta) g; theta <- theta - nu lr/(1-beta^t) m / F~, weight decay coupled or decoupled;
        nu the trust region's factor (`_kl_factor`, 1 with kl_clip=None). A parameter that no layer preconditions
        takes, with unpreconditioned="graft", m / (sqrt(v^) + 1e-8) s in place of m / F~ (v^ Adam's bias-corrected
        second moment of g, `graft_denominator`; s the RMS per entry of m / F~ over this step's preconditioned
        entries), so every entry moves at a preconditioned entry's scale; with "sgd", or when no entry is
        preconditioned, F~ = 1 (the public algorithm)."""
        plans = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, beta, wd, damping = group["lr"], group["beta"], group["weight_decay"], group["damping"]
            grads = [p.grad for p in params]
            if wd != 0 and not self.decoupled_weight_decay:
                grads = torch._foreach_add(grads, params, alpha=wd)
            exp_avgs = []
            for p in params:
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["step"] = 0
                elif state["exp_avg"].dtype != p.dtype or state["exp_avg"].device != p.device:
                    state["exp_avg"] = state["exp_avg"].to(p)  # the model was cast or moved after construction
                exp_avgs.append(state["exp_avg"])
            torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta)
            coefs, fishers = [], []
            for p in params:
                self.state[p]["step"] += 1
                coefs.append(-lr / (1.0 - beta ** self.state[p]["step"]))
                where = self.param_to_layer.get(id(p))
                diag = None if where is None else self.diagonals(where[0])
                fishers.append(None if diag is None else
                               _fisher_tilde(self.layers[where[0]], where[1], diag[0], diag[1], damping, p.dtype))
            plans.append((params, exp_avgs, coefs, fishers, lr * wd if self.decoupled_weight_decay else 0.0))
        graft = self._graft_scale(plans)
        nu = self._kl_factor(plans, grafted=graft is not None)
        for params, exp_avgs, coefs, fishers, decay in plans:
            if decay != 0:
                torch._foreach_mul_(params, 1.0 - decay)
            steps = exp_avgs if nu is None else torch._foreach_mul(exp_avgs, nu)
            pre = [(p, m, F, c) for p, m, F, c in zip(params, steps, fishers, coefs) if F is not None]
            plain = [(p, m, c) for p, m, F, c in zip(params, steps, fishers, coefs) if F is None]
            if pre:
                torch._foreach_addcdiv_(*(list(t) for t in zip(*pre)))
            if plain and graft is not None:
                scale, denoms = graft
                for p, m, c in plain:
                    p.add_((m.to(denoms[id(p)].dtype) / denoms[id(p)]).mul_(scale * c).to(p.dtype))
            elif plain:
                ps, ms, cs = zip(*plain)
                torch._foreach_add_(list(ps), torch._foreach_mul(list(ms), list(cs)))

    def _graft_scale(self, plans) -> tuple[torch.Tensor, dict[int, torch.Tensor]] | None:
        """(s, {id(p): graft denominator}) for the parameters without F~ (unpreconditioned="graft"): s the RMS per
        entry of m / F~ over the preconditioned entries; None when there are none or nothing to graft."""
        if self.unpreconditioned != "graft":
            return None
        pre = [(m, F) for _, exp_avgs, _, fishers, _ in plans for m, F in zip(exp_avgs, fishers) if F is not None]
        others = [p for params, _, _, fishers, _ in plans for p, F in zip(params, fishers) if F is None]
        if not pre or not others:
            return None
        norms = torch.stack([torch.linalg.vector_norm(m / F, dtype=torch.float64) for m, F in pre])  # no overflow
        scale = torch.linalg.vector_norm(norms) / math.sqrt(sum(m.numel() for m, _ in pre))
        return scale, {id(p): graft_denominator(self.state[p], p.grad) for p in others}

    def _kl_factor(self, plans, grafted: bool = False) -> torch.Tensor | None:
        """nu = min(1, sqrt(kl_clip / sum lr_t^2 <m, m / F~>)), lr_t = lr / (1 - beta^t) (F~ = 1 for the parameters
        no layer preconditions, which count only when they are not grafted: a grafted step is scaled to the
        preconditioned ones): scaled by nu the step's predicted KL divergence in AdaFisher's own metric F~ is at
        most kl_clip. A 0-d device tensor (no host sync); None with kl_clip=None."""
        if self.kl_clip is None:
            return None
        total = None
        for _, exp_avgs, coefs, fishers, _ in plans:
            for m, F, c in zip(exp_avgs, fishers, coefs):
                if F is None and grafted:
                    continue
                q = (m.square() if F is None else m.square() / F).sum() * (c * c)
                q = q.to(torch.promote_types(q.dtype, torch.float32))
                total = q if total is None else total + q
        return torch.sqrt(self.kl_clip / total.clamp_min(1e-30)).clamp(max=1.0)

class AdaFisher(_AdaFisherBase):
    r"""AdaFisher (coupled weight decay: g <- g + wd theta), see the module docstring for the update.

    Args:
        params_or_model: the model, or parameters / param groups with `model=` given (hooks go on its layers).
        lr: learning rate (1e-3). beta: first-moment decay (0.9). damping: lambda added to S_j H_i (1e-3).
        gamma: running-average constant of the diagonals (0.8). factor_interval: steps between refreshes (100).
        weight_decay: 0. ema: "public" (the public code's constants) or "average" (a proper average).
        kl_clip: the trust region on the step's predicted KL divergence in the metric F~ (module docstring; 1e-3),
            None turns it off.
        unpreconditioned: "graft" (default: the parameters of no supported layer take Adam's direction at the scale
            of the preconditioned entries) or "sgd" (F~ = 1, the public code).
        exclude: modules or module names whose parameters are not preconditioned (see `unpreconditioned`).
        check_finite, grad_scaler: see CurvatureOptimizer. distributed: None (synchronize across ranks when a
            process group of more than one rank is initialized), False, True or a fop.distributed.DistributedOptions:
            the fresh diagonals are averaged over ranks on refresh steps (fop.distributed_rows).
    Supported (fop._layers, docs/layers.md): Linear and transformers' Conv1D, Conv2d and Conv1d (any groups),
    Embedding and EmbeddingBag, nn.MultiheadAttention's projections, BatchNorm2d, LayerNorm (subclasses included);
    every other parameter takes the grafted step (`unpreconditioned`).
    """


class AdaFisherW(_AdaFisherBase):
    r"""AdaFisherW: AdaFisher with decoupled weight decay theta <- (1 - lr wd) theta (arguments as AdaFisher)."""

    decoupled_weight_decay = True
