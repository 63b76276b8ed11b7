"""AdaFisher / AdaFisherW: diagonals and the whole update against a literal float64 implementation, explicit
parameter-to-module mapping, the documented F~ range, training on digits, state_dict, GradScaler and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from fop import AdaFisher, AdaFisherW
from fop._layers import discover_layers
from fop.adafisher import adafisher_layer_support, input_diagonal, output_diagonal
from helpers import assert_close, train_steps
from test_optim_frog import train_digits
from torch import nn

DT = torch.float64


# -- a literal float64 implementation of the formulas (independent of the optimizer's code) ---------------------------
def literal_H(module, h):
    if isinstance(module, nn.Linear):
        X = h.reshape(-1, h.shape[-1])
        if module.bias is not None:
            X = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], 1)
        return (X**2).mean(0)
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(h, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
        P = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        if module.bias is not None:
            P = torch.cat([P, torch.ones(P.shape[0], 1, dtype=P.dtype)], 1)
        return (P**2).mean(0)
    N = h.shape[0]
    if isinstance(module, nn.BatchNorm2d):
        u = h.sum((0, 2, 3)) / (h.shape[2] * h.shape[3]) ** 2
    else:
        C = module.weight.numel()
        T = h.numel() // (N * C)
        u = h.reshape(-1, C).sum(0) / T**2
    return torch.stack([(u**2).sum(), torch.tensor(float(u.numel()), dtype=h.dtype)]) / N**2


def literal_S(module, s):
    if isinstance(module, nn.Linear):
        return (s.reshape(-1, s.shape[-1]) ** 2).mean(0)
    if isinstance(module, nn.Conv2d):
        return (s.permute(0, 2, 3, 1).reshape(-1, s.shape[1]) ** 2).mean(0)
    if isinstance(module, nn.BatchNorm2d):
        return s.sum((0, 2, 3)) ** 2 / s.shape[0]
    return s.reshape(-1, module.weight.numel()).sum(0) ** 2 / s.shape[0]


def literal_minmax(t):
    t = t.clone()
    t[t == float("inf")] = 1.0
    t[t == float("-inf")] = 0.0
    return (t - t.min()) / (t.max() - t.min() + 1e-6)


def literal_F(module, H, S, damping):
    """{param name: F~} with F~[j, i] = S_j H_i + damping, as explicit Kronecker products."""
    if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
        Fm = torch.kron(H[:, None], S[None, :]).T + damping  # C x 2
        return {"weight": Fm[:, 0].reshape(module.weight.shape), "bias": Fm[:, 1]}
    W = module.weight
    R, groups = W.shape[0], getattr(module, "groups", 1)
    d = W[0].numel()
    rows = []
    for j in range(R):
        g = j // (R // groups)
        Hj = torch.cat([H[g * d:(g + 1) * d], H[-1:]]) if module.bias is not None else H[g * d:(g + 1) * d]
        rows.append(S[j] * Hj + damping)
    Fm = torch.stack(rows)
    out = {"weight": Fm[:, :d].reshape(W.shape)}
    if module.bias is not None:
        out["bias"] = Fm[:, d]
    return out


class Tiny(nn.Module):
    """Conv2d, BatchNorm2d, grouped strided Conv2d, Linear, LayerNorm, Linear, and an unsupported parameter."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2, bias=False)
        self.fc1 = nn.Linear(36, 8)
        self.ln = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        x = self.conv2(F.relu(self.bn(self.conv1(x))))
        return self.fc2(self.ln(torch.tanh(self.fc1(x.flatten(1))))) * self.scale


def literaltrain_steps(model, batches, lr, beta, damping, gamma, interval, wd, decoupled, ema, kl_clip=None):
    """Train `model` with the formulas written out; returns the parameters after every step. With `kl_clip`: the
    step times nu = min(1, sqrt(kl_clip / sum_k (lr / (1 - beta^t))^2 sum m_k^2 / F_k)) (weight decay unscaled)."""
    mods = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.BatchNorm2d,
                                                                     nn.LayerNorm))}
    H = {n: None for n in mods}
    S = {n: None for n in mods}
    io = {}
    for n, m in mods.items():
        def fwd(module, inputs, output, n=n):
            io[n + ".h"] = inputs[0].detach()
            output.register_hook(lambda g: io.__setitem__(n + ".s", g.detach()))
        m.register_forward_hook(fwd)
    params = dict(model.named_parameters())
    m_buf = {k: torch.zeros_like(p) for k, p in params.items()}
    history = []
    for t, (x, y) in enumerate(batches):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if t % interval == 0:
            for n, mod in mods.items():
                for store, fresh in ((H, literal_H(mod, io[n + ".h"])), (S, literal_S(mod, io[n + ".s"]))):
                    cur = torch.ones_like(fresh) if store[n] is None else store[n]
                    new = literal_minmax(fresh)
                    store[n] = 0.1 * gamma * cur + 0.01 * gamma * new if ema == "public" else \
                        gamma * cur + (1 - gamma) * new
        Fs = {}
        for n, mod in mods.items():
            for which, Fm in literal_F(mod, H[n], S[n], damping).items():
                Fs[f"{n}.{which}"] = Fm
        with torch.no_grad():
            for k, p in params.items():
                g = p.grad if decoupled else p.grad + wd * p
                m_buf[k] = beta * m_buf[k] + (1 - beta) * g
            rate = lr / (1 - beta ** (t + 1))
            nu = 1.0
            if kl_clip is not None:
                kl = sum(rate ** 2 * float((m_buf[k] ** 2 / Fs.get(k, torch.ones_like(p))).sum())
                         for k, p in params.items())
                nu = min(1.0, (kl_clip / kl) ** 0.5)
            for k, p in params.items():
                Fk = Fs.get(k, torch.ones_like(p))
                if decoupled:
                    p -= lr * wd * p + nu * rate * m_buf[k] / Fk
                else:
                    p -= nu * rate * m_buf[k] / Fk
        history.append({k: p.detach().clone() for k, p in params.items()})
    return history


def _batches(n, seed=3, N=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(N, 2, 6, 6, generator=g, dtype=DT), torch.randint(0, 3, (N,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("cls, ema, kl_clip", [(AdaFisher, "public", None), (AdaFisherW, "public", None),
                                               (AdaFisher, "average", None), (AdaFisherW, "average", None),
                                               (AdaFisher, "public", 1e-3), (AdaFisherW, "average", 1e-3)])
def test_update_matches_literal_float64(cls, ema, kl_clip):
    """kl_clip=None: the public algorithm; 1e-3 (the default): its trust region, active on these steps. The
    unsupported `scale` takes F~ = 1 as in the public code (unpreconditioned="sgd"; the graft: the next test)."""
    torch.manual_seed(0)
    model = Tiny().double()
    ref, ref_unclipped = copy.deepcopy(model), copy.deepcopy(model)
    hp = dict(lr=0.01, beta=0.9, damping=1e-3, gamma=0.8, interval=2, wd=0.05)
    opt = cls(model, lr=hp["lr"], beta=hp["beta"], damping=hp["damping"], gamma=hp["gamma"],
              factor_interval=hp["interval"], weight_decay=hp["wd"], ema=ema, kl_clip=kl_clip,
              unpreconditioned="sgd")
    assert [line.split(":")[0] for line in opt.preconditioned()] == ["conv1", "bn", "conv2", "fc1", "ln", "fc2"]
    batches = _batches(5)
    expected = literaltrain_steps(ref, batches, decoupled=cls is AdaFisherW, ema=ema, kl_clip=kl_clip, **hp)
    if kl_clip is not None:  # the clip is active: without it the parameters differ
        unclipped = literaltrain_steps(ref_unclipped, batches[:1], decoupled=cls is AdaFisherW, ema=ema, **hp)
        assert not torch.allclose(unclipped[0]["fc2.weight"], expected[0]["fc2.weight"])
    for t, (x, y) in enumerate(batches):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for n, p in model.named_parameters():
            assert_close(p, expected[t][n], 1e-12, 1e-10, f"step {t}: {n}")


@pytest.mark.parametrize("cls", [AdaFisher, AdaFisherW])
def test_grafted_parameter_moves_at_the_preconditioned_scale(cls):
    """unpreconditioned="graft" (default), kl_clip=None: on the first step the preconditioned parameters move as in
    the "sgd" run (later the runs differ through `scale` in the forward); the unsupported `scale` moves by
    -lr_t s m / (sqrt(v^) + 1e-8), s the RMS of m / F~ over the preconditioned entries of the step (read back from
    their updates, -lr_t m / F~), v^ Adam's bias-corrected second moment."""
    torch.manual_seed(0)
    grafted, plain = Tiny().double(), Tiny().double()
    plain.load_state_dict(grafted.state_dict())
    lr, beta = 0.01, 0.9
    opts = [cls(m, lr=lr, beta=beta, factor_interval=2, kl_clip=None, unpreconditioned=u)
            for m, u in ((grafted, "graft"), (plain, "sgd"))]
    m_scale, v = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for t, (x, y) in enumerate(_batches(4), start=1):
        before = {n: p.detach().clone() for n, p in grafted.named_parameters()}
        for model, opt in zip((grafted, plain), opts):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        g = grafted.scale.grad
        m_scale = beta * m_scale + (1 - beta) * g
        v = 0.999 * v + 0.001 * g * g
        lr_t = lr / (1 - beta ** t)
        moved = [(p.detach() - before[n]).flatten() for n, p in grafted.named_parameters() if n != "scale"]
        s = torch.cat(moved).square().mean().sqrt() / lr_t
        expected = before["scale"] - lr_t * s * m_scale / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
        assert_close(grafted.scale, expected, 1e-10, 1e-12, f"step {t}: scale")
        for (n, p), q in zip(grafted.named_parameters(), plain.parameters()):
            if n != "scale" and t == 1:
                assert_close(p, q, 0, 0, f"step {t}: {n}")
    assert not torch.allclose(grafted.scale, plain.scale)


DIAG_CASES = [
    (lambda: nn.Linear(5, 3), (4, 5)),
    (lambda: nn.Linear(5, 3, bias=False), (2, 3, 5)),
    (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 5, 6)),
    (lambda: nn.Conv2d(4, 6, (2, 3), stride=2, padding=(1, 0), dilation=2, groups=2), (3, 4, 7, 8)),
    (lambda: nn.Conv2d(4, 4, 3, groups=4, bias=False), (2, 4, 5, 5)),
    (lambda: nn.BatchNorm2d(3), (4, 3, 2, 3)),
    (lambda: nn.LayerNorm(6), (5, 6)),
    (lambda: nn.LayerNorm((2, 3)), (4, 5, 2, 3)),
]


@pytest.mark.parametrize("make, shape", DIAG_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_diagonals_match_literal(make, shape, dtype):
    module = make().to(dtype)
    (layer,), _ = discover_layers(nn.Sequential(module), support=adafisher_layer_support)
    h = torch.randn(shape, dtype=dtype)
    s = torch.randn_like(module(h))
    tol = (1e-12, 1e-10) if dtype == DT else (1e-6, 1e-5)
    assert_close(input_diagonal(layer, h), literal_H(module, h.double()), *tol, "H")
    assert_close(output_diagonal(layer, s), literal_S(module, s.double()), *tol, "S")


def test_unsupported_parameters_after_supported_ones_all_update():
    """The public code pairs parameters with modules by position and can skip trailing ones: we map explicitly."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.prelu = nn.PReLU(6)  # unsupported, after a supported layer
            self.unused = nn.Linear(6, 6)  # no gradient this step
            self.emb = nn.Embedding(3, 6)
            self.head = nn.Linear(6, 2)
            self.offset = nn.Parameter(torch.zeros(2))

        def forward(self, x, k):
            return self.head(self.prelu(self.fc(x)) + self.emb(k)) + self.offset

    torch.manual_seed(0)
    net = Net()
    opt = AdaFisher(net, lr=1e-2, factor_interval=1)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(net(torch.randn(8, 4), torch.randint(0, 3, (8,))), torch.randint(0, 2, (8,))).backward()
        opt.step()
    for n, p in net.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (not n.startswith("unused")), n
    assert dict(opt.not_preconditioned())["prelu"] == "layer type not supported"


def test_public_constants_keep_fisher_within_8_percent_of_damping():
    """ema="public": after k refreshes a diagonal is <= 0.08^k + 0.0087, so from k = 3 on F~ / damping <= 1.085
    (here 4 refreshes: <= 1.08)."""
    torch.manual_seed(0)
    model = Tiny()
    opt = AdaFisher(model, factor_interval=1)
    for x, y in _batches(4):
        opt.zero_grad()
        F.cross_entropy(model(x.float()), y).backward()
        opt.step()
    ranges = opt.fisher_range()
    assert set(ranges) == {"conv1", "bn", "conv2", "fc1", "ln", "fc2"}
    assert all(1.0 <= lo <= hi <= 1.08 for lo, hi in ranges.values()), ranges
    avg = AdaFisher(Tiny(), factor_interval=1, ema="average")
    avg.zero_grad()
    F.cross_entropy(avg.model(_batches(1)[0][0].float()), _batches(1)[0][1]).backward()
    avg.step()
    assert max(hi for _, hi in avg.fisher_range().values()) > 100  # a proper average moves F~ far from damping


@pytest.mark.parametrize("cls", [AdaFisher, AdaFisherW])
def test_trains_digits_to_95_percent(cls):
    acc = train_digits(lambda m: cls(m, lr=2e-3, factor_interval=10), epochs=8)
    assert acc >= 0.95, f"{cls.__name__} reached {acc:.3f} test accuracy on digits"


# -- state_dict, AMP, bad input ----------------------------------------------------------------------------------------
def test_state_dict_round_trip_resumes_bit_identically():
    torch.manual_seed(0)
    model = Tiny()
    kw = dict(lr=1e-2, factor_interval=2, weight_decay=1e-3)
    opt = AdaFisherW(model, **kw)
    batches = _batches(7)
    train_steps(model, opt, batches[:3])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train_steps(model, opt, batches[3:])
    model2 = Tiny()
    model2.load_state_dict(saved_model)
    opt2 = AdaFisherW(model2, **kw)
    opt2.load_state_dict(saved_opt)
    assert opt2.is_refresh_step() is False and opt2.steps == 3
    train_steps(model2, opt2, batches[3:])
    for (n, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), n


def test_gradscaler_skips_overflow_and_unscales():
    torch.manual_seed(0)
    model = Tiny()
    ref = copy.deepcopy(model)
    opt, opt_ref = AdaFisher(model, factor_interval=2), AdaFisher(ref, factor_interval=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    batches = _batches(4)
    train_steps(model, opt, batches[:1], scaler)
    train_steps(ref, opt_ref, batches[:1])
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(batches[1][0].float()), batches[1][1])).backward()
    model.fc1.weight.grad[0, 0] = float("nan")
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    after = opt.state_dict()
    for k, v in state["state"].items():
        assert all(torch.equal(torch.as_tensor(v[key]), torch.as_tensor(after["state"][k][key])) for key in v)
    assert opt.steps == 1 and opt.is_refresh_step() is False
    train_steps(model, opt, batches[2:], scaler)
    train_steps(ref, opt_ref, batches[2:])
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        assert_close(a, b, 1e-5, 1e-4, f"GradScaler run vs unscaled run: {n}")


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "lr"), (dict(beta=1.0), "beta"), (dict(damping=0.0), "damping"), (dict(gamma=1.5), "gamma"),
    (dict(factor_interval=0), "factor_interval"), (dict(weight_decay=-1.0), "weight_decay"),
    (dict(ema="proper"), "ema"), (dict(exclude="nope"), "nope"),
])
def test_invalid_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaFisher(Tiny(), **kwargs)


def test_huge_finite_gradient_is_not_taken_for_non_finite():
    """The finiteness check uses L2 norms (fast); one that overflows on finite values must not raise."""
    torch.manual_seed(0)
    model = Tiny()
    opt = AdaFisher(model, factor_interval=1)
    opt.zero_grad()
    F.cross_entropy(model(_batches(1)[0][0].float()), _batches(1)[0][1]).backward()
    model.fc2.weight.grad[0, 0] = 1e30  # its square overflows float32
    opt.step()
    assert opt.steps == 1 and all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_gradient_raises_and_changes_nothing():
    torch.manual_seed(0)
    model = Tiny()
    opt = AdaFisher(model, factor_interval=1)
    batches = _batches(2)
    train_steps(model, opt, batches[:1])
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    F.cross_entropy(model(batches[1][0].float()), batches[1][1]).backward()
    model.scale.grad[1] = float("inf")
    with pytest.raises(FloatingPointError, match="scale"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    after = opt.state_dict()
    for k, v in state["state"].items():
        assert all(torch.equal(torch.as_tensor(v[key]), torch.as_tensor(after["state"][k][key])) for key in v)
    assert after["curvature"]["steps"] == 1
