"""One K-FAC step with inverse_method="eigh" on timm's ResNet-18 layout at width 64 (batch 64, 32x32): the factor
update and an eigendecomposition of every factor, each on its support (fop.kfac.deflated_eigh). Prints the time,
the factors whose support is smaller than their width, and whether the parameters stayed finite.

    PYTHONPATH=.:python .venv/bin/python bench/studies/check_eigh_wide.py
"""

import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fop import KFAC  # noqa: E402
from fop.inverse_choice import support  # noqa: E402
from wide_models import resnet18_timm  # noqa: E402


def main():
    torch.manual_seed(0)
    m = resnet18_timm(64)
    opt = KFAC(m, inverse_method="eigh")  # defaults otherwise: factored damping, intervals 10
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    opt.zero_grad()
    F.cross_entropy(m(x), y).backward()
    decompose, spent = opt._decompose, {}

    def timed():
        t = time.perf_counter()
        decompose()
        spent["s"] = time.perf_counter() - t

    opt._decompose = timed
    t = time.perf_counter()
    opt.step()
    total = time.perf_counter() - t
    sizes = [(layer.name, layer.in_dim, None if (s := support(A)) is None else s.numel())
             for layer, A in zip(opt.layers, opt.factors_A)]
    print(f"step 0 (factor update + eigh of every factor): {total:.1f} s, of which decompositions {spent['s']:.1f} s")
    print("A supports (name, width, support):", [s for s in sizes if s[2] is not None])
    print("finite params:", all(bool(torch.isfinite(p).all()) for p in m.parameters()))


if __name__ == "__main__":
    main()
