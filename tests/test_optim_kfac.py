"""K-FAC against explicit Kronecker inverses, its limits and schedules, weight decay, KL clipping, the MC Fisher."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from fop import FOP, KFAC
from fop.kfac import DampedFactor, keeps_cholesky_factor, on_schedule
from helpers import inverse_kwargs
from test_optim_fop import _one_step_direction, _per_layer_stats, tiny_net
from torch import nn

import fop_kernels


def _batch(n=10, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 6, 6, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)


def _grads(m, x, y):
    m = copy.deepcopy(m)
    F.cross_entropy(m(x), y).backward()
    out = {}
    for name, mod in m.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            g = mod.weight.grad.reshape(mod.weight.shape[0], -1)
            out[name] = torch.cat([g, mod.bias.grad[:, None]], 1) if mod.bias is not None else g
    return out


@pytest.mark.parametrize("damping_mode,inverse", [("eigen", "eigh"), ("factored", "eigh"),
                                                  ("factored", "cholesky-inverse"), ("factored", "cholesky-factor"),
                                                  ("factored", "auto")])
@pytest.mark.parametrize("kl_clip", [None, "default"])
def test_kfac_matches_explicit_kronecker_inverse(damping_mode, inverse, kl_clip, monkeypatch):
    """U = Fd^-1 vec(V) with the explicit damped Kronecker Fisher; with the default KL clip (1e-3, lr 1 here) every
    layer's U is scaled by min(1, sqrt(1e-3 / sum_l U_l^T Fd_l U_l))."""
    torch.manual_seed(20)
    m = tiny_net().double()
    x, y = _batch(9)
    damping = 3e-3
    clip = {} if kl_clip == "default" else {"kl_clip": None}
    got, _ = _one_step_direction(KFAC, m, x, y, damping=damping,
                                 **{"damping_mode": damping_mode, **inverse_kwargs(inverse, monkeypatch)}, **clip)
    layers, stats = _per_layer_stats(copy.deepcopy(m), x, y)
    grads = _grads(m, x, y)
    N = x.shape[0]
    expected, quadratic = {}, 0.0
    for layer in layers:
        P, Y, L = stats[layer.name]
        A, G = P.T @ P / (N * L), N * Y.T @ Y
        if damping_mode == "eigen":
            Fd = torch.kron(A, G) + damping * torch.eye(A.shape[0] * G.shape[0], dtype=A.dtype)
        else:
            pi = torch.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0]))
            Fd = torch.kron(A + damping**0.5 * pi * torch.eye(A.shape[0], dtype=A.dtype),
                            G + damping**0.5 / pi * torch.eye(G.shape[0], dtype=G.dtype))
        u = torch.linalg.solve(Fd, grads[layer.name].T.reshape(-1))
        quadratic = quadratic + u @ Fd @ u
        expected[layer.name] = u.reshape(layer.in_dim, layer.out_dim).T
    nu = min(1.0, float((1e-3 / quadratic) ** 0.5)) if kl_clip == "default" else 1.0
    if kl_clip == "default":
        assert nu < 1.0  # the default clip is active at lr 1 on this batch
    for layer in layers:
        torch.testing.assert_close(got[layer.name], nu * expected[layer.name], rtol=1e-7, atol=1e-10)


def test_kfac_large_damping_approaches_sgd_direction():
    torch.manual_seed(21)
    m = tiny_net().double()
    x, y = _batch(8)
    damping = 1e8
    got, _ = _one_step_direction(KFAC, m, x, y, damping=damping, damping_mode="eigen", kl_clip=None)
    grads = _grads(m, x, y)
    for name, U in got.items():
        torch.testing.assert_close(U * damping, grads[name], rtol=1e-5, atol=1e-9)


def test_factor_ema_and_intervals():
    torch.manual_seed(22)
    m = tiny_net().double()
    x1, y1 = _batch(8, seed=1)
    x2, y2 = _batch(8, seed=2)
    rho = 0.3
    m_only1, m_only2 = copy.deepcopy(m), copy.deepcopy(m)  # copies before any hooks are registered
    opt = KFAC(m, lr=0.0, factor_decay=rho, factor_interval=1, inverse_interval=1, factor_dtype=torch.float64)
    only = []
    for model, (x, y) in ((m_only1, (x1, y1)), (m_only2, (x2, y2))):  # lr=0: parameters never move
        o = KFAC(model, lr=0.0, factor_interval=1, factor_dtype=torch.float64)
        F.cross_entropy(model(x), y).backward()
        o.step()
        only.append(o.factors_A)
    for x, y in ((x1, y1), (x2, y2)):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    for A, A1, A2 in zip(opt.factors_A, *only):
        torch.testing.assert_close(A, (1 - rho) * A1 + rho * A2, rtol=1e-12, atol=1e-14)

    m = tiny_net()
    opt = KFAC(m, lr=0.01, damping=0.1, factor_interval=3, inverse_interval=4)
    factor_steps = {0, 1, 2, 3, 6}  # every 3 steps, and 1, 2 while younger than the interval
    decompositions = []
    for step in range(7):
        assert opt.is_factor_step() == (step in factor_steps)
        x, y = _batch(6, seed=step, dtype=torch.float32)
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
        decompositions.append(opt.decomposed_at)
        assert opt.capture.armed == (opt.steps in factor_steps)  # K-FAC captures only before factor steps
    assert opt.factor_updates == 5 and decompositions == [0, 1, 2, 2, 4, 4, 4]  # steps 0, 1, 2 and every 4
    assert [s for s in range(40) if on_schedule(s, 10)] == [0, 1, 2, 4, 8, 10, 20, 30]


def test_factor_decay_is_per_step_at_any_interval():
    """factor_interval=3 (updates at steps 0, 1, 2, 3, 6), lr 0: each update weighs its batch by 1 - (1 - rho)^k,
    k the steps since the last update; the same factors as per-step updates over the batches seen (the step-6
    update stands for steps 4-6), and no longer rho per update (the memory then grew with the interval)."""
    torch.manual_seed(24)
    m = tiny_net().double()
    rho, factor_steps = 0.2, [0, 1, 2, 3, 6]
    batches = [_batch(8, seed=10 + s) for s in range(7)]
    per_batch = []
    for x, y in batches:  # each batch's statistics, from a copy (lr 0: the parameters never move)
        model = copy.deepcopy(m)
        o = KFAC(model, lr=0.0, factor_interval=1, factor_dtype=torch.float64)
        F.cross_entropy(model(x), y).backward()
        o.step()
        per_batch.append(o.factors_A)
    opt = KFAC(m, lr=0.0, factor_decay=rho, factor_interval=3, inverse_interval=3, factor_dtype=torch.float64)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    assert opt.factor_updated_at == [6] * len(opt.layers)
    for j in range(len(opt.layers)):
        want, last = per_batch[0][j], 0
        for s in factor_steps[1:]:
            w = 1 - (1 - rho) ** (s - last)
            want, last = (1 - w) * want + w * per_batch[s][j], s
        torch.testing.assert_close(opt.factors_A[j], want, rtol=1e-12, atol=1e-14)
        per_update = per_batch[0][j]
        for s in factor_steps[1:]:
            per_update = (1 - rho) * per_update + rho * per_batch[s][j]
        assert not torch.allclose(opt.factors_A[j], per_update, rtol=1e-6, atol=0)


def test_state_dict_without_factor_update_steps_resumes_as_saved():
    """A state_dict saved before the per-layer update steps were kept loads with the last scheduled factor step:
    the run resumed from it equals the run that never stopped."""
    torch.manual_seed(25)
    m = tiny_net()
    opt = KFAC(m, lr=0.05, factor_interval=3, inverse_interval=3)
    for step in range(14):
        x, y = _batch(6, seed=step, dtype=torch.float32)
        if step == 8:
            saved_model, saved = copy.deepcopy(m.state_dict()), copy.deepcopy(opt.state_dict())
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    assert saved["curvature"]["factor_updated_at"] == [6] * len(opt.layers)
    del saved["curvature"]["factor_updated_at"]
    m2 = tiny_net()
    m2.load_state_dict(saved_model)
    opt2 = KFAC(m2, lr=0.05, factor_interval=3, inverse_interval=3)
    opt2.load_state_dict(saved)
    assert opt2.factor_updated_at == [6] * len(opt2.layers)
    for step in range(8, 14):
        x, y = _batch(6, seed=step, dtype=torch.float32)
        opt2.zero_grad()
        F.cross_entropy(m2(x), y).backward()
        opt2.step()
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    bad = copy.deepcopy(opt.state_dict())
    bad["curvature"]["factor_updated_at"] = [opt.steps] * len(opt.layers)
    with pytest.raises(ValueError, match="factor_updated_at of layer"):
        KFAC(tiny_net(), lr=0.05).load_state_dict(bad)


def test_damping_schedule_is_called_with_the_step():
    torch.manual_seed(23)
    m = tiny_net().double()
    seen = []

    def schedule(step):
        seen.append(step)
        return 1e-2 if step < 2 else 1e-1

    m1, m2 = copy.deepcopy(m), copy.deepcopy(m)
    o1 = KFAC(m1, lr=0.1, damping=schedule, factor_interval=1, inverse_interval=1)
    o2 = KFAC(m2, lr=0.1, damping=1e-2, factor_interval=1, inverse_interval=1)
    for step in range(3):
        x, y = _batch(6, seed=step)
        if step == 2:
            o2.damping = 1e-1
        for model, opt in ((m1, o1), (m2, o2)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert seen == [0, 1, 2]
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
    with pytest.raises(ValueError, match=r"damping\(3\) must be > 0.0"):
        o3 = KFAC(tiny_net(), damping=lambda s: -1.0)
        o3.steps = 3
        x, y = _batch(4, dtype=torch.float32)
        F.cross_entropy(o3.model(x), y).backward()
        o3.step()


@pytest.mark.parametrize("decoupled", [False, True])
def test_weight_decay_coupled_and_decoupled(decoupled):
    torch.manual_seed(24)
    m = tiny_net().double()
    x, y = _batch(8)
    lr, wd = 0.5, 0.1
    plain, _ = _one_step_direction(KFAC, m, x, y, damping=1e-2, kl_clip=None)
    m2 = copy.deepcopy(m)
    opt = KFAC(m2, lr=lr, momentum=0.0, weight_decay=wd, decoupled=decoupled, damping=1e-2, factor_interval=1,
               factor_dtype=torch.float64, kl_clip=None)
    opt.zero_grad()
    F.cross_entropy(m2(x), y).backward()
    opt.step()
    for layer in opt.layers:
        p0 = torch.cat([dict(m.named_parameters())[f"{layer.name}.{k}"].detach().reshape(layer.out_dim, -1)
                        for k in (["weight", "bias"] if layer.bias is not None else ["weight"])], 1)
        p1 = torch.cat([p.detach().reshape(layer.out_dim, -1) for p in layer.params], 1)
        if decoupled:
            expected = (1 - lr * wd) * p0 - lr * plain[layer.name]
        else:
            expected = p0 - lr * (plain[layer.name] + wd * p0)
        torch.testing.assert_close(p1, expected, rtol=1e-10, atol=1e-12)


def test_kl_clip_scales_the_preconditioned_update():
    torch.manual_seed(25)
    m = tiny_net().double()
    x, y = _batch(8)
    lr, kl = 0.3, 1e-4
    free, _ = _one_step_direction(KFAC, m, x, y, damping=1e-2, kl_clip=None)  # at lr 1: the direction U
    grads = _grads(m, x, y)
    vg = sum((lr**2) * (free[n] * grads[n]).sum() for n in free)
    nu = min(1.0, float((kl / vg) ** 0.5))
    assert nu < 1.0
    m2 = copy.deepcopy(m)
    opt = KFAC(m2, lr=lr, momentum=0.0, damping=1e-2, kl_clip=kl, factor_interval=1, factor_dtype=torch.float64)
    before = {layer.name: torch.cat([p.detach().reshape(layer.out_dim, -1) for p in layer.params], 1)
              for layer in opt.layers}
    opt.zero_grad()
    F.cross_entropy(m2(x), y).backward()
    opt.step()
    for layer in opt.layers:
        after = torch.cat([p.detach().reshape(layer.out_dim, -1) for p in layer.params], 1)
        torch.testing.assert_close(before[layer.name] - after, lr * nu * free[layer.name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cls", [KFAC, FOP])
def test_mc_fisher_helper(cls):
    torch.manual_seed(26)
    m = tiny_net()
    opt = cls(m, lr=0.01, damping=0.1, fisher="mc", factor_interval=2)
    emp = cls(copy.deepcopy(m), lr=0.01, damping=0.1, factor_interval=2)
    x, y = _batch(8, dtype=torch.float32)
    logits = m(x)
    F.cross_entropy(logits, y).backward(retain_graph=True)
    grads_before = [p.grad.clone() for p in m.parameters()]
    opt.fisher_backward(logits, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(g, p.grad) for g, p in zip(grads_before, m.parameters()))  # .grad untouched
    opt.step()
    F.cross_entropy(emp.model(x), y).backward()
    emp.step()
    assert all(torch.equal(a, b) for a, b in zip(opt.factors_A, emp.factors_A))  # A: same inputs
    assert not any(torch.allclose(a, b) for a, b in zip(opt.factors_G, emp.factors_G))  # G: sampled labels
    # step 1 is not a factor step: the helper is a no-op, step() does not ask for it
    opt.zero_grad()
    logits = m(x)
    opt.fisher_backward(logits)
    F.cross_entropy(logits, y).backward()
    opt.step()
    # step 2 is a factor step: forgetting the helper raises before anything changes
    opt.zero_grad()
    F.cross_entropy(m(x), y).backward()
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(RuntimeError, match="fisher_backward"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, m.parameters()))
    with pytest.raises(ValueError, match="logits"):
        opt.fisher_backward(torch.zeros(3))
    with pytest.raises(RuntimeError, match="fisher='mc'"):
        emp.fisher_backward(logits)


@pytest.mark.parametrize("passes", [1, 2])
def test_mc_output_factor_is_the_sampled_label_gradient_gram(passes):
    """fisher="mc" reduces the sampled-label output gradients to Grams in the hook: G must still be
    sum over samples (and conv positions) of g g^T / N, g the output gradient of the summed sampled-label loss, over
    every forward pass of the step (gradient accumulation); the training output gradients are not kept."""
    torch.manual_seed(27)
    m = tiny_net().double()
    opt = KFAC(m, lr=0.01, damping=0.1, fisher="mc", factor_dtype=torch.float64)
    x, y = _batch(10)
    expected = {}
    outputs = {}
    hooks = [mod.register_forward_hook(lambda mod, i, o, name=name: outputs.__setitem__(name, o))
             for name, mod in m.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))]
    for k, (xb, yb) in enumerate(zip(x.chunk(passes), y.chunk(passes))):
        logits = m(xb)
        probs = torch.softmax(logits.detach().float(), dim=1)
        labels = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(k)).squeeze(1)
        sampled = F.cross_entropy(logits.float(), labels, reduction="sum")  # as the helper: a float32 loss
        grads = torch.autograd.grad(sampled, [outputs[n] for n in outputs], retain_graph=True)
        for name, g in zip(outputs, grads):
            rows = g.movedim(1, -1).reshape(-1, g.shape[1]) if g.dim() == 4 else g
            expected[name] = expected.get(name, 0) + rows.T @ rows
        opt.fisher_backward(logits, generator=torch.Generator().manual_seed(k))
        (F.cross_entropy(logits, yb) / passes).backward()
        assert all(r.dy is None and r.backward_done for recs in opt.capture.records for r in recs)
    for h in hooks:
        h.remove()
    opt.step()
    for i, layer in enumerate(opt.layers):
        torch.testing.assert_close(opt.factors_G[i], expected[layer.name] / 10, rtol=1e-12, atol=1e-14)


def test_layer_without_gradient_is_skipped_and_keyword_calls_are_seen():
    """A layer the forward skipped has no gradient: it is skipped as torch skips such parameters (no error, no
    update, no factor); a layer called as lin(input=x) is captured like lin(x)."""
    class TwoHeads(nn.Module):
        def __init__(self, keyword=False):
            super().__init__()
            self.body, self.unused = nn.Linear(4, 3), nn.Linear(4, 3)
            self.keyword = keyword

        def forward(self, x):
            return self.body(input=x) if self.keyword else self.body(x)

    torch.manual_seed(0)
    m = TwoHeads()
    opt = KFAC(m, damping=1e-2)
    before = m.unused.weight.detach().clone()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    F.cross_entropy(m(x), y).backward()
    opt.step()
    assert torch.equal(m.unused.weight, before) and opt.factors_A[1] is None and opt.factors_A[0] is not None
    k, m2 = TwoHeads(keyword=True), TwoHeads()
    k.load_state_dict(m.state_dict())
    m2.load_state_dict(m.state_dict())
    o1, o2 = KFAC(k, damping=1e-2), KFAC(m2, damping=1e-2)
    for model, o in ((k, o1), (m2, o2)):
        F.cross_entropy(model(x), y).backward()
        o.step()
    assert torch.equal(o1.factors_A[0], o2.factors_A[0])
    assert torch.equal(k.body.weight, m2.body.weight)


def test_forward_before_construction_uses_plain_gradient_then_preconditions():
    torch.manual_seed(27)
    m = tiny_net()
    x, y = _batch(6, dtype=torch.float32)
    loss = F.cross_entropy(m(x), y)
    opt = KFAC(m, lr=0.1, momentum=0.0)
    ref = copy.deepcopy(m)
    loss.backward()
    opt.step()  # nothing captured: SGD step, factors still pending
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    F.cross_entropy(ref(x), y).backward()
    sgd.step()
    for p1, p2 in zip(m.parameters(), ref.parameters()):
        assert torch.equal(p1, p2)
    assert opt.factor_updates == 0 and opt.is_factor_step()
    opt.zero_grad()
    F.cross_entropy(m(x), y).backward()
    opt.step()
    assert opt.factor_updates == 1 and opt.buckets


def test_eigh_refresh_matches_full_decomposition_on_fixed_factors():
    """lr=0 and one batch: the factors never change, so refreshing from the exact basis keeps the same update."""
    torch.manual_seed(28)
    m = tiny_net().double()
    x, y = _batch(8)
    m_full, m_ref = copy.deepcopy(m), copy.deepcopy(m)
    kwargs = dict(lr=0.0, momentum=0.0, damping=1e-2, factor_interval=1, inverse_interval=1,
                  factor_dtype=torch.float64)
    o_full, o_ref = KFAC(m_full, **kwargs), KFAC(m_ref, eigh_refresh_iters=2, **kwargs)
    for _ in range(3):
        dirs = []
        for model, opt in ((m_full, o_full), (m_ref, o_ref)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            dirs.append(opt._curvature_step(None))
            opt.steps += 1
            opt._after_step()
        for d_full, d_ref in zip(dirs[0].values(), dirs[1].values()):  # same layer order in both
            torch.testing.assert_close(d_ref, d_full, rtol=1e-6, atol=1e-10)
    with pytest.raises(ValueError, match="eigh_refresh_iters"):
        KFAC(tiny_net(), eigh_refresh_iters=-1)


def test_cholesky_inverse_needs_factored_damping_and_no_refresh():
    with pytest.raises(ValueError, match="inverse_method='cholesky' needs damping_mode='factored'"):
        KFAC(tiny_net(), damping_mode="eigen", inverse_method="cholesky")
    with pytest.raises(ValueError, match="eigh_refresh_iters"):
        KFAC(tiny_net(), damping_mode="factored", inverse_method="cholesky", eigh_refresh_iters=1)
    with pytest.raises(ValueError, match="inverse_method"):
        KFAC(tiny_net(), inverse_method="lu")


@pytest.mark.parametrize("scratch", [False, True], ids=["copy", "scratch"])
@pytest.mark.parametrize("keep_factor", [False, True], ids=["inverse", "factor"])
def test_damped_factor_falls_back_to_clamped_eigenvalues_when_cholesky_fails(keep_factor, scratch):
    """Rounding can leave a factor slightly indefinite; when M + lam I is not positive definite its Cholesky fails
    and that matrix is replaced by its eigendecomposition with eigenvalues clamped at 0, while the others keep their
    own Cholesky. Both forms (inverse, Cholesky factor) multiply from either side as the damped inverse. With
    `sources` (the stack is the caller's scratch, inverted in place) the repair reads the source matrix, which the
    in-place Cholesky did not touch; without, the stack itself is left as it was."""
    torch.manual_seed(21)
    X = torch.randn(6, 4, dtype=torch.float64)
    good = X.T @ X
    Q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    evals = torch.tensor([-1e-3, 1.0, 2.0, 3.0], dtype=torch.float64)
    indefinite = Q @ torch.diag(evals) @ Q.T
    lam = torch.tensor([0.1, 1e-6], dtype=torch.float64)
    sources = [good.clone(), indefinite.clone()]
    stack = torch.stack(sources)
    damped = DampedFactor.of(stack, lam, keep_factor, sources=sources if scratch else None)
    assert (damped.chol is not None) == keep_factor
    assert torch.equal(sources[0], good) and torch.equal(sources[1], indefinite)
    if not scratch:
        assert torch.equal(stack, torch.stack([good, indefinite]))
    elif not keep_factor:
        assert damped.inv.data_ptr() == stack.data_ptr()  # inverted in place: no second stack
    expected = torch.stack([torch.linalg.inv(good + 0.1 * torch.eye(4, dtype=torch.float64)),
                            Q @ torch.diag(1.0 / (evals.clamp_min(0) + 1e-6)) @ Q.T])
    M = torch.randn(2, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(damped.left(M), expected @ M, rtol=1e-8, atol=1e-6)
    torch.testing.assert_close(damped.right(M.mT), M.mT @ expected, rtol=1e-8, atol=1e-6)


def test_cholesky_factor_kept_only_where_the_inverse_costs_more():
    """MNIST CNN's fc1 (64 x 3137) at interval 10 keeps A's Cholesky factor; ResNet-18's largest factors (1153 for
    128-wide gradients) and every G are inverted; a longer interval favours the inverse."""
    assert keeps_cholesky_factor(3137, 64, 10)
    assert not keeps_cholesky_factor(64, 3137, 10)
    assert not keeps_cholesky_factor(1153, 128, 10)
    assert not keeps_cholesky_factor(3137, 64, 100)


def _normed_net() -> nn.Module:
    """A preconditioned Linear pair around a LayerNorm and a bare scale parameter (both not preconditioned)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.ln, self.fc2 = nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3)
            self.gain = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.fc2(torch.tanh(self.ln(self.fc1(x)))) * self.gain

    torch.manual_seed(3)
    return Net().double()


def _normed_batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)


def test_unpreconditioned_parameters_take_the_grafted_adam_direction():
    """d = s g / (sqrt(v / (1 - b2^t)) + 1e-8), v <- b2 v + (1 - b2) g^2, s the RMS per entry of the step's
    preconditioned directions (read back from the preconditioned layers' moves, momentum 0): two steps, literal.
    FOP's s: test_fop_grafts_at_the_scale_of_its_mean_gradient_step."""
    m = _normed_net()
    lr, b2 = 0.05, 0.999
    opt = KFAC(m, lr=lr, momentum=0.0, factor_interval=1, inverse_interval=1, factor_dtype=torch.float64)
    assert {layer.name for layer in opt.layers} == {"fc1", "fc2"}
    others = [m.ln.weight, m.ln.bias, m.gain]
    pre = [p for layer in opt.layers for p in layer.params]
    v = [torch.zeros_like(p) for p in others]
    for t in (1, 2):
        x, y = _normed_batch(t)
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        grads = [p.grad.clone() for p in others]
        before = [p.detach().clone() for p in pre + others]
        opt.step()
        moves = [(b - p.detach()) / lr for b, p in zip(before, pre + others)]
        pre_moves = moves[: len(pre)]
        s = torch.sqrt(sum(d.square().sum() for d in pre_moves) / sum(d.numel() for d in pre_moves))
        for k, (g, d) in enumerate(zip(grads, moves[len(pre):])):
            v[k] = b2 * v[k] + (1 - b2) * g * g
            expected = s * g / ((v[k] / (1 - b2 ** t)).sqrt() + 1e-8)
            torch.testing.assert_close(d, expected, rtol=1e-8, atol=1e-12)
            torch.testing.assert_close(opt.state[others[k]]["graft_sq"], v[k], rtol=1e-12, atol=0)
            assert opt.state[others[k]]["graft_step"] == t
        assert float(s) > 0


@pytest.mark.parametrize("damping_mode", ["factored", "eigen"])  # the damped-inverse path and the eigenbasis
def test_fop_grafts_at_the_scale_of_its_mean_gradient_step(damping_mode):
    """FOP's grafted parameters move at s = nu RMS(eta P g_avg) (eta = 1 by default), the scale of its step along the
    mean gradient, not of its combined step: one step from one initialization and batch, read back from three
    optimizers' moves: K-FAC without the KL clip (P g_avg), FOP without it and FOP with it (their ratio is nu)."""
    x, y = _normed_batch(1)
    lr = 0.05
    kw = dict(lr=lr, momentum=0.0, factor_interval=1, inverse_interval=1, factor_dtype=torch.float64,
              damping_mode=damping_mode)

    def moves(cls, **extra):
        m = _normed_net()
        opt = cls(m, **kw, **extra)
        F.cross_entropy(m(x), y).backward()
        pre = [p for layer in opt.layers for p in layer.params]
        others = [m.ln.weight, m.ln.bias, m.gain]
        grads = [p.grad.clone() for p in others]
        before = [p.detach().clone() for p in pre + others]
        opt.step()
        out = [(b - p.detach()) / lr for b, p in zip(before, pre + others)]
        return out[: len(pre)], out[len(pre):], grads

    def rms(ts):
        return torch.sqrt(sum(t.square().sum() for t in ts) / sum(t.numel() for t in ts))

    mean_step, _, _ = moves(KFAC, kl_clip=None)
    combined, _, _ = moves(FOP, kl_clip=None)
    clipped, grafted, grads = moves(FOP)
    nu = rms(clipped) / rms(combined)
    assert 0 < float(nu) < 1  # the KL clip binds here
    s = nu * rms(mean_step)
    for g, d in zip(grads, grafted):
        torch.testing.assert_close(d, s * g / (g.abs() + 1e-8), rtol=1e-8, atol=1e-12)  # t = 1: v^ = g^2
    assert abs(float(rms(clipped) / s) - 1) > 1e-2  # the combined step's scale differs: the test can tell them apart


def test_unpreconditioned_sgd_is_the_former_gradient_times_nu():
    """unpreconditioned="sgd": the other parameters move by lr nu g (nu the KL clip's factor, the same for all)."""
    m = _normed_net()
    lr = 0.3
    opt = KFAC(m, lr=lr, momentum=0.0, factor_interval=1, unpreconditioned="sgd", factor_dtype=torch.float64)
    x, y = _normed_batch(1)
    F.cross_entropy(m(x), y).backward()
    others = [m.ln.weight, m.ln.bias, m.gain]
    grads = [p.grad.clone() for p in others]
    before = [p.detach().clone() for p in others]
    opt.step()
    ratios = torch.cat([((b - p.detach()) / (lr * g)).flatten() for b, p, g in zip(before, others, grads)])
    assert float(ratios.max() - ratios.min()) < 1e-9 and 0 < float(ratios[0]) <= 1.0
    assert not any("graft_sq" in opt.state[p] for p in others)
    with pytest.raises(ValueError, match="unpreconditioned"):
        KFAC(_normed_net(), unpreconditioned="adam")


@pytest.mark.parametrize("cls", [KFAC, FOP])
def test_grafted_state_is_transactional_and_round_trips(cls):
    """A failing step leaves graft_sq/graft_step as they were; a state_dict resumes bit for bit; a graft_sq of the
    wrong shape or a negative graft_step is rejected naming it."""
    m = _normed_net()
    opt = cls(m, lr=0.05, factor_interval=1, factor_dtype=torch.float64)
    for t in (1, 2):
        x, y = _normed_batch(t)
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    saved_sq = opt.state[m.ln.weight]["graft_sq"].clone()
    x, y = _normed_batch(3)
    opt.zero_grad()
    F.cross_entropy(m(x), y).backward()
    m.gain.grad[0] = float("inf")
    with pytest.raises(FloatingPointError):
        opt.step()
    assert torch.equal(opt.state[m.ln.weight]["graft_sq"], saved_sq) and opt.state[m.ln.weight]["graft_step"] == 2
    sd = copy.deepcopy(opt.state_dict())
    m2 = copy.deepcopy(m)
    opt2 = cls(m2, lr=0.05, factor_interval=1, factor_dtype=torch.float64)
    opt2.load_state_dict(copy.deepcopy(sd))
    for model, o in ((m, opt), (m2, opt2)):
        o.zero_grad()
        F.cross_entropy(model(x), y).backward()
        o.step()
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    index = [id(p) for p in m.parameters()].index(id(m.ln.weight))
    bad = copy.deepcopy(sd)
    bad["state"][index]["graft_sq"] = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="graft_sq"):
        opt2.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["state"][index]["graft_step"] = -1
    with pytest.raises(ValueError, match="graft_step"):
        opt2.load_state_dict(bad)


class _SmallMaps(nn.Module):
    """A conv on 1x1 maps (8 of its 9 taps read only padding) before a Linear head; with 2x2 inputs every tap
    reads the image."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 5, 3, padding=1)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).mean((2, 3)))


def _small_maps_run(opt_cls, monkeypatch, min_bytes, sizes, fail_at=None):
    import fop.kfac as kfac_module
    monkeypatch.setattr(kfac_module, "IN_PLACE_MIN_BYTES", min_bytes)
    torch.manual_seed(0)
    model = _SmallMaps().double()
    opt = opt_cls(model, lr=0.1, factor_interval=2, inverse_interval=2, factor_dtype=torch.float64)
    ids = []
    for step, size in enumerate(sizes):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, size, size, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        ids.append(opt.factors_A[0])  # the tensors themselves: an id could be reused once one is freed
    return model, opt, ids


@pytest.mark.parametrize("opt_cls", [KFAC, FOP])
def test_conv_factor_with_dead_taps_is_updated_in_place_with_the_same_result(opt_cls, monkeypatch):
    """A large conv input factor whose dead taps' rows are zero is updated in place on its live columns (the same
    tensor across refreshes) and every step equals the update into a new tensor; when the input grows so that
    every tap is live, and when it shrinks back (the factor is then nonzero everywhere), it takes the copy again,
    and still equals it."""
    for sizes in ([1] * 9, [1, 1, 1, 1, 2, 2, 1, 1, 1]):
        m_in, opt_in, ids = _small_maps_run(opt_cls, monkeypatch, 0, sizes)
        m_copy, opt_copy, ids_copy = _small_maps_run(opt_cls, monkeypatch, 2 ** 62, sizes)
        for p, q in zip(m_in.parameters(), m_copy.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(opt_in.factors_A[0], opt_copy.factors_A[0], rtol=1e-12, atol=1e-14)
        factor_steps = (2, 4, 6, 8)
        assert all(ids_copy[s] is not ids_copy[s - 1] for s in factor_steps)  # a new tensor at every factor step
        if sizes == [1] * 9:
            assert all(ids[s] is ids[2] for s in factor_steps)  # one tensor, updated in place
        else:  # 2x2 inputs at steps 4, 5: every tap live, then a factor dense everywhere: copies
            assert ids[4] is not ids[3] and ids[6] is not ids[5] and ids[8] is not ids[7]


@pytest.mark.parametrize("opt_cls", [KFAC, FOP])
def test_failed_step_after_an_in_place_factor_update_restores_the_factor(opt_cls, monkeypatch):
    """The inversion fails after the conv factor was updated in place: the step raises, and the factor (the same
    tensor), the rest of the state and the parameters are exactly as before; the next steps train."""
    model, opt, _ = _small_maps_run(opt_cls, monkeypatch, 0, [1] * 4)  # steps 0-3; step 4 inverts
    A = opt.factors_A[0]
    before_A = A.clone()
    before = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]

    def boom(*args, **kwargs):
        raise ValueError("injected fault")

    real = fop_kernels.damped_cholesky_inverse
    monkeypatch.setattr(fop_kernels, "damped_cholesky_inverse", boom)
    g = torch.Generator().manual_seed(99)
    x, y = torch.randn(8, 6, 1, 1, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="injected fault"):
        opt.step()
    assert opt.factors_A[0] is A and torch.equal(A, before_A)
    after = opt.state_dict()
    assert torch.equal(after["curvature"]["factors"][0]["A"], before["curvature"]["factors"][0]["A"])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    monkeypatch.setattr(fop_kernels, "damped_cholesky_inverse", real)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.steps == 5 and opt.factors_A[0] is A and not torch.equal(A, before_A)


@pytest.mark.parametrize("opt_cls", [KFAC, FOP])
def test_overflow_in_a_factor_updated_in_place_raises_and_restores_it(opt_cls, monkeypatch):
    """The finiteness check reads the block an in-place update wrote: inputs that overflow it in float32 raise,
    naming the factor, and leave it exactly as it was."""
    model, opt, _ = _small_maps_run(opt_cls, monkeypatch, 0, [1] * 4)
    model.float()
    opt2 = opt_cls(model, lr=0.1, factor_interval=2, inverse_interval=2)
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, 1, 1, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt2.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt2.step()
    A = opt2.factors_A[0]
    before = A.clone()
    x = torch.randn(8, 6, 1, 1, generator=torch.Generator().manual_seed(7)) * 1e25
    opt2.zero_grad()
    F.cross_entropy(model(x), torch.zeros(8, dtype=torch.long)).backward()
    with pytest.raises(FloatingPointError, match="factor A of layer conv"):
        opt2.step()
    assert opt2.factors_A[0] is A and torch.equal(A, before)


@pytest.mark.parametrize("opt_cls", [KFAC, FOP])
def test_resume_with_in_place_conv_factors_is_bit_identical(opt_cls, monkeypatch):
    """A run whose conv factor is updated in place, saved after 5 steps and resumed in a new optimizer (which
    recovers the factor's nonzero columns from the loaded A), takes the same next 5 steps bit for bit; the saved
    copy is untouched by the steps after it."""
    model, opt, _ = _small_maps_run(opt_cls, monkeypatch, 0, [1] * 5)
    saved_model, saved = copy.deepcopy(model), copy.deepcopy(opt.state_dict())
    twin = opt_cls(saved_model, lr=0.1, factor_interval=2, inverse_interval=2, factor_dtype=torch.float64)
    twin.load_state_dict(copy.deepcopy(saved))
    A_saved = saved["curvature"]["factors"][0]["A"].clone()
    for step in range(5, 10):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, 1, 1, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
        for m, o in ((model, opt), (saved_model, twin)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), saved_model.parameters()))
    assert torch.equal(opt.factors_A[0], twin.factors_A[0]) and twin.nonzero_columns_A[0] is not None
    assert torch.equal(saved["curvature"]["factors"][0]["A"], A_saved)
