"""product_dtype: the per-step preconditioner products in a lower precision than the factors, against the same step
in the factors' precision from the same state."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from fop import FOP, KFAC
from fop.kfac import Bucket, InverseBucket
from torch import nn


class _Net(nn.Module):
    """A padded conv (a support on 2x2 maps), a grouped conv (blocks), a Linear; `embed` adds an Embedding (a
    diagonal input factor: inverse_method="auto" then takes the eigenbasis)."""

    def __init__(self, embed: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(32 + (6 if embed else 0), 5)
        self.emb = nn.Embedding(11, 6) if embed else None

    def forward(self, x, ids=None):
        h = F.relu(self.grouped(F.relu(self.conv(x)))).flatten(1)
        return self.fc(h if self.emb is None else torch.cat([h, self.emb(ids)], 1))


def _batch(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 2, 2, generator=g), torch.randint(0, 11, (n,), generator=g),
            torch.randint(0, 5, (n,), generator=g))


def _step(model, opt, batch):
    x, ids, y = batch
    opt.zero_grad()
    F.cross_entropy(model(x, ids if model.emb is not None else None), y).backward()
    opt.step()


def _twins(opt_cls, n, embed, steps=3, **kwargs):
    """(model, optimizer) in the factors' precision after `steps` steps, and a copy whose optimizer multiplies in
    bfloat16, loaded from the same state."""
    torch.manual_seed(0)
    model = _Net(embed)
    opt = opt_cls(model, lr=0.1, factor_interval=1, inverse_interval=2, **kwargs)
    for s in range(steps):
        _step(model, opt, _batch(n, s))
    twin = copy.deepcopy(model)
    low = opt_cls(twin, lr=0.1, factor_interval=1, inverse_interval=2, product_dtype=torch.bfloat16, **kwargs)
    low.load_state_dict(copy.deepcopy(opt.state_dict()))
    return (model, opt), (twin, low)


def _lowered_matrices(opt) -> list[torch.Tensor]:
    """The matrices the products multiply by: dense inverses and factor copies, or the eigenvector copies."""
    out = []
    for b in opt.buckets:
        if isinstance(b, InverseBucket):
            for side in (b.Ginv, b.Ainv):
                core = side.core
                if hasattr(core, "M"):  # DenseBlock (a Woodbury core keeps the factors' dtype)
                    if core.M is not None:  # the undamped block: FOP's alone (K-FAC keeps none)
                        out.append(core.M)
                    if core.core.inv is not None:
                        out.append(core.core.inv)
        else:
            assert isinstance(b, Bucket)
            out += [Q for Q in b.bases if Q is not None]
    return out


@pytest.mark.parametrize("opt_cls", [KFAC, FOP])
@pytest.mark.parametrize("n", [8, 40])  # 8 rows: Woodbury forms on the Linear; 40: dense
@pytest.mark.parametrize("config", [dict(), dict(inverse_method="cholesky"), dict(damping_mode="eigen"),
                                    dict(embed=True)])
def test_bfloat16_step_is_the_float32_step_to_bfloat16_rounding(opt_cls, n, config):
    config = dict(config)
    embed = config.pop("embed", False)
    (model, opt), (twin, low) = _twins(opt_cls, n, embed, **config)
    before = [p.detach().clone() for p in model.parameters()]
    batch = _batch(n, 99)
    _step(model, opt, batch)
    _step(twin, low, batch)
    lowered = _lowered_matrices(low)
    assert lowered and all(M.dtype == torch.bfloat16 for M in lowered)
    assert all(M.dtype == torch.float32 for M in _lowered_matrices(opt))
    ref = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    got = torch.cat([(p.detach() - b).flatten() for p, b in zip(twin.parameters(), before)])
    assert bool(torch.isfinite(got).all())
    err = float((got - ref).norm() / ref.norm())
    assert 1e-6 < err < 3e-2, err  # bf16 products were used, and they round the step by about 2^-9 per product


def test_product_dtype_of_the_factors_dtype_is_the_default_bit_for_bit():
    torch.manual_seed(0)
    a = _Net()
    b = copy.deepcopy(a)
    opt_a = FOP(a, lr=0.1, factor_interval=1, inverse_interval=2)
    opt_b = FOP(b, lr=0.1, factor_interval=1, inverse_interval=2, product_dtype=torch.float32)
    for s in range(4):
        _step(a, opt_a, _batch(12, s))
        _step(b, opt_b, _batch(12, s))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_float32_products_of_float64_factors():
    (model, opt), _ = _twins(KFAC, 12, False, factor_dtype=torch.float64)
    twin = copy.deepcopy(model)
    low = KFAC(twin, lr=0.1, factor_interval=1, inverse_interval=2, factor_dtype=torch.float64,
               product_dtype=torch.float32)
    low.load_state_dict(copy.deepcopy(opt.state_dict()))
    before = [p.detach().clone() for p in model.parameters()]
    _step(model, opt, _batch(12, 7))
    _step(twin, low, _batch(12, 7))
    assert {M.dtype for M in _lowered_matrices(low)} == {torch.float32}
    ref = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    got = torch.cat([(p.detach() - b).flatten() for p, b in zip(twin.parameters(), before)])
    err = float((got - ref).norm() / ref.norm())
    assert 0 < err < 1e-4, err


@pytest.mark.parametrize("method", ["auto", "cholesky"])
def test_bfloat16_state_dict_resumes_bit_for_bit(method):
    """Saved inverses go back to the factors' dtype (exactly) and are rounded again on load: the resumed run
    multiplies by the same bf16 matrices."""
    torch.manual_seed(3)
    ref_model = _Net()
    model = copy.deepcopy(ref_model)
    kw = dict(lr=0.1, factor_interval=1, inverse_interval=2, inverse_method=method, product_dtype=torch.bfloat16)
    ref, first = FOP(ref_model, **kw), FOP(model, **kw)
    for s in range(3):
        _step(ref_model, ref, _batch(10, s))
        _step(model, first, _batch(10, s))
    sd = copy.deepcopy(first.state_dict())
    inverses = [e for e in sd["curvature"]["inverse"] if e is not None]
    assert inverses and all(t.dtype == torch.float32 for e in inverses for t in e.values())
    fresh = FOP(model, **kw)
    fresh.load_state_dict(sd)
    for s in range(3, 6):
        _step(ref_model, ref, _batch(10, s))
        _step(model, fresh, _batch(10, s))
    assert all(torch.equal(p, q) for p, q in zip(ref_model.parameters(), model.parameters()))


@pytest.mark.parametrize("bad", [torch.float16, "bfloat16", torch.int8])
def test_bad_product_dtype_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="product_dtype"):
        KFAC(_Net(), lr=0.1, product_dtype=bad)
