"""Fault suite: a step either happens completely or not at all.

Every failing step below is checked by snapshot: the parameters and a deep copy of `state_dict()` before the step
equal, bit for bit, those after the step raised; then the optimizer trains on on good batches."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from fop import FOP, FROG, KFAC, KFROG, AdaFisher, AdaFisherW
from fop.kfac import robust_eigh
from torch import nn

import fop_kernels

ALL = [KFAC, FOP, FROG, KFROG, AdaFisher, AdaFisherW]
KFAC_FOP = [KFAC, FOP]
FAST = dict(damping=1e-2, factor_interval=2, inverse_interval=2)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3))


def make(cls, model, **kwargs):
    if cls in KFAC_FOP:
        kwargs = {**FAST, **kwargs}
    elif cls in (AdaFisher, AdaFisherW):
        kwargs = {"factor_interval": 2, **kwargs}
    return cls(model, lr=0.05, **kwargs)


def batch(n=8, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g) * scale, torch.randint(0, 3, (n,), generator=g)


def train(model, opt, steps, seed=100, scale=1.0):
    for k in range(steps):
        x, y = batch(seed=seed + k, scale=scale)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()), _counters(opt)


def _counters(opt):
    return {k: getattr(opt, k) for k in ("steps", "factor_updates", "decomposed_at") if hasattr(opt, k)}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and bool(
            torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)) and torch.equal(a.isnan(), b.isnan()))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
    return a == b


def failing_step(model, opt, x, y, error, match):
    """A step on (x, y) that must raise `error` and change nothing."""
    before = snapshot(model, opt)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(error, match=match):
        opt.step()
    assert same(before, snapshot(model, opt)), "a failed step changed the optimizer or the parameters"


def trains_on(model, opt, steps=3):
    """The optimizer keeps working: finite parameters that move, counters advance."""
    before = [p.detach().clone() for p in model.parameters()]
    steps_before = opt.steps
    train(model, opt, steps, seed=500)
    assert opt.steps == steps_before + steps
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


# -- damping ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", KFAC_FOP)
@pytest.mark.parametrize("inverse", ["eigh", "cholesky", "auto"])
def test_damping_must_be_positive(cls, inverse):
    kw = {"inverse_method": inverse, **({"damping_mode": "factored"} if inverse == "cholesky" else {})}
    with pytest.raises(ValueError, match=r"damping must be > 0"):
        cls(mlp(), damping=0.0, **kw)
    m = mlp()
    opt = make(cls, m, **kw)
    train(m, opt, 2)
    for value, match in ((0.0, r"damping\(2\) must be > 0"), (float("nan"), r"damping\(2\) must be finite")):
        opt.damping = lambda step, v=value: v
        failing_step(m, opt, *batch(seed=7), ValueError, match)
    opt.damping = 1e-2
    trains_on(m, opt)


# -- non-finite curvature and updates from finite gradients ----------------------------------------------------------
@pytest.mark.parametrize("cls", KFAC_FOP)
@pytest.mark.parametrize("inverse", ["eigh", "cholesky", "auto"])
@pytest.mark.parametrize("product_dtype", [None, torch.bfloat16])
def test_factor_overflow_raises_and_does_not_poison_later_steps(cls, inverse, product_dtype):
    kw = {"inverse_method": inverse, "product_dtype": product_dtype,
          **({"damping_mode": "factored"} if inverse == "cholesky" else {})}
    m = mlp()
    opt = make(cls, m, **kw)
    train(m, opt, 2)  # step 2 is a factor step
    x, y = batch(seed=9)
    failing_step(m, opt, x * 1e20, y, FloatingPointError, r"factor A of layer 0 is non-finite.*nothing was changed")
    trains_on(m, opt)


def test_fop_huge_inputs_give_an_error_not_nan_parameters():
    """Inputs x 1e10 (gradients finite, up to ~1e9): FOP's Fisher inner products overflow in float32 and the
    update is NaN; that must be an error and change nothing."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = FOP(m, lr=0.05, damping=1e-2, factor_interval=1, inverse_interval=1)
    x, y = torch.randn(32, 20), torch.randint(0, 10, (32,))
    before = snapshot(m, opt)
    opt.zero_grad()
    F.cross_entropy(m(x * 1e10), y).backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in m.parameters())
    with pytest.raises(FloatingPointError, match="non-finite .* nothing was changed"):
        opt.step()
    assert same(before, snapshot(m, opt)) and opt.last_stats() == {}
    for k in range(3):
        g = torch.Generator().manual_seed(k)
        opt.zero_grad()
        F.cross_entropy(m(torch.randn(32, 20, generator=g)), torch.randint(0, 10, (32,), generator=g)).backward()
        opt.step()
    assert opt.steps == 3 and all(bool(torch.isfinite(p).all()) for p in m.parameters())


def test_nonfinite_update_from_finite_gradients_names_the_layer(monkeypatch):
    m = mlp()
    opt = make(KFAC, m, inverse_method="eigh")
    train(m, opt, 1)
    real = fop_kernels.project_combine

    def nan_combine(*args, **kwargs):
        U, scalars = real(*args, **kwargs)
        U[-1].fill_(float("nan"))
        return U, scalars

    monkeypatch.setattr(fop_kernels, "project_combine", nan_combine)
    failing_step(m, opt, *batch(seed=4), FloatingPointError,
                 r"update of .*4\.weight.* non-finite .* from finite gradients")
    monkeypatch.setattr(fop_kernels, "project_combine", real)
    trains_on(m, opt)


@pytest.mark.parametrize("cls", KFAC_FOP)
@pytest.mark.parametrize("damping", [1e-12, 1e-30])
def test_cholesky_with_tiny_damping_has_no_raw_linalg_error(cls, damping):
    m = mlp()
    opt = make(cls, m, damping=damping, damping_mode="factored", inverse_method="cholesky")
    x, y = batch(seed=1)
    before = snapshot(m, opt)
    opt.zero_grad()
    F.cross_entropy(m(x), y).backward()
    try:
        opt.step()
    except FloatingPointError as err:  # acceptable: a clear error and nothing changed
        assert "nothing was changed" in str(err)
        assert same(before, snapshot(m, opt))
    except torch.linalg.LinAlgError as err:
        pytest.fail(f"raw LinAlgError: {err}")
    else:
        assert all(bool(torch.isfinite(p).all()) for p in m.parameters())


# -- an exception at each phase of step() ----------------------------------------------------------------------------
def _inject(monkeypatch, module, name):
    def boom(*args, **kwargs):
        raise ValueError("injected fault")

    monkeypatch.setattr(module, name, boom)


CHOL = dict(damping_mode="factored", inverse_method="cholesky")
EIGH = dict(inverse_method="eigh")
PHASES = [
    (KFAC, {}, fop_kernels, "accumulate_factor"),  # factor update
    (KFAC, EIGH, fop_kernels, "eigh"),  # decomposition
    (KFAC, EIGH, fop_kernels, "project_combine"),  # preconditioning
    (KFAC, CHOL, fop_kernels, "accumulate_conv_factor"),  # not called by an MLP: then the next phase
    (KFAC, CHOL, fop_kernels, "damped_cholesky_inverse"),  # inversion
    (KFAC, {}, fop_kernels, "damped_cholesky_inverse"),  # the default's per-factor inversion (dense blocks)
    (FOP, EIGH, fop_kernels, "fisher_inner_products"),  # FOP's projection
    (FOP, EIGH, fop_kernels, "eigh"),
    (FOP, CHOL, fop_kernels, "combine_scalars"),
    (FOP, {}, fop_kernels, "combine_scalars"),
    (FOP, CHOL, fop_kernels, "damped_cholesky_inverse"),
    (FROG, {}, fop_kernels, "batched_cg"),
    (AdaFisher, {}, fop_kernels, "accumulate_factor_diag"),
    (AdaFisherW, {}, fop_kernels, "accumulate_factor_diag"),
]


@pytest.mark.parametrize("cls,kw,module,name", PHASES,
                         ids=[f"{c.__name__}-{k.get('inverse_method', 'auto')}-{n}" for c, k, _, n in PHASES])
def test_exception_at_a_phase_changes_nothing(monkeypatch, cls, kw, module, name):
    m = mlp() if name != "accumulate_conv_factor" else nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(),
                                                                      nn.Linear(2 * 2 * 2, 3))
    opt = make(cls, m, momentum=0.9, **kw) if cls is FROG else make(cls, m, **kw)
    if name == "accumulate_conv_factor":
        x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))
        F.cross_entropy(m(x), y).backward()
        opt.step()
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    else:
        train(m, opt, 2)  # the next step is a factor/inverse/refresh step everywhere
        x, y = batch(seed=11)
    real = getattr(module, name)
    _inject(monkeypatch, module, name)
    failing_step(m, opt, x, y, ValueError, "injected fault")
    monkeypatch.setattr(module, name, real)
    if name == "accumulate_conv_factor":
        return
    trains_on(m, opt)


def test_adafisher_tensor_lr_in_param_groups_is_rejected_before_anything_changes():
    m = mlp()
    opt = make(AdaFisher, m)
    train(m, opt, 1)
    opt.param_groups[0]["lr"] = torch.tensor(0.01)
    failing_step(m, opt, *batch(seed=2), ValueError, r"param_groups\[0\]\['lr'\] must be a number")
    opt.param_groups[0]["beta"] = 1.0
    opt.param_groups[0]["lr"] = 0.01
    failing_step(m, opt, *batch(seed=2), ValueError, r"param_groups\[0\]\['beta'\] must be < 1")
    opt.param_groups[0]["beta"] = 0.9
    trains_on(m, opt)


# -- empty batches and missing gradients -----------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALL)
def test_empty_batch_is_a_clear_error(cls):
    m = mlp()
    opt = make(cls, m)
    train(m, opt, 2)
    x, y = batch(seed=5)
    failing_step(m, opt, x[:0], y[:0], ValueError, "0 samples")
    trains_on(m, opt)


@pytest.mark.parametrize("cls", ALL)
def test_step_without_backward_changes_nothing(cls):
    m = mlp()
    opt = make(cls, m)
    train(m, opt, 3)
    before = snapshot(m, opt)
    opt.zero_grad()
    opt.step()  # no gradients at all: nothing to do, as torch's optimizers
    m(batch()[0])  # a forward without backward, then a step
    opt.step()
    assert same(before, snapshot(m, opt))
    trains_on(m, opt)


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 8)
        self.a, self.b = nn.Linear(8, 3), nn.Linear(8, 3)
        self.use = "ab"

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return sum(getattr(self, k)(h) for k in self.use)


@pytest.mark.parametrize("cls", ALL)
def test_parameters_without_gradients_are_skipped(cls):
    m = Branches()
    opt = make(cls, m)
    train(m, opt, 2)
    # a branch unused on one step: its parameters, momentum and factors stay; the others train
    m.use = "a"
    b_before = [p.detach().clone() for p in m.b.parameters()]
    state_b = copy.deepcopy([opt.state.get(p, {}) for p in m.b.parameters()])
    factors_b = [opt.factors_A[2].clone(), opt.factors_G[2].clone()] if cls in KFAC_FOP else None
    trains_on(m, opt, steps=3)
    assert all(torch.equal(u, p) for u, p in zip(b_before, m.b.parameters()))
    assert same(state_b, [opt.state.get(p, {}) for p in m.b.parameters()])
    if factors_b is not None:
        assert torch.equal(factors_b[0], opt.factors_A[2]) and torch.equal(factors_b[1], opt.factors_G[2])
    # a layer frozen after construction
    m.use = "ab"
    m.a.requires_grad_(False)
    a_before = [p.detach().clone() for p in m.a.parameters()]
    trains_on(m, opt, steps=3)
    assert all(torch.equal(u, p) for u, p in zip(a_before, m.a.parameters()))


# -- decompositions that cannot fail the step -----------------------------------------------------------------------
@pytest.mark.parametrize("cls", KFAC_FOP)
def test_conv_on_1x1_maps_trains_at_defaults(cls):
    """LAPACK's float32 eigh fails to converge on this conv's input factor (mostly zero rows): the retry in a safer
    form must let the default optimizer train."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.Flatten(), nn.Linear(64, 10))
    opt = cls(m)
    before = [p.detach().clone() for p in m.parameters()]
    for k in range(3):
        g = torch.Generator().manual_seed(k)
        x, y = torch.relu(torch.randn(64, 64, 1, 1, generator=g)), torch.randint(0, 10, (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    assert opt.steps == 3 and opt.decomposed_at == 2  # steps 0, 1, 2 refresh the young curvature
    assert all(bool(torch.isfinite(p).all()) for p in m.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(before, m.parameters()))


def test_robust_eigh_retries_and_names_the_matrix_when_every_form_fails(monkeypatch):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 6, generator=g, dtype=torch.float64)
    M = torch.zeros(9, 9, dtype=torch.float64)
    M[:6, :6] = X.T @ X  # three zero rows, as a conv input factor on 1x1 maps

    def failing(mats):
        raise RuntimeError("did not converge")

    (l,), (Q,) = robust_eigh([M], ["factor A of layer conv"], decompose=failing)
    torch.testing.assert_close(Q @ torch.diag(l) @ Q.T, M, atol=1e-10, rtol=1e-10)
    assert bool((l >= 0).all()) and bool((l[1:] >= l[:-1] - 1e-12).all())

    def always_fails(*args, **kwargs):
        raise RuntimeError("no convergence")

    monkeypatch.setattr(torch.linalg, "eigh", always_fails)
    monkeypatch.setattr(torch.linalg, "svd", always_fails)
    with pytest.raises(RuntimeError, match="eigendecomposition of factor A of layer conv failed in every form"):
        robust_eigh([M], ["factor A of layer conv"], decompose=failing)


# -- load_state_dict: validated and atomic ---------------------------------------------------------------------------
def _trained(cls, **kwargs):
    m = mlp()
    opt = make(cls, m, **kwargs)
    train(m, opt, 3)
    return m, opt


def _corruptions(cls):
    """(description, change to a state_dict copy, expected message) for `cls`'s state."""
    out = [
        ("steps < 0", lambda sd: sd["curvature"].update(steps=-5), "steps must be an integer >= 0"),
        ("other layers", lambda sd: sd["curvature"].update(layers=["x"]), "preconditioned layers"),
        ("no curvature", lambda sd: sd.pop("curvature"), "no 'curvature' entry"),
        ("NaN lr", lambda sd: sd["param_groups"][0].update(lr=float("nan")), "lr'\\] must be finite"),
        ("missing group", lambda sd: sd.update(param_groups=[]), "param groups"),
    ]
    if cls in (FOP, KFAC):
        out += [
            ("truncated factors", lambda sd: sd["curvature"]["factors"].pop(), "factors of 2 layers"),
            ("truncated eigen", lambda sd: sd["curvature"]["eigen"].pop(), "eigen entries"),
            ("NaN eigenvalues", lambda sd: sd["curvature"]["eigen"][1]["lA"].fill_(float("nan")), "non-finite"),
            ("wider factor", lambda sd: sd["curvature"]["factors"][0].update(A=torch.eye(9)), r"factor A .* \(7, 7\)"),
            ("float64 factor", lambda sd: sd["curvature"]["factors"][0].update(
                A=sd["curvature"]["factors"][0]["A"].double()), "torch.float32"),
            ("factor_updates < 0", lambda sd: sd["curvature"].update(factor_updates=-1), "factor_updates"),
            ("momentum shape", lambda sd: sd["state"][0].update(momentum_buffer=torch.zeros(3)), "momentum_buffer"),
        ]
    if cls is FROG:
        out += [("bad generator", lambda sd: sd["curvature"].update(generator=torch.zeros(3)), "generator")]
    if cls.layer_state_keys:
        out += [
            ("truncated layer_state", lambda sd: sd["curvature"]["layer_state"].pop(), "one dict per preconditioned"),
            ("no layer_state", lambda sd: sd["curvature"].pop("layer_state"), "one dict per preconditioned"),
            ("unknown layer_state key", lambda sd: sd["curvature"]["layer_state"][0].update(x=torch.zeros(2)),
             "keys among"),
        ]
    if cls in (AdaFisher, AdaFisherW):
        out += [
            ("shorter H", lambda sd: sd["curvature"]["layer_state"][1].update(fisher_H=torch.ones(3)),
             r"'fisher_H' of layer 2 has shape \(3,\), expected \(9,\)"),
            ("NaN S", lambda sd: sd["curvature"]["layer_state"][0]["fisher_S"].fill_(float("nan")), "non-finite"),
        ]
    return out


@pytest.mark.parametrize("cls", ALL)
def test_bad_state_dict_is_rejected_before_anything_changes(cls):
    eigh = {"inverse_method": "eigh"} if cls in KFAC_FOP else {}  # the corruptions of eigen entries
    source, good = _trained(cls, **eigh)[1], None
    good = source.state_dict()
    m, opt = _trained(cls, **eigh)
    train(m, opt, 1, seed=900)  # a different state than `good`
    for what, corrupt, match in _corruptions(cls):
        sd = copy.deepcopy(good)
        corrupt(sd)
        before = snapshot(m, opt)
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(sd)
        assert same(before, snapshot(m, opt)), what
    opt.load_state_dict(copy.deepcopy(good))
    assert same(good, opt.state_dict())
    trains_on(m, opt)


@pytest.mark.parametrize("saved,loaded", [(KFAC, FOP), (FOP, KFAC), (AdaFisher, AdaFisherW), (AdaFisherW, AdaFisher),
                                          (KFAC, FROG), (FROG, KFAC)])
def test_state_of_another_optimizer_class_is_rejected(saved, loaded):
    sd = _trained(saved)[1].state_dict()
    m, opt = _trained(loaded)
    before = snapshot(m, opt)
    with pytest.raises(ValueError, match=f"saved by {saved.__name__}, not {loaded.__name__}"):
        opt.load_state_dict(sd)
    assert same(before, snapshot(m, opt))


@pytest.mark.parametrize("cls", KFAC_FOP)
def test_state_of_another_inverse_method_is_rejected(cls):
    eig = _trained(cls, inverse_method="eigh")[1].state_dict()
    chol = _trained(cls, damping_mode="factored", inverse_method="cholesky")[1].state_dict()
    m, opt = _trained(cls, damping_mode="factored", inverse_method="cholesky")
    with pytest.raises(ValueError, match="inverse_method='eigh'"):
        opt.load_state_dict(eig)
    del eig["curvature"]["inverse_method"]  # a state saved before the method was recorded: told by its entries
    with pytest.raises(ValueError, match="eigen decompositions"):
        opt.load_state_dict(eig)
    m, opt = _trained(cls, inverse_method="eigh")
    with pytest.raises(ValueError, match="inverse_method='cholesky'"):
        opt.load_state_dict(chol)


# -- hook lifecycle --------------------------------------------------------------------------------------------------
def _hooks_left(model) -> int:
    return sum(len(mod._forward_hooks) for mod in model.modules()) + sum(
        len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters())


@pytest.mark.parametrize("cls,kw", [(c, {}) for c in ALL] + [(FOP, {"split": "backward"})],
                         ids=[c.__name__ for c in ALL] + ["FOP-backward"])
def test_hooks_hold_the_optimizer_weakly_and_go_with_it(cls, kw):
    import gc
    import weakref

    m = mlp()
    opt = make(cls, m, **kw)
    train(m, opt, 2)
    assert _hooks_left(m) > 0
    gone, capture = weakref.ref(opt), weakref.ref(opt.capture)
    del opt
    gc.collect()
    assert gone() is None and capture() is None
    assert _hooks_left(m) == 0
    opt = make(cls, m, **kw)  # a second optimizer on the model trains alone
    trains_on(m, opt)


@pytest.mark.parametrize("cls", ALL)
def test_remove_hooks_and_context_manager(cls):
    m = mlp()
    with make(cls, m) as opt:
        train(m, opt, 2)
        assert _hooks_left(m) > 0
    assert _hooks_left(m) == 0
    assert opt.capture.records == [[] for _ in opt.layers]
    m(batch()[0]).sum().backward()
    before = snapshot(m, opt)
    with pytest.raises(RuntimeError, match=r"remove_hooks\(\) was called"):
        opt.step()
    assert same(before, snapshot(m, opt))
    resumed = make(cls, m)  # resumes from the state of the closed one
    resumed.load_state_dict(opt.state_dict())
    trains_on(m, resumed)
    resumed.remove_hooks()
    resumed.remove_hooks()  # twice is harmless
    assert _hooks_left(m) == 0


# -- ops: one validation per op, shared by every backend -------------------------------------------------------------
def _op_calls():
    """(op name, callable(damping=..., backend=..., **extra)) on small valid inputs."""
    g = torch.Generator().manual_seed(0)
    A = [torch.randn(3, 4, generator=g)]
    D = [torch.randn(3, 4, generator=g)]
    lG, lA = [torch.rand(3, generator=g)], [torch.rand(4, generator=g)]
    X = torch.randn(5, 4, generator=g, dtype=torch.float64)
    M = [X.T @ X]
    Xs, w, B = torch.randn(6, 4, generator=g), torch.rand(6, 3, generator=g), torch.randn(3, 4, generator=g)
    sums = fop_kernels.fisher_inner_products(A, D, lG, lA, 0.1)
    return {
        "fisher_inner_products": lambda damping, **kw: fop_kernels.fisher_inner_products(A, D, lG, lA, damping, **kw),
        "project_combine": lambda damping, **kw: fop_kernels.project_combine(A, D, sums, lG, lA, damping, **kw),
        "damped_inverse": lambda damping, **kw: fop_kernels.damped_inverse(M, damping, **kw),
        "batched_cg": lambda damping, iters=2, **kw: fop_kernels.batched_cg(Xs, w, B, damping, iters=iters, **kw),
    }


def _cpu_backends(op):
    from helpers import backends_for

    return [None] + backends_for(op, torch.device("cpu"))


BAD_DAMPING = [(torch.tensor(-1.0), ValueError, r"damping must be a finite value >= 0, got -1.0"),
               (torch.tensor(float("nan")), ValueError, r"damping must be a finite value >= 0"),
               (torch.tensor([0.1]), ValueError, r"damping must be 0-D, got shape \(1,\)"),
               (-1e-3, ValueError, r"damping must be a finite value >= 0"),
               ("0.1", TypeError, r"damping must be a float or a 0-dim tensor")]


@pytest.mark.parametrize("op", ["fisher_inner_products", "project_combine", "damped_inverse", "batched_cg"])
def test_op_damping_is_validated_alike_on_every_backend(op):
    call = _op_calls()[op]
    for backend in _cpu_backends(op):
        for damping, exc, match in BAD_DAMPING:
            with pytest.raises(exc, match=match):
                call(damping, backend=backend)
        call(torch.tensor(0.1), backend=backend)


def test_batched_cg_iters_must_be_an_integer_on_every_backend():
    call = _op_calls()["batched_cg"]
    for backend in _cpu_backends("batched_cg"):
        for iters, exc, match in ((2.7, TypeError, "iters must be an integer, got 2.7"),
                                  ("3", TypeError, "iters must be an integer, got '3'"),
                                  (True, TypeError, "iters must be an integer"),
                                  (-1, ValueError, "iters must be >= 0")):
            with pytest.raises(exc, match=match):
                call(0.1, iters=iters, backend=backend)
        with pytest.raises(ValueError, match="damping must be a finite value >= 0, got -1.0"):
            call(torch.tensor(-1.0), backend=backend)
        z, _ = call(0.1, iters=3, backend=backend)
        assert bool(torch.isfinite(z).all())


# -- smaller items ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALL)
def test_unbatched_input_names_the_layer(cls):
    m = mlp()
    opt = make(cls, m)
    train(m, opt, 2)
    before = snapshot(m, opt)
    opt.zero_grad()
    F.cross_entropy(m(batch()[0][0]), torch.tensor(1)).backward()  # one sample without a batch dimension
    with pytest.raises(ValueError, match=r"layer 0 was called on an input of shape \(6,\) without a batch"):
        opt.step()
    assert same(before, snapshot(m, opt))
    trains_on(m, opt)


def test_even_kernel_same_padding_gets_the_plain_update():
    m = nn.Sequential(nn.Conv2d(1, 2, 4, padding="same"), nn.Flatten(), nn.Linear(2 * 5 * 5, 3))
    opt = KFAC(m, damping=1e-2)
    assert [layer.name for layer in opt.layers] == ["2"]
    assert ("0", "padding='same' with an even kernel extent (asymmetric padding)") in opt.not_preconditioned()
    F.cross_entropy(m(torch.randn(4, 1, 5, 5)), torch.randint(0, 3, (4,))).backward()
    opt.step()
    assert opt.steps == 1


@pytest.mark.parametrize("cls", ALL)
def test_parameters_of_another_model_are_rejected(cls):
    with pytest.raises(ValueError, match="none of the parameters .* belongs to model="):
        cls(mlp().parameters(), model=mlp())
