"""Which layers of a model a Kronecker-factored optimizer preconditions, and how their gradients are laid out.

A supported layer has a weight W (out x in) and an optional bias b. Its gradient is handled as one matrix
`[W | b]` of shape out x (in + 1) (conv weights flattened to out x (C_in kh kw)): the bias is an extra input
column of ones, as in docs/design.md. Supported: `nn.Linear`, and `nn.Conv2d` with groups=1 and zero padding (any
stride, padding and dilation). Everything else (norm layers, embeddings, grouped or depthwise convs, circular
padding) is not preconditioned: its parameters get the optimizer's outer update on the plain gradient.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that holds the layers: `model.module` for DistributedDataParallel / DataParallel wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def unsupported_reason(module: nn.Module) -> str | None:
    """None when `module` can be preconditioned, else why not (for the log of what is left out)."""
    if type(module) is nn.Linear:
        return None
    if type(module) is nn.Conv2d:
        if module.groups != 1:
            return f"grouped conv (groups={module.groups})"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        if isinstance(module.padding, str):
            if module.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size)):
                return "padding='same' with an even kernel extent (asymmetric padding)"
            return None if module.padding in ("valid", "same") else f"padding={module.padding!r}"
        return None
    return "layer type not supported"


@dataclass
class Layer:
    """One preconditioned layer: its module, parameters and the shape of its gradient matrix [W | b]."""

    name: str
    module: nn.Module
    weight: nn.Parameter
    bias: nn.Parameter | None
    kind: str  # "linear" or "conv2d"
    conv: dict = field(default_factory=dict)  # kernel_size, stride, padding, dilation for conv2d

    @property
    def out_dim(self) -> int:
        return self.weight.shape[0]

    @property
    def in_dim(self) -> int:
        """Columns of the gradient matrix: C_in kh kw (conv) or in_features (linear), plus 1 with a bias."""
        return self.weight[0].numel() + (self.bias is not None)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_dim, self.in_dim)

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def grad_matrix(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[W.grad | b.grad] as an out x in matrix (a new tensor when there is a bias)."""
        return self.matrix([p.grad for p in self.params], dtype)

    def matrix(self, tensors: list[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
        """[w | b] as an out x in matrix from tensors shaped like [weight] or [weight, bias] (grad_matrix's layout)."""
        gw = tensors[0].reshape(self.out_dim, -1)
        if self.bias is not None:
            gw = torch.cat([gw, tensors[1].reshape(-1, 1)], dim=1)
        return gw if dtype is None else gw.to(dtype)

    def split(self, matrix: torch.Tensor) -> list[torch.Tensor]:
        """The inverse of grad_matrix: views shaped like [weight] or [weight, bias]."""
        w = matrix[:, : self.weight[0].numel()].reshape(self.weight.shape)
        if self.bias is None:
            return [w]
        return [w, matrix[:, -1]]

    def describe(self) -> str:
        kind = type(self.module).__name__
        extra = ""
        if self.kind == "conv2d":
            c = self.conv
            extra = f" k={c['kernel_size']} s={c['stride']} p={c['padding']} d={c['dilation']}"
            extra += f" groups={c['groups']}" if c["groups"] != 1 else ""
        bias = "+bias" if self.bias is not None else ""
        return (f"{self.name}: {kind}{extra} weight{tuple(self.weight.shape)}{bias}"
                f" -> G {self.out_dim}x{self.out_dim}, A {self.in_dim}x{self.in_dim}")


def _conv_geometry(m: nn.Conv2d) -> dict:
    padding = m.padding
    if isinstance(padding, str):  # "valid" or "same" (stride 1): resolve to explicit numbers per side
        if padding == "valid":
            padding = (0, 0)
        else:
            total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
            if any(t % 2 for t in total):
                raise ValueError(f"padding='same' with an even total padding {total} is asymmetric; not supported")
            padding = tuple(t // 2 for t in total)
    return {"kernel_size": tuple(m.kernel_size), "stride": tuple(m.stride), "padding": tuple(padding),
            "dilation": tuple(m.dilation), "groups": m.groups}


def _resolve_exclude(model: nn.Module, exclude) -> set[int]:
    """ids of the modules to leave out: those named or given in `exclude`, and every module under them."""
    if exclude is None:
        return set()
    if isinstance(exclude, (str, nn.Module)):
        exclude = [exclude]
    named = dict(model.named_modules())
    roots = []
    for item in exclude:
        if isinstance(item, nn.Module):
            if not any(item is m for m in named.values()):
                raise ValueError(f"exclude: module {type(item).__name__} is not part of the model")
            roots.append(item)
        elif isinstance(item, str):
            if item not in named:
                raise ValueError(f"exclude: no module named {item!r} in the model")
            roots.append(named[item])
        else:
            raise TypeError(f"exclude entries must be modules or module names, got {type(item).__name__}")
    return {id(m) for root in roots for m in root.modules()}


# Layer.kind of each module type a support predicate may accept (AdaFisher also takes the norm layers).
LAYER_KINDS = {nn.Linear: "linear", nn.Conv2d: "conv2d", nn.BatchNorm2d: "batchnorm2d", nn.LayerNorm: "layernorm"}


def discover_layers(model: nn.Module, params: Iterable[nn.Parameter] | None = None, exclude=None,
                    support: Callable[[nn.Module], str | None] = unsupported_reason
                    ) -> tuple[list[Layer], list[tuple[str, str]]]:
    """The supported layers of `model` (unwrapped) whose weight requires grad and is optimized.

    `params`: the optimizer's parameters; a layer whose weight is not among them is skipped. Returns the layers
    (in module order) and a list of (name, reason) for the modules with parameters that are not preconditioned.
    `support(module)`: None when the optimizer supports the module, else why not (default: K-FAC's
    `unsupported_reason`); the module's type must be in LAYER_KINDS.
    A weight shared by two modules is preconditioned by neither (its gradient mixes two layers' statistics)."""
    model = unwrap_model(model)
    excluded = _resolve_exclude(model, exclude)
    optimized = None if params is None else {id(p) for p in params}
    layers, skipped = [], []
    for name, m in model.named_modules():
        direct = list(m.parameters(recurse=False))
        if not direct:
            continue
        if id(m) in excluded:
            skipped.append((name, "excluded"))
            continue
        reason = support(m)
        if reason is None and not m.weight.requires_grad:
            reason = "weight does not require grad"
        if reason is None and optimized is not None and id(m.weight) not in optimized:
            reason = "weight is not among the optimizer's parameters"
        if reason is None and m.bias is not None and optimized is not None and id(m.bias) not in optimized:
            reason = "bias is not among the optimizer's parameters"
        if reason is None and m.bias is not None and not m.bias.requires_grad:
            reason = "bias does not require grad"
        if reason is not None:
            skipped.append((name, reason))
            continue
        conv = _conv_geometry(m) if isinstance(m, nn.Conv2d) else {}
        layers.append(Layer(name or type(m).__name__, m, m.weight, m.bias, LAYER_KINDS[type(m)], conv))
    uses = Counter(id(p) for layer in layers for p in layer.params)
    kept = []
    for layer in layers:
        if any(uses[id(p)] > 1 for p in layer.params):
            skipped.append((layer.name, "parameter shared with another layer"))
        else:
            kept.append(layer)
    layers = kept
    return layers, skipped


def parameter_map(layers: list[Layer]) -> dict[int, tuple[int, str]]:
    """id(parameter) -> (layer index, "weight" | "bias"): explicit, never by position in a param group."""
    out = {}
    for i, layer in enumerate(layers):
        out[id(layer.weight)] = (i, "weight")
        if layer.bias is not None:
            out[id(layer.bias)] = (i, "bias")
    return out
