"""FROG, K-FROG and AdaFisher/AdaFisherW across gloo ranks on CPU (fop.distributed_rows): 2 and 3 processes.

As in tests/test_distributed.py, the ranks are separate processes (`python tests/test_distributed_rows.py <scenario>
<rank> <world> <port> <out>`), each launch with a timeout so that a hang fails the test; the single-process
references run in the pytest process. Equivalence: with DDP on W ranks, after 5 steps the parameters equal those
of one process on the concatenated global batch (rank 0's samples first), with the same seed, to 1e-9 relative in
float64 (FROG and K-FROG draw the same s of the N = 6 W samples; AdaFisher refreshes at steps 0, 2, 4).
"""

from __future__ import annotations

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
N_LOCAL = 6
TIMEOUT_S = 150
PORTS = {"equiv2": 47631, "equiv3": 47632, "fail": 47633}
RUNS = {  # name: (class name, keyword arguments)
    "frog": ("FROG", dict(lr=0.05, momentum=0.9, weight_decay=1e-3, sample_size=5, seed=3)),
    "frog_warm": ("FROG", dict(lr=0.05, momentum=0.9, sample_size=None, warm_start=True, fold_bias=False, seed=4)),
    "frog_scaler": ("FROG", dict(lr=0.05, momentum=0.9, sample_size=7, seed=5)),
    "kfrog": ("KFROG", dict(lr=1e-3, momentum=0.5, sample_size=5, y_momentum=0.9, fold_bias=True, seed=6)),
    "kfrog_plain": ("KFROG", dict(lr=0.05, sample_size=None, seed=7)),
    "adafisher": ("AdaFisher", dict(lr=0.01, factor_interval=2, weight_decay=1e-3)),
    "adafisherw": ("AdaFisherW", dict(lr=0.01, factor_interval=2, weight_decay=1e-2, ema="average")),
}


def make_model() -> nn.Module:
    """Conv layers (one strided, one without bias), Linear layers and a LayerNorm (AdaFisher preconditions it)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 3, stride=2, bias=False),
                         nn.Tanh(), nn.Flatten(), nn.Linear(4 * 2 * 2, 12), nn.LayerNorm(12), nn.Tanh(),
                         nn.Linear(12, 4)).double()


def make_optimizer(name: str, model, **kwargs):
    import fop

    cls, hyper = RUNS[name]
    return getattr(fop, cls)(model, **hyper, **kwargs)


def global_batches(world: int):
    gen = torch.Generator().manual_seed(4321)
    return [(torch.randn(world * N_LOCAL, 1, 5, 5, generator=gen, dtype=torch.float64),
             torch.randint(0, 4, (world * N_LOCAL,), generator=gen)) for _ in range(STEPS)]


def local(batch, rank: int):
    return tuple(t[rank * N_LOCAL:(rank + 1) * N_LOCAL] for t in batch)


def train_step(opt, model, x, y, scaler=None) -> None:
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    if scaler is None:
        loss.backward()
        opt.step()
        return
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


# -- the rank processes ---------------------------------------------------------------------------------------------
def _rank_main(scenario: str, rank: int, world: int, port: int, out: Path) -> int:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    results: dict = {}
    try:
        if scenario == "fail":
            _fail_scenario(rank, world, out, results)
        else:
            for name in RUNS:
                torch.manual_seed(100 + rank)  # ranks' global generators differ: the seeds given are the same
                model = make_model()
                ddp = DDP(model)
                opt = make_optimizer(name, ddp)
                scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if name.endswith("scaler") else None
                step_bytes = []
                for batch in global_batches(world):
                    train_step(opt, ddp, *local(batch, rank), scaler=scaler)
                    step_bytes.append(dict(opt.comm.last_step_bytes))
                mine = flat_params(model)
                gathered = [torch.empty_like(mine) for _ in range(world)]
                dist.all_gather(gathered, mine)
                results[name] = {"params": mine, "identical": all(torch.equal(g, gathered[0]) for g in gathered),
                                 "bytes": step_bytes, "active": opt.comm.active,
                                 "grad_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
        torch.save(results, out / f"rank{rank}.pt")
        return 0
    except Exception as err:
        import traceback

        (out / f"rank{rank}.err").write_text(f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
        return 3
    finally:
        dist.destroy_process_group()


def _fail_scenario(rank: int, world: int, out: Path, results: dict) -> None:
    """Rank 1 fails in three places of step(): its gradient check (inside the agreement), FROG's local trace (a
    summed round) and AdaFisher's local diagonals (the refresh round). Every rank must raise each time, then one
    ordinary step runs on every rank and leaves the parameters identical."""
    import fop.adafisher
    import fop.frog
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, y = local(global_batches(world)[0], rank)
    errors = []
    for name, how in (("frog", "nan"), ("frog", "trace"), ("kfrog", "nan"), ("adafisher", "diagonals")):
        model = make_model()
        ddp = DDP(model)
        opt = make_optimizer(name, ddp)
        patched = []
        if rank == 1 and how == "trace":
            patched.append((fop.frog, "conv_row_trace"))
        if rank == 1 and how == "diagonals":
            patched.append((fop.adafisher, "input_diagonal"))
        saved = [(mod, attr, getattr(mod, attr)) for mod, attr in patched]

        def broken(*args, **kwargs):
            raise RuntimeError("injected failure")

        for mod, attr in patched:
            setattr(mod, attr, broken)
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        if rank == 1 and how == "nan":
            model[0].weight.grad[0, 0, 0, 0] = float("nan")
        try:
            opt.step()
            errors.append("no error")
        except Exception as err:
            errors.append(f"{type(err).__name__}: {err}")
        for mod, attr, fn in saved:
            setattr(mod, attr, fn)
        train_step(opt, ddp, x, y)  # the group and the optimizer still work
        mine = flat_params(model)
        gathered = [torch.empty_like(mine) for _ in range(world)]
        torch.distributed.all_gather(gathered, mine)
        errors.append(all(torch.equal(g, gathered[0]) for g in gathered))
    results["errors"] = errors


def launch(scenario: str, world: int, tmp_path: Path) -> list[dict]:
    codes, logs = run_ranks(__file__, scenario, world, PORTS[scenario], tmp_path, TIMEOUT_S)
    if any(codes):
        errors = [(tmp_path / f"rank{r}.err").read_text() if (tmp_path / f"rank{r}.err").exists() else ""
                  for r in range(world)]
        pytest.fail(f"scenario {scenario!r}: ranks exited with {codes}:\n" + "\n".join(logs + errors))
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def reference(name: str, world: int) -> torch.Tensor:
    """One process on the global batches, the same hyperparameters and seed."""
    model = make_model()
    opt = make_optimizer(name, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if name.endswith("scaler") else None
    for batch in global_batches(world):
        train_step(opt, model, *batch, scaler=scaler)
    return flat_params(model)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-9, what: str = "") -> None:
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rtol * scale, f"{what}: max abs difference {err:.3e} > {rtol:g} x max |expected| {scale:.3e}"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return launch("equiv2", 2, tmp_path_factory.mktemp("rows2"))


@pytest.mark.parametrize("name", list(RUNS))
def test_two_ranks_equal_one_process_on_the_global_batch(two_ranks, name):
    start = flat_params(make_model())
    expected = reference(name, 2)
    assert (expected - start).abs().max() > 1e-3  # the steps moved the parameters
    for r in two_ranks:
        assert r[name]["active"] and r[name]["identical"]
        assert_rel_close(r[name]["params"], expected, what=name)


def test_two_ranks_differ_from_each_rank_alone(two_ranks):
    """The check above can fail: one process on rank 0's half of the batch ends elsewhere."""
    model = make_model()
    opt = make_optimizer("frog", model)
    for batch in global_batches(2):
        train_step(opt, model, *local(batch, 0))
    assert (flat_params(model) - two_ranks[0]["frog"]["params"]).abs().max() > 1e-4


def test_bytes_follow_the_cost_model(two_ranks):
    from fop.adafisher import additive_sizes
    from fop.distributed_rows import cost_model

    for name, kind in (("frog", "frog"), ("frog_warm", "frog"), ("kfrog", "kfrog"), ("adafisher", "adafisher")):
        opt = make_optimizer(name, make_model())
        hyper = RUNS[name][1]
        for step, got in enumerate(two_ranks[0][name]["bytes"]):
            want = cost_model(kind, opt.layers, 2, warm_start=hyper.get("warm_start", False) and step > 0,
                              fold_bias=getattr(opt, "fold_bias", True), refresh=step % 2 == 0, value_bytes=8,
                              diagonal_sizes=[additive_sizes(layer) for layer in opt.layers],
                              kl_clip=getattr(opt, "kl_clip", None) is not None)
            assert got == want, (name, step)


def test_three_ranks_equal_one_process(tmp_path):
    results = launch("equiv3", 3, tmp_path)
    for name in RUNS:
        expected = reference(name, 3)
        for r in results:
            assert r[name]["identical"]
            assert_rel_close(r[name]["params"], expected, what=name)


def test_a_raising_rank_makes_every_rank_raise(tmp_path):
    results = launch("fail", 2, tmp_path)
    r0, r1 = (r["errors"] for r in results)
    assert r0[1::2] == [True] * 4 and r1[1::2] == [True] * 4  # afterwards: a normal step, identical parameters
    for how, e0, e1 in zip(("nan", "trace", "nan", "diagonals"), r0[0::2], r1[0::2]):
        assert not e1.startswith("DistributedStepError") and e1 != "no error"
        if how == "nan":  # rank 1's NaN gradient reaches rank 0's CG through the summed rounds: both updates are NaN
            assert e0.startswith(("DistributedStepError", "FloatingPointError")), e0
        else:
            assert e0.startswith("DistributedStepError") and "rank 1" in e0
    assert r1[0].startswith("FloatingPointError") and r1[2].startswith("RuntimeError: injected failure")


def test_one_process_is_the_plain_path():
    from fop.distributed import NullComm

    for name in RUNS:
        assert isinstance(make_optimizer(name, make_model()).comm, NullComm)


def test_bad_distributed_arguments():
    from fop.distributed import DistributedOptions

    with pytest.raises(TypeError, match="distributed must be"):
        make_optimizer("frog", make_model(), distributed="yes")
    with pytest.raises(RuntimeError, match="not initialized"):
        make_optimizer("adafisher", make_model(), distributed=True)
    with pytest.raises(ValueError, match="sub-batches"):
        make_optimizer("kfrog", make_model(), distributed=DistributedOptions(split="ranks"))


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])))
