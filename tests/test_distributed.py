"""Distributed FOP and K-FAC over gloo on CPU (fop.distributed): 2 (and 3) processes on 127.0.0.1.

The ranks are separate processes started with `python tests/test_distributed.py <scenario> <rank> <world> <port>
<out>` (what torchrun would do), each with a timeout, so a hang fails the test instead of blocking CI. One launch
runs several scenarios; the single-process references run here, in the pytest process.

Equivalence: with DDP on W ranks, after 5 steps (factor and inverse steps at 0, 2, 4) the parameters equal those
of one process on the concatenated global batch, ordered so that its first half is the union of the first halves
of every rank's batch (FOP's sub-batch 1), to 1e-5 relative. In float64: on this small, ill-conditioned problem
merely reordering the samples of one float32 process changes its parameters by ~5e-4 relative, so float32 would
measure rounding, not the algorithm.
"""

from __future__ import annotations

import contextlib
import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import flat_params, run_ranks
from torch import nn

pytestmark = pytest.mark.distributed

STEPS = 5
N_LOCAL = 6  # samples per rank and step
MICRO = [(0, 2), (2, 6)]  # gradient accumulation: two micro-batches of each rank's batch
TIMEOUT_S = 150  # per launch: a hang fails the test
PORTS = {"equiv2": 47611, "equiv3": 47612, "fail": 47613, "single": 47614, "faults": 47615,
         "hang": 47616, "killed": 47617}  # fixed, distinct per launch
HYPER = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, damping=1e-2, factor_interval=2, inverse_interval=2,
             factor_dtype=torch.float64, inverse_method="eigh")  # the sharded eigendecompositions; CHOLESKY overrides
CHOLESKY = dict(damping_mode="factored", inverse_method="cholesky")  # inverted on every rank, not sharded
CLIP = 0.02  # clip_grad_norm_'s max_norm in the clipped run: below every step's gradient norm (the test checks)
CLIPPED = dict(beta=0.3)  # a fixed beta: the adaptive one would project an unfollowed clip's error out


# -- the model, data and training loop shared by the ranks and the references --------------------------------------
def make_model() -> nn.Module:
    """Conv and Linear layers (preconditioned; one Linear without bias) and a LayerNorm (not preconditioned)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 5, 12),
                         nn.LayerNorm(12), nn.Tanh(), nn.Linear(12, 7, bias=False), nn.Tanh(),
                         nn.Linear(7, 4)).double()


class AttentionNet(nn.Module):
    """Rows of the 5 x 5 image as 5 tokens: Linear, nn.MultiheadAttention (its two projections preconditioned
    through fop._attention), mean over the tokens, Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(5, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.embed(x.flatten(0, 1))
        h, _ = self.attention(h, h, h, need_weights=False)
        return self.head(h.mean(dim=1))


def make_attention_model() -> nn.Module:
    return AttentionNet().double()


MODELS = {"attention": make_attention_model}


def global_batches(world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per step the global batch: rank r's local batch is rows [r N_LOCAL, (r+1) N_LOCAL)."""
    gen = torch.Generator().manual_seed(1234)
    return [(torch.randn(world * N_LOCAL, 1, 5, 5, generator=gen, dtype=torch.float64),
             torch.randint(0, 4, (world * N_LOCAL,), generator=gen))
            for _ in range(STEPS)]


def local(batch, rank: int):
    x, y = batch
    return x[rank * N_LOCAL:(rank + 1) * N_LOCAL], y[rank * N_LOCAL:(rank + 1) * N_LOCAL]


def halves_first(batch, world: int, lo: int = 0, hi: int = N_LOCAL):
    """Rows [lo, hi) of every rank's batch, ordered so that the first half is the union of the ranks' first halves."""
    x, y = batch
    h = (hi - lo) // 2
    idx = [r * N_LOCAL + j for r in range(world) for j in range(lo, lo + h)]
    idx += [r * N_LOCAL + j for r in range(world) for j in range(lo + h, hi)]
    return x[idx], y[idx]


def make_optimizer(kind: str, model, **kwargs):
    from fop import FOP, KFAC

    cls = KFAC if kind == "kfac" else FOP
    if not isinstance(model, nn.parallel.DistributedDataParallel):  # one process: the layers the ranks precondition
        kwargs.setdefault("exclude", [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)] or None)
    return cls(model, **{**HYPER, **kwargs})


def train_step(opt, model, x, y, clip: float | None = None) -> float | None:
    """One step; `clip`: torch.nn.utils.clip_grad_norm_ to it between backward and step (returns the norm before)."""
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    norm = None if clip is None else float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
    opt.step()
    return norm


def accumulation_step(opt, model, batch, rank: int | None = None, world: int = 1) -> None:
    """Gradient accumulation over MICRO (rows of each rank's batch), each loss weighted by its share of the batch;
    under DDP (`rank` given) the backward passes but the last run inside `no_sync()`. Without `rank`: one process on
    the global batch, each micro-batch ordered by halves_first."""
    opt.zero_grad()
    for k, (lo, hi) in enumerate(MICRO):
        if rank is None:
            x, y = halves_first(batch, world, lo, hi)
            sync = contextlib.nullcontext()
        else:
            x, y = (t[lo:hi] for t in local(batch, rank))
            sync = model.no_sync() if k < len(MICRO) - 1 else contextlib.nullcontext()
        with sync:
            (F.cross_entropy(model(x), y) * ((hi - lo) / N_LOCAL)).backward()
    opt.step()


def skipped_then_step(opt, model, x, y) -> None:
    """A backward whose step is skipped (zero_grad without step(), as a loop that drops a bad batch does), then the
    step in the order forward, zero_grad, backward: the skipped pass must leave nothing behind, the forward waiting
    for its backward everything."""
    opt.zero_grad()
    F.cross_entropy(model(2 * x.flip(0)), y).backward()
    logits = model(x)
    opt.zero_grad()
    F.cross_entropy(logits, y).backward()
    opt.step()


def scaled_step(opt, model, scaler, x, y) -> None:
    """A GradScaler step: the loss scaled by a power of 2, so the result equals the unscaled one."""
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()


# -- the rank processes ---------------------------------------------------------------------------------------------
def _rank_main(scenario: str, rank: int, world: int, port: int, out: Path) -> int:
    import torch.distributed as dist
    from fop.distributed import DistributedOptions
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fop_kernels

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    decomposed: list[int] = []  # sizes of the matrices this rank decomposed
    eigh = fop_kernels.eigh

    def counting_eigh(mats, *args, **kwargs):
        decomposed.extend(m.shape[0] for m in mats)
        return eigh(mats, *args, **kwargs)

    fop_kernels.eigh = counting_eigh
    results: dict = {}
    try:
        if scenario == "fail":
            _fail_scenario(rank, world, out)
        elif scenario == "faults":
            results = _faults_scenario(rank, world)
        elif scenario == "hang":
            results = _hang_scenario(rank, world)
        elif scenario == "killed":
            results = _killed_scenario(rank, world)
        else:
            runs = [("fop", {}), ("kfac", {}), ("fop_accum", {}), ("fop_scaler", {}), ("fop_cholesky", CHOLESKY),
                    ("fop_attention", {}), ("fop_clipped", CLIPPED), ("fop_skipped", {})]
            if world % 2 == 0:
                runs.append(("fop_ranks", {"distributed": DistributedOptions(split="ranks")}))
            else:
                try:
                    make_optimizer("fop", DDP(make_model()), distributed=DistributedOptions(split="ranks"))
                except ValueError as err:
                    results["odd_ranks_error"] = str(err)
            for kind in ("kfac", "fop"):  # a grouped conv: one Kronecker block per group, not distributed
                opt = make_optimizer(kind, DDP(nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(),
                                                             nn.Linear(4, 3))))
                results[f"grouped_{kind}"] = ([layer.name for layer in opt.layers], dict(opt.not_preconditioned()))
            for name, kwargs in runs:
                decomposed.clear()
                model = MODELS.get(name.split("_")[-1], make_model)()
                ddp = DDP(model)
                opt = make_optimizer(name.split("_")[0], ddp, **kwargs)
                scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
                step_bytes, norms = [], []
                for step, batch in enumerate(global_batches(world)):
                    if name == "fop_accum":
                        accumulation_step(opt, ddp, batch, rank, world)
                    elif name == "fop_scaler":
                        scaled_step(opt, ddp, scaler, *local(batch, rank))
                    elif name == "fop_skipped":
                        skipped_then_step(opt, ddp, *local(batch, rank))
                    else:
                        norms.append(train_step(opt, ddp, *local(batch, rank), clip=CLIP if name == "fop_clipped"
                                                else None))
                    step_bytes.append(dict(opt.comm.last_step_bytes))
                    if step == 2 and rank == 0:
                        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, out / f"{name}.pt")
                mine = flat_params(model)
                gathered = [torch.empty_like(mine) for _ in range(world)]
                dist.all_gather(gathered, mine)
                results[name] = {"params": mine, "identical": all(torch.equal(g, gathered[0]) for g in gathered),
                                 "norms": norms,
                                 "bytes": step_bytes, "decomposed": list(decomposed), "owners": opt.comm.owners,
                                 "launches": opt.comm.stats()["launches"],
                                 "dims": [layer.in_dim for layer in opt.layers] + [layer.out_dim for layer in
                                                                                   opt.layers],
                                 "grad_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
        if scenario == "equiv3":  # resume one process's state (saved by the test after 3 steps) on 3 ranks
            for kind in ("fop", "kfac"):
                state = torch.load(out / f"single_{kind}.pt")
                model = make_model()
                model.load_state_dict(state["model"])
                ddp = DDP(model)
                opt = make_optimizer(kind, ddp)
                opt.load_state_dict(state["optimizer"])
                for batch in global_batches(world)[3:]:
                    train_step(opt, ddp, *local(batch, rank))
                results[f"{kind}_resumed"] = flat_params(model)
        torch.save(results, out / f"rank{rank}.pt")
        if scenario == "hang":  # a gloo group whose collective timed out can abort in its teardown ("terminate called
            os._exit(0)  # without an active exception", 1 run in 4 under load): the results are saved, leave as is
        return 0
    except Exception as err:  # the failure scenario: report what this rank raised
        import traceback

        (out / f"rank{rank}.err").write_text(f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
        return 3
    finally:
        fop_kernels.eigh = eigh
        dist.destroy_process_group()


def _fail_scenario(rank: int, world: int, out: Path) -> None:
    """1) fisher='mc': rank 1 forgets optimizer.fisher_backward(logits) on a factor step, so its step() raises; every
    rank raises, and the ranks stay usable. 2) rank 1 feeds a batch of the wrong shape: its forward raises and the
    process exits; the other rank's next collective fails (gloo: connection closed) instead of waiting."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(make_model())
    opt = make_optimizer("fop", ddp, fisher="mc")
    x, y = local(global_batches(world)[0], rank)
    opt.zero_grad()
    logits = ddp(x)
    if rank != 1:
        opt.fisher_backward(logits)
    F.cross_entropy(logits, y).backward()
    try:
        opt.step()
        (out / f"rank{rank}.step").write_text("no error")
    except Exception as err:
        (out / f"rank{rank}.step").write_text(f"{type(err).__name__}: {err}")
    if rank == 1:
        x = x[:, :, :4]
    opt.zero_grad()
    logits = ddp(x)
    opt.fisher_backward(logits)
    F.cross_entropy(logits, y).backward()
    opt.step()


FAULTS = ("factor statistics", "decomposition", "preconditioning", "nan damping", "empty batch")


def _faults_scenario(rank: int, world: int) -> dict:
    """Faults on rank 1 only, one per step attempt at step 2 (a factor and inverse step), for FOP, K-FAC and FOP
    with Cholesky inverses: an exception in each phase of step(), a damping schedule returning NaN, an empty
    batch. Every rank must raise and change nothing; then the ranks train on identically."""
    import torch.distributed as dist
    from test_faults import same, snapshot
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fop_kernels

    def boom(*args, **kwargs):
        raise ValueError("injected fault")

    results = {}
    for name, kwargs in (("fop", {}), ("kfac", {}), ("fop_cholesky", CHOLESKY)):
        model = make_model()
        ddp = DDP(model)
        opt = make_optimizer(name.split("_")[0], ddp, **kwargs)
        batches = global_batches(world)
        for batch in batches[:2]:
            train_step(opt, ddp, *local(batch, rank))
        outcomes = {}
        for fault in FAULTS:
            x, y = local(batches[2], rank)
            patch = None
            if rank == 1:
                if fault == "factor statistics":
                    patch = (fop_kernels, "accumulate_factor")
                elif fault == "decomposition":
                    patch = (torch.linalg, "cholesky_ex") if name == "fop_cholesky" else (opt.comm.view, "decompose")
                elif fault == "preconditioning":
                    patch = (fop_kernels, {"fop": "fisher_inner_products", "kfac": "project_combine",
                                           "fop_cholesky": "combine_scalars"}[name])
                elif fault == "nan damping":
                    opt.damping = lambda step: float("nan")
                else:
                    x, y = x[:0], y[:0]
            real = None if patch is None else getattr(*patch)
            if patch is not None:
                setattr(*patch, boom)
            before = snapshot(model, opt)
            try:
                train_step(opt, ddp, x, y)
                outcome = ("no error", "")
            except Exception as err:
                outcome = (type(err).__name__, str(err))
            finally:
                if patch is not None:
                    setattr(*patch, real)
                opt.damping = HYPER["damping"]
            outcomes[fault] = (*outcome, same(before, snapshot(model, opt)))
        for batch in batches[2:]:
            train_step(opt, ddp, *local(batch, rank))
        mine = flat_params(model)
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        results[name] = {"outcomes": outcomes, "params": mine, "steps": opt.steps,
                         "identical": all(torch.equal(g, gathered[0]) for g in gathered)}
    return results


HANG_TIMEOUT_S = 3.0


def _hang_scenario(rank: int, world: int) -> dict:
    """Rank 1 stalls (sleeps) instead of calling step(); rank 0's step() must raise once the optimizer's
    `DistributedOptions(timeout=...)` has passed, not wait forever. The backward runs under no_sync() so that
    DDP's own all-reduce does not wait first."""
    import time

    from fop.distributed import DistributedOptions
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(make_model())
    opt = make_optimizer("kfac", ddp, distributed=DistributedOptions(timeout=HANG_TIMEOUT_S))
    x, y = local(global_batches(world)[0], rank)
    train_step(opt, ddp, x, y)  # one good step together
    with ddp.no_sync():
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
    if rank == 1:
        time.sleep(3 * HANG_TIMEOUT_S)
        return {"slept": True}
    start = time.monotonic()
    try:
        opt.step()
        return {"outcome": ("no error", ""), "waited": time.monotonic() - start}
    except Exception as err:
        return {"outcome": (type(err).__name__, str(err)), "waited": time.monotonic() - start, "steps": opt.steps}


def _killed_scenario(rank: int, world: int) -> dict:
    """Rank 1 dies inside step() (in its preconditioning, after the factor all-reduce and the broadcasts of a factor
    and inverse step); rank 0's step() must raise a clear error, not hang, and leave its state unchanged."""
    import time

    from fop.distributed import DistributedOptions
    from test_faults import same, snapshot
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fop_kernels

    model = make_model()
    ddp = DDP(model)
    opt = make_optimizer("fop", ddp, distributed=DistributedOptions(timeout=HANG_TIMEOUT_S))
    batches = global_batches(world)
    for batch in batches[:2]:
        train_step(opt, ddp, *local(batch, rank))
    if rank == 1:
        fop_kernels.fisher_inner_products = lambda *args, **kwargs: os._exit(5)
    opt.zero_grad()
    F.cross_entropy(ddp(local(batches[2], rank)[0]), local(batches[2], rank)[1]).backward()
    before = snapshot(model, opt)
    start = time.monotonic()
    try:
        opt.step()
        outcome = ("no error", "")
    except Exception as err:
        outcome = (type(err).__name__, str(err))
    return {"outcome": outcome, "unchanged": same(before, snapshot(model, opt)), "waited": time.monotonic() - start}


def launch(scenario: str, world: int, tmp_path: Path) -> tuple[list[int], list[dict], list[str]]:
    """Run the ranks as processes; (return codes, saved results, error texts). Fails the test on a timeout."""
    codes, logs = run_ranks(__file__, scenario, world, PORTS[scenario], tmp_path, TIMEOUT_S)
    results = [torch.load(tmp_path / f"rank{r}.pt") if (tmp_path / f"rank{r}.pt").exists() else {}
               for r in range(world)]
    errors = [(tmp_path / f"rank{r}.err").read_text() if (tmp_path / f"rank{r}.err").exists() else ""
              for r in range(world)]
    if scenario not in ("fail", "killed") and any(codes):
        pytest.fail(f"scenario {scenario!r}: ranks exited with {codes}:\n" + "\n".join(logs))
    return codes, results, errors


# -- references in this process --------------------------------------------------------------------------------------
def reference(kind: str, world: int, order: str, steps: range = range(STEPS), state=None,
              save_to: Path | None = None, model_fn=make_model, clip: float | None = None, **kwargs) -> torch.Tensor:
    """One process on the global batches (`order`: "halves" reorders them so that sub-batch 1 matches,
    "accumulate" does that per micro-batch of a gradient accumulation); `save_to`: save the final state there;
    `clip`: clip_grad_norm_ to it before every step."""
    model = model_fn()
    opt = make_optimizer(kind, model, **kwargs)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    batches = global_batches(world)
    for step in steps:
        if order == "accumulate":
            accumulation_step(opt, model, batches[step], world=world)
            continue
        batch = halves_first(batches[step], world) if order == "halves" else batches[step]
        train_step(opt, model, *batch, clip=clip)
    if save_to is not None:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, save_to)
    return flat_params(model)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rtol * scale, f"max abs difference {err:.3e} > {rtol:g} x max |expected| {scale:.3e}"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("equiv2")
    _, results, _ = launch("equiv2", 2, tmp)
    return tmp, results


# -- tests ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fop", "kfac"])
def test_two_ranks_equal_one_process_on_the_global_batch(two_ranks, kind):
    _, results = two_ranks
    expected = reference(kind, 2, "halves")
    for rank in range(2):
        assert_rel_close(results[rank][kind]["params"], expected)
    assert not torch.equal(expected, flat_params(make_model())), "training did not move the parameters"


def test_two_ranks_with_multihead_attention_equal_one_process(two_ranks):
    """FOP's sub-batch sums of the attention projections go through fop._attention on both consumers (the capture and
    the distributed half-batch hooks)."""
    _, results = two_ranks
    expected = reference("fop", 2, "halves", model_fn=make_attention_model)
    for rank in range(2):
        assert_rel_close(results[rank]["fop_attention"]["params"], expected)
    assert not torch.equal(expected, flat_params(make_attention_model()))


def test_two_ranks_with_cholesky_inverses_equal_one_process(two_ranks):
    _, results = two_ranks
    expected = reference("fop", 2, "halves", **CHOLESKY)
    for rank in range(2):
        assert_rel_close(results[rank]["fop_cholesky"]["params"], expected)
        assert results[rank]["fop_cholesky"]["decomposed"] == []  # no eigendecomposition at all
    # the same update as the eigenbasis with the factored damping (float64: equal to rounding)
    assert_rel_close(expected, reference("fop", 2, "halves", damping_mode="factored"), rtol=1e-8)


@pytest.mark.parametrize("kind", ["fop", "kfac"])
def test_block_diagonal_layers_are_left_out_with_the_reason(two_ranks, kind):
    """Grouped convs and norm layers (one Kronecker block per group or feature) take the unpreconditioned update
    under distributed K-FAC/FOP, with the reason, instead of failing the construction; make_model's LayerNorm is
    left out the same way (the references below exclude it)."""
    _, results = two_ranks
    for rank in range(2):
        names, reasons = results[rank][f"grouped_{kind}"]
        assert names == ["2"] and reasons["0"].startswith("block-diagonal factors") and "distributed" in reasons["0"]


def test_primary_secondary_split_equals_rank_batches_as_sub_batches(two_ranks):
    _, results = two_ranks
    expected = reference("fop", 2, "concatenated")  # first half = rank 0's batch, second half = rank 1's
    for rank in range(2):
        assert_rel_close(results[rank]["fop_ranks"]["params"], expected)


def test_grad_scaler(two_ranks):
    """torch.amp.GradScaler: the all-reduced half-batch gradients are unscaled like .grad."""
    _, results = two_ranks
    expected = reference("fop", 2, "halves")
    for rank in range(2):
        assert_rel_close(results[rank]["fop_scaler"]["params"], expected)


def test_gradient_clipping_is_followed_by_the_sub_batches(two_ranks):
    """clip_grad_norm_ between backward and step under DDP: the all-reduced first half is rescaled with DDP's
    averaged .grad (marked after DDP writes it), so the ranks step as one process clipping the global gradient
    (fixed beta 0.3; before, g_diff kept (1 - c) g_avg: off by far more than the tolerance)."""
    _, results = two_ranks
    expected = reference("fop", 2, "halves", clip=CLIP, **CLIPPED)
    for rank in range(2):
        assert all(n > 2 * CLIP for n in results[rank]["fop_clipped"]["norms"])  # the clip binds at every step
        assert_rel_close(results[rank]["fop_clipped"]["params"], expected)
    assert not torch.equal(expected, reference("fop", 2, "halves", **CLIPPED))


def test_gradient_accumulation_with_no_sync(two_ranks):
    """DDP's no_sync() micro-batches: sub-batch 1 is the union of the first halves of every micro-batch of every
    rank, and the half-batch all-reduces start in the backward pass that DDP synchronizes."""
    _, results = two_ranks
    expected = reference("fop", 2, "accumulate")
    for rank in range(2):
        assert_rel_close(results[rank]["fop_accum"]["params"], expected)
        assert results[rank]["fop_accum"]["launches"] == {"backward": STEPS * 1}


def test_a_skipped_backward_leaves_nothing_behind(two_ranks):
    """Before every step a backward on other inputs, then zero_grad() instead of step(): its half-batch sums (and the
    all-reduces it started) go with its gradients, so the ranks step as if it had not run (before, the step read the
    skipped pass's all-reduced first half)."""
    _, results = two_ranks
    expected = reference("fop", 2, "halves")
    for rank in range(2):
        assert_rel_close(results[rank]["fop_skipped"]["params"], expected)
        assert results[rank]["fop_skipped"]["launches"] == {"backward": 2 * STEPS}


def test_half_batch_all_reduce_starts_in_backward(two_ranks):
    _, results = two_ranks
    for rank in range(2):
        assert results[rank]["fop"]["launches"] == {"backward": STEPS}  # one bucket per step, all in backward
        assert results[rank]["kfac"]["launches"] == {}


@pytest.mark.parametrize("kind", ["fop", "kfac", "fop_ranks", "fop_accum", "fop_scaler", "fop_cholesky",
                                  "fop_skipped"])
def test_parameters_identical_across_ranks(two_ranks, kind):
    _, results = two_ranks
    assert all(results[rank][kind]["identical"] for rank in range(2))
    assert torch.equal(results[0][kind]["params"], results[1][kind]["params"])


def test_decompositions_sharded_by_owner(two_ranks):
    _, results = two_ranks
    from fop.distributed import assign_owners

    for kind in ("fop", "kfac"):
        dims = results[0][kind]["dims"]
        owners = assign_owners(dims, 2)
        assert results[0][kind]["owners"] == owners
        inverse_steps = 4  # steps 0, 1 (young statistics), 2, 4
        for rank in range(2):
            mine = sorted(d for d, r in zip(dims, owners) if r == rank)
            assert sorted(results[rank][kind]["decomposed"]) == sorted(mine * inverse_steps)
        load = [sum(d ** 3 for d, r in zip(dims, owners) if r == rank) for rank in range(2)]
        assert max(load) <= sum(load) - max(load) + max(dims) ** 3  # greedy balance bound


def test_communicated_bytes_follow_the_cost_model(two_ranks):
    _, results = two_ranks
    from fop.distributed import cost_model
    from fop.kfac import on_schedule

    layers = make_optimizer("fop", make_model()).layers
    for kind in ("fop", "kfac"):
        for rank in range(2):
            for step, got in enumerate(results[rank][kind]["bytes"]):
                refresh = on_schedule(step, 2)
                expected = cost_model(layers, 2, half_batch=kind == "fop", factor_step=refresh,
                                      inverse_step=refresh, grad_bytes=8, factor_bytes=8)
                assert got == expected, (kind, rank, step)
                if not refresh:  # ordinary step: at most DDP's gradient volume (plus the agreement vector)
                    assert got["total"] - got["control"] <= results[rank][kind]["grad_bytes"]


def test_state_dict_from_rank0_restores_in_one_process(two_ranks):
    tmp, results = two_ranks
    for kind in ("fop", "kfac"):
        state = torch.load(tmp / f"{kind}.pt")
        resumed = reference(kind, 2, "halves", steps=range(3, STEPS), state=state)
        assert_rel_close(resumed, results[0][kind]["params"])


def test_three_ranks_equal_one_process(tmp_path):
    """Also: a state_dict saved by one process after 3 steps restores on 3 ranks, which finish identically."""
    for kind in ("fop", "kfac"):
        reference(kind, 3, "halves", steps=range(3), save_to=tmp_path / f"single_{kind}.pt")
    _, results, _ = launch("equiv3", 3, tmp_path)
    for kind in ("fop", "kfac"):
        expected = reference(kind, 3, "halves")
        for rank in range(3):
            assert results[rank][kind]["identical"]
            assert_rel_close(results[rank][kind]["params"], expected)
            assert_rel_close(results[rank][f"{kind}_resumed"], expected)
    assert "even world size" in results[0]["odd_ranks_error"]


def test_a_raising_rank_makes_every_rank_fail(tmp_path):
    codes, _, errors = launch("fail", 2, tmp_path)
    in_step = [(tmp_path / f"rank{r}.step").read_text() for r in range(2)]
    assert in_step[1].startswith("RuntimeError") and "fisher_backward" in in_step[1]
    assert in_step[0].startswith("DistributedStepError") and "rank 1" in in_step[0]
    assert "fisher_backward" in in_step[0]
    # then rank 1's forward raises on a bad batch and it exits; rank 0 fails in its next collective, no hang
    assert codes == [3, 3], errors
    assert errors[1].startswith("RuntimeError") and "shapes cannot be multiplied" in errors[1]
    assert errors[0].startswith("RuntimeError") and "peer" in errors[0]  # gloo: "Connection closed/reset by peer"


@pytest.mark.parametrize("world", [2, 3])
def test_a_fault_on_one_rank_raises_on_every_rank_and_changes_nothing(tmp_path, world):
    """An exception in each phase of step() (factor statistics, the owned decompositions, the preconditioning), a
    NaN damping and an empty batch, each on rank 1 only: both ranks raise (rank 1 its error, rank 0
    DistributedStepError naming rank 1), no rank hangs, state is unchanged; then both train on identically and
    finish as one process that never saw the faults."""
    _, results, _ = launch("faults", world, tmp_path)
    expected_msg = {"factor statistics": "injected fault", "decomposition": "injected fault",
                    "preconditioning": "injected fault", "nan damping": "must be finite", "empty batch": "0 samples"}
    for name in ("fop", "kfac", "fop_cholesky"):
        for fault in FAULTS:
            kind1, msg1, unchanged1 = results[1][name]["outcomes"][fault]
            assert kind1 != "no error" and expected_msg[fault] in msg1, (name, fault, kind1, msg1)
            assert unchanged1, (name, fault)
            for other in set(range(world)) - {1}:
                kind0, msg0, unchanged0 = results[other][name]["outcomes"][fault]
                assert kind0 == "DistributedStepError" and "rank 1" in msg0 and expected_msg[fault] in msg0, (
                    name, fault, other, kind0, msg0)
                assert unchanged0, (name, fault, other)
        assert results[0][name]["identical"] and results[0][name]["steps"] == STEPS
        kind = name.split("_")[0]
        expected = reference(kind, world, "halves", **(CHOLESKY if name.endswith("cholesky") else {}))
        assert_rel_close(results[0][name]["params"], expected)


def test_a_stalled_rank_makes_step_raise_after_the_timeout(tmp_path):
    _, results, _ = launch("hang", 2, tmp_path)
    kind, message = results[0]["outcome"]
    assert kind == "RuntimeError" and "Timed out" in message, results[0]  # gloo names the 3000 ms it waited
    assert results[0]["steps"] == 1 and results[1]["slept"]


def test_a_rank_killed_inside_step_makes_the_other_raise_with_its_state_unchanged(tmp_path):
    codes, results, _ = launch("killed", 2, tmp_path)
    assert codes[1] == 5 and codes[0] == 0, codes
    kind, message = results[0]["outcome"]
    assert kind == "RuntimeError" and ("peer" in message or "Timed out" in message), results[0]
    assert results[0]["unchanged"]


def test_world_size_one_is_the_plain_path():
    import torch.distributed as dist
    from fop.distributed import NullComm
    from torch.nn.parallel import DistributedDataParallel as DDP

    batches = global_batches(1)
    for kind in ("fop", "kfac"):
        plain_model = make_model()
        plain = make_optimizer(kind, plain_model, exclude=None)  # world size 1 preconditions its LayerNorm too
        for batch in batches:
            train_step(plain, plain_model, *batch)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{PORTS['single']}", rank=0, world_size=1,
                                timeout=timedelta(seconds=60))
        try:
            model = make_model()
            ddp = DDP(model)
            opt = make_optimizer(kind, ddp)
            assert isinstance(opt.comm, NullComm)
            for batch in batches:
                train_step(opt, ddp, *batch)
        finally:
            dist.destroy_process_group()
        assert torch.equal(flat_params(model), flat_params(plain_model))
        assert opt.state_dict()["state"].keys() == plain.state_dict()["state"].keys()


def test_bad_distributed_arguments():
    from fop.distributed import DistributedOptions

    with pytest.raises(ValueError, match="split"):
        DistributedOptions(split="thirds")
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        DistributedOptions(bucket_cap_mb=0)
    for bad in (0, -1.0, float("inf"), "30"):
        with pytest.raises(ValueError, match="timeout"):
            DistributedOptions(timeout=bad)
    with pytest.raises(TypeError, match="distributed"):
        make_optimizer("fop", make_model(), distributed="yes")
    with pytest.raises(RuntimeError, match="init_process_group"):
        make_optimizer("fop", make_model(), distributed=True)


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])))
