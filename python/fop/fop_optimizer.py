"""FOP: Fisher-Orthogonal Projection on top of the K-FAC eigenbasis machinery."""

from __future__ import annotations

import weakref

import torch

import fop_kernels
from fop._base import check_choice, check_float, check_range, logger, stack_dot
from fop._capture import remove_handles
from fop.kfac import KFAC, Bucket, InverseBucket


def _beta_eta(name: str, value):
    if isinstance(value, str):
        if value != "adaptive":
            raise ValueError(f"{name} must be 'adaptive' or a number, got {value!r}")
        return value
    return check_float(name, value)


SPLITS = ("half_batch", "backward")


def _squared_norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """|t|^2 of each tensor in promote_types(dtype, float32), one foreach norm per dtype."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for k, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(k)
    for dtype, index in by_dtype.items():
        norms = torch._foreach_norm([tensors[k].detach() for k in index], 2,
                                    dtype=torch.promote_types(dtype, torch.float32))
        for k, norm in zip(index, norms):
            out[k] = norm.square()
    return out


def _difference(S1: torch.Tensor, V: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """g_diff = g1 - g2 for g1 = w1 S1, g2 = w2 (V - S1), as (w1 + w2) S1 - w2 V in place on S1 (a fresh stack; w1,
    w2 device tensors that broadcast against it): two passes over the stack instead of four and three temporaries."""
    return S1.mul_(w1 + w2).addcmul_(V, w2, value=-1)


def _layer_sums(sums: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
    """Per-block rows of `sums` (entries x 5, the buckets' entries in order; `shapes` (layers, blocks) per bucket)
    summed over the blocks of each layer and repeated back to every block: K-FAC's Fisher of a grouped layer is
    block-diagonal, so its inner products <x, F y> and <x, P y> are the sums over its blocks."""
    parts = []
    for part, (n, g) in zip(sums.split([n * g for n, g in shapes]), shapes):
        parts.append(part if g == 1 else part.view(n, g, -1).sum(1).repeat_interleave(g, dim=0))
    return torch.cat(parts)


def _multi_rank() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


class FOP(KFAC):
    r"""Fisher-Orthogonal Projection (Lu and Armour, arXiv 2508.13898; docs/design.md "FOP").

    One backward, two gradients: with `.grad` = g_avg (the mean-loss gradient over N samples) and the hooks'
    first-half sum S1 = sum_{n < N1} dy_n a_n^T (N1 = floor(N/2), N2 = N - N1):
        g1 = (N / N1) S1,   g2 = (N / N2) (g_avg - S1),   g_diff = g1 - g2
    (for even N, g_avg = (g1 + g2) / 2 exactly). In the eigenbasis of K-FAC's factors, A~ = Q_G^T g_avg Q_A,
    D~ = Q_G^T g_diff Q_A, f = l_G l_A^T (undamped), w the damped eigenvalues (see KFAC); per layer:
        S1 = sum A~^2 f, S2 = sum A~ D~ f, a = sum A~^2/w, c = sum A~ D~/w, e0 = sum D~^2/w
        s_proj = S2 / S1   (g_perp = g_diff - s_proj g_avg is Fisher-orthogonal to g_avg)
        d = c - s_proj a,  e = e0 - 2 s_proj c + s_proj^2 a
        beta* = clamp(d / e, beta_clip)                              (paper eq. 16)
        eta*  = clamp(2 (a + beta d) / (a + 2 beta d + beta^2 e), eta_clip)   (eq. 17, g_tot = g1 + g2)
        U = Q_G [eta (A~ + beta (D~ - s_proj A~)) / w] Q_A^T
    With eta_norm=True (default) eta* is divided by its value at beta = 0 (which is 2):
        eta = clamp((a + beta d) / (a + 2 beta d + beta^2 e), eta_clip),   eta_clip default (0, 1)
    the step length that minimizes the quadratic model of the mean loss along u = g_avg + beta g_perp, so FOP's lr
    means what K-FAC's does (at beta = 0 the update is K-FAC's); eta_norm=False is the paper's form (eta near 2,
    eta_clip default (0, 2) as the official code). Then K-FAC's KL clip, with <U, F_w U> =
    eta^2 (a + 2 beta d + beta^2 e), the other parameters' grafted step at the scale of nu eta P g_avg (not of U:
    `_graft_scale`), and the outer update.
    With damped inverses (inverse_method="cholesky", or "auto" with factored damping) the same quantities come
    without an eigenbasis: with F g = G g A (the factors of the last inversion) and P g = G_d^-1 g A_d^-1,
        S1 = <g_avg, F g_avg>, S2 = <g_diff, F g_avg>, a = <g_avg, P g_avg>, c = <g_diff, P g_avg>,
        e0 = <g_diff, P g_diff>,   U = eta (P g_avg + beta (P g_diff - s_proj P g_avg)),
    F and P on each factor's support and in its chosen form (fop.inverse_choice).
    `beta`/`eta` fixed (numbers) replace the adaptive values;
    beta=0, eta=1 is K-FAC exactly. A batch of 1 (no second half) falls back to the K-FAC step with a logged
    warning. All scalars stay on the device: the only host sync in `step()` is the finiteness check (and, with
    damped inverses, the Cholesky status and the factors' supports on inversion steps).

    Args (beyond KFAC's): beta ("adaptive" or a number), beta_clip=(-0.5, 0.5), eta (1.0, or "adaptive" for the
    paper's layer-wise eta*: on the digits CNN and MNIST the per-layer eta cost accuracy against a fixed eta = 1,
    docs/optimizers.md "Defaults"), eta_clip (for the adaptive eta: default (0, 1) normalized, (0, 2) with
    eta_norm=False, the official code's clip), eta_norm (above; a fixed eta is used as given), and `split`:

    - "half_batch" (default): one backward per step; sub-batch 1 is the first half of every batch, its gradient one
      half-batch weight-gradient GEMM per layer over the captured inputs and output gradients (above).
    - "backward": the training loop runs k >= 2 backward passes per step, each on its own micro-batch with its
      mean loss divided by k (gradient accumulation, as the official code's two half-batch passes); sub-batch 1 is
      the first pass: its share S1 of `.grad` is copied when the first pass has accumulated, and
          g1 = k S1,   g2 = (k / (k - 1)) (g_avg - S1)
      (the mean gradients of pass 1 and of the other passes). No half-batch GEMM and no capture on non-factor steps:
      the sub-batch gradients cost nothing beyond the passes themselves. Single process, loss_reduction="mean";
      `zero_grad()` before the first pass. A step with one pass falls back to the K-FAC update (warned once).
    """

    factor_products = True  # the damped-inverse forms keep the undamped factor blocks for G V A (S1, S2)

    def __init__(self, params_or_model, lr: float = 0.1, momentum: float = 0.5, weight_decay: float = 0.0, *,
                 beta="adaptive", beta_clip=(-0.5, 0.5), eta=1.0, eta_clip=None, eta_norm: bool = True,
                 split: str = "half_batch", **kwargs):
        self.split = check_choice("split", split, SPLITS)
        if self.split == "backward":
            if kwargs.get("loss_reduction", "mean") != "mean":
                raise ValueError("split='backward' needs loss_reduction='mean' (each pass's mean loss divided by the "
                                 "number of passes)")
            if kwargs.get("distributed") not in (None, False) or (kwargs.get("distributed") is None and _multi_rank()):
                raise ValueError("split='backward' is for a single process; distributed FOP splits every rank's "
                                 "batch (split='half_batch')")
        self.beta = _beta_eta("beta", beta)
        self.eta = _beta_eta("eta", eta)
        self.beta_clip = check_range("beta_clip", beta_clip)
        if not isinstance(eta_norm, bool):
            raise ValueError(f"eta_norm must be True or False, got {eta_norm!r}")
        self.eta_norm = eta_norm
        # the kernels form the paper's eta (g_tot = g1 + g2); normalized, FOP uses half of it (1 at beta = 0)
        self._eta_factor = 0.5 if (eta_norm and self.eta == "adaptive") else 1.0
        if eta_clip is None:
            eta_clip = (0.0, 2.0 * self._eta_factor)
        self.eta_clip = check_range("eta_clip", eta_clip)
        self._kernel_eta_clip = tuple(c / self._eta_factor for c in self.eta_clip)
        self._stats: tuple | None = None  # (layer order, sums, scalars, |P g_avg|^2) of the last step
        self._warned_fallback = False
        self._first_pass: dict[int, torch.Tensor] = {}  # split="backward": id(p) -> .grad after the first pass
        self._passes: dict[int, int] = {}  # split="backward": id(p) -> backward passes accumulated this step
        # id(p) -> (.grad, its version, its squared norm) after the last backward pass accumulated into it
        self._grad_marks: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}
        self._rescaled: dict[int, torch.Tensor] = {}  # layer -> the step's rescaling of .grad since backward
        self._marks_queued = False  # the end-of-backward marking is queued for this backward
        super().__init__(params_or_model, lr, momentum, weight_decay, **kwargs)
        on_grad = weakref.WeakMethod(self._on_grad_accumulated)  # the hooks hold the optimizer weakly

        def pass_hook(p):
            method = on_grad()
            if method is not None:
                method(p)

        self._pass_hooks = [p.register_post_accumulate_grad_hook(pass_hook) for layer in self.layers
                            for p in layer.params]
        self._pass_finalizer = weakref.finalize(self, remove_handles, self._pass_hooks)

    def remove_hooks(self) -> None:
        super().remove_hooks()
        self._pass_finalizer()

    def _needs_half_batch(self, step: int) -> bool:
        return self.split == "half_batch"

    def _half_grads_in_hooks(self) -> bool:
        return self.split == "half_batch" and not self.comm.active  # distributed: fop.distributed's own hooks

    def _on_grad_accumulated(self, p: torch.Tensor) -> None:
        """After a backward pass accumulates into a preconditioned parameter: queue the marking of .grad for the end
        of this backward (`_mark_grads`, once per backward); split="backward": count the passes and copy .grad once
        the first has accumulated. The marking is queued from a queued callback, so it runs after every callback
        that backward queued meanwhile: DDP's, which writes the averaged .grad. Distributed without DDP (a user's
        own all-reduce after backward) .grad is not marked, and a rescaling of it is not followed."""
        if not self._marks_queued and (not self.comm.active or self.comm.ddp is not None):
            self._marks_queued = True
            engine = torch.autograd.Variable._execution_engine
            engine.queue_callback(lambda: engine.queue_callback(self._mark_grads))
        if self.split == "backward":
            count = self._passes.get(id(p), 0) + 1
            self._passes[id(p)] = count
            if count == 1:
                self._first_pass[id(p)] = p.grad.detach().clone()

    def _mark_grads(self) -> None:
        """At the end of backward: mark every preconditioned .grad (the object, its version, its squared norm)."""
        self._marks_queued = False
        params = [p for layer in self.layers for p in layer.params if p.grad is not None]
        for p, norm2 in zip(params, _squared_norms([p.grad for p in params])):
            self._grad_marks[id(p)] = (weakref.ref(p.grad), p.grad._version, norm2)

    def _grad_rescaling(self) -> dict[int, torch.Tensor]:
        """{layer: c} for the layers whose .grad changed between backward and step (torch.nn.utils.clip_grad_norm_,
        a GradScaler's unscale_, `p.grad *= k`): c = |.grad now| / |.grad after backward| over the layer's
        parameters, a device scalar (1 where both are 0). The hooks' first-half sum S1 is multiplied by c, so that
        g1 and g2 = 2 g_avg - g1 are rescaled with `.grad` = g_avg: exact for a rescaling by one number per layer;
        another change of .grad (clip_grad_value_, an added term) is taken as a rescaling by the norms' ratio."""
        changed = []
        for i, layer in enumerate(self.layers):
            marks = [(p, self._grad_marks.get(id(p))) for p in layer.params if p.grad is not None]
            if any(m is not None and (m[0]() is not p.grad or m[1] != p.grad._version) for p, m in marks):
                changed.append((i, [p.grad for p, m in marks if m is not None], [m[2] for p, m in marks if m]))
        if not changed:
            return {}
        now = iter(_squared_norms([g for _, grads, _ in changed for g in grads]))
        rescaling = {}
        for i, _, then in changed:
            n2 = sum(next(now).to(t.dtype) for t in then)
            t2 = sum(then)
            rescaling[i] = torch.where(t2 > 0, (n2 / t2).sqrt(), torch.ones_like(t2))
        return rescaling

    def _prepare_gradients(self):
        self._rescaled = self._grad_rescaling()  # before a GradScaler's grad_scale path unscales .grad here
        return super()._prepare_gradients()

    def _first_half_scales(self, index: list[int], inv_scale: torch.Tensor | None, S1: torch.Tensor) -> torch.Tensor:
        """The factors the stacked first-half sums S1 of the layers `index` take, (B, 1, 1) in S1's dtype and device:
        inv_scale (a GradScaler's, or None: 1) times the layer's rescaling of .grad since backward; a scaler.unscale_
        the user called is part of that rescaling, so inv_scale is not applied twice."""
        unscaled_here = inv_scale is not None and getattr(self, "grad_scale", None) is not None  # by step() itself
        scales = []
        for i in index:
            c = self._rescaled.get(i)
            if c is None:
                c = S1.new_ones(()) if inv_scale is None else inv_scale
            elif unscaled_here:
                c = c * inv_scale.to(c.device)
            scales.append(c.to(device=S1.device, dtype=S1.dtype))
        return torch.stack(scales).view(-1, 1, 1)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._forget_passes()  # a backward that raised never ran its queued marking, nor finished its pass count

    def _forget_passes(self) -> None:
        """Forget what the backward passes since the last step left: pass counts, first-pass copies, .grad marks."""
        self._first_pass, self._passes, self._rescaled, self._grad_marks = {}, {}, {}, {}
        self._marks_queued = False

    def _after_step(self) -> None:
        super()._after_step()
        self._forget_passes()

    def _after_skipped_step(self) -> None:
        super()._after_skipped_step()
        self._forget_passes()

    def _after_load(self) -> None:
        super()._after_load()
        self._forget_passes()

    def _fallback(self, why: str) -> None:
        """Warn once that this step takes the K-FAC update, and why; None (no sub-batches)."""
        if not self._warned_fallback:
            logger.warning("FOP step %d: %s; using the K-FAC update for this step (warned once)", self.steps, why)
            self._warned_fallback = True

    _step_attrs = KFAC._step_attrs + ("_stats",)

    def _sub_batches(self, buckets) -> dict[int, tuple[int, int]] | None:
        """{layer: (N, N1)} sample counts of the step and of its first sub-batch, or None (with a warning once) when
        this step has no second sub-batch and falls back to K-FAC."""
        counts = {i: self.capture.sample_counts_of(i) for b in buckets for i in b.index}
        if self.split == "backward":
            passes = {self._passes.get(id(p), 0) for i in counts for p in self.layers[i].params}
            if len(passes) != 1:
                return self._fallback(f"split='backward': the preconditioned parameters saw different numbers of "
                                      f"backward passes ({sorted(passes)})")
            if passes.pop() < 2:
                return self._fallback("split='backward' needs at least two backward passes per step")
            return counts
        if self.comm.active:  # distributed: sub-batches over all ranks, the same decision on every rank
            return self._fallback(self.comm.fallback_reason) if self.comm.fallback_reason else counts
        if any(n == 0 for n, _ in counts.values()):
            return self._fallback("no half-batch capture (no backward since the last step, or a forward run before "
                                  "the optimizer was built?)")
        if any(n1 == 0 for _, n1 in counts.values()):
            return self._fallback("a batch of 1 sample has no second half")
        return counts

    def _bucket_gradients(self, bucket: Bucket, inv_scale, sub_batches):
        V, _ = super()._bucket_gradients(bucket, inv_scale, sub_batches)
        if sub_batches is None:
            return V, None
        dtype = V.dtype
        if self.split == "backward":
            k = self._passes[id(self.layers[bucket.index[0]].weight)]
            S1 = torch.stack([self.layers[i].matrix([self._first_pass[id(p)] for p in self.layers[i].params], dtype)
                              for i in bucket.index])
            w1, w2 = S1.new_tensor(float(k)), S1.new_tensor(k / (k - 1))
        elif self.comm.active:  # g1 = w1 S1 over the first sub-batch of every rank (fop.distributed)
            S1, w1, w2 = self.comm.half_batch(bucket.index, dtype)
        else:
            S1 = torch.stack([self.capture.half_batch_grad(i, dtype) for i in bucket.index])
            n = torch.tensor([sub_batches[i][0] for i in bucket.index], dtype=torch.float64)
            n1 = torch.tensor([sub_batches[i][1] for i in bucket.index], dtype=torch.float64)
            w1 = (n / n1).to(dtype=dtype, device=V.device).view(-1, 1, 1)  # g1 = (N/N1) S1
            w2 = (n / (n - n1)).to(dtype=dtype, device=V.device).view(-1, 1, 1)  # g2 = (N/N2)(g_avg - S1)
        if inv_scale is not None or self._rescaled:  # S1 unscaled and rescaled with .grad
            S1 = S1 * self._first_half_scales(bucket.index, inv_scale, S1)
        return V, _difference(S1, V, w1, w2)

    def _inverse_update(self, bucket: InverseBucket, V, D):
        """(eta (P V + beta (P D - s_proj P V)), (the bucket's block layers, its sums, its scalars, |P V|^2))."""
        if D is None:
            return super()._inverse_update(bucket, V, D)
        FV = bucket.fisher(V)
        PV, PD = bucket.precondition(V), bucket.precondition(D)  # PV as K-FAC's: beta=0, eta=1 is K-FAC exactly
        sums = torch.stack([stack_dot(V, FV), stack_dot(D, FV), stack_dot(V, PV), stack_dot(D, PV),
                            stack_dot(D, PD)], dim=1)
        if bucket.groups > 1:  # one s_proj, beta, eta per layer, from the sums over its blocks
            sums = _layer_sums(sums, [(len(bucket.index), bucket.groups)])
        scalars = fop_kernels.combine_scalars(sums, beta=self.beta, eta=self.eta, beta_clip=self.beta_clip,
                                              eta_clip=self._kernel_eta_clip)
        s, beta, eta = (t.view(-1, 1, 1) for t in scalars.unbind(1))
        # eta (PV + beta (PD - s PV)) = eta (1 - beta s) PV + eta beta PD, in place (at beta = 0: eta PV)
        mean_sq = stack_dot(PV, PV)  # |P g_avg|^2 per entry: the graft's scale
        U = PV.mul_(eta * (1 - beta * s)).add_(PD.mul_(eta * beta))
        return U, (bucket.entry_layers(), sums, scalars, mean_sq)

    def _combine(self, buckets, A_rot, D_rot, lG, lA, damping):
        """(U~ per block from project_combine, (the layer of every block, the sums, the scalars, |P V|^2))."""
        if D_rot is None:
            return super()._combine(buckets, A_rot, None, lG, lA, damping)
        shapes = [(len(b.index), b.groups) for b in buckets]
        sums = fop_kernels.fisher_inner_products(A_rot, D_rot, lG, lA, damping, self.damping_mode)
        if any(g > 1 for _, g in shapes):  # one s_proj, beta, eta per layer, from the sums over its blocks
            sums = _layer_sums(sums, shapes)
        U_rot, scalars = fop_kernels.project_combine(A_rot, D_rot, sums, lG, lA, damping, self.damping_mode,
                                                     beta=self.beta, eta=self.eta, beta_clip=self.beta_clip,
                                                     eta_clip=self._kernel_eta_clip)
        mean_rot, _ = super()._combine(buckets, A_rot, None, lG, lA, damping)  # P g_avg in the eigenbasis
        mean_sq = torch.stack(_squared_norms(mean_rot))  # |P g_avg|^2 per block (the rotation keeps norms)
        return U_rot, ([i for b in buckets for i in b.entry_layers()], sums, scalars, mean_sq)

    def _update_scale(self, buckets, updates, V_stacks, D_stacks, stats):
        """eta's normalization (1/2) folded into one multiply with the KL clip. The clip's quadratic form: U = eta P u
        with u = g_avg + beta (g_diff - s_proj g_avg) and P = F_w^-1, so <U, F_w U> = eta <U, u> =
        eta ((1 - beta s_proj) <U, g_avg> + beta <U, g_diff>) >= 0: at beta = 0, eta = 1 K-FAC's <U, V> bit for bit.
        Keeps the step's statistics (the parts concatenated in bucket order) for `last_stats`."""
        self._stats = None if stats is None else ([i for part in stats for i in part[0]],
                                                  *(torch.cat([part[k] for part in stats]) for k in (1, 2, 3)))
        if self._stats is None:  # a K-FAC fallback step
            return super()._update_scale(buckets, updates, V_stacks, D_stacks, stats)
        factor = self._eta_factor
        if self.kl_clip is None:
            return (None if factor == 1.0 else updates[0].new_tensor(factor)), None
        scalars = self._stats[2].split([b.size for b in buckets])
        quadratic = []
        for U, V, D, sc in zip(updates, V_stacks, D_stacks, scalars):
            s, beta, eta = (t.to(U.dtype) for t in sc.unbind(1))
            q = eta * ((1 - beta * s) * stack_dot(U, V) + beta * stack_dot(U, D))
            quadratic.append(q.clamp_min(0) * factor ** 2)
        nu = self._kl_factor(buckets, quadratic)
        return nu * factor, nu

    def _graft_scale(self, preconditioned, nu):
        """s = nu sqrt(sum_l eta_l^2 |P_l g_avg|^2 / sum_l numel(U_l)): the RMS per entry of FOP's step along the
        mean gradient, not of the combined step U. The grafted parameters take the mean gradient's diagonal direction;
        U's Fisher-orthogonal part adds length that they do not share, at a scale set by the sub-batches' noise
        (docs/optimizers.md "One scale"). At beta = 0 it is K-FAC's s; after a K-FAC fallback step, K-FAC's."""
        if self._stats is None:
            return super()._graft_scale(preconditioned, nu)
        eta = self._stats[2][:, 2].double() * self._eta_factor
        s = torch.sqrt((eta.square() * self._stats[3].double()).sum() / sum(t.numel() for t in preconditioned))
        return s if nu is None else s * nu.double()

    def last_stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per layer name: s_proj, beta, eta of the last FOP step as 0-d device tensors (empty after a K-FAC
        fallback or before the first preconditioned step). Reading them as floats syncs the host."""
        if self._stats is None:
            return {}
        order, _, scalars, _ = self._stats
        return {self.layers[i].name: {"s_proj": scalars[j, 0], "beta": scalars[j, 1],
                                      "eta": scalars[j, 2] * self._eta_factor} for j, i in enumerate(order)}
