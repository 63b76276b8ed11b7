"""Refresh and product cost of K-FAC's damped inverses on the width-64 ResNet-18 (timm layout, 32x32, batch 64):
inverse_method="cholesky" (dense inverses of the whole factors) against "auto" (per factor on its support, in the
form fop.inverse_choice picks), on the same factors, interleaved, in one process. Prints per repeat the time of one
inversion of every factor (`_decompose`) and of one preconditioning of every layer (`_precondition`), and the
forms "auto" chose.

    PYTHONPATH=.:python .venv/bin/python bench/studies/inverse_cost.py --repeats 2
"""

import argparse
import copy
import os
import sys
import time
from collections import Counter

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fop import KFAC  # noqa: E402
from wide_models import resnet18_timm  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    torch.manual_seed(0)
    base = resnet18_timm(64)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    opts = {}
    for method in ("cholesky", "auto"):
        m = copy.deepcopy(base)
        opt = KFAC(m, inverse_method=method)
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()  # step 0: factors from this batch, inverted
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()  # gradients for the products
        opts[method] = opt
    auto = opts["auto"]
    forms = Counter((s.form, s.index is not None) for b in auto.buckets for s in (b.Ginv, b.Ainv) for _ in b.index)
    print("auto forms (form, on a support): layer sides", dict(forms))
    for r in range(args.repeats):
        for method, opt in opts.items():
            t = time.perf_counter()
            opt._decompose()
            t1 = time.perf_counter()
            opt._precondition(opt._active_buckets(), None, None)
            t2 = time.perf_counter()
            print(f"repeat {r} {method}: inversion of every factor {t1 - t:.2f} s, products of every layer "
                  f"{t2 - t1:.2f} s")


if __name__ == "__main__":
    main()
