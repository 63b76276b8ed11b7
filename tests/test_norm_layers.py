"""LayerNorm and RMSNorm under K-FAC/FOP (PerSampleNormType): per-feature Kronecker blocks, checked against the same
affine map written as a depthwise 1 x 1 Conv1d on the normalized input (a grouped conv: one block per feature)."""

import fop
import pytest
import torch
import torch.nn.functional as F
from fop._capture import Capture
from fop._layers import discover_layers, kfac_support
from helpers import step_losses
from torch import nn

DT = torch.float64
NORMS = {
    "layernorm": lambda: nn.LayerNorm(6),
    "layernorm, no bias": lambda: nn.LayerNorm(6, bias=False),
    "rmsnorm": lambda: nn.RMSNorm(6),
}


class _Normalize(nn.Module):
    """The norm without its affine map."""

    def __init__(self, norm):
        super().__init__()
        self.rms, self.shape, self.eps = isinstance(norm, nn.RMSNorm), norm.normalized_shape, norm.eps

    def forward(self, x):
        if self.rms:
            return F.rms_norm(x, self.shape, eps=self.eps)
        return F.layer_norm(x, self.shape, eps=self.eps)


class _Affine(nn.Module):
    """w * xhat + b per feature as a depthwise 1 x 1 Conv1d over the tokens (N x T x C in, N x T x C out)."""

    def __init__(self, norm):
        super().__init__()
        c = norm.weight.numel()
        self.conv = nn.Conv1d(c, c, 1, groups=c, bias=getattr(norm, "bias", None) is not None)
        with torch.no_grad():
            self.conv.weight.copy_(norm.weight.reshape(c, 1, 1))
            if self.conv.bias is not None:
                self.conv.bias.copy_(norm.bias)

    def forward(self, x):
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


def _nets(name):
    torch.manual_seed(0)
    norm = NORMS[name]().to(DT)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_()
    head = [nn.Linear(4, 6), None, nn.Tanh(), nn.Linear(6, 3)]
    a = nn.Sequential(*[m if m is not None else norm for m in head]).to(DT)
    b = nn.Sequential(head[0].__class__(4, 6), _Normalize(norm), _Affine(norm), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    b[0].load_state_dict(a[0].state_dict())
    b[4].load_state_dict(a[3].state_dict())
    return a, b


@pytest.mark.parametrize("name", list(NORMS))
def test_factors_are_the_per_feature_blocks(name):
    """A_c = mean over rows of [xhat_c, 1]^T [xhat_c, 1] and G_c = sum g_c^2 / N, against a hand computation."""
    a, _ = _nets(name)
    layers, _ = discover_layers(a, support=kfac_support)  # what KFAC(precondition_norms=True) discovers
    assert [layer.kind for layer in layers] == ["linear", "layernorm" if "layer" in name else "rmsnorm", "linear"]
    cap = Capture(layers)
    cap.arm(full=True)
    x, y = torch.randn(5, 7, 4, dtype=DT), torch.randint(0, 3, (5,))
    F.cross_entropy(a(x).mean(1), y).backward()
    layer = layers[1]
    A = torch.full(layer.type.input_factor_shape(layer), float("nan"), dtype=DT)
    G = torch.full(layer.type.output_factor_shape(layer), float("nan"), dtype=DT)
    assert cap.update_input_factor(1, A, 1.0) and cap.update_output_factor(1, G, 1.0)
    h = a[0](x).detach()
    xhat = _Normalize(a[1])(h).reshape(-1, 6)
    rows = torch.stack([xhat, torch.ones_like(xhat)], -1) if getattr(a[1], "bias", None) is not None \
        else xhat.unsqueeze(-1)
    torch.testing.assert_close(A, torch.einsum("rci,rcj->cij", rows, rows) / rows.shape[0])
    dy = cap.records[1][0].dy.reshape(-1, 6)
    torch.testing.assert_close(G, (5 * dy).square().sum(0).view(6, 1, 1) / 5)


@pytest.mark.parametrize("name", list(NORMS))
@pytest.mark.parametrize("optimizer", ["KFAC", "FOP"])
@pytest.mark.parametrize("inverse_method", ["auto", "eigh"])
def test_steps_equal_the_depthwise_conv_form(name, optimizer, inverse_method):
    """At defaults (factors and inverses every step, float64 factors), 4 steps: the norm's parameters move as the
    depthwise 1 x 1 conv's, and so does every other layer. (The two models' own float64 gradients differ by about 1e-8
    relative, torch's LayerNorm backward against its conv's: hence rtol 1e-6.)"""
    nets = _nets(name)
    opts = [getattr(fop, optimizer)(net, lr=0.1, factor_interval=1, inverse_interval=1, precondition_norms=True,
                                    inverse_method=inverse_method, factor_dtype=DT) for net in nets]
    assert opts[0].coverage()["total"]["share"] == 1.0
    torch.manual_seed(1)
    batches = [(torch.randn(8, 5, 4, dtype=DT), torch.randint(0, 3, (8,))) for _ in range(4)]
    start = nets[0][1].weight.detach().clone()
    for net, opt in zip(nets, opts):
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(net(x).mean(1), y).backward()
            opt.step()
    a, b = nets
    assert (a[1].weight - start).abs().max() > 1e-3
    torch.testing.assert_close(a[1].weight, b[2].conv.weight.reshape(-1), rtol=1e-6, atol=1e-8)
    if getattr(a[1], "bias", None) is not None:
        torch.testing.assert_close(a[1].bias, b[2].conv.bias, rtol=1e-6, atol=1e-8)
    for p, q in ((a[0].weight, b[0].weight), (a[3].weight, b[4].weight)):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)


def test_norms_are_opt_in():
    """precondition_norms=False (default): the LayerNorm takes the unpreconditioned step, with the reason; a bad value
    is refused."""
    a, _ = _nets("layernorm")
    opt = fop.KFAC(a, lr=0.1)
    assert [layer.kind for layer in opt.layers] == ["linear", "linear"]
    assert dict(opt.not_preconditioned())["1"].startswith("norm layer: takes the unpreconditioned step")
    with pytest.raises(ValueError, match="precondition_norms must be True or False"):
        fop.FOP(a, lr=0.1, precondition_norms="yes")


def test_batchnorm_stays_on_the_graft_under_kfac_with_the_reason():
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    opt = fop.KFAC(m, lr=0.1, precondition_norms=True)
    assert dict(opt.not_preconditioned())["1"].startswith("batch statistics")
    assert [layer.kind for layer in fop.AdaFisher(m).layers] == ["conv2d", "batchnorm2d"]


def test_channels_first_layernorm_and_two_dim_shapes():
    """timm's channels-first LayerNorm2d (by class name) and a LayerNorm over (2, 3): steps run, loss falls."""

    class LayerNorm2d(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    for net, x in ((nn.Sequential(nn.Conv2d(1, 4, 3), LayerNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 3)),
                    torch.randn(16, 1, 8, 8)),
                   (nn.Sequential(nn.Unflatten(1, (2, 3)), nn.LayerNorm((2, 3)), nn.Flatten(), nn.Linear(6, 3)),
                    torch.randn(16, 6))):
        torch.manual_seed(0)
        opt = fop.FOP(net, lr=0.1, precondition_norms=True)
        assert opt.coverage()["total"]["share"] == 1.0
        y = torch.randint(0, 3, (16,))
        losses = step_losses(opt, lambda net=net, x=x, y=y: F.cross_entropy(net(x), y), 10)
        assert losses[-1] < losses[0]
