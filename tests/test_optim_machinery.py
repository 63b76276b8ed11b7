"""The shared optimizer machinery: layer discovery, armed capture, validation, AMP, non-finite, state_dict."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from fop import FOP, KFAC
from fop._base import check_float, check_int, check_range, eval_schedule
from fop._capture import Capture
from fop._layers import discover_layers, parameter_map, unwrap_model
from helpers import INVERSES, inverse_kwargs
from torch import nn


def small_cnn(bias: bool = True) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=bias), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, dilation=1, bias=bias), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 3, 2, padding=1, dilation=2), nn.Flatten(), nn.Linear(3 * 2 * 2, 5, bias=bias))


# -- layers ------------------------------------------------------------------------------------------------------------
def test_discover_supported_and_skipped():
    m = nn.Sequential(nn.Linear(4, 6), nn.Conv2d(3, 4, 3, groups=1), nn.Conv2d(4, 4, 3, groups=2),
                      nn.Conv2d(3, 3, 3, padding_mode="circular", padding=1), nn.LayerNorm(6), nn.Embedding(5, 3),
                      nn.Conv2d(3, 3, 3, padding="same", dilation=2, bias=False))
    layers, skipped = discover_layers(m)
    assert [layer.name for layer in layers] == ["0", "1", "2", "5", "6"]
    assert [layer.kind for layer in layers] == ["linear", "conv2d", "conv2d", "embedding", "conv2d"]
    assert layers[4].conv["padding"] == (2, 2) and layers[4].bias is None
    assert layers[0].shape == (6, 5) and layers[1].shape == (4, 3 * 9 + 1) and layers[4].shape == (3, 27)
    assert layers[2].shape == (4, 2 * 9 + 1) and layers[2].conv["groups"] == 2  # grouped: 2 blocks of 2 x 19
    assert layers[3].shape == (3, 5)  # the embedding's gradient matrix: dim x vocab
    reasons = dict(skipped)
    assert "circular" in reasons["3"]
    assert reasons["4"].startswith("norm layer: takes the unpreconditioned step")


def test_exclude_by_module_and_name_and_unknown():
    m = small_cnn()
    layers, skipped = discover_layers(m, exclude=["0", m[7]])
    assert [layer.name for layer in layers] == ["2", "5"]
    assert ("0", "excluded") in skipped and ("7", "excluded") in skipped
    with pytest.raises(ValueError, match="no module named 'nope'"):
        discover_layers(m, exclude="nope")
    with pytest.raises(ValueError, match="not part of the model"):
        discover_layers(m, exclude=[nn.Linear(2, 2)])
    opt = KFAC(m, exclude=[m[0]])
    assert all(not line.startswith("0:") for line in opt.preconditioned())
    assert ("0", "excluded") in opt.not_preconditioned()


def test_excluded_and_unsupported_params_get_plain_outer_update():
    """unpreconditioned="sgd" without the KL clip: the excluded conv and the BatchNorm move exactly as SGD (the
    default grafted step is tested in test_optim_kfac)."""
    torch.manual_seed(0)
    m = small_cnn()
    ref = copy.deepcopy(m)
    opt = FOP(m, lr=0.1, momentum=0.0, exclude=["0"], kl_clip=None, unpreconditioned="sgd")
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    x, y = torch.randn(8, 2, 6, 6), torch.randint(0, 5, (8,))
    for model, o in ((m, opt), (ref, sgd)):
        o.zero_grad()
        F.cross_entropy(model(x), y).backward()
        o.step()
    for name in ("0.weight", "0.bias", "3.weight", "3.bias"):  # excluded conv and the BatchNorm: SGD exactly
        assert torch.equal(dict(m.named_parameters())[name], dict(ref.named_parameters())[name]), name
    assert not torch.equal(m[2].weight, ref[2].weight)


@pytest.mark.parametrize("cls", [KFAC, FOP])
def test_kl_clip_scales_every_parameter_alike(cls):
    """With the (default) KL clip active, the excluded conv and the BatchNorm move by lr nu g with the nu that scales
    the preconditioned layers: the same step as with kl_clip=None, times nu < 1."""
    torch.manual_seed(0)
    m = small_cnn()
    x, y = torch.randn(8, 2, 6, 6), torch.randint(0, 5, (8,))
    steps = {}
    for clip in ("default", None):
        model = copy.deepcopy(m)
        opt = cls(model, lr=10.0, momentum=0.0, exclude=["0"], **({} if clip == "default" else {"kl_clip": None}))
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        steps[clip] = {n: b - p.detach() for (n, p), b in zip(model.named_parameters(), before)}
    names = list(steps[None])
    nu = (steps["default"]["0.weight"].norm() / steps[None]["0.weight"].norm()).item()
    assert 0.0 < nu < 0.5
    for name in names:
        torch.testing.assert_close(steps["default"][name], nu * steps[None][name], rtol=1e-4, atol=1e-7)


def test_unwrap_and_param_map_and_params_subset():
    m = small_cnn()
    assert unwrap_model(nn.DataParallel(m)) is m
    layers, _ = discover_layers(nn.DataParallel(m))
    pmap = parameter_map(layers)
    assert pmap[id(m[2].weight)] == (1, "weight") and pmap[id(m[7].bias)] == (3, "bias")
    layers, skipped = discover_layers(m, params=[p for n, p in m.named_parameters() if not n.startswith("7")])
    assert "7" not in [layer.name for layer in layers]
    assert ("7", "weight is not among the optimizer's parameters") in skipped
    groups = [{"params": m[0].parameters(), "lr": 0.01},
              {"params": list(m[2].parameters()) + list(m[7].parameters())}]
    opt = KFAC(groups, model=nn.DataParallel(m))
    assert len(opt.layers) == 3 and opt.model is m


def test_tied_weights_are_not_preconditioned():
    l1, l2 = nn.Linear(4, 4), nn.Linear(4, 4)
    l2.weight = l1.weight
    m = nn.Sequential(l1, nn.ReLU(), l2, nn.Linear(4, 2))
    layers, skipped = discover_layers(m)
    assert [layer.name for layer in layers] == ["3"]
    assert ("0", "parameter shared with another layer") in skipped


def test_grad_matrix_split_roundtrip():
    layers, _ = discover_layers(small_cnn())
    for layer in layers:
        for p in layer.params:
            p.grad = torch.randn_like(p)
        M = layer.grad_matrix()
        assert M.shape == layer.shape
        for p, back in zip(layer.params, layer.split(M)):
            assert torch.equal(p.grad, back)


# -- capture ---------------------------------------------------------------------------------------------------------
def test_capture_only_when_armed_and_released():
    m = small_cnn()
    layers, _ = discover_layers(m)
    cap = Capture(layers)
    x = torch.randn(6, 2, 6, 6)
    m(x).sum().backward()
    assert all(not recs for recs in cap.records)
    cap.arm(full=False)
    with torch.no_grad():
        m(x)
    assert all(not recs for recs in cap.records)
    m(x).sum().backward()
    assert all(len(recs) == 1 and recs[0].a.shape[0] == 3 and recs[0].dy.shape[0] == 3 for recs in cap.records)
    m(x[:5]).sum().backward()  # gradient accumulation: a second record, odd batch
    assert [r.n_half for r in cap.records[0]] == [3, 2]
    assert cap.sample_counts_of(0) == (11, 5)
    cap.release()
    assert all(not recs for recs in cap.records) and not cap.armed
    cap.remove()


def _explicit_factors(m, layer, x, loss_fn):
    """A and G of one layer from explicit per-sample quantities (im2col by unfold), float64."""
    m = copy.deepcopy(m).double()
    for sub in m.modules():  # deepcopy copied the capture's hooks: drop them
        sub._forward_hooks.clear()
    mod = dict(m.named_modules())[layer.name]
    store = {}
    mod.register_forward_hook(lambda _m, i, o: store.update(a=i[0], out=o))
    out = m(x.double())
    store["out"].retain_grad()
    loss_fn(out).backward()
    a, dy = store["a"], store["out"].grad
    N = x.shape[0]
    if layer.kind == "conv2d":
        c = layer.conv
        P = F.unfold(a, c["kernel_size"], dilation=c["dilation"], padding=c["padding"], stride=c["stride"])
        P = P.transpose(1, 2).reshape(-1, P.shape[1])
        Y = dy.permute(0, 2, 3, 1).reshape(-1, dy.shape[1])
    else:
        P, Y = a, dy
    if layer.bias is not None:
        P = torch.cat([P, torch.ones(P.shape[0], 1, dtype=P.dtype)], 1)
    return P.T @ P / P.shape[0], (N * Y).T @ (N * Y) / N


@pytest.mark.parametrize("bias", [True, False])
def test_capture_factors_match_explicit(bias):
    torch.manual_seed(1)
    m = small_cnn(bias).double()
    layers, _ = discover_layers(m)
    cap = Capture(layers)
    cap.arm(full=True)
    x, y = torch.randn(7, 2, 6, 6, dtype=torch.float64), torch.randint(0, 5, (7,))

    def loss_fn(out):
        return F.cross_entropy(out, y)

    loss_fn(m(x)).backward()
    for i, layer in enumerate(layers):
        A = torch.zeros(layer.in_dim, layer.in_dim, dtype=torch.float64)
        G = torch.zeros(layer.out_dim, layer.out_dim, dtype=torch.float64)
        assert cap.update_input_factor(i, A, 1.0) and cap.update_output_factor(i, G, 1.0)
        A_ref, G_ref = _explicit_factors(m, layer, x, loss_fn)
        torch.testing.assert_close(A, A_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(G, G_ref, rtol=1e-10, atol=1e-12)


def test_capture_accumulation_equals_one_big_batch():
    """Two micro-batches (loss / 2 each) give the same factors and half-batch sum as the stacked batch."""
    torch.manual_seed(2)
    m = small_cnn().double()
    m[3].eval()  # BatchNorm in training mode couples the samples of a batch
    layers, _ = discover_layers(m)
    x, y = torch.randn(8, 2, 6, 6, dtype=torch.float64), torch.randint(0, 5, (8,))
    results = []
    for chunks in (1, 2):
        cap = Capture(layers)
        cap.arm(full=True)
        for xc, yc in zip(x.chunk(chunks), y.chunk(chunks)):
            (F.cross_entropy(m(xc), yc) / chunks).backward()
        out = []
        for i, layer in enumerate(layers):
            A = torch.zeros(layer.in_dim, layer.in_dim, dtype=torch.float64)
            G = torch.zeros(layer.out_dim, layer.out_dim, dtype=torch.float64)
            cap.update_input_factor(i, A, 1.0)
            cap.update_output_factor(i, G, 1.0)
            out.append((A, G))
        results.append(out)
        cap.remove()
    for (A1, G1), (A2, G2) in zip(*results):
        torch.testing.assert_close(A1, A2)
        torch.testing.assert_close(G1, G2)


# -- validation ------------------------------------------------------------------------------------------------------
def test_validation_helpers_name_the_value():
    with pytest.raises(ValueError, match=r"lr must be >= 0.0, got -1.0"):
        check_float("lr", -1, low=0.0)
    with pytest.raises(ValueError, match="momentum must be < 1.0"):
        check_float("momentum", 1.0, low=0.0, high=1.0, high_open=True)
    with pytest.raises(ValueError, match="factor_interval must be an integer >= 1, got 0"):
        check_int("factor_interval", 0)
    with pytest.raises(ValueError, match="beta_clip"):
        check_range("beta_clip", (1, -1))
    with pytest.raises(ValueError, match=r"damping\(3\) must be >= 0.0, got -1.0"):
        eval_schedule("damping", lambda s: -1.0, 3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-0.1), "lr"), (dict(momentum=1.5), "momentum"), (dict(weight_decay=-1), "weight_decay"),
    (dict(damping=-1e-3), "damping"), (dict(damping_mode="bad"), "damping_mode"),
    (dict(factor_decay=0.0), "factor_decay"), (dict(factor_interval=0), "factor_interval"),
    (dict(inverse_interval=2.5), "inverse_interval"), (dict(kl_clip=0.0), "kl_clip"),
    (dict(fisher="true"), "fisher"), (dict(beta="big"), "beta"), (dict(eta_clip=(2, 0)), "eta_clip"),
    (dict(loss_reduction="max"), "loss_reduction"), (dict(factor_dtype=torch.float16), "factor_dtype"),
    (dict(inverse_method="svd"), "inverse_method"),
    (dict(inverse_method="cholesky", damping_mode="eigen"), "damping_mode='factored'"),
])
def test_constructor_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FOP(small_cnn(), **kwargs)


def test_constructor_needs_model():
    m = small_cnn()
    with pytest.raises(ValueError, match="needs the model"):
        KFAC(m.parameters())
    assert len(KFAC(m.parameters(), model=m).layers) == 4


# -- non-finite, GradScaler, state_dict --------------------------------------------------------------------------------
def _snapshot(m, opt):
    """Parameters and optimizer state (not BatchNorm buffers, which the forward pass updates)."""
    return {k: v.detach().clone() for k, v in m.named_parameters()}, copy.deepcopy(opt.state_dict())


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _assert_same(u, v)
    else:
        assert a == b


def _train(m, opt, steps, seed=0, batch=8):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(batch, 2, 6, 6, generator=g), torch.randint(0, 5, (batch,), generator=g)
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()


@pytest.mark.parametrize("cls", [KFAC, FOP])
def test_nonfinite_gradient_raises_and_changes_nothing(cls):
    m = small_cnn()
    opt = cls(m, lr=0.1, factor_interval=1, inverse_interval=2, weight_decay=1e-4, damping=1e-2, kl_clip=1e-2)
    _train(m, opt, 3)
    before = _snapshot(m, opt)
    x, y = torch.randn(8, 2, 6, 6), torch.randint(0, 5, (8,))
    opt.zero_grad()
    F.cross_entropy(m(x), y).backward()
    m[2].weight.grad[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite gradient .* in 2.weight"):
        opt.step()
    _assert_same(before, _snapshot(m, opt))


@pytest.mark.parametrize("cls", [KFAC, FOP])
def test_gradscaler_overflow_step_is_skipped(cls):
    m = small_cnn()
    opt = cls(m, lr=0.1, factor_interval=1, inverse_interval=1, damping=1e-2, kl_clip=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    g = torch.Generator().manual_seed(0)

    def scaled_step(overflow=False):
        x, y = torch.randn(8, 2, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)
        opt.zero_grad()
        scaler.scale(F.cross_entropy(m(x), y)).backward()
        if overflow:
            m[7].weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()

    for _ in range(3):
        scaled_step()
    assert opt.steps == 3
    before = _snapshot(m, opt)
    scaled_step(overflow=True)
    _assert_same(before, _snapshot(m, opt))
    assert scaler.get_scale() == 2.0**9 and opt.steps == 3
    scaled_step()
    assert opt.steps == 4


@pytest.mark.parametrize("cls", [KFAC, FOP])
def test_gradscaler_matches_unscaled(cls):
    """A scaled step equals the unscaled one: gradients and captured output gradients are unscaled."""
    torch.manual_seed(3)
    m1 = small_cnn().double()
    m2 = copy.deepcopy(m1)
    o1 = cls(m1, lr=0.1, factor_interval=1, inverse_interval=1)
    o2 = cls(m2, lr=0.1, factor_interval=1, inverse_interval=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(8, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 5, (8,), generator=g)
        o1.zero_grad()
        F.cross_entropy(m1(x), y).backward()
        o1.step()
        o2.zero_grad()
        scaler.scale(F.cross_entropy(m2(x), y)).backward()
        scaler.step(o2)
        scaler.update()
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("inverse", INVERSES)
@pytest.mark.parametrize("cls", [KFAC, FOP])
def test_state_dict_round_trip_bit_identical(cls, inverse, monkeypatch):
    torch.manual_seed(4)
    m = small_cnn()
    kwargs = dict(lr=0.05, factor_interval=2, inverse_interval=3, weight_decay=1e-3, damping=1e-2, kl_clip=1e-2,
                  **inverse_kwargs(inverse, monkeypatch))
    opt = cls(m, **kwargs)
    _train(m, opt, 5, seed=1)
    saved_model = copy.deepcopy(m.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    _train(m, opt, 4, seed=2)
    m2 = small_cnn()
    m2.load_state_dict(saved_model)
    opt2 = cls(m2, **kwargs)
    opt2.load_state_dict(saved_opt)
    _train(m2, opt2, 4, seed=2)
    for (n, p1), p2 in zip(m.named_parameters(), m2.parameters()):
        assert torch.equal(p1, p2), n
    with pytest.raises(ValueError, match="preconditioned layers"):
        cls(small_cnn(), exclude="0").load_state_dict(saved_opt)


def test_gradient_accumulation_equals_big_batch():
    """Two micro-batches of 8 (loss / 2) step like one batch of 16 (FOP's halves: first half of each)."""
    torch.manual_seed(5)
    m1 = small_cnn().double()
    m2 = copy.deepcopy(m1)
    for m in (m1, m2):  # BatchNorm statistics depend on the batch: use eval-mode BN (running stats)
        m[3].eval()
    o1 = KFAC(m1, lr=0.1, factor_interval=1, inverse_interval=1)
    o2 = KFAC(m2, lr=0.1, factor_interval=1, inverse_interval=1)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(16, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 5, (16,), generator=g)
        o1.zero_grad()
        F.cross_entropy(m1(x), y).backward()
        o1.step()
        o2.zero_grad()
        for xc, yc in zip(x.chunk(2), y.chunk(2)):
            (F.cross_entropy(m2(xc), yc) / 2).backward()
        o2.step()
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-9, atol=1e-12)


def test_lr_scheduler_and_closure():
    m = small_cnn()
    opt = FOP(m, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = torch.randn(8, 2, 6, 6), torch.randint(0, 5, (8,))
    for _ in range(3):
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            return loss
        assert torch.isfinite(opt.step(closure))
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 8)


def test_autocast_bf16_cpu():
    torch.manual_seed(6)
    m = small_cnn()
    opt = FOP(m, lr=0.05, factor_interval=1, inverse_interval=1, damping=1e-2, kl_clip=1e-2)
    x, y = torch.randn(16, 2, 6, 6), torch.randint(0, 5, (16,))
    losses = []
    for _ in range(4):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in m.parameters())
    assert all(A.dtype == torch.float32 for A in opt.factors_A)
    assert losses[-1] < losses[0]


def test_loss_reduction_sum_matches_mean():
    """A summed loss with loss_reduction="sum" and lr / N steps exactly like the mean loss (same factors). The
    BatchNorm takes unpreconditioned="sgd": the grafted g / (|g| + 1e-8) is not exactly scale-free (Adam's 1e-8)."""
    torch.manual_seed(7)
    m1 = small_cnn().double()
    m2 = copy.deepcopy(m1)
    m1[3].eval()
    m2[3].eval()
    N = 8
    o1 = FOP(m1, lr=0.1, momentum=0.0, damping=1e-2, factor_interval=1, factor_dtype=torch.float64,
             unpreconditioned="sgd")
    o2 = FOP(m2, lr=0.1 / N, momentum=0.0, damping=1e-2, factor_interval=1, factor_dtype=torch.float64,
             loss_reduction="sum", unpreconditioned="sgd")
    x, y = torch.randn(N, 2, 6, 6, dtype=torch.float64), torch.randint(0, 5, (N,))
    F.cross_entropy(m1(x), y).backward()
    F.cross_entropy(m2(x), y, reduction="sum").backward()
    o1.step()
    o2.step()
    for A1, A2, G1, G2 in zip(o1.factors_A, o2.factors_A, o1.factors_G, o2.factors_G):
        torch.testing.assert_close(A1, A2)
        torch.testing.assert_close(G1, G2)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-9, atol=1e-12)


def test_gradscaler_with_user_unscale_needs_grad_scaler_argument():
    torch.manual_seed(8)
    m1 = small_cnn().double()
    m1[3].eval()
    m2, m3 = copy.deepcopy(m1), copy.deepcopy(m1)
    kwargs = dict(lr=0.1, factor_interval=1, damping=1e-2, factor_dtype=torch.float64)
    o1 = KFAC(m1, **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
    o2 = KFAC(m2, grad_scaler=scaler, **kwargs)
    o3 = KFAC(m3, **kwargs)
    x, y = torch.randn(8, 2, 6, 6, dtype=torch.float64), torch.randint(0, 5, (8,))
    F.cross_entropy(m1(x), y).backward()
    o1.step()
    scaler.scale(F.cross_entropy(m2(x), y)).backward()
    scaler.unscale_(o2)  # e.g. for gradient clipping
    scaler.step(o2)
    scaler.update()
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-9, atol=1e-12)
    scaler3 = torch.amp.GradScaler("cpu", init_scale=2.0**6)
    scaler3.scale(F.cross_entropy(m3(x), y)).backward()
    scaler3.unscale_(o3)
    before = [p.detach().clone() for p in m3.parameters()]
    with pytest.raises(RuntimeError, match="grad_scaler=scaler"):
        scaler3.step(o3)
    assert all(torch.equal(a, p) for a, p in zip(before, m3.parameters()))


@pytest.mark.parametrize("cls", [KFAC, FOP])
def test_max_update_norm_clips_the_global_norm_of_the_step(cls):
    """max_update_norm: the directions of every parameter (preconditioned or not) scaled together so that their
    global norm is the bound; a bound above the norm changes nothing."""
    torch.manual_seed(3)
    m = small_cnn().double()
    x, y = torch.randn(8, 2, 6, 6, dtype=torch.float64), torch.randint(0, 5, (8,))
    steps = {}
    for bound in (None, 1e-3, 1e9):
        model = copy.deepcopy(m)
        opt = cls(model, lr=1.0, momentum=0.0, exclude=["0"], max_update_norm=bound)
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        steps[bound] = [b - p.detach() for p, b in zip(model.parameters(), before)]
    free = torch.linalg.vector_norm(torch.stack([d.norm() for d in steps[None]]))
    clipped = torch.linalg.vector_norm(torch.stack([d.norm() for d in steps[1e-3]]))
    assert free > 1e-2
    torch.testing.assert_close(clipped, torch.tensor(1e-3, dtype=torch.float64), rtol=1e-3, atol=0)
    for a, b, c in zip(steps[None], steps[1e-3], steps[1e9]):
        torch.testing.assert_close(b, a * (1e-3 / free), rtol=1e-3, atol=1e-9)
        torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="max_update_norm"):
        cls(copy.deepcopy(m), max_update_norm=0.0)


class _AttnNet(nn.Module):
    """Linear, nn.MultiheadAttention (its projections are captured through the attention interceptor) and a head."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h.mean(1))


@pytest.mark.parametrize("opt_name", ["KFAC", "FOP", "FROG", "KFROG", "AdaFisher"])
def test_forward_passes_of_a_deepcopy_of_the_model_are_not_captured(opt_name):
    """copy.deepcopy(model) after the optimizer hooked it (an EMA or teacher copy, as timm's ModelEmaV2 makes)
    copies the hooks too; forward and backward passes of the copy with grad enabled must not feed the original's
    curvature: the original's steps equal those of a run without the copy's passes, bit for bit."""
    import fop

    def run(with_copy: bool):
        torch.manual_seed(0)
        model = _AttnNet().double()
        opt = getattr(fop, opt_name)(model, lr=0.01, factor_interval=1, **(
            {"inverse_interval": 1} if opt_name in ("KFAC", "FOP") else {})) if opt_name in (
            "KFAC", "FOP", "AdaFisher") else getattr(fop, opt_name)(model, lr=0.01)
        twin = copy.deepcopy(model)
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(6, 4, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
            opt.zero_grad()
            if with_copy:  # the copy's own forward/backward, between the original's and on other data
                F.cross_entropy(twin(x.flip(0) * 2), y).backward()
            F.cross_entropy(model(x), y).backward()
            if with_copy:
                F.cross_entropy(twin(x + 1), y).backward()
            opt.step()
        return [p.detach() for p in model.parameters()]

    for p, q in zip(run(False), run(True)):
        assert torch.equal(p, q)

def _stepped_mlp(opt_name: str, n: int):
    """(model, optimizer, x, y): a 6-8-3 tanh MLP (seed 0) and the named fop optimizer after one step on n samples."""
    import fop

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = getattr(fop, opt_name)(model, lr=0.05)
    x, y = torch.randn(n, 6), torch.randint(0, 3, (n,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return model, opt, x, y



@pytest.mark.parametrize("opt_name", ["KFAC", "FOP", "FROG", "KFROG", "AdaFisher"])
def test_copying_or_pickling_the_optimizer_is_a_clear_error(opt_name):
    """copy.deepcopy / copy.copy / pickling of the optimizer object would make one without hooks (torch's default
    state): refused, naming state_dict as the way; the state dict itself copies and pickles, and the optimizer still
    trains afterwards."""
    import io
    import pickle

    model, opt, x, y = _stepped_mlp(opt_name, 8)
    for attempt in (lambda: copy.deepcopy(opt), lambda: copy.copy(opt), lambda: pickle.dumps(opt),
                    lambda: torch.save(opt, io.BytesIO())):
        with pytest.raises(TypeError, match="cannot be copied or pickled.*state_dict"):
            attempt()
    copy.deepcopy(opt.state_dict())
    torch.save(opt.state_dict(), io.BytesIO())
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.steps == 2 and any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


class _CheckpointedNet(nn.Module):
    """Two convs run under torch.utils.checkpoint (reentrant or not), or plainly (`reentrant=None`)."""

    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant
        self.c1, self.c2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 36, 3)

    def block(self, h):
        return torch.tanh(self.c2(torch.tanh(self.c1(h))))

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        h = self.block(x) if self.reentrant is None else checkpoint(self.block, x, use_reentrant=self.reentrant)
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("opt_name", ["KFAC", "FOP", "FROG", "KFROG", "AdaFisher"])
def test_activation_checkpointing_gives_the_plain_steps(opt_name, reentrant):
    """Under torch.utils.checkpoint the hooked layers run twice (the recompute in backward; reentrant: the first
    pass without grad): the captured statistics are those of one pass, and 5 steps equal the plain run's bit for
    bit."""
    import fop

    def run(mode):
        torch.manual_seed(0)
        model = _CheckpointedNet(mode).double()
        opt = getattr(fop, opt_name)(model, lr=0.05)
        for step in range(5):
            g = torch.Generator().manual_seed(step)
            x = torch.randn(8, 1, 6, 6, generator=g, dtype=torch.float64).requires_grad_(mode is True)
            y = torch.randint(0, 3, (8,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return [p.detach() for p in model.parameters()]

    for p, q in zip(run(None), run(reentrant)):
        assert torch.equal(p, q)


class _RaiseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backward failed on purpose")


class _FragileNet(nn.Module):
    """A conv and two Linear layers; with `fail` set, the backward raises between the conv and the Linears, after
    the Linears' output gradients (and FOP's sub-batch sums) have arrived."""

    def __init__(self):
        super().__init__()
        self.fail = False
        self.conv, self.fc1, self.fc2 = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 36, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        if self.fail:
            h = _RaiseInBackward.apply(h)
        return self.fc2(torch.tanh(self.fc1(h)))


@pytest.mark.parametrize("order", ["failed backward", "forward before zero_grad"])
@pytest.mark.parametrize("opt_name", ["KFAC", "FOP", "FROG", "KFROG", "AdaFisher"])
def test_zero_grad_forgets_what_backward_captured(opt_name, order):
    """optimizer.zero_grad() drops what the hooks captured of backward passes since the last step, as it drops their
    gradients, and keeps a forward pass still waiting for its backward. A backward that raised part-way (an OOM, a
    user's check) and is retried after zero_grad gives the steps of a run without it, bit for bit; before, the
    layers it reached kept their statistics (K-FAC's parameters 0.58 off after 3 steps, FOP's 0.99). The order
    forward, zero_grad, backward, step gives the usual order's steps."""
    import fop

    def run(disturbed):
        torch.manual_seed(0)
        model = _FragileNet().double()
        opt = getattr(fop, opt_name)(model, lr=0.05)
        for step in range(4):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(8, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
            if disturbed and order == "failed backward" and step in (0, 2):
                model.fail = True
                with pytest.raises(RuntimeError, match="on purpose"):
                    F.cross_entropy(model(x[:5] * 2), y[:5]).backward()
                model.fail = False
            if disturbed and order == "forward before zero_grad":
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
            else:
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        return [p.detach() for p in model.parameters()]

    plain = run(False)
    torch.manual_seed(0)
    assert any(not torch.equal(p, q) for p, q in zip(plain, _FragileNet().double().parameters()))  # it trained
    for p, q in zip(plain, run(True)):
        assert torch.equal(p, q)


@pytest.mark.parametrize("opt_name", ["KFAC", "FOP", "FROG", "KFROG", "AdaFisher"])
def test_a_forward_without_backward_holds_no_input(opt_name):
    """Forward passes with grad enabled whose graph is dropped without a backward (a validation loop without
    torch.no_grad) leave no layer input in the capture (before, each kept its layers' inputs until the next step:
    a GPU validation loop could run out of memory), and the steps are those of a run without them, bit for bit."""
    import fop

    def run(validate):
        torch.manual_seed(0)
        model = _FragileNet().double()
        opt = getattr(fop, opt_name)(model, lr=0.05)
        held = []
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(8, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
            opt.zero_grad()
            if validate:
                for _ in range(3):
                    F.cross_entropy(model(torch.randn(32, 1, 6, 6, dtype=torch.float64)), y.repeat(4)).item()
                held.append(sum(r.a.numel() for recs in opt.capture.records for r in recs if r.a is not None))
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return [p.detach() for p in model.parameters()], held

    plain, _ = run(False)
    validated, held = run(True)
    assert held == [0, 0, 0]
    for p, q in zip(plain, validated):
        assert torch.equal(p, q)


@pytest.mark.parametrize("opt_name", ["KFAC", "FOP", "FROG", "KFROG", "AdaFisher"])
def test_model_cast_after_the_first_step_trains_on(opt_name):
    """model.double() after the optimizer has taken a step (its moments in float32): the next steps run and bring
    the loss down, the moments follow the parameters' dtype (AdaFisher's first moment raised a dtype error in
    torch's foreach lerp before)."""
    model, opt, x, y = _stepped_mlp(opt_name, 32)
    model.double()
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(model(x.double()), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(p.dtype == torch.float64 and bool(torch.isfinite(p).all()) for p in model.parameters())
    assert losses[-1] < losses[0], losses
