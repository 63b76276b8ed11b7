"""The dispatch layer: registry contents, forced backends, clear errors, the environment report."""

import subprocess
import sys

import pytest
import torch

import fop_kernels
from fop_kernels import BackendUnavailableError

PUBLIC_OPS = [
    "accumulate_conv_factor", "accumulate_conv_factor_diag", "accumulate_factor", "accumulate_factor_diag",
    "batched_cg", "damped_inverse", "eigh", "fisher_inner_products", "project_combine",
]


@pytest.mark.parametrize("op", PUBLIC_OPS)
def test_every_op_has_a_reference_on_every_device(op):
    impls = fop_kernels.implementations(op)
    assert set(impls["reference"]) == {"cpu", "cuda"}


def test_available_backends_reports_reasons():
    status = fop_kernels.available_backends()
    assert set(status) == {"triton", "cuda", "cpp", "reference"}
    assert status["reference"]["available"]
    for st in status.values():
        assert isinstance(st["reason"], str) and st["reason"]


def test_forced_reference_backend_is_used():
    name, fn = fop_kernels.resolve("eigh", "cpu", backend="reference")
    assert name == "reference" and fn is fop_kernels.reference.eigh


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(BackendUnavailableError, match="unknown backend 'nope'"):
        fop_kernels.eigh([torch.eye(3)], backend="nope")


def test_forcing_an_unavailable_backend_names_what_is_missing(monkeypatch):
    if fop_kernels.available_backends()["cuda"]["available"]:
        pytest.skip("cuda backend is available here")
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' is not available"):
        fop_kernels.eigh([torch.eye(3)], backend="cuda")
    monkeypatch.setenv("FOP_KERNELS_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' is not available"):
        fop_kernels.eigh([torch.eye(3)])


def test_environment_report_runs():
    out = subprocess.run([sys.executable, "-m", "fop_kernels"], capture_output=True, text=True, check=True).stdout
    assert "torch" in out and "backends:" in out and "reference" in out
