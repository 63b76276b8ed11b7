"""nn.MultiheadAttention under the curvature optimizers (fop._attention, MultiheadAttentionType): the explicit form of
its forward equals torch's, and a step on it equals the step on the same attention written with two nn.Linear."""

import gc

import fop
import pytest
import torch
import torch.nn.functional as F
from fop import _attention
from fop._attention import observe_attention
from fop._layers import discover_layers
from helpers import step_losses
from torch import nn

OPTIMIZERS = {"kfac": fop.KFAC, "fop": fop.FOP, "adafisher": fop.AdaFisher, "frog": fop.FROG, "kfrog": fop.KFROG}


def _mha(embed=8, heads=2, seed=0, **kw):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(embed, heads, **kw)
    with torch.no_grad():  # torch zeroes the biases: random ones make the bias columns count
        for p in (mha.in_proj_bias, mha.out_proj.bias):
            if p is not None:
                p.normal_()
    return mha


class _Recorder:
    """A consumer of fop._attention: keeps what the linear calls `keys` showed, and their output gradients."""

    def __init__(self, keys=("in", "out")):
        self.seen = {k: [] for k in keys}
        self.grads = {k: [] for k in keys}
        self.skips = []

    def hooks(self):
        def make(which):
            def hook(inputs, output):
                self.seen[which].append((inputs[0].detach().clone(), output.detach().clone()))
                output.register_hook(lambda g: self.grads[which].append(g.detach().clone()))
            return hook
        return {k: make(k) for k in self.seen}


CASES = {
    "batch_first": dict(kw=dict(batch_first=True), call=dict()),
    "seq_first, weights per head": dict(kw=dict(), call=dict(need_weights=True, average_attn_weights=False)),
    "no bias, need_weights=False": dict(kw=dict(batch_first=True, bias=False), call=dict(need_weights=False)),
    "padding mask, bool mask": dict(kw=dict(batch_first=True), call=dict(key_padding_mask="pad", attn_mask="bool")),
    "float mask": dict(kw=dict(batch_first=True), call=dict(attn_mask="float")),
    "causal": dict(kw=dict(batch_first=True), call=dict(attn_mask="causal", is_causal=True, need_weights=False)),
    "bias_kv, zero_attn": dict(kw=dict(batch_first=True, add_bias_kv=True, add_zero_attn=True), call=dict()),
    "dropout": dict(kw=dict(batch_first=True, dropout=0.3), call=dict()),
    "unbatched": dict(kw=dict(), call=dict(), unbatched=True),
}


def _call_args(mha, case, x):
    call = dict(case["call"])
    n, length = (1, x.shape[0]) if x.dim() == 2 else (x.shape[0], x.shape[1]) if mha.batch_first else \
        (x.shape[1], x.shape[0])
    if call.get("key_padding_mask") == "pad":
        pad = torch.zeros(n, length, dtype=torch.bool)
        pad[0, -2:] = True
        call["key_padding_mask"] = pad
    if call.get("attn_mask") == "float":
        call["attn_mask"] = torch.randn(length, length)
    if call.get("attn_mask") == "bool":
        call["attn_mask"] = torch.rand(length, length) > 0.7
        call["attn_mask"].fill_diagonal_(False)
    if call.get("attn_mask") == "causal":
        call["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(length)
    return call


@pytest.mark.parametrize("name", list(CASES))
def test_explicit_form_equals_torch_and_shows_the_projections(name):
    """Outputs, attention weights and every gradient equal torch's own forward; the consumer sees the two linear
    calls batch-first (input, output and output gradient), consistent with the weights they use."""
    case = CASES[name]
    mha = _mha(**case["kw"])
    mha.train()
    L, N, E = 5, 3, 8
    shape = (L, E) if case.get("unbatched") else (N, L, E) if mha.batch_first else (L, N, E)
    x = torch.randn(shape)
    call = _call_args(mha, case, x)
    results = []
    rec = _Recorder()
    for observed in (False, True):
        handle = observe_attention(mha, rec.hooks(), active=lambda: True) if observed else None
        xi = x.clone().requires_grad_()
        torch.manual_seed(1)
        out, weights = mha(xi, xi, xi, **call)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append((out.detach(), weights, xi.grad, {n: p.grad.clone() for n, p in mha.named_parameters()}))
        mha.zero_grad()
        if handle is not None:
            handle.remove()
    (o0, w0, gx0, gp0), (o1, w1, gx1, gp1) = results
    torch.testing.assert_close(o1, o0, rtol=1e-5, atol=1e-6)
    assert (w0 is None) == (w1 is None)
    if w0 is not None:
        torch.testing.assert_close(w1, w0)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    assert gp1.keys() == gp0.keys()
    for name in gp0:
        torch.testing.assert_close(gp1[name], gp0[name], rtol=1e-5, atol=1e-6)
    n = 1 if x.dim() == 2 else N
    (a_in, y_in), = rec.seen["in"]
    (a_out, y_out), = rec.seen["out"]
    assert a_in.shape == (n, L, E) and y_in.shape == (n, L, 3 * E) and a_out.shape == (n, L, E)
    xb = x.unsqueeze(0) if x.dim() == 2 else x if mha.batch_first else x.transpose(0, 1)
    torch.testing.assert_close(a_in, xb)
    torch.testing.assert_close(y_in, F.linear(xb, mha.in_proj_weight, mha.in_proj_bias))
    torch.testing.assert_close(y_out, F.linear(a_out, mha.out_proj.weight, mha.out_proj.bias))
    # the weight gradients are sum dy a^T of what the consumer saw: its rows are the per-sample tokens
    (g_in,), (g_out,) = rec.grads["in"], rec.grads["out"]
    torch.testing.assert_close(torch.einsum("nlo,nli->oi", g_in, a_in), gp0["in_proj_weight"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.einsum("nlo,nli->oi", g_out, a_out), gp0["out_proj.weight"], rtol=1e-4,
                               atol=1e-5)


def test_cross_attention_shows_only_the_out_projection():
    mha = _mha(batch_first=True)
    rec = _Recorder()
    handle = observe_attention(mha, rec.hooks(), active=lambda: True, on_skip=rec.skips.append)
    q, kv = torch.randn(3, 4, 8), torch.randn(3, 6, 8)
    out, _ = mha(q, kv, kv)
    handle.remove()
    assert rec.seen["in"] == [] and len(rec.seen["out"]) == 1 and rec.skips == [_attention.CROSS_ATTENTION]
    ref, _ = mha(q, kv, kv)
    torch.testing.assert_close(out, ref)


def test_inactive_or_grad_free_forwards_run_unchanged():
    mha = _mha(batch_first=True)
    rec = _Recorder()
    active = [False]
    handle = observe_attention(mha, rec.hooks(), active=lambda: active[0])
    x = torch.randn(2, 4, 8)
    mha(x, x, x)
    active[0] = True
    with torch.no_grad():
        mha(x, x, x)
    assert rec.seen == {"in": [], "out": []}
    mha(x, x, x)
    assert len(rec.seen["in"]) == 1
    handle.remove()
    assert mha not in _attention._interceptors
    assert not mha._forward_pre_hooks and not mha._forward_hooks


class _ExplicitAttention(nn.Module):
    """A batch-first self-attention with the weights of `mha`, written with two nn.Linear modules."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        e = mha.embed_dim
        self.heads = mha.num_heads
        self.in_proj = nn.Linear(e, 3 * e, bias=mha.in_proj_bias is not None)
        self.out_proj = nn.Linear(e, e, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            self.in_proj.weight.copy_(mha.in_proj_weight)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                self.in_proj.bias.copy_(mha.in_proj_bias)
                self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(self, x):
        n, length, e = x.shape
        q, k, v = (t.reshape(n, length, self.heads, e // self.heads).transpose(1, 2)
                   for t in self.in_proj(x).chunk(3, dim=-1))
        z = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(z.transpose(1, 2).reshape(n, length, e))


class _AttentionNet(nn.Module):
    def __init__(self, attention: nn.Module, batch_first: bool = True):
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Linear(4, 8)
        self.attention = attention
        self.head = nn.Linear(8, 3)
        self.batch_first = batch_first

    def forward(self, x):
        h = self.embed(x)
        if isinstance(self.attention, nn.MultiheadAttention):
            h = h if self.batch_first else h.transpose(0, 1)
            h, _ = self.attention(h, h, h, need_weights=False)
            h = h if self.batch_first else h.transpose(0, 1)
        else:
            h = self.attention(h)
        return self.head(h.mean(dim=1))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_equals_the_step_on_explicit_linear_layers(name, batch_first):
    """Every optimizer at its defaults: the parameters after 4 steps on nn.MultiheadAttention equal those on the same
    attention as two nn.Linear, preconditioned as any Linear (the factors, FOP's half batches, FROG's rows, AdaFisher's
    diagonals all see the same per-sample token rows)."""
    mha = _mha(batch_first=batch_first).double()  # float64: FROG's CG would amplify float32 rounding
    start = mha.in_proj_weight.detach().clone()
    nets = [_AttentionNet(mha, batch_first).double(), _AttentionNet(_ExplicitAttention(mha)).double()]
    # K-FROG without its trust region: the head's U^T A U (eps 1e-6 under 1/sqrt(y)) differs by 4e-8 relative between
    # the two float64 computations, and the clip's one nu carries that into every parameter (3e-7 after 4 steps)
    extra = {"kfac": dict(factor_interval=1, inverse_interval=1), "fop": dict(factor_interval=1, inverse_interval=1),
             "kfrog": dict(kl_clip=None)}.get(name, {})
    opts = [OPTIMIZERS[name](net, lr=0.05, **extra) for net in nets]
    assert [layer.name for layer in opts[0].layers] == ["embed", "attention.in_proj", "attention.out_proj", "head"]
    assert [layer.kind for layer in opts[0].layers][1:3] == ["attention_in_proj", "attention_out_proj"]
    shares = [opt.coverage()["total"]["share"] for opt in opts]
    assert shares[0] == shares[1] and (shares[0] == 1.0 or name == "kfrog")  # K-FROG: biases take the plain update
    torch.manual_seed(4)
    batches = [(torch.randn(16, 5, 4, dtype=torch.float64), torch.randint(0, 3, (16,))) for _ in range(4)]
    for net, opt in zip(nets, opts):
        torch.manual_seed(5)  # FROG's row samples
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    a, b = nets
    pairs = [(a.embed.weight, b.embed.weight), (a.attention.in_proj_weight, b.attention.in_proj.weight),
             (a.attention.in_proj_bias, b.attention.in_proj.bias), (a.attention.out_proj.weight,
                                                                     b.attention.out_proj.weight),
             (a.head.weight, b.head.weight)]
    moved = (a.attention.in_proj_weight - start).abs().max()
    assert moved > 1e-3
    # K-FROG's eps under 1/sqrt(y) amplifies the two computations' float64 rounding to a few 1e-7 relative in 4 steps
    # (which entries depends on the BLAS threads); every other optimizer agrees to 1e-7
    rtol, atol = (1e-6, 1e-8) if name == "kfrog" else (1e-7, 1e-9)
    for p, q in pairs:
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_cross_attention_trains_with_the_input_projection_plain(name, caplog):
    """A decoder-style cross-attention call: no error; K-FAC/FOP give its input projection the plain update with a
    warning once; the out projection stays preconditioned; the loss falls."""

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.q, self.kv = nn.Linear(4, 8), nn.Linear(4, 8)
            self.attention = _mha(batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            kv = self.kv(x)
            h, _ = self.attention(self.q(x[:, :2]), kv, kv)
            return self.head(h.mean(dim=1))

    net = Cross()
    opt = OPTIMIZERS[name](net, lr=0.05)
    x = torch.randn(64, 5, 4)
    y = (x[:, :, 0].sum(1) > 0).long() + (x[:, :, 1].sum(1) > 0).long()  # a learnable target
    with caplog.at_level("WARNING", logger="fop"):
        losses = step_losses(opt, lambda: F.cross_entropy(net(x), y), 20)
    assert losses[-1] < 0.8 * losses[0]
    if name in ("kfac", "fop"):
        assert caplog.text.count("layer attention.in_proj takes the plain update on this step: cross-attention") == 1
        assert opt.capture.records[2] == []  # released; the out projection had its record (it is preconditioned)


def test_transformer_encoder_is_covered_but_its_norms():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), num_layers=2,
                                enable_nested_tensor=False)
    layers, skipped = discover_layers(enc)
    kinds = [layer.kind for layer in layers]
    assert kinds.count("attention_in_proj") == 2 and kinds.count("attention_out_proj") == 2
    assert {name for name, _ in skipped} == {f"layers.{i}.norm{j}" for i in range(2) for j in (1, 2)}


def test_separate_projection_weights_are_three_layers():
    """kdim or vdim != embed_dim: q_proj_weight, k_proj_weight, v_proj_weight and out_proj, each a Linear on its own
    input; the shared in_proj_bias belongs to none of them and takes the plain update."""
    mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=5)
    opt = fop.KFAC(nn.Sequential(mha), lr=0.1)
    assert [(layer.name, layer.kind, layer.shape) for layer in opt.layers] == [
        ("0.q_proj", "attention_q_proj", (8, 8)), ("0.k_proj", "attention_k_proj", (8, 6)),
        ("0.v_proj", "attention_v_proj", (8, 5)), ("0.out_proj", "attention_out_proj", (8, 9))]
    assert opt.skipped == []
    table = opt.coverage()["MultiheadAttention"]
    assert table["total"] - table["preconditioned"] == mha.in_proj_bias.numel()


@pytest.mark.parametrize("batch_first", [True, False])
def test_separate_weights_explicit_form_equals_torch(batch_first):
    """Separate q/k/v weights on three different inputs (query length 4, key and value length 6): outputs and every
    gradient equal torch's own forward; each projection is shown batch-first with its own input, and its weight
    gradient is sum dy a^T over what the consumer saw."""
    mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=5, batch_first=batch_first)
    with torch.no_grad():
        mha.in_proj_bias.normal_()
    N = 3
    shapes = {"q": (4, 8), "k": (6, 6), "v": (6, 5)}
    inputs = {k: torch.randn(N, L, E) if batch_first else torch.randn(L, N, E) for k, (L, E) in shapes.items()}
    mask = torch.zeros(N, 6, dtype=torch.bool)
    mask[0, -2:] = True
    rec, results = _Recorder(("q", "k", "v", "out")), []
    for observed in (False, True):
        handle = observe_attention(mha, rec.hooks(), active=lambda: True) if observed else None
        xs = {k: x.clone().requires_grad_() for k, x in inputs.items()}
        out, _ = mha(xs["q"], xs["k"], xs["v"], key_padding_mask=mask)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append((out.detach(), {k: x.grad for k, x in xs.items()},
                        {n: p.grad.clone() for n, p in mha.named_parameters()}))
        mha.zero_grad()
        if handle is not None:
            handle.remove()
    (o0, gx0, gp0), (o1, gx1, gp1) = results
    torch.testing.assert_close(o1, o0, rtol=1e-5, atol=1e-6)
    for k in gx0:
        torch.testing.assert_close(gx1[k], gx0[k], rtol=1e-5, atol=1e-6)
    for name in gp0:
        torch.testing.assert_close(gp1[name], gp0[name], rtol=1e-5, atol=1e-6)
    for k in ("q", "k", "v"):
        (a, y), = rec.seen[k]
        (g,) = rec.grads[k]
        xb = inputs[k] if batch_first else inputs[k].transpose(0, 1)
        torch.testing.assert_close(a, xb)
        torch.testing.assert_close(y, F.linear(xb, getattr(mha, f"{k}_proj_weight"),
                                               mha.in_proj_bias.chunk(3)["qkv".index(k)]))
        torch.testing.assert_close(torch.einsum("nlo,nli->oi", g, a), gp0[f"{k}_proj_weight"], rtol=1e-4, atol=1e-5)


class _SeparateNet(nn.Module):
    """Query, key and value from three inputs of widths 8, 6 and 5 through nn.MultiheadAttention with separate
    weights (no biases), or the same attention written with four nn.Linear modules."""

    def __init__(self, mha: nn.MultiheadAttention, explicit: bool = False):
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.ModuleDict({k: nn.Linear(4, w) for k, w in (("q", 8), ("k", 6), ("v", 5))})
        self.head = nn.Linear(8, 3)
        self.explicit, self.heads = explicit, mha.num_heads
        if explicit:
            self.proj = nn.ModuleDict({k: nn.Linear(w.shape[1], w.shape[0], bias=False)
                                       for k, w in (("q", mha.q_proj_weight), ("k", mha.k_proj_weight),
                                                    ("v", mha.v_proj_weight), ("out", mha.out_proj.weight))})
            with torch.no_grad():
                for k in "qkv":
                    self.proj[k].weight.copy_(getattr(mha, f"{k}_proj_weight"))
                self.proj["out"].weight.copy_(mha.out_proj.weight)
        else:
            self.attention = mha

    def forward(self, x):
        q, k, v = (self.embed[key](x) for key in "qkv")
        if not self.explicit:
            h, _ = self.attention(q, k, v, need_weights=False)
            return self.head(h.mean(dim=1))
        n, length, e = q.shape
        q, k, v = (self.proj[key](t).reshape(n, length, self.heads, e // self.heads).transpose(1, 2)
                   for key, t in zip("qkv", (q, k, v)))
        z = F.scaled_dot_product_attention(q, k, v)
        return self.head(self.proj["out"](z.transpose(1, 2).reshape(n, length, e)).mean(dim=1))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_separate_weights_step_equals_the_step_on_explicit_linear_layers(name):
    """Every optimizer at its defaults: 4 steps on nn.MultiheadAttention with separate q/k/v weights equal the steps
    on the same attention as four nn.Linear."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=5, bias=False, batch_first=True).double()
    start = mha.k_proj_weight.detach().clone()
    nets = [_SeparateNet(mha).double(), _SeparateNet(mha, explicit=True).double()]
    extra = {"kfac": dict(factor_interval=1, inverse_interval=1), "fop": dict(factor_interval=1, inverse_interval=1),
             "kfrog": dict(kl_clip=None)}.get(name, {})
    opts = [OPTIMIZERS[name](net, lr=0.05, **extra) for net in nets]
    assert [layer.kind for layer in opts[0].layers if layer.name.startswith("attention")] == [
        f"attention_{k}_proj" for k in ("q", "k", "v", "out")]
    torch.manual_seed(4)
    batches = [(torch.randn(16, 5, 4, dtype=torch.float64), torch.randint(0, 3, (16,))) for _ in range(4)]
    for net, opt in zip(nets, opts):
        torch.manual_seed(5)
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    a, b = nets
    assert (a.attention.k_proj_weight - start).abs().max() > 1e-3
    rtol, atol = (1e-6, 1e-8) if name == "kfrog" else (1e-7, 1e-9)
    for k in "qkv":
        torch.testing.assert_close(getattr(a.attention, f"{k}_proj_weight"), b.proj[k].weight, rtol=rtol, atol=atol)
        torch.testing.assert_close(a.embed[k].weight, b.embed[k].weight, rtol=rtol, atol=atol)
    torch.testing.assert_close(a.attention.out_proj.weight, b.proj["out"].weight, rtol=rtol, atol=atol)
    torch.testing.assert_close(a.head.weight, b.head.weight, rtol=rtol, atol=atol)


def test_excluding_the_out_projection_keeps_the_input_projection():
    net = _AttentionNet(_mha(batch_first=True))
    opt = fop.KFAC(net, lr=0.1, exclude=["attention.out_proj"])
    assert [layer.name for layer in opt.layers] == ["embed", "attention.in_proj", "head"]
    assert ("attention.out_proj", "excluded") in opt.skipped


def test_hooks_go_with_the_optimizer():
    net = _AttentionNet(_mha(batch_first=True))
    opt = fop.FOP(net, lr=0.1)
    assert net.attention in _attention._interceptors
    del opt
    gc.collect()
    assert net.attention not in _attention._interceptors
    assert not net.attention._forward_pre_hooks and not net.attention._forward_hooks


def test_torch_compile_of_an_attention_model_gives_the_same_steps():
    """aot_eager (inductor would need a C++ compiler here): the steps equal the eager ones."""
    x, y = torch.randn(16, 5, 4), torch.randint(0, 3, (16,))
    params = []
    for compiled in (False, True):
        net = _AttentionNet(_mha(batch_first=True))
        opt = fop.FOP(net, lr=0.1)
        run = torch.compile(net, backend="aot_eager") if compiled else net
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(run(x), y).backward()
            opt.step()
        assert opt.steps == 3
        params.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_attention_study_script_runs(capsys):
    """bench/studies/attention.py: one probe cell and a one-round cost table, tiny, on the real code paths."""
    import argparse
    from pathlib import Path

    from helpers import load_script

    study = load_script(Path(__file__).resolve().parents[1] / "bench" / "studies" / "attention.py", "attention_study")
    assert study.attention_modules(_AttentionNet(_mha(batch_first=True))) == ["attention"]
    study.cost(argparse.Namespace(batch=4, width=16, rounds=1, warmup=0))
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| KFAC") or line.startswith("| FOP")]
    assert len(rows) == 6 and all(float(r.split("|")[2]) > 0 for r in rows), out
    losses = study.probe_run("KFAC", 0.1, 0, attention=False)
    assert len(losses) == 30


@pytest.mark.parametrize("name", ["kfac", "fop"])
def test_attention_steps_on_the_device(device, name):
    """The GPU check runs this on cuda (tests whose id names cuda): float32 there (TF32 as the user left it), the
    explicit form's output equals torch's and two steps equal those on the explicit-Linear attention."""
    mha = _mha(batch_first=True).to(device)
    x = torch.randn(8, 5, 8, device=device)
    rec = _Recorder()
    handle = observe_attention(mha, rec.hooks(), active=lambda: True)
    out, _ = mha(x, x, x)
    handle.remove()
    ref, _ = mha(x, x, x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    nets = [_AttentionNet(mha).to(device), _AttentionNet(_ExplicitAttention(mha)).to(device)]
    opts = [OPTIMIZERS[name](net, lr=0.05, factor_interval=1, inverse_interval=1) for net in nets]
    batch = (torch.randn(16, 5, 4, device=device), torch.randint(0, 3, (16,), device=device))
    for net, opt in zip(nets, opts):
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(net(batch[0]), batch[1]).backward()
            opt.step()
    torch.testing.assert_close(nets[0].attention.in_proj_weight, nets[1].attention.in_proj.weight, rtol=1e-3,
                               atol=1e-4)
    torch.testing.assert_close(nets[0].head.weight, nets[1].head.weight, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", ["kfac", "fop"])
def test_encoder_decoder_transformer_trains(name, caplog):
    """nn.Transformer (encoder self-attention, decoder causal self-attention and cross-attention): every attention
    is covered; the cross-attention input projections take the plain update (warned once each), the rest is
    preconditioned, and a copy task's loss falls."""
    torch.manual_seed(0)

    class Seq2Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(7, 16)
            self.core = nn.Transformer(16, 2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32,
                                       dropout=0.0, batch_first=True)
            self.head = nn.Linear(16, 7)

        def forward(self, src, tgt):
            mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
            return self.head(self.core(self.embed(src), self.embed(tgt), tgt_mask=mask, tgt_is_causal=True))

    net = Seq2Seq()
    opt = OPTIMIZERS[name](net, lr=0.1)
    kinds = [layer.kind for layer in opt.layers]
    assert kinds.count("attention_in_proj") == 3 and kinds.count("attention_out_proj") == 3
    src = torch.randint(1, 7, (32, 6))
    tgt_in, tgt_out = torch.cat([torch.zeros(32, 1, dtype=torch.long), src[:, :-1]], 1), src
    with caplog.at_level("WARNING", logger="fop"):
        losses = step_losses(opt, lambda: F.cross_entropy(net(src, tgt_in).flatten(0, 1), tgt_out.flatten()), 25)
    assert losses[-1] < 0.6 * losses[0], losses
    warned = [line for line in caplog.text.splitlines() if "cross-attention" in line]
    assert len(warned) == 1 and "core.decoder.layers.0.multihead_attn.in_proj" in warned[0]


class _SeqFirstNet(nn.Module):
    """A Linear embedding, a torch TransformerEncoder of one layer with a final LayerNorm (batch_first as given: False
    is torch's default, whose linear1/linear2 and norms see T x N x E tensors) and a head, on (N, T, 5) inputs."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Linear(5, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 1, norm=nn.LayerNorm(16), enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.emb(x)
        h = self.enc(h) if self.batch_first else self.enc(h.transpose(0, 1)).transpose(0, 1)
        return self.head(h.mean(1))


@pytest.mark.parametrize("opt_name,kwargs", [("KFAC", {}), ("FOP", {}), ("FROG", {}), ("KFROG", {}), ("AdaFisher", {}),
                                             ("KFAC", {"precondition_norms": True})])
def test_sequence_first_transformer_layers_give_the_batch_first_steps(opt_name, kwargs):
    """The same model with torch's TransformerEncoderLayer sequence-first (batch_first=False) and batch-first takes
    the same steps to float64 rounding: the layer's Linear and norm inputs and output gradients are captured with
    the batch dim first, so the samples are N (8), not T (6), and FOP's halves are halves of the batch. Before,
    K-FAC's steps differed by 1.4% and FOP's by 3.9% (relative norm after 4 steps)."""
    def run(batch_first):
        torch.manual_seed(0)
        model = _SeqFirstNet(batch_first).double()
        opt = getattr(fop, opt_name)(model, lr=0.05, **kwargs)
        for step in range(4):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(8, 6, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()]), model

    (a, model_bf), (b, model_sf) = run(True), run(False)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    dims = {layer.name: layer.batch_dim for layer in discover_layers(model_sf)[0]}
    assert dims["enc.layers.0.linear1"] == dims["enc.layers.0.linear2"] == 1 and dims["emb"] == dims["head"] == 0
    assert all(layer.batch_dim == 0 for layer in discover_layers(model_bf)[0])
