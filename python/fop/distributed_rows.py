"""FROG, K-FROG and AdaFisher across ranks (torch.distributed, beside DistributedDataParallel).

The optimizer is built on the DDP model; DDP averages `.grad` as usual (FROG's and K-FROG's momentum, AdaFisher's
first moment), and the optimizer synchronizes its curvature on its own process group (a copy of DDP's):

- Agreement, at the start of every `step()` (as fop.distributed does for FOP): one small all-reduce carries an
  error flag and every rank's number of captured samples per layer, so every rank knows the global batch
  N = sum_r n_r and where its own samples sit in it (rank r holds global samples [sum_{q<r} n_q, ... + n_r)). A
  rank whose checks raise still joins, and every rank raises (the failing one its own error, the others
  `fop.distributed.DistributedStepError`).
- FROG: every rank draws the same s global sample indices (the optimizer's generator, in step with rank 0's) and
  keeps those that fall in its own batch. A row Fisher is a sum over samples, F_r = sum_r' F_r^(r'), so each rank
  applies its own samples' part and the parts are summed: one all-reduce of the traces t_r (R per layer), then one
  per CG round, all layers in lockstep in one flat buffer: the R x D matvec parts (cg_iters - 1 rounds, one more
  with warm_start) and the R quadratic forms of the last iteration. Every rank then holds the same solution.
- K-FROG: the same CG on the sampled input factor; the row scaling y_r (R per layer) and the diagonal of the
  input factor are summed over ranks in the first round.
- AdaFisher/AdaFisherW, on refresh steps only: the fresh diagonals, as additive sums over samples (weighted by
  n_r / N and, for the output gradients of a mean loss, by the per-rank scale of dy), in one bucketed all-reduce
  before their min-max normalization. Other steps communicate nothing beyond the agreement vector.

Every round's buffer carries an error flag in its last entry: a rank whose local work raises contributes zeros and
the flag, and every rank raises together instead of waiting in the next collective. Buffers are cut into buckets of
at most `bucket_cap_mb`. Cost model and the choice against gathering the sampled activations: docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from fop._layers import Conv2dType
from fop.distributed import DistributedOptions, NullComm, RankAgreement, own_group, resolve_distributed
from fop.row_cg import cg_schedule, row_cg_requests, rowdot

__all__ = ["RowsComm", "RowsView", "cost_model", "gather_cost_model", "lockstep_row_cg", "make_rows_comm",
           "rows_view_of"]


@dataclass
class RowsView:
    """What RowsComm needs of its optimizer, and nothing else: the optimizer's name (for errors), its number of
    preconditioned layers, the device of its parameters, this rank's captured samples per layer, and what to do
    when a step is abandoned (drop the captures, arm the hooks again)."""

    name: str
    n_layers: int
    device: torch.device
    local_sample_counts: Callable[[], list[int]]
    after_skipped_step: Callable[[], None]


def rows_view_of(optimizer) -> RowsView:
    """The RowsView of a FROG / K-FROG / AdaFisher optimizer: bound methods and counts, not the optimizer."""
    first = next(p for g in optimizer.param_groups for p in g["params"])
    return RowsView(type(optimizer).__name__, len(optimizer.layers), first.device,
                    optimizer._local_sample_counts, optimizer._after_skipped_step)


def make_rows_comm(view: RowsView, model: nn.Module, distributed) -> NullComm | RowsComm:
    """The communicator of a FROG / K-FROG / AdaFisher optimizer (`view`: what it needs of that optimizer).
    `distributed`: None (on when a process group of more than one rank is initialized), False (off: each rank keeps
    its own curvature), True, or a fop.distributed.DistributedOptions (process_group and bucket_cap_mb are used;
    split and overlap are FOP's)."""
    if isinstance(distributed, DistributedOptions) and distributed.split != "halves":
        raise ValueError(f"split={distributed.split!r} chooses FOP's two sub-batches; {view.name} has none")
    resolved = resolve_distributed(model, distributed)
    if resolved is None:
        return NullComm()
    options, _, base = resolved
    if dist.get_world_size(base) == 1:
        return NullComm()
    return RowsComm(view, own_group(options, base), options)


class _RoundFailed(Exception):
    """Raised by RowsComm.round on a rank whose local work raised (carries that error)."""


class RowsComm(RankAgreement):
    """Agreement and summed rounds of one FROG / K-FROG / AdaFisher optimizer on `group` (module docstring)."""

    active = True

    def __init__(self, view: RowsView, group, options: DistributedOptions):
        self.view, self.group, self.options = view, group, options
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = view.device if "nccl" in str(dist.get_backend(group)) else torch.device("cpu")
        self.cap = int(options.bucket_cap_mb * 2**20)
        self.counts: list[list[int]] | None = None  # per layer, the captured samples of every rank
        self.bytes = Counter()
        self.total_bytes = Counter()
        self.last_step_bytes: dict[str, int] = {"total": 0}
        self.steps = 0

    # -- agreement ---------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def guard(self):
        """Run the body (the optimizer's local checks), then agree: raise on every rank if one raised; learn every
        rank's captured sample count per layer (`counts`)."""
        error = None
        try:
            yield
        except Exception as err:  # re-raised below, after the other ranks have been told
            error = err
        L = self.view.n_layers
        local = [0] * L
        if error is None:
            try:
                local = self.view.local_sample_counts()
            except Exception as err:  # the same: told first, raised after
                error = err
        vec = torch.zeros(1 + self.world_size * L, dtype=torch.float64)
        vec[0] = float(error is not None)
        vec[1 + self.rank * L:1 + (self.rank + 1) * L] = torch.tensor(local, dtype=torch.float64)
        vec = vec.to(self.device)
        dist.all_reduce(vec, group=self.group)
        self.bytes["control"] += vec.numel() * vec.element_size()
        total = vec.cpu()
        if total[0] > 0:
            self._raise_together(error)
        per_rank = total[1:].reshape(self.world_size, L).round().long()
        self.counts = per_rank.T.tolist()

    def _abandon(self) -> None:
        self.end_step()  # the step is abandoned: its captures are dropped; run forward and backward again
        self.view.after_skipped_step()

    def offset(self, i: int) -> int:
        """Where this rank's samples of layer i start in the global batch."""
        return sum(self.counts[i][:self.rank])

    def local_indices(self, idx: torch.Tensor | None, i: int) -> torch.Tensor:
        """This rank's part of the global sample indices `idx` of layer i (None: all N), as local indices."""
        n, lo = self.counts[i][self.rank], self.offset(i)
        if idx is None:
            return torch.arange(n)
        idx = idx.cpu()
        return idx[(idx >= lo) & (idx < lo + n)] - lo

    # -- summed rounds ---------------------------------------------------------------------------------------------
    def round(self, kind: str, shapes: list[tuple[int, ...]], dtype: torch.dtype, compute) -> list[torch.Tensor]:
        """The sums over ranks of the tensors `compute()` returns (shaped `shapes`, the same on every rank), in one
        flat buffer cut into buckets of at most bucket_cap_mb, all-reduced together. If `compute` raises on any
        rank, every rank raises (module docstring)."""
        error = None
        try:
            parts = compute()
            if [tuple(p.shape) for p in parts] != [tuple(s) for s in shapes]:
                raise RuntimeError(f"distributed {kind} round: local parts shaped {[tuple(p.shape) for p in parts]}, "
                                   f"expected {shapes}")
        except Exception as err:  # told to the others through the flag, raised below
            error, parts = err, None
        numel = [math.prod(s) for s in shapes]
        if parts is None:
            flat = torch.zeros(sum(numel) + 1, dtype=dtype, device=self.device)
            flat[-1] = 1.0
        else:
            flat = torch.cat([p.reshape(-1).to(device=self.device, dtype=dtype) for p in parts]
                             + [torch.zeros(1, dtype=dtype, device=self.device)])
        step = max(1, self.cap // flat.element_size())
        works = [dist.all_reduce(flat[a:a + step], group=self.group, async_op=True) for a in range(0, flat.numel(),
                                                                                                     step)]
        for work in works:
            work.wait()
        self.bytes[kind] += flat.numel() * flat.element_size()
        if float(flat[-1]) > 0:  # one host sync per round: the flag
            self._raise_together(error, finish=False)
        out, start = [], 0
        home = parts[0].device if parts else self.device
        for s, k in zip(shapes, numel):
            out.append(flat[start:start + k].view(s).to(home))
            start += k
        return out

    # -- end of step ---------------------------------------------------------------------------------------------------
    def remove(self) -> None:
        """No hooks of its own."""

    def forget_backward(self) -> None:
        """Nothing kept from a backward pass: the rows are gathered in step()."""

    def end_step(self, failed: bool = False) -> None:
        """After a step (taken, skipped or abandoned): record the bytes, reset the per-step state."""
        self.last_step_bytes = dict(self.bytes)
        self.last_step_bytes["total"] = sum(self.bytes.values())
        self.total_bytes.update(self.bytes)
        self.bytes = Counter()
        self.counts = None
        self.steps += 1

    def stats(self) -> dict:
        """Bytes handed to collectives: `last_step` per kind and in total, `mean_per_step` over all steps."""
        total = dict(self.total_bytes)
        total["total"] = sum(self.total_bytes.values())
        return {"last_step": dict(self.last_step_bytes), "steps": self.steps,
                "mean_per_step": {k: v / max(self.steps, 1) for k, v in total.items()}}


def lockstep_row_cg(comm: RowsComm, shapes: list[tuple[int, int]], iters: list[int], warm: list[bool],
                    dtype: torch.dtype, build) -> list[torch.Tensor]:
    """Row CG (fop.frog.row_cg_requests) of several layers at once across ranks: one summed round per CG request.

    `build()` runs inside the first round and returns per layer (systems, B, x0); systems has `matvec_data`,
    `quad_data` (this rank's samples' part) and `damping`. Each round sums the parts over ranks and adds the
    damping: F^ P = sum_ranks data(P) + damping P. Returns z per layer, the same on every rank."""
    schedules = [cg_schedule(k, w) for k, w in zip(iters, warm)]
    state: dict = {}
    results: list = [None] * len(shapes)

    def compute(k: int, active: list[int]):
        if k == 0:
            items = build()
            state["systems"] = [it[0] for it in items]
            state["solves"] = [row_cg_requests(B, n, x0) for (_, B, x0), n in zip(items, iters)]
            state["requests"] = [next(s) for s in state["solves"]]
        else:
            for j in active:
                state["requests"][j] = state["solves"][j].send(results[j])
        parts = []
        for j in active:
            kind, P = state["requests"][j]
            systems = state["systems"][j]
            parts.append(systems.matvec_data(P) if kind == "matvec" else systems.quad_data(P))
        return parts

    for k in range(max(len(s) for s in schedules)):
        active = [j for j, s in enumerate(schedules) if k < len(s)]
        round_shapes = [shapes[j] if schedules[j][k] == "matvec" else shapes[j][:1] for j in active]
        sums = comm.round("cg", round_shapes, dtype, lambda k=k, active=active: compute(k, active))
        for j, total in zip(active, sums):
            kind, P = state["requests"][j]
            total = total.to(P.dtype)  # the round's dtype is the widest of the layers'
            damping = state["systems"][j].damping
            results[j] = total.add_(P, alpha=damping) if kind == "matvec" else total + damping * rowdot(P, P)
    out = []
    for j, solve in enumerate(state["solves"]):
        try:
            solve.send(results[j])
        except StopIteration as done:
            out.append(done.value)
    return out


def _rows_dims(layers, fold_bias: bool) -> tuple[list[int], list[int]]:
    return ([layer.weight.shape[0] for layer in layers],
            [layer.weight[0].numel() + int(fold_bias and layer.bias is not None) for layer in layers])


def cost_model(kind: str, layers, world: int, *, cg_iters: int = 4, warm_start: bool = False,
               fold_bias: bool = True, refresh: bool = True, value_bytes: int = 4,
               diagonal_sizes: list[tuple[int, int]] | None = None, kl_clip: bool = True) -> dict[str, int]:
    """Payload bytes one rank hands to the collectives of one step (what `RowsComm.last_step_bytes` reports), for
    `kind` "frog", "kfrog" or "adafisher"; every summed round's buffer carries a one-entry flag.

    control: the agreement vector before the step's work, 8 (1 + W L), and the error flag after it, 8. FROG: the
    traces (R per layer), (cg_iters - 1 [+ 1 warm_start]) rounds of the R x D matvec parts, the last iteration's R
    quadratic forms. K-FROG: y_r (R) and the input diagonal's data (C_in kh kw + 1 for a conv, D for a Linear) per
    layer in one round, then the same CG rounds without a warm start, and with its trust region on (`kl_clip`) one
    more round of U_r^T A U_r (R) and the input row count (1) per layer. AdaFisher: on refresh steps only, H and S of
    every layer in one round (`diagonal_sizes`: the lengths of each layer's H and S, fop.adafisher.additive_sizes,
    required for "adafisher")."""
    L = len(layers)
    out = {"control": 8 * (1 + world * L) + 8}
    if kind == "adafisher":
        if diagonal_sizes is None or len(diagonal_sizes) != L:
            raise ValueError("cost_model('adafisher', ...) needs diagonal_sizes: (len H, len S) of every layer")
        if refresh:
            out["diagonals"] = value_bytes * (sum(h + s for h, s in diagonal_sizes) + 1)
    else:
        rows, dims = _rows_dims(layers, fold_bias)
        matvec_rounds = cg_iters - 1 + int(warm_start and kind == "frog")
        cg = matvec_rounds * (sum(r * d for r, d in zip(rows, dims)) + 1) + sum(rows) + 1
        if kind == "frog":
            out["trace"] = value_bytes * (sum(rows) + 1)
        else:
            data = [layer.weight.shape[1] * layer.conv["groups"] * layer.weight[0, 0].numel() + 1
                    if isinstance(layer.type, Conv2dType)
                    else layer.weight.shape[1] + int(fold_bias and layer.bias is not None) for layer in layers]
            out["stats"] = value_bytes * (sum(rows) + sum(data) + 1)
            if kl_clip:
                out["kl"] = value_bytes * (sum(rows) + L + 1)
        out["cg"] = value_bytes * cg
    out["total"] = sum(out.values())
    return out


def gather_cost_model(sample_numel: list[int], s: int, world: int, value_bytes: int = 4) -> int:
    """Bytes every rank would receive per step if FROG all-gathered the s sampled samples' inputs and output
    gradients instead: (W - 1) / W of b s sum_l (|x_l| + |dy_l|), `sample_numel` the per-sample sizes per layer."""
    return int(value_bytes * s * sum(sample_numel) * (world - 1) / world)
