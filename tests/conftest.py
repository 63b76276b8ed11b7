"""Test set-up: Triton runs under the interpreter on machines without a GPU.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here,
before fop_kernels is imported by any test module. Nothing touches a GPU at collection.
"""

import os
import shutil

if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run (CI must not turn red by a new random draw);
# FOP_HYPOTHESIS_RANDOM=1 searches afresh.
settings.register_profile("fixed", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("random", deadline=None, print_blob=True)
settings.load_profile("random" if os.environ.get("FOP_HYPOTHESIS_RANDOM") == "1" else "fixed")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(params=["cpu"] + (["cuda"] if HAS_CUDA else []))
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
