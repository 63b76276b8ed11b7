"""K-FROG against a pure-torch reference of the public code's formulas (explicit X^T X from im2col patches, textbook
CG), the optimizer step, param groups, training on digits, state_dict, GradScaler and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from fop import KFROG
from fop.kfrog import conv_input_diag, kfrog_conv_solve, kfrog_linear_solve, linear_input_diag
from fop_train.data import load_digits
from fop_train.models import SmallCNN
from helpers import assert_close, train_steps
from models import ConvBNLinear, record_layer_io
from torch import nn

DT = torch.float64


# -- the reference: the public kfrog.py's formulas, written out with explicit matrices -------------------------------
def explicit_input_factors(x_s, weight_shape=None, stride=1, padding=0, dilation=1, groups=1, bias=False):
    """[X_g^T X_g / s per group]: X_g the im2col patches of group g (conv) or the input rows (weight_shape None),
    with a column of ones for a bias."""
    s = x_s.shape[0]
    if weight_shape is None:
        X = x_s.reshape(-1, x_s.shape[-1])
        blocks = [X]
    else:
        _, _, kh, kw = weight_shape
        cols = F.unfold(x_s, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # s x (C kh kw) x L
        per_group = cols.shape[1] // groups
        blocks = [cols[:, g * per_group:(g + 1) * per_group].permute(0, 2, 1).reshape(-1, per_group)
                  for g in range(groups)]
    if bias:
        blocks = [torch.cat([X, X.new_ones(X.shape[0], 1)], dim=1) for X in blocks]
    return [X.T @ X / s for X in blocks]


def textbook_cg(A, b, iters):
    """CG from zero on A z = b (one right-hand side), `iters` iterations, stopping where the residual is 0."""
    z, r = torch.zeros_like(b), b.clone()
    p, rs = r.clone(), r @ r
    for _ in range(iters):
        if rs == 0:
            break
        Ap = A @ p
        alpha = rs / (p @ Ap)
        z, r = z + alpha * p, r - alpha * Ap
        rs_new = r @ r
        p, rs = r + rs_new / rs * p, rs_new
    return z


def reference_row_scale(dy, conv: bool, n_total: int, mean: bool = True):
    """The public y_diag = sum (Y^2) over samples and positions, times the batch (mean loss) or over it (sum)."""
    dims = (0, 2, 3) if conv else tuple(range(dy.dim() - 1))
    y = (dy**2).sum(dims)
    return y * n_total if mean else y / n_total


def reference_direction(factors, m, y_hat, eps, iters):
    """P1 = m / sqrt(y^ + eps); Z_r = CG(A_g + eps I, P1_r); U_r = Z_r * sqrt(diag A_g), g the group of row r."""
    R = m.shape[0]
    P1 = m / torch.sqrt(y_hat + eps)[:, None]
    rows = []
    for r in range(R):
        A = factors[r // (R // len(factors))]
        z = textbook_cg(A + eps * torch.eye(A.shape[0], dtype=A.dtype), P1[r], iters)
        rows.append(z * torch.sqrt(torch.diagonal(A)))
    return torch.stack(rows)


CONV_CASES = [  # C_in, R, kernel, stride, padding, dilation, groups, bias, H, W
    (3, 4, 3, 1, 1, 1, 1, True, 6, 5),
    (4, 6, 3, 2, 0, 1, 2, False, 7, 7),
    (2, 3, (2, 3), 1, (1, 0), 2, 1, True, 6, 7),
    (4, 4, 3, 1, 1, 1, 4, False, 5, 5),
    (5, 7, 1, 1, 0, 1, 1, False, 3, 4),
]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


@pytest.mark.parametrize("case_index", range(len(CONV_CASES)))
@pytest.mark.parametrize("iters", [1, 4, "D"])
def test_conv_solve_and_diag_match_explicit_factors(case_index, iters):
    C, R, k, stride, padding, dilation, groups, bias, H, W = CONV_CASES[case_index]
    torch.manual_seed(case_index)
    k, stride, padding, dilation = map(_pair, (k, stride, padding, dilation))
    wshape = (R, C // groups, *k)
    x = torch.randn(3, C, H, W, dtype=DT)
    factors = explicit_input_factors(x, wshape, stride, padding, dilation, groups, bias)
    D = factors[0].shape[0]
    n_iter = D if iters == "D" else iters
    B, y, eps = torch.randn(R, D, dtype=DT), torch.rand(R, dtype=DT), 1e-3
    diag = conv_input_diag(x, wshape, stride, padding, dilation, groups, bias)
    assert_close(diag, torch.stack([torch.diagonal(factors[r // (R // groups)]) for r in range(R)]), 1e-12, 1e-12,
                 "diag(X^T X) / s")
    P1 = B / torch.sqrt(y + eps)[:, None]
    inputs = (x.clone(), P1.clone())
    Z = kfrog_conv_solve(x, P1, wshape, stride, padding, dilation, groups, bias, eps, n_iter)
    assert torch.equal(x, inputs[0]) and torch.equal(P1, inputs[1]), "the solve wrote into its inputs"
    if iters == "D":  # D iterations: the exact solve, up to fp64 loss of orthogonality (two CGs drift apart here)
        Ainv = [torch.linalg.inv(A + eps * torch.eye(D, dtype=DT)) for A in factors]
        exact = torch.stack([Ainv[r // (R // groups)] @ P1[r] for r in range(R)])
        assert_close(Z, exact, 1e-6 * float(exact.abs().max()), 1e-6, "CG with D iterations vs solve")
    else:
        expected = reference_direction(factors, B, y, eps, n_iter)
        assert_close(Z * diag.sqrt(), expected, 1e-10 * float(expected.abs().max()), 1e-9, f"direction, {n_iter} CG")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, bias", [((5, 7), True), ((4, 3, 6), False), ((2, 9), False)])
def test_linear_solve_matches_explicit_factor(dtype, shape, bias):
    """Through fop_kernels.batched_cg (trace-normalized systems rescaled back to X^T X / s + eps I)."""
    torch.manual_seed(len(shape) + int(bias))
    x = torch.randn(*shape, dtype=DT)
    s, R = shape[0], 4
    X = x.reshape(-1, shape[-1])
    if bias:
        X = torch.cat([X, X.new_ones(X.shape[0], 1)], dim=1)
    (A,) = explicit_input_factors(x, bias=bias)
    B, y, eps = torch.randn(R, A.shape[0], dtype=DT), torch.rand(R, dtype=DT), 1e-2
    P1 = B / torch.sqrt(y + eps)[:, None]
    Xd, P1d = X.to(dtype), P1.to(dtype)
    inputs = (Xd.clone(), P1d.clone())
    Z = kfrog_linear_solve(Xd, s, P1d, eps, 4)
    diag = linear_input_diag(Xd, s)
    assert torch.equal(Xd, inputs[0]) and torch.equal(P1d, inputs[1]), "the solve wrote into its inputs"
    assert Z.dtype == dtype and diag.dtype == dtype
    tol = 1e-10 if dtype == DT else 1e-4
    assert_close(diag, torch.diagonal(A), tol, tol, "diag(X^T X) / s")
    expected = reference_direction([A], B, y, eps, 4)
    assert_close(Z * diag.sqrt(), expected, tol * float(expected.abs().max()), tol, "4-iteration direction")


# -- the optimizer step against the reference ------------------------------------------------------------------------
def _rows(tensors, bias):
    w = tensors[0].reshape(tensors[0].shape[0], -1)
    return torch.cat([w, tensors[1][:, None]], dim=1) if bias else w


@pytest.mark.parametrize("fold_bias", [False, True])
@pytest.mark.parametrize("sample_size", [None, 4])
@pytest.mark.parametrize("kl_clip, kl_damping", [(None, 0.0), (1e-5, 0.0), (1e-5, 1e-3)])
def test_steps_match_reference(fold_bias, sample_size, kl_clip, kl_damping):
    """Three steps with momentum, Nesterov, a y EMA with bias correction and per-group settings; every update is
    -nu lr times the reference direction U (sampled inputs drawn as documented: per layer in order, from the seed),
    nu = min(1, sqrt(kl_clip / sum_layers lr^2 sum_r ((y^_r + eps) U_r^T (A + eps I) U_r / L + kl_damping |U_r|^2)))
    with L the output positions per sample, on the SGD path too (unpreconditioned="sgd"); kl_clip=None: nu = 1, the
    public algorithm."""
    torch.manual_seed(0)
    model = ConvBNLinear().double()
    seed, N = 7, 6
    settings = {"conv": dict(lr=0.05, eps=1e-3, y_momentum=0.9), "fc": dict(lr=0.02, eps=1e-2, y_momentum=0.0)}
    groups = [dict(params=list(model.conv.parameters()), **settings["conv"]),
              dict(params=list(model.fc.parameters()), **settings["fc"]),
              dict(params=list(model.bn.parameters()))]
    mu, ratio = 0.5, 0.5
    opt = KFROG(groups, model=model, lr=0.1, momentum=mu, nesterov=True, sample_size=sample_size, cg_iters=4,
                lr_other_ratio=ratio, fold_bias=fold_bias, seed=seed, kl_clip=kl_clip, kl_damping=kl_damping,
                unpreconditioned="sgd")
    nus = []
    draws = torch.Generator().manual_seed(seed)
    bufs, y_ema = {}, {"conv": torch.zeros(3, dtype=DT)}
    for t in range(1, 4):
        x, y = torch.randn(N, 2, 5, 5, dtype=DT), torch.randint(0, 4, (N,))
        io, handles = record_layer_io(model)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for h in handles:
            h.remove()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        after = dict(model.named_parameters())
        expected, q = {}, 0.0
        for name in ("conv", "fc"):  # the optimizer's layer order
            mod, cfg = getattr(model, name), settings[name]
            idx = None if sample_size is None else torch.randperm(N, generator=draws)[:sample_size]
            x_s = io[name + ".x"] if idx is None else io[name + ".x"][idx]
            yr = reference_row_scale(io[name + ".dy"], name == "conv", N)
            if cfg["y_momentum"] > 0:
                b_ = cfg["y_momentum"]
                y_ema[name] = b_ * y_ema[name] + (1 - b_) * yr
                yr = y_ema[name] / (1 - b_**t)
            names = [name + ".weight"] + ([name + ".bias"] if fold_bias else [])
            for n in names:
                bufs[n] = grads[n] if n not in bufs else mu * bufs[n] + grads[n]
            m = _rows([grads[n] + mu * bufs[n] for n in names], fold_bias)
            geometry = (mod.weight.shape, mod.stride, mod.padding, mod.dilation, 1) if name == "conv" else ()
            factors = explicit_input_factors(x_s, *geometry, bias=fold_bias)
            U = reference_direction(factors, m, yr, cfg["eps"], 4)
            A = factors[0] + cfg["eps"] * torch.eye(factors[0].shape[0], dtype=DT)  # one group in both layers
            L = io[name + ".dy"][0, 0].numel() if name == "conv" else 1
            q = q + cfg["lr"] ** 2 * (((yr + cfg["eps"]) * torch.einsum("ri,ij,rj->r", U, A, U)).sum() / L
                                      + kl_damping * U.square().sum())
            expected[name] = (_rows([after[n].detach() - before[n] for n in names], fold_bias), -cfg["lr"] * U)
        nu = 1.0 if kl_clip is None else min(1.0, math.sqrt(kl_clip / float(q)))
        nus.append(nu)
        for name, (delta, step) in expected.items():
            assert_close(delta, nu * step, 1e-12, 1e-8, f"step {t}: {name} update")
        sgd = ["bn.weight", "bn.bias"] + ([] if fold_bias else ["conv.bias", "fc.bias"])
        for n in sgd:  # SGD path: momentum, Nesterov, lr of the group times lr_other_ratio (times nu)
            bufs[n] = grads[n] if n not in bufs else mu * bufs[n] + grads[n]
            lr = settings.get(n.split(".")[0], {}).get("lr", 0.1)
            assert_close(after[n].detach() - before[n], -nu * lr * ratio * (grads[n] + mu * bufs[n]), 1e-14,
                         1e-10, f"step {t}: {n}")
        for n, p in model.named_parameters():  # the step never writes into a gradient
            assert torch.equal(p.grad, grads[n]), n
    assert opt.layer_state[0]["y_updates"] == 3 and "y_ema" not in opt.layer_state[1]
    assert (max(nus) < 0.5) == (kl_clip is not None), f"nu per step {nus}: the clip binds exactly when it is on"


@pytest.mark.parametrize("kl_damping", [1e-3, 1e-2])
def test_kl_damping_bounds_the_step_when_the_fisher_vanishes(kl_damping):
    """A fitted model's row scales y_r are small (here: the loss scaled by 1e-2, so y_r by 1e-4, still above eps)
    and the clip alone lets the step grow as 1 / y (its squared norm was 0.0016 at scale 1, 15 at 1e-2 with lr 10);
    kl_damping caps the preconditioned step's squared norm at kl_clip / kl_damping (the preconditioned layers'
    weights; fold_bias=True puts the biases in the rows too)."""
    kl_clip = 1e-3
    norms = {}
    for damping in (0.0, kl_damping):
        torch.manual_seed(0)
        model = ConvBNLinear().double()
        opt = KFROG(model, lr=10.0, fold_bias=True, seed=3, kl_clip=kl_clip, kl_damping=damping)
        x, y = torch.randn(6, 2, 5, 5, dtype=DT), torch.randint(0, 4, (6,))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        (1e-2 * F.cross_entropy(model(x), y)).backward()
        opt.step()
        norms[damping] = sum(float((p.detach() - before[n]).square().sum()) for n, p in model.named_parameters()
                             if n.startswith(("conv.", "fc.")))
    assert norms[kl_damping] <= kl_clip / kl_damping * (1 + 1e-9), norms
    assert norms[0.0] > 10 * kl_clip / kl_damping, f"without kl_damping the step should be unbounded: {norms}"


def test_kl_damping_is_checked():
    with pytest.raises(ValueError, match="kl_damping"):
        KFROG(ConvBNLinear(), lr=0.1, kl_damping=-1.0)


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_linear_on_sequences_matches_reference(loss_reduction):
    """A Linear layer on (N, T, D) inputs: rows are (sample, position) pairs, A divides by the s samples, and y_r
    follows the loss reduction (public: times N for a mean loss, over N for a sum)."""
    torch.manual_seed(2)
    fc = nn.Linear(5, 4).double()
    N, T = 6, 3
    x, target = torch.randn(N, T, 5, dtype=DT), torch.randn(N, T, 4, dtype=DT)
    opt = KFROG(fc, lr=0.05, eps=1e-2, sample_size=4, fold_bias=True, loss_reduction=loss_reduction, seed=3,
                kl_clip=None)
    dy = {}
    out = fc(x)
    out.register_hook(lambda g: dy.__setitem__("dy", g.detach()))
    loss = ((out - target) ** 2).sum((1, 2))
    (loss.mean() if loss_reduction == "mean" else loss.sum()).backward()
    before = [p.detach().clone() for p in fc.parameters()]
    m = _rows([p.grad.clone() for p in fc.parameters()], True)
    opt.step()
    idx = torch.randperm(N, generator=torch.Generator().manual_seed(3))[:4]
    factors = explicit_input_factors(x[idx], bias=True)
    yr = reference_row_scale(dy["dy"], False, N, mean=loss_reduction == "mean")
    U = reference_direction(factors, m, yr, 1e-2, 4)
    delta = _rows([p.detach() - b for p, b in zip(fc.parameters(), before)], True)
    assert_close(delta, -0.05 * U, 1e-12, 1e-8, "update")


def test_gradient_accumulation_equals_one_batch():
    """Two half-batch backward passes (losses halved) give the step of one whole-batch pass: y_r, m and A are the
    same sums over the N samples."""
    torch.manual_seed(4)
    base = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4)).double()
    x, y = torch.randn(8, 2, 5, 5, dtype=DT), torch.randint(0, 4, (8,))
    whole, halves = copy.deepcopy(base), copy.deepcopy(base)
    for model, parts in ((whole, [slice(0, 8)]), (halves, [slice(0, 4), slice(4, 8)])):
        opt = KFROG(model, lr=0.05, momentum=0.9, y_momentum=0.5, fold_bias=True, seed=0)
        opt.zero_grad()
        for part in parts:
            (F.cross_entropy(model(x[part]), y[part]) / len(parts)).backward()
        opt.step()
    for (n, a), b in zip(whole.named_parameters(), halves.parameters()):
        assert_close(b, a, 1e-13, 1e-10, n)


def test_weight_decay_is_decoupled_on_preconditioned_layers():
    """Against the same step without decay: W moves by an extra -lr wd W (decoupled), the SGD path by -lr wd p (the
    public algorithm, kl_clip=None; the clip scales the SGD path's coupled decay with the rest of its step)."""
    torch.manual_seed(0)
    model = ConvBNLinear().double()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(5, 2, 5, 5, dtype=DT), torch.randint(0, 4, (5,))
    lr, wd = 0.05, 0.1
    stepped = []
    for w in (wd, 0.0):
        m = copy.deepcopy(model)
        opt = KFROG(m, lr=lr, weight_decay=w, seed=0, kl_clip=None)
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
        stepped.append(dict(m.named_parameters()))
    for n in ("conv.weight", "fc.weight", "bn.weight", "conv.bias"):
        assert_close(stepped[0][n] - stepped[1][n], -lr * wd * start[n], 1e-14, 1e-10, n)


# -- training --------------------------------------------------------------------------------------------------------
def test_kfrog_trains_digits_to_95_percent_at_its_defaults():
    data = load_digits()
    torch.manual_seed(0)
    model = SmallCNN(1, 8, 10)
    opt = KFROG(model, seed=0)
    epochs, batch = 8, 64
    steps = epochs * math.ceil(len(data.train_y) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: one thread avoids oversubscription on a shared 2-core runner
    try:
        for _ in range(epochs):
            perm = torch.randperm(len(data.train_y))
            for k in range(0, len(perm), batch):
                idx = perm[k:k + batch]
                opt.zero_grad()
                F.cross_entropy(model(data.train_x[idx]), data.train_y[idx]).backward()
                opt.step()
                sched.step()
        with torch.no_grad():
            acc = (model(data.test_x).argmax(1) == data.test_y).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    assert acc >= 0.95, f"K-FROG (defaults, lr {opt.defaults['lr']}) reached {acc:.3f} test accuracy on digits"


def test_fop_train_builds_kfrog():
    from fop_train import cli as train

    opt = train.make_optimizer("kfrog", SmallCNN(1, 8, 10), lr=train.OPTIMIZERS["kfrog"].base_lr * 64 / 256)
    assert isinstance(opt, KFROG) and opt.defaults["lr"] == KFROG(SmallCNN(1, 8, 10)).defaults["lr"]
    assert "kfrog" in train.available_optimizers()


# -- state_dict, AMP, bad input ----------------------------------------------------------------------------------------
def _batches(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 2, 5, 5, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def test_state_dict_round_trip_resumes_bit_identically():
    torch.manual_seed(0)
    model = ConvBNLinear()
    kw = dict(lr=0.05, momentum=0.9, sample_size=5, y_momentum=0.9, weight_decay=1e-3, fold_bias=True)
    opt = KFROG(model, **kw)
    batches = _batches(6)
    train_steps(model, opt, batches[:3])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train_steps(model, opt, batches[3:])
    model2 = ConvBNLinear()
    model2.load_state_dict(saved_model)
    opt2 = KFROG(model2, **kw, seed=12345)
    opt2.load_state_dict(saved_opt)
    train_steps(model2, opt2, batches[3:])
    for (n, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), n
    assert opt2.layer_state[0]["y_updates"] == 6


def test_gradscaler_skips_overflow_and_unscales():
    torch.manual_seed(0)
    model = ConvBNLinear()
    ref = copy.deepcopy(model)
    opt = KFROG(model, lr=0.05, momentum=0.9, y_momentum=0.9, seed=1)
    opt_ref = KFROG(ref, lr=0.05, momentum=0.9, y_momentum=0.9, seed=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    batches = _batches(3)
    train_steps(model, opt, batches[:1], scaler)
    train_steps(ref, opt_ref, batches[:1])
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(batches[1][0]), batches[1][1])).backward()
    model.fc.weight.grad[0, 0] = float("inf")
    scaler.step(opt)  # an overflow step: skipped, nothing changes
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    for k, v in state["state"].items():
        for key, val in v.items():
            assert torch.equal(torch.as_tensor(val), torch.as_tensor(opt.state_dict()["state"][k][key])), key
    assert opt.steps == 1 and scaler.get_scale() < 2.0**10
    train_steps(model, opt, batches[2:], scaler)
    train_steps(ref, opt_ref, batches[2:])
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        assert_close(a, b, 1e-5, 1e-4, f"GradScaler run vs unscaled run: {n}")


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "lr"), (dict(momentum=1.0), "momentum"), (dict(weight_decay=-1e-3), "weight_decay"),
    (dict(y_momentum=1.0), "y_momentum"), (dict(y_momentum=-0.1), "y_momentum"), (dict(sample_size=0), "sample_size"),
    (dict(cg_iters=0), "cg_iters"), (dict(eps=0.0), "eps"), (dict(eps=float("inf")), "eps"),
    (dict(lr_other_ratio=-0.5), "lr_other_ratio"), (dict(nesterov=True), "nesterov"), (dict(fold_bias=1), "fold_bias"),
    (dict(seed=-1), "seed"), (dict(exclude=["nope"]), "nope"),
])
def test_invalid_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KFROG(ConvBNLinear(), **kwargs)


@pytest.mark.parametrize("key, value", [("eps", -1.0), ("y_momentum", 1.5), ("cg_iters", 0)])
def test_bad_group_value_or_nonfinite_gradient_changes_nothing(key, value):
    torch.manual_seed(0)
    model = ConvBNLinear()
    opt = KFROG(model, lr=0.05, momentum=0.9, y_momentum=0.5)
    batches = _batches(2)
    train_steps(model, opt, batches[:1])
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    F.cross_entropy(model(batches[1][0]), batches[1][1]).backward()
    good = opt.param_groups[0][key]
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=key):
        opt.step()
    opt.param_groups[0][key] = good
    model.bn.weight.grad[0] = float("nan")
    with pytest.raises(FloatingPointError, match="bn.weight"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    after = opt.state_dict()
    for k, v in state["state"].items():
        for name, val in v.items():
            assert torch.equal(torch.as_tensor(val), torch.as_tensor(after["state"][k][name])), name
    assert after["curvature"]["steps"] == 1
