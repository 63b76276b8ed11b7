"""Distributed K-FAC and FOP over torch.distributed (NCCL on GPU, gloo on CPU), beside DistributedDataParallel.

The optimizer is built on the DDP-wrapped model (`FOP(ddp_model)`); its hooks sit on the inner modules. DDP keeps
averaging `.grad` as usual (that is FOP's `g_avg` and K-FAC's gradient); the optimizer adds, on its own process
group (a copy of DDP's, so its collectives never interleave with DDP's buckets):

- FOP's first sub-batch. Every rank computes its local half-batch gradient of each preconditioned layer,
  `S1_r = sum_{first half of rank r's batch} dy a^T` (in `.grad`'s scale), as soon as the layer's output gradient
  arrives in backward, and all-reduces it in buckets (`bucket_cap_mb`), asynchronously; `step()` waits. Sub-batch 1
  is the union of the first halves of every rank's batch:
      S1 = (1/W) sum_r S1_r,  rho1 = (1/W) sum_r n1_r / n_r,  rho2 = (1/W) sum_r n2_r / n_r
      g1 = S1 / rho1,  g2 = (g_avg - S1) / rho2
  which is single-process FOP's `g1 = (N/N1) S1`, `g2 = (N/N2)(g_avg - S1)` on the concatenated batch (equal local
  batches). `split="ranks"` is the paper's primary/secondary scheme: even ranks' whole batches form g1, odd ranks'
  g2 (n1_r = n_r on even ranks, 0 on odd ones); it needs an even world size.
- Factors, on factor steps: after the local EMA update every rank all-reduces the upper triangles of all A and G
  in one flat bucketed buffer and averages them: A <- (1-rho) A + rho mean_r(a_r^T a_r / rows_r).
- Eigendecompositions, on inverse steps: each factor matrix has an owner rank (greedy longest-processing-time
  assignment by d^3); owners decompose theirs with one batched `fop_kernels.eigh`, then broadcast Q and l in one
  flat buffer per owner. Ranks that own nothing decompose nothing.
- Agreement: one small all-reduce at the start of every `step()` carries an error flag, whether this rank captured
  factor statistics, and the half-batch fractions rho; then every local phase of the step (factor statistics,
  owned decompositions, preconditioning and the final check) ends in a one-flag all-reduce (`Comm.agree`). A rank
  whose `step()` raises still takes part, so every rank raises (`DistributedStepError` naming the failing rank and
  its error) before any rank enters the next collective, and nothing is committed anywhere.

With no process group, or a world size of 1, `make_comm` returns a `NullComm` and the optimizer runs its plain,
single-process code unchanged. Every rank holds the whole optimizer state, so `state_dict()` on rank 0 restores
on any world size. Communication per step (payload bytes, `Comm.last_step_bytes`; cost model in
docs/distributed.md): FOP's half-batch gradients = the preconditioned part of DDP's gradient volume, so together
at most 2x DDP's; factor steps add the factor triangles, inverse steps the eigenvectors.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from fop._capture import attach_forward_hook, batch_first, remove_handles, sub_batch_grad

logger = logging.getLogger("fop")

SPLITS = ("halves", "ranks")


class DistributedStepError(RuntimeError):
    """Another rank's `step()` raised; this rank stops too instead of waiting for it in a collective."""


@dataclass(frozen=True)
class DistributedOptions:
    """How the optimizer communicates (pass as `distributed=` to FOP / KFAC).

    process_group: the ranks to synchronize; default: a new group over the DDP model's (or the default) group's
        ranks, so that the optimizer's collectives never interleave with DDP's.
    split: FOP's sub-batches: "halves" (g1 = the first half of every rank's batch) or "ranks" (the paper's
        primary/secondary scheme: even ranks' batches form g1, odd ranks' g2; needs an even world size).
    bucket_cap_mb: largest flat buffer of one collective (half-batch gradients, factors, eigenvectors).
    overlap: launch the half-batch all-reduces during backward (needs the model wrapped in DDP, whose
        `no_sync()` tells which backward ends the step); otherwise they all start in `step()`.
    timeout: seconds a collective of the optimizer's own group waits for the other ranks before it raises (a rank
        that died or hangs outside `step()`); None: torch.distributed's default for a new group (30 minutes for
        gloo and NCCL). Ignored when `process_group` is given (its own timeout applies).
    """

    process_group: Any = None
    split: str = "halves"
    bucket_cap_mb: float = 25.0
    overlap: bool = True
    timeout: float | None = None

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"distributed split must be one of {SPLITS}, got {self.split!r}")
        cap = self.bucket_cap_mb
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap <= 0:
            raise ValueError(f"bucket_cap_mb must be a positive number, got {cap!r}")
        t = self.timeout
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0):
            raise ValueError(f"timeout must be None or a positive number of seconds, got {t!r}")


class NullComm:
    """Single process (no process group, or world size 1): every hook is the plain single-process operation."""

    active = False
    rank = 0
    world_size = 1

    def guard(self):
        return contextlib.nullcontext()

    def agree(self):
        return contextlib.nullcontext()

    def all_reduce_factors(self, factors_A: list, factors_G: list) -> None:
        """Nothing to average."""

    def end_step(self, failed: bool = False) -> None:
        """Nothing pending."""

    def forget_backward(self) -> None:
        """Nothing kept."""

    def remove(self) -> None:
        """No hooks."""

    @property
    def last_step_bytes(self) -> dict[str, int]:
        return {"total": 0}


def resolve_distributed(model: nn.Module, distributed):
    """(options, ddp, base group) for `distributed` (None: on when a process group is initialized; True; a
    DistributedOptions), or None when there is nothing to synchronize: distributed=False, or None without an
    initialized process group. The base group is the given process_group, else DDP's, else WORLD."""
    if distributed is False:
        return None
    if distributed is None or distributed is True:
        options = DistributedOptions()
    elif isinstance(distributed, DistributedOptions):
        options = distributed
    else:
        raise TypeError(f"distributed must be None, True, False or a fop.distributed.DistributedOptions, "
                        f"got {type(distributed).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        if distributed is None:
            return None
        raise RuntimeError("distributed=... was given but torch.distributed is not initialized: call "
                           "torch.distributed.init_process_group first (torchrun sets the environment it reads)")
    ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
    base = options.process_group
    if base is None:
        base = ddp.process_group if ddp is not None else dist.group.WORLD
    return options, ddp, base


def own_group(options: DistributedOptions, base):
    """The optimizer's own process group over the ranks of `base` (with options.timeout), or the given one."""
    if options.process_group is not None:
        return options.process_group
    timeout = None if options.timeout is None else timedelta(seconds=options.timeout)
    return dist.new_group(ranks=dist.get_process_group_ranks(base), timeout=timeout)


def will_synchronize(model: nn.Module | None, distributed) -> bool:
    """Whether make_comm will return a real communicator (a process group of more than one rank), decided before the
    optimizer is built (its layers depend on it); raises as make_comm would on an invalid `distributed`."""
    resolved = resolve_distributed(model, distributed)
    return resolved is not None and dist.get_world_size(resolved[2]) > 1


def make_comm(view: CommView, model: nn.Module, distributed, has_sub_batches: bool) -> NullComm | Comm:
    """The communicator of a KFAC/FOP optimizer (`view`: what it reads of it; `has_sub_batches`: FOP).
    `distributed`: None (on when a process group with more than one rank is initialized), False (off: each rank
    keeps its own curvature state), True, or a DistributedOptions."""
    resolved = resolve_distributed(model, distributed)
    if resolved is None:
        return NullComm()
    options, ddp, base = resolved
    world = dist.get_world_size(base)
    if options.split == "ranks" and world % 2:
        raise ValueError(f"split='ranks' (primary/secondary: even ranks form g1, odd ranks g2) needs an even world "
                         f"size, got {world}; use split='halves'")
    if world == 1:
        return NullComm()
    if options.split == "ranks" and not has_sub_batches:
        raise ValueError("split='ranks' chooses FOP's two sub-batches; KFAC has none")
    return Comm(view, ddp, own_group(options, base), options)


def _chunks(sizes: list[int], cap: int) -> list[list[int]]:
    """Consecutive groups of item indices whose sizes sum to at most `cap` (an item larger than cap goes alone)."""
    groups, current, total = [], [], 0
    for i, s in enumerate(sizes):
        if current and total + s > cap:
            groups.append(current)
            current, total = [], 0
        current.append(i)
        total += s
    if current:
        groups.append(current)
    return groups


def assign_owners(dims: list[int], world: int) -> list[int]:
    """Owner rank of each d x d matrix: largest first to the least-loaded rank, load = sum d^3 (ties: lower rank,
    then lower index), the same on every rank."""
    load = [0.0] * world
    owners = [0] * len(dims)
    for i in sorted(range(len(dims)), key=lambda i: (-dims[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += float(dims[i]) ** 3
    return owners


def cost_model(layers, world: int, *, half_batch: bool, factor_step: bool, inverse_step: bool,
               grad_bytes: int = 4, factor_bytes: int = 4) -> dict[str, int]:
    """Payload bytes one rank hands to the optimizer's collectives in one step (what `Comm.last_step_bytes`
    reports): half-batch gradients out*in per layer, factor triangles d(d+1)/2, eigenpairs d^2 + d per factor
    (counted for the broadcasting owner and every receiver alike: the payload of the broadcast), and the agreement
    vectors: 3 + 2 L float64 with FOP (3 without) before the step's work, and one float64 error flag after each
    local phase (before the factor all-reduce, before the eigenpair broadcasts, before the commit)."""
    n = len(layers)
    flags = 1 + int(factor_step) + int(inverse_step)
    out = {"control": 8 * (3 + (2 * n if half_batch else 0) + flags)}
    if half_batch:
        out["half_batch_grad"] = grad_bytes * sum(layer.out_dim * layer.in_dim for layer in layers)
    dims = [layer.in_dim for layer in layers] + [layer.out_dim for layer in layers]
    if factor_step:
        out["factors"] = factor_bytes * sum(d * (d + 1) // 2 for d in dims)
    if inverse_step:
        out["eigen"] = factor_bytes * sum(d * d + d for d in dims)
    out["total"] = sum(out.values())
    return out


# -- the communicator ------------------------------------------------------------------------------------------------
class RankAgreement:
    """Failure agreement of a communicator (`group`, `rank`, `world_size`, `device`, `bytes`): whatever raises on one
    rank raises on every rank, the failing ranks with their own error, the others with DistributedStepError naming
    it. Subclasses say in `_abandon` how a step given up before its work ends."""

    def _abandon(self) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def agree(self):
        """Run the body (the local work of step()); then one all-reduce of an error flag: if the body raised on any
        rank, every rank raises, so that no rank enters the next collective alone. An error already raised on every
        rank (`_raise_together` inside the body) passes through without another collective."""
        error = None
        try:
            yield
        except Exception as err:  # re-raised below, after the other ranks have been told
            if getattr(err, "_fop_agreed", False):
                raise
            error = err
        vec = torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64, device=self.device)
        dist.all_reduce(vec, group=self.group)
        self.bytes["control"] += vec.numel() * vec.element_size()
        if vec.item() > 0:
            self._raise_together(error, finish=False)

    def _raise_together(self, error: Exception | None, finish: bool = True):
        """Every rank learns which ranks failed and why; the failing ranks re-raise their own error. `finish`: end
        the step here (the agreement before the step's work); step() ends it after a failure in its work."""
        message = "" if error is None else f"{type(error).__name__}: {error}"
        messages = [None] * self.world_size
        dist.all_gather_object(messages, message, group=self.group)
        if finish:
            self._abandon()
        failed = {r: m for r, m in enumerate(messages) if m}
        summary = "; ".join(f"rank {r}: {m}" for r, m in failed.items())
        if error is None:
            error = DistributedStepError(f"optimizer step() failed on another rank ({summary}); this rank (rank "
                                         f"{self.rank}) stops as well instead of waiting for it")
        elif len(failed) > 1 and hasattr(error, "add_note"):
            error.add_note(f"step() failed on {len(failed)} ranks: {summary}")
        error._fop_agreed = True
        raise error


@dataclass
class CommView:
    """What a `Comm` reads of its KFAC/FOP optimizer, and nothing more: the layers, the factor dtype, the capture's
    MC flag and the step's schedule (callables, asked when needed), the local decomposition."""

    layers: list
    dtype: torch.dtype
    device: torch.device  # of the parameters
    capture: Any  # fop._capture.Capture: mc_active and has_factor_data
    fisher: str  # "empirical" or "mc"
    half_batch_now: Callable[[], bool]  # does this step use FOP's sub-batches
    factor_step_now: Callable[[], bool]  # does this step update the factors
    decompose: Callable  # (mats, names) -> (evals, evecs): fop.kfac.robust_eigh


class Comm(RankAgreement):
    """The distributed hooks of one KFAC/FOP optimizer on `group` (see the module docstring)."""

    active = True

    def __init__(self, view: CommView, ddp: nn.parallel.DistributedDataParallel | None, group,
                 options: DistributedOptions):
        self.view = view
        self.ddp = ddp
        self.group = group
        self.options = options
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = dist.get_backend(group)
        self.cap = int(options.bucket_cap_mb * 2**20)
        layers = view.layers
        self.device = view.device if "nccl" in str(self.backend) else torch.device("cpu")
        self.dtype = view.dtype
        self.uses_half_batch = bool(view.half_batch_now()) and bool(layers)
        self.split = options.split
        self.owners = assign_owners([layer.in_dim for layer in layers] + [layer.out_dim for layer in layers],
                                    self.world_size)
        # half-batch all-reduce buckets: layers in reverse module order (about the order backward reaches them)
        order = list(reversed(range(len(layers))))
        size = torch.finfo(self.dtype).bits // 8
        self.buckets = [[order[j] for j in chunk]
                        for chunk in _chunks([layers[i].out_dim * layers[i].in_dim * size for i in order], self.cap)]
        self._handles = []
        if self.uses_half_batch:
            ref = weakref.ref(self)
            self._handles = [attach_forward_hook(layer, self._forward_hook(i),
                                                 lambda: (c := ref()) is not None and c.view.half_batch_now())
                             for i, layer in enumerate(layers)]
        self._finalizer = weakref.finalize(self, remove_handles, self._handles)  # hooks hold this weakly
        self.bytes = Counter()
        self.total_bytes = Counter()
        self.last_step_bytes: dict[str, int] = {"total": 0}
        self.steps = 0
        self.launches = Counter()  # half-batch buckets started during backward / in step()
        self.fallback_reason: str | None = None
        self._reset()

    def remove(self) -> None:
        """Remove the hooks."""
        self._finalizer()

    def _reset(self) -> None:
        n = len(self.view.layers)
        self._acc: list[torch.Tensor | None] = [None] * n  # local sum dy a^T over the rank's first sub-batch
        self._n = [0] * n  # samples whose output gradient arrived
        self._n1 = [0] * n  # of which in the rank's first sub-batch
        self._pending = [0] * n  # records of the syncing forward still waiting for their gradient
        self._synced = [False] * n  # a syncing forward of the layer ran
        self._next_bucket = 0
        self._works: list[tuple[Any, torch.Tensor, list[int]]] = []
        self._reduced: dict[int, torch.Tensor] | None = None
        self._rho: tuple[list[float], list[float]] | None = None

    # -- half-batch gradients: hooks -------------------------------------------------------------------------------
    def _first_rows(self, n: int) -> int:
        if self.split == "ranks":
            return n if self.rank % 2 == 0 else 0
        return n // 2

    def _forward_hook(self, i: int):
        ref = weakref.ref(self)

        def hook(module, inputs, kwargs, output):
            self = ref()
            if self is None or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
                return
            if not output.requires_grad:
                return
            layer = self.view.layers[i]
            if module is not layer.module:  # a copy.deepcopy of the model carries this hook (fop._capture)
                return
            x = layer.type.read_input(layer, inputs, kwargs)
            if x is None or x.dim() < layer.type.unbatched_dim or not self.view.half_batch_now():
                return  # an unbatched input: the capture's record makes step() raise
            x = layer.type.input(layer, batch_first(layer, x.detach()))
            n = x.shape[0]
            m = self._first_rows(n)
            sync = self.options.overlap and self.ddp is not None and bool(self.ddp.require_backward_grad_sync)
            if sync:
                self._pending[i] += 1
                self._synced[i] = True
            a = x[:m]
            output.register_hook(lambda grad: self._on_grad(i, a, n, m, sync, grad))

        return hook

    def _on_grad(self, i: int, a: torch.Tensor, n: int, m: int, sync: bool, grad: torch.Tensor) -> None:
        if self.view.capture.mc_active:  # the sampled-label backward of fisher="mc" is not a training gradient
            return
        self._n[i] += n
        self._n1[i] += m
        if m > 0:
            layer = self.view.layers[i]
            part = sub_batch_grad(layer, a, layer.type.output_grad(layer, batch_first(layer, grad.detach()))[:m],
                                  self.dtype)
            self._acc[i] = part if self._acc[i] is None else self._acc[i] + part
        if sync:
            self._pending[i] -= 1
            self._launch_ready()

    def _launch_ready(self) -> None:
        """Start the next buckets whose layers all have their gradients (in bucket order, the same on every rank)."""
        while self._next_bucket < len(self.buckets) and all(
                self._synced[i] and self._pending[i] == 0 for i in self.buckets[self._next_bucket]):
            self._launch(self._next_bucket, in_backward=True)

    def _launch(self, b: int, in_backward: bool = False) -> None:
        layers = self.view.layers
        parts = []
        for i in self.buckets[b]:
            acc = self._acc[i]
            if acc is None:
                acc = torch.zeros(layers[i].shape, dtype=self.dtype, device=layers[i].weight.device)
            parts.append(acc.reshape(-1))
            self._acc[i] = None
        flat = torch.cat(parts) if len(parts) > 1 else parts[0]  # our own accumulator: reduced in place
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self._works.append((work, flat, self.buckets[b]))
        self.bytes["half_batch_grad"] += flat.numel() * flat.element_size()
        self.launches["backward" if in_backward else "step"] += 1
        self._next_bucket = b + 1

    # -- step() agreement ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def guard(self):
        """Run the body (the optimizer's local checks); then agree with every rank: raise on all if one raised,
        or if ranks disagree on whether factor statistics were captured; learn the half-batch fractions."""
        error = None
        try:
            yield
        except Exception as err:  # re-raised below, after the other ranks have been told
            error = err
        half = self.uses_half_batch and self.view.half_batch_now()
        if half:
            while self._next_bucket < len(self.buckets):  # whatever backward did not start (the same on all ranks)
                self._launch(self._next_bucket)
        opt = self.view
        have = missing = 0.0
        if error is None and opt.layers and opt.factor_step_now():
            ok = opt.capture.has_factor_data(mc=opt.fisher == "mc")
            have, missing = float(ok), float(not ok)
        flags = [1.0 if error is not None else 0.0, missing, have]
        if half:
            for i in range(len(opt.layers)):
                n, n1 = self._n[i], self._n1[i]
                flags += [n1 / n if n else 0.0, (n - n1) / n if n else 0.0]
        vec = torch.tensor(flags, dtype=torch.float64, device=self.device)
        dist.all_reduce(vec, group=self.group)
        self.bytes["control"] += vec.numel() * vec.element_size()
        total = vec.tolist()
        if total[0] > 0:
            self._raise_together(error)
        if total[1] > 0 and total[2] > 0:
            err = DistributedStepError(
                f"ranks disagree on this factor step: {int(total[1])} rank(s) captured no factor statistics (no "
                f"forward/backward since the optimizer was built or armed?) while {int(total[2])} did; every rank "
                f"must run the same forward and backward passes")
            self.end_step(failed=True)
            raise err
        if half:
            rho1 = [v / self.world_size for v in total[3::2]]
            rho2 = [v / self.world_size for v in total[4::2]]
            self._rho = (rho1, rho2)
            empty = [opt.layers[i].name for i in range(len(opt.layers)) if rho1[i] <= 0 or rho2[i] <= 0]
            self.fallback_reason = (f"no rank has samples in one of the two sub-batches of {', '.join(empty)}"
                                    if empty else None)

    def _abandon(self) -> None:
        self.end_step(failed=True)  # the step is abandoned: run forward and backward again before the next step()

    # -- what FOP reads ---------------------------------------------------------------------------------------------
    def _wait(self) -> dict[int, torch.Tensor]:
        if self._reduced is None:
            self._reduced = {}
            for work, flat, index in self._works:
                work.wait()
                start = 0
                for i in index:
                    size = self.view.layers[i].out_dim * self.view.layers[i].in_dim
                    self._reduced[i] = flat[start:start + size].view(self.view.layers[i].shape)
                    start += size
            self._works = []
        return self._reduced

    def half_batch(self, index: list[int], dtype: torch.dtype):
        """(S1, w1, w2) for the layers `index`: S1 = (1/W) sum_r S1_r stacked (B, out, in) in `dtype` (still
        scaled as the loss was: FOP unscales it), w1 = 1/rho1 and w2 = 1/rho2 shaped (B, 1, 1), so that
        g1 = w1 S1 and g2 = w2 (g_avg - S1). Waits for the all-reduces started in backward."""
        reduced = self._wait()
        S1 = torch.stack([reduced[i] for i in index]).to(dtype) / self.world_size
        rho1, rho2 = self._rho
        w1 = torch.tensor([1.0 / rho1[i] for i in index], dtype=torch.float64)
        w2 = torch.tensor([1.0 / rho2[i] for i in index], dtype=torch.float64)
        return (S1, w1.to(dtype=dtype, device=S1.device).view(-1, 1, 1),
                w2.to(dtype=dtype, device=S1.device).view(-1, 1, 1))

    # -- factors and eigendecompositions ----------------------------------------------------------------------------
    def all_reduce_factors(self, factors_A: list[torch.Tensor], factors_G: list[torch.Tensor]) -> None:
        """Average every factor over the ranks, in place: upper triangles packed into flat buffers of at most
        bucket_cap_mb, all-reduced together."""
        mats = list(factors_A) + list(factors_G)
        tri = [torch.triu_indices(m.shape[0], m.shape[0], device=m.device) for m in mats]
        sizes = [t.shape[1] * mats[0].element_size() for t in tri]
        pending = []
        for chunk in _chunks(sizes, self.cap):
            flat = torch.cat([mats[j][tri[j][0], tri[j][1]] for j in chunk])
            pending.append((dist.all_reduce(flat, group=self.group, async_op=True), flat, chunk))
            self.bytes["factors"] += flat.numel() * flat.element_size()
        for work, flat, chunk in pending:
            work.wait()
            flat.div_(self.world_size)
            start = 0
            for j in chunk:
                rows, cols = tri[j]
                values = flat[start:start + rows.numel()]
                mats[j][rows, cols] = values
                mats[j][cols, rows] = values
                start += rows.numel()

    def eigh(self, mats: list[torch.Tensor], names: list[str]):
        """([l_i], [Q_i]) of every matrix like the local decomposition (`CommView.decompose`): each rank decomposes
        the matrices it owns (an owner that fails makes every rank raise before the broadcasts), then every owner
        broadcasts its eigenpairs in flat buffers."""
        mine = [j for j, r in enumerate(self.owners) if r == self.rank]
        evals: list[torch.Tensor | None] = [None] * len(mats)
        evecs: list[torch.Tensor | None] = [None] * len(mats)
        with self.agree():
            if mine:
                lv, qv = self.view.decompose([mats[j] for j in mine], [names[j] for j in mine])
                for j, lam, q in zip(mine, lv, qv):
                    evals[j], evecs[j] = lam, q
        pending = []
        for owner in range(self.world_size):
            owned = [j for j, r in enumerate(self.owners) if r == owner]
            sizes = [(mats[j].shape[0] ** 2 + mats[j].shape[0]) * mats[j].element_size() for j in owned]
            for chunk in _chunks(sizes, self.cap):
                index = [owned[c] for c in chunk]
                if owner == self.rank:
                    flat = torch.cat([t for j in index for t in (evecs[j].reshape(-1), evals[j].reshape(-1))])
                else:
                    numel = sum(mats[j].shape[0] ** 2 + mats[j].shape[0] for j in index)
                    flat = torch.empty(numel, dtype=mats[0].dtype, device=mats[0].device)
                src = dist.get_global_rank(self.group, owner)
                pending.append((dist.broadcast(flat, src=src, group=self.group, async_op=True), flat, index, owner))
                self.bytes["eigen"] += flat.numel() * flat.element_size()
        for work, flat, index, owner in pending:
            work.wait()
            if owner == self.rank:
                continue
            start = 0
            for j in index:
                d = mats[j].shape[0]
                evecs[j] = flat[start:start + d * d].view(d, d)
                evals[j] = flat[start + d * d:start + d * d + d]
                start += d * d + d
        return evals, evecs

    # -- end of step --------------------------------------------------------------------------------------------------
    def _finish_pending(self, failed: bool = False) -> None:
        """Wait for the collectives in flight; after a failed step, an error of theirs (a dead peer) is logged
        rather than raised over the step's own error."""
        works, self._works = self._works, []
        for work, _, _ in works:
            try:
                work.wait()
            except RuntimeError as err:
                if not failed:
                    raise
                logger.warning("rank %d: a collective of the failed step failed as well: %s", self.rank, err)

    def forget_backward(self) -> None:
        """optimizer.zero_grad(): drop the half-batch sums of the backward passes since the last step (and wait out
        the all-reduces they started: every rank started the same ones), as the gradients go; keep the forward passes
        still waiting for their backward (forward, zero_grad, backward is a common order)."""
        self._finish_pending()
        waiting = [(p, s and p > 0) for p, s in zip(self._pending, self._synced)]
        self._reset()
        self._pending = [p for p, _ in waiting]
        self._synced = [s for _, s in waiting]

    def end_step(self, failed: bool = False) -> None:
        """After a step (taken, skipped or `failed`): finish what is in flight, record the bytes, reset the
        per-step state."""
        self._finish_pending(failed)
        self.last_step_bytes = dict(self.bytes)
        self.last_step_bytes["total"] = sum(self.bytes.values())
        self.total_bytes.update(self.bytes)
        self.bytes = Counter()
        self.steps += 1
        self._reset()

    def stats(self) -> dict:
        """Bytes handed to collectives: `last_step` per kind and in total, `mean_per_step` over all steps so far;
        `launches`: half-batch buckets started during backward (overlapped) and in step()."""
        total = dict(self.total_bytes)
        total["total"] = sum(self.total_bytes.values())
        return {"last_step": dict(self.last_step_bytes), "steps": self.steps, "launches": dict(self.launches),
                "mean_per_step": {k: v / max(self.steps, 1) for k, v in total.items()}}


__all__ = ["Comm", "CommView", "DistributedOptions", "DistributedStepError", "NullComm", "assign_owners", "cost_model",
           "make_comm"]
