"""Every Triton kernel compiles to an sm_90 cubin with the installed triton, no GPU needed (Triton's own compiler
and ptxas). The CPU tests run the kernels under the interpreter, which does not compile them; this is the check
that a triton version (the package supports >= 3.2) accepts the kernels' language features. The compile runs in
a subprocess with TRITON_INTERPRET=0 (the test process defines its kernels for the interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_COMPILE_ALL = r"""
import inspect, json
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fop_kernels.triton import cg as C, factor as FA, fisher as FI

NEW_API = "constexprs" in inspect.signature(ASTSource.__init__).parameters  # triton >= 3.3
T = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16, "fp64": tl.float64}
FLOATS = {"keep_hi", "keep_lo", "coef_hi", "coef_lo"}


def compile_kernel(kernel, constexprs, pointers, options):
    # signature: the pointer types given, fp32 for FLOATS, i64 for every other runtime argument
    names = kernel.arg_names
    runtime = {n: pointers.get(n, "fp32" if n in FLOATS else "i64") for n in names if n not in constexprs}
    if NEW_API:
        signature = {n: "constexpr" if n in constexprs else runtime[n] for n in names}
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    else:
        src = ASTSource(fn=kernel, signature=runtime, constants=constexprs)
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    return len(out.asm["cubin"])


report = []
for x, acc, patches, bias, read, block in [("fp32", "fp32", False, False, True, 64),
                                           ("bf16", "fp32", True, True, False, 128),
                                           ("fp16", "fp32", True, False, True, 64),
                                           ("fp64", "fp64", False, False, True, 64)]:
    load = x if x != "fp32" and acc == "fp32" else acc
    use_dot = acc != "fp64" or FA.FP64_DOT
    meta = dict(PATCHES=patches, BIAS=bias, READ_STATE=read, LOAD_DTYPE=T[load], ACC_DTYPE=T[acc], PRECISION="ieee",
                USE_DOT=use_dot, BLOCK=block if use_dot else 32, BLOCK_K=32 if use_dot else 8)
    ptrs = {"state_ptr": "*" + acc, "x_ptr": "*" + x}
    report.append(["factor", x, compile_kernel(FA._factor_ema_kernel, meta, ptrs,
                                               {"num_warps": 8 if block == 128 else 4, "num_stages": 3})])
    diag = dict(PATCHES=patches, BIAS=bias, READ_STATE=read, ACC_DTYPE=T[acc], BLOCK=128, BLOCK_K=64)
    report.append(["factor_diag", x, compile_kernel(FA._diag_ema_kernel, diag, ptrs, {"num_warps": 4})])
for acc in ("fp32", "fp64"):
    ptrs = {n: "*" + acc for n in ("x_ptr", "r_ptr", "p_ptr", "ap_ptr", "rs_ptr", "threshold_ptr", "damping_ptr")}
    report.append(["cg", acc, compile_kernel(C._cg_row_step_kernel, dict(ACC_DTYPE=T[acc], BLOCK_D=1024), ptrs,
                                             {"num_warps": 4})])
for a, acc, factored, from_ptr in [("fp32", "fp32", False, False), ("bf16", "fp32", True, True),
                                   ("fp16", "fp32", False, True), ("fp64", "fp64", True, False)]:
    meta = dict(A_DTYPE=T[a], LG_DTYPE=tl.float32, LA_DTYPE=tl.float32, ACC=T[acc], FACTORED=factored,
                DAMPING_FROM_PTR=from_ptr, BLOCK_R=8, BLOCK_C=256, BLOCK_T=1024)
    ptrs = {"layer_table_ptr": "*i64", "program_table_ptr": "*i64", "out_ptr": "*" + acc, "damping_ptr": "*fp32",
            "sums_ptr": "*" + acc, "scalars_ptr": "*" + acc}
    sums = compile_kernel(FI._fisher_sums_kernel, meta, ptrs, {"num_warps": FI._NUM_WARPS})
    report.append(["fisher_sums", a, sums])
    comb = dict(meta, ADAPTIVE_BETA=not from_ptr, ADAPTIVE_ETA=True)
    report.append(["project_combine", a, compile_kernel(FI._project_combine_kernel, comb, ptrs,
                                                        {"num_warps": FI._NUM_WARPS, "enable_fp_fusion": False})])
print(json.dumps({"triton": triton.__version__, "kernels": report}))
"""


def test_every_triton_kernel_compiles_for_sm90():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_ALL], capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("triton's ptxas is not available")
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    kernels = {k for k, _, _ in out["kernels"]}
    assert kernels == {"factor", "factor_diag", "cg", "fisher_sums", "project_combine"}, out
    assert all(size > 0 for _, _, size in out["kernels"]), out
