"""bench/gpu_check.py (`make gpu-check`) on a machine without CUDA: it stops before the first part, says so, lists
what it would run and exits 0; its correctness harness, roofline arithmetic and target evaluation are checked
here on CPU (the harness with the CPU backends standing in for the GPU ones)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_script

import fop_kernels

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    return load_script(SCRIPT, "gpu_check")


def test_without_cuda_it_reports_nothing_to_check_and_exits_0(tmp_path, gpu_check):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", FOP_GPU_CHECK_OUT=str(tmp_path / "report"),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "python")]))
    done = subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no CUDA device: nothing to check" in done.stdout
    for part in gpu_check.PARTS:
        assert f"- {part} (" in done.stdout, f"the plan does not list part {part}"
    report = json.loads((tmp_path / "report" / "gpu-check.json").read_text())
    assert report["status"] == "no CUDA device: nothing to check"
    assert report["environment"]["torch"] == torch.__version__ and report["parts"] == {}
    assert {t["status"] for t in report["targets"]} == {"not measured"}
    assert "nothing to check" in (tmp_path / "report" / "gpu-check.md").read_text()


def test_unknown_part_is_an_error(gpu_check):
    with pytest.raises(SystemExit):
        gpu_check.main(["--only", "build,nope"])


def _cpu_backend(op: str) -> str:
    """triton under the interpreter when it serves CPU tensors here, else the C++ backend, else the reference."""
    status = fop_kernels.available_backends()
    for backend in ("triton", "cpp"):
        if status[backend]["available"] and "cpu" in fop_kernels.implementations(op).get(backend, ()):
            return backend
    return "reference"


def test_correctness_harness_passes_correct_backends_on_every_case(gpu_check):
    """Every case of the ops part (tiny shapes, all dtypes) run with the CPU backends: each must pass."""
    results = []
    cases = gpu_check._op_cases("cpu", fast_backend=_cpu_backend("accumulate_factor"),
                                eigh_backend=_cpu_backend("eigh"), small=True)
    for op, backend, case, dtype, fast, reference, tol in cases:
        gpu_check.check_case(results, op, backend, case, dtype, fast, reference, tol)
    assert {r["op"] for r in results} >= {"accumulate_factor", "accumulate_factor_diag", "fisher_inner_products",
                                         "project_combine", "batched_cg", "eigh + damped_inverse"}
    assert {r["dtype"] for r in results} == {"fp32", "bf16", "fp16", "fp64"}
    bad = [r for r in results if r["status"] != "ok"]
    assert not bad, bad


def test_correctness_harness_flags_wrong_and_unwritten_outputs(gpu_check):
    results = []
    x = torch.randn(50)
    gpu_check.check_case(results, "op", "b", "right", "fp32", lambda: [x.clone()], lambda: [x.double()], 1e-6)
    gpu_check.check_case(results, "op", "b", "off by 1e-3", "fp32", lambda: [x * (1 + 1e-3)], lambda: [x], 1e-4)
    unwritten = x.clone()
    unwritten[7] = float("nan")
    gpu_check.check_case(results, "op", "b", "one NaN", "fp32", lambda: [unwritten], lambda: [x], 1e-4)
    gpu_check.check_case(results, "op", "b", "raises", "fp32", lambda: [x[:3]], lambda: [x], 1e-4)
    gpu_check.check_case(results, "op", "b", "missing output", "fp32", lambda: [x], lambda: [x, x], 1e-4)
    assert [r["status"] for r in results] == ["ok", "FAILED", "FAILED", "FAILED", "FAILED"]
    assert results[2]["nan"] == 1 and "error" in results[3] and "error" in results[4]


def test_roofline_fractions(gpu_check):
    # 1 GB moved in 1 ms at a 2000 GB/s copy rate: memory bound, 1000 GB/s, half the copy bandwidth
    mem = gpu_check.roofline_fractions(1.0, 1e9, 1e9, copy_gbs=2000.0, peak_tflops=100.0)
    assert mem["bound"] == "memory" and mem["gbs"] == pytest.approx(1000.0)
    assert mem["fraction_of_copy_bw"] == pytest.approx(0.5) and mem["fraction_of_peak"] == pytest.approx(0.5)
    # 50 TFLOP in 1 s on a 100 TFLOP/s peak with few bytes: compute bound at half the peak
    comp = gpu_check.roofline_fractions(1000.0, 1e6, 50e12, copy_gbs=2000.0, peak_tflops=100.0)
    assert comp["bound"] == "compute" and comp["fraction_of_copy_bw"] is None
    assert comp["tflops"] == pytest.approx(50.0) and comp["fraction_of_peak"] == pytest.approx(0.5)


def test_targets_met_missed_and_not_measured(gpu_check):
    report = {"parts": {
        "kernels": {"results": [
            {"name": "fisher_inner_products x", "backend": "triton", "bound": "memory", "fraction_of_copy_bw": 0.85},
            {"name": "project_combine x", "backend": "triton", "bound": "memory", "fraction_of_copy_bw": 0.6},
            {"name": "accumulate_factor X 1x1", "backend": "triton", "bound": "compute",
             "fraction_of_torch_gemm": 0.9, "speedup_vs_reference": 2.0},
            {"name": "eigh 200 x 64", "backend": "cuda", "speedup_vs_reference": 3.5}]},
        "steps": {"results": [{"model": "resnet18", "batch": 1024, "optimizer": "fop", "mean_vs_sgd": 1.2},
                              {"model": "resnet18", "batch": 256, "optimizer": "fop", "mean_vs_sgd": 9.0}]},
        "sync": {"results": [{"case": "a", "syncs": 0, "expect_none": True},
                             {"case": "b", "syncs": 1, "expect_none": False}]}}}
    status = {t["target"]: t["status"] for t in gpu_check.evaluate_targets(report)}
    assert status == {"memory_bound": "missed", "factor_gemm": "met", "factor_vs_reference": "met",
                      "eigh_vs_loop": "met", "fop_vs_sgd": "met", "host_syncs": "met"}
    report["parts"]["sync"]["results"][1]["expect_none"] = True
    report["parts"].pop("steps")
    status = {t["target"]: t["status"] for t in gpu_check.evaluate_targets(report)}
    assert status["host_syncs"] == "missed" and status["fop_vs_sgd"] == "not measured"


@pytest.mark.parametrize("name", ["sgd", "adamw", "kfac", "fop", "frog", "adafisher"])
def test_step_configs_build_and_step_on_cpu(gpu_check, name):
    """The optimizers and models of the steps part (shrunk) take one finite step: a wrong argument fails here,
    not during a GPU lease."""
    import torch.nn.functional as F
    from fop_train.models import resnet18

    cases = [(resnet18(width=4), torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))),
             (gpt2_small := gpu_check.gpt2_stack(layers=1, dim=16, heads=2, classes=5), torch.randn(2, 6, 16),
              torch.randint(0, 5, (2, 6)))]
    assert sum(isinstance(m, torch.nn.Linear) for m in gpt2_small.modules()) == 5
    for model, x, y in cases:
        opt = gpu_check._make_optimizer(name, model)
        for _ in range(2):
            opt.zero_grad()
            out = model(x)
            F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
            opt.step()
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters()), name


def test_kernel_cases_run_on_cpu(gpu_check):
    """Every case of the kernels part (tiny shapes, CPU backends) runs its fast path, reference and GEMM, and
    has a positive byte and flop count: the timing part has no argument error waiting for a GPU."""
    cases = list(gpu_check._kernel_cases("cpu", _cpu_backend("accumulate_factor"), _cpu_backend("eigh"),
                                         small=True))
    names = {c[0].split()[0] for c in cases}
    assert names == {"accumulate_factor", "accumulate_factor_diag", "accumulate_conv_factor", "fisher_inner_products",
                     "project_combine", "batched_cg", "eigh"}, names
    for name, _backend, _dtype, fast, reference, nbytes, flops, gemm in cases:
        for fn in (fast, reference) + ((gemm,) if gemm is not None else ()):
            fn()
        assert nbytes > 0 and flops > 0, name


def test_sync_part_logic_on_cpu(gpu_check, monkeypatch):
    """The sync part's step sequence on CPU, with the CUDA sync counter replaced by a plain call: it measures the
    capture and step() of a plain and of a curvature step."""
    from fop import FOP

    monkeypatch.setattr(gpu_check, "_sync_count", lambda fn: (fn(), (0, ""))[1])
    part = {"results": [], "notes": []}
    gpu_check._sync_config(part, "fop", FOP, {}, False, device="cpu", size=(16, 4, 16))
    cases = [r["case"] for r in part["results"]]
    assert cases == ["fop check_finite=False capture (forward+backward, plain step)",
                     "fop check_finite=False step() (plain)",
                     "fop check_finite=False capture (forward+backward, curvature step)",
                     "fop check_finite=False step() (curvature)"], cases
    assert all(r["status"] == "ok" and r["expect_none"] for r in part["results"])
