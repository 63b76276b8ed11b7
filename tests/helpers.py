"""Shared test utilities: NaN poisoning, float64 oracles and verbose mismatch reports."""

from __future__ import annotations

import torch

import fop_kernels

# (dtype, atol, rtol) rows for comparing a fast path with the float64 reference.
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (1e-2, 1e-2),
}


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill t with NaN (floats) so that any element a kernel fails to write shows up."""
    return t.fill_(float("nan"))


def poisoned_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return poison_(torch.empty_like(t, dtype=dtype or t.dtype))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str = "") -> None:
    """Like torch.testing.assert_close on the common dtype, with a report: count, worst index, NaN/inf."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    bad_nonfinite = ~torch.isfinite(a) & torch.isfinite(e)
    err = (a - e).abs()
    tol = atol + rtol * e.abs()
    bad = (err > tol) | bad_nonfinite
    if bool(bad.any()):
        worst = int(torch.nan_to_num(err - tol, nan=float("inf")).argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape)) if a.dim() else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{a.numel()} elements out of tolerance (atol={atol}, rtol={rtol}); "
            f"{int(bad_nonfinite.sum())} non-finite; worst at {idx}: got {a.flatten()[worst].item()!r}, "
            f"expected {e.flatten()[worst].item()!r}"
        )


def load_script(path, name: str):
    """The module of a script that is not in a package (bench/gpu_check.py, bench/tables_to_json.py), loaded from
    `path` under `name`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def backends_for(op: str, device: torch.device) -> list[str]:
    """The backends that are available here and implement `op` for `device` tensors."""
    status = fop_kernels.available_backends()
    return [b for b, devs in fop_kernels.implementations(op).items()
            if device.type in devs and status[b]["available"]]


def train_steps(model, opt, batches, scaler=None) -> None:
    """Cross-entropy steps over (x, y) batches, through a GradScaler when one is given."""
    import torch.nn.functional as F

    for x, y in batches:
        opt.zero_grad()
        loss = F.cross_entropy(model(x.float()), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()


def step_losses(opt, loss_of, steps: int) -> list[float]:
    """`steps` optimizer steps on `loss_of()` (zero_grad, backward, step); the loss before each step."""
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


INVERSES = ["eigh", "cholesky-inverse", "cholesky-factor", "auto"]


def inverse_kwargs(name: str, monkeypatch) -> dict:
    """Optimizer kwargs for an inverse configuration of INVERSES. The Cholesky path keeps each damped factor as its
    inverse or as its Cholesky factor by a size rule (fop.kfac.keeps_cholesky_factor); the two cholesky-* names
    force one form for every factor, so both are tested on small networks. "auto" (the default) chooses per factor
    (fop.inverse_choice); with damping_mode="eigen" it is the eigh path."""
    if name in ("eigh", "auto"):
        return {"inverse_method": name}
    import fop.kfac

    keep = {"cholesky-inverse": False, "cholesky-factor": True}[name]
    monkeypatch.setattr(fop.kfac, "keeps_cholesky_factor", lambda n, m, interval: keep)
    return dict(damping_mode="factored", inverse_method="cholesky")


# -- multi-process tests (gloo) ------------------------------------------------------------------------------------
def flat_params(model) -> torch.Tensor:
    """Every parameter of `model`, flattened into one vector (in parameters() order)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def run_ranks(script: str, scenario: str, world: int, port: int, out, timeout_s: float) -> tuple[list[int], list[str]]:
    """Run `python script scenario rank world port out` once per rank, one thread each, the Triton interpreter on
    unless set; (return codes, each rank's combined output). A run past `timeout_s` is killed and fails the test as
    a hang."""
    import os
    import subprocess
    import sys

    import pytest

    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.setdefault("TRITON_INTERPRET", "1")
    procs = [subprocess.Popen([sys.executable, script, scenario, str(r), str(world), str(port), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout_s)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"distributed scenario {scenario!r} did not finish within {timeout_s} s (a hang)")
    return [p.returncode for p in procs], logs
