"""Which layers of a model the curvature optimizers precondition: the layer types, registered in one place.

A layer type (a `LayerType` subclass, one instance in the registry) says how to recognise a module (by capability:
`isinstance`, so a subclass of nn.LayerNorm is a LayerNorm), which optimizer families have a form for it, how its
gradient is laid out as one matrix `[W | b]` (out x in; conv weights flattened to out x (C_in/groups kh kw); a bias
is an extra input column of ones, as in docs/design.md), and what its hooks read: the input rows of the factor A,
the output-gradient rows of G, the sub-batch gradient sum dy a^T (FOP's half batch), the diagonals AdaFisher uses,
and the rank below which an input has no batch dimension. Adding a type is one subclass and `register_layer_type`
(docs/layers.md has a worked example and the factor formulas of every built-in type).

Built in: nn.Linear (any leading dims), transformers' `Conv1D` (a Linear with an in x out weight, matched by class
name), nn.Conv2d and nn.Conv1d (any groups; under K-FAC/FOP a grouped or depthwise conv is one Kronecker block per
group, A_j kron G_j, its factors stacked (groups, a, a) and (groups, out/groups, out/groups): `blocks`,
`input_factor_shape`, `output_factor_shape`), nn.Embedding/EmbeddingBag, nn.MultiheadAttention (packed weights: two
Linear layers, its input and out projections; separate q/k/v weights: four; fop._attention shows their calls to the
hooks), nn.LayerNorm
(subclasses included; timm's channels-first `LayerNorm2d` by class name) and nn.RMSNorm (under K-FAC/FOP with
precondition_norms=True: one Kronecker block per feature, as a depthwise 1 x 1 conv on the normalized input), and
for AdaFisher also
nn.BatchNorm2d and nn.LayerNorm's EFIM blocks. Everything else (circular padding, norms under K-FAC/FOP by
default, recurrent layers) is not preconditioned: its parameters get the optimizer's outer
update on the plain gradient, and `CurvatureOptimizer.coverage()` says how much that is.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F_nn
from torch import nn

import fop_kernels

logger = logging.getLogger("fop")

FAMILIES = ("kfac", "frog", "adafisher")  # the optimizer families: KFAC/FOP, FROG/K-FROG, AdaFisher
TOKEN_MODES = ("expand", "reduce")  # a Linear over leading (token) dims: K-FAC-expand or K-FAC-reduce
NOT_SUPPORTED = "layer type not supported"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that holds the layers: `model.module` for DistributedDataParallel / DataParallel wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


# -- row helpers ---------------------------------------------------------------------------------------------------
def _rows(t: torch.Tensor, bias: bool) -> torch.Tensor:
    """A rows x features matrix (N, ..., d) -> (N*..., d), with a column of ones for a bias."""
    X = t.reshape(-1, t.shape[-1])
    if bias:
        X = torch.cat([X, X.new_ones(X.shape[0], 1)], dim=1)
    return X


def _stacked_rows(ts: list[torch.Tensor], bias: bool) -> torch.Tensor:
    """The rows of every record (see _rows) stacked into one matrix with a column of ones for a bias, with one copy
    of the data (no per-record copy followed by a concatenating one)."""
    d = ts[0].shape[-1]
    counts = [t.numel() // d for t in ts]
    X = ts[0].new_empty(sum(counts), d + int(bias))
    start = 0
    for t, n in zip(ts, counts):
        dst = X[start:start + n, :d]
        (dst.unflatten(0, t.shape[:-1]) if t.dim() > 1 else dst.view(d)).copy_(t)
        start += n
    if bias:
        X[:, d] = 1.0
    return X


def conv_output_size(H: int, W: int, kernel_size, stride, padding, dilation) -> tuple[int, int]:
    """(oh, ow) of a 2-D convolution of an H x W input (torch's formula, explicit padding per side)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    return (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def _patches(x: torch.Tensor, c: dict, bias: bool) -> torch.Tensor:
    """im2col rows of x ((N*L) x (C kh kw [+1])), for records whose spatial sizes differ (no single conv call)."""
    cols = F_nn.unfold(x, c["kernel_size"], dilation=c["dilation"], padding=c["padding"], stride=c["stride"])
    return _rows(cols.transpose(1, 2), bias)


# -- layer types ---------------------------------------------------------------------------------------------------
class LayerType:
    """A kind of layer: how to recognise it and lay out and read its statistics (see the module docstring).

    Subclasses set `name` (the `Layer.kind`), `modules` (matched by isinstance, or override `matches`), `forms`
    (the optimizer families that precondition it) and `unbatched_dim`, and implement the methods their families
    use. The defaults are those of a layer y = W a (+ b) with W out x in and a row-per-sample input."""

    name = "layer"
    modules: tuple[type, ...] = ()
    forms: frozenset[str] = frozenset(FAMILIES)
    unbatched_dim = 1  # an input with fewer dims has no batch dimension

    def __init__(self, modules: tuple[type, ...] | None = None):
        if modules is not None:
            self.modules = tuple(modules)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(m.__name__ for m in self.modules)})"

    # -- matching --------------------------------------------------------------------------------------------------
    def matches(self, module: nn.Module) -> bool:
        return bool(self.modules) and isinstance(module, self.modules)

    def reason(self, module: nn.Module, family: str) -> str | None:
        """None when `family` (one of FAMILIES) preconditions `module`, else why not."""
        return None if family in self.forms else NOT_SUPPORTED

    def geometry(self, module: nn.Module) -> dict:
        """Extra layout the statistics need (conv: kernel_size, stride, padding, dilation, groups)."""
        return {}

    def describe(self, layer: Layer) -> str:
        """Geometry for `Layer.describe` (empty when there is none)."""
        return ""

    def layers_of(self, name: str, module: nn.Module) -> list[Layer]:
        """The preconditioned layers a matching module makes: one, from its `weight` and `bias`."""
        return [Layer(name, module, module.weight, getattr(module, "bias", None), self, self.geometry(module))]

    def claimed(self, module: nn.Module) -> list[nn.Module]:
        """Submodules whose parameters `layers_of` already covers (not matched on their own)."""
        return []

    # -- gradient-matrix layout ---------------------------------------------------------------------------------------
    def out_dim(self, layer: Layer) -> int:
        return layer.weight.shape[0]

    def weight_columns(self, layer: Layer) -> int:
        """Columns of the weight part of the gradient matrix (the bias adds one)."""
        return layer.weight[0].numel()

    def weight_matrix(self, layer: Layer, w: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like the weight as its out x columns matrix."""
        return w.reshape(layer.out_dim, -1)

    def weight_from_matrix(self, layer: Layer, m: torch.Tensor) -> torch.Tensor:
        """The inverse of weight_matrix: an out x columns matrix shaped like the weight (a view)."""
        return m.reshape(layer.weight.shape)

    # -- what the hooks read (K-FAC/FOP) ----------------------------------------------------------------------------
    def read_input(self, layer: Layer, inputs: tuple, kwargs: dict) -> torch.Tensor | None:
        """The input tensor of a call, positional or as `input=` (nn.Linear's and nn.Conv2d's name), or None."""
        x = inputs[0] if inputs else kwargs.get("input")
        return x if isinstance(x, torch.Tensor) else None

    def blocks(self, layer: Layer) -> int:
        """Independent diagonal blocks of the layer's K-FAC Fisher (a grouped conv: its groups), each with its own
        Kronecker factors; the gradient matrix's rows split evenly over them (out / blocks rows each)."""
        return 1

    def input_factor_shape(self, layer: Layer) -> tuple[int, ...]:
        """The shape of the stored factor A: in x in (a diagonal type: (in,), the diagonal alone; blocks > 1:
        (blocks, in, in), one factor per block)."""
        return (layer.in_dim, layer.in_dim)

    def output_factor_shape(self, layer: Layer) -> tuple[int, ...]:
        """The shape of the stored factor G: out x out (blocks > 1: (blocks, out / blocks, out / blocks))."""
        return (layer.out_dim, layer.out_dim)

    def input(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        """The layer input in the form the statistics read (conv1d: as a 2-D conv's N x C x 1 x L)."""
        return x

    def output_grad(self, layer: Layer, g: torch.Tensor) -> torch.Tensor:
        """The output gradient in the form the statistics read (the same transformation as `input`)."""
        return g

    def output_rows(self, layer: Layer, dy: torch.Tensor, tokens: str = "expand") -> torch.Tensor:
        """Rows of G: an (..., out) tensor, every leading index a row."""
        return dy

    def update_output_factor(self, layer: Layer, G: torch.Tensor, rows: list[torch.Tensor], decay: float,
                             scale: float = 1.0) -> None:
        """G <- (1-decay) G + decay scale sum_rows g g^T over the records' `output_rows`."""
        fop_kernels.accumulate_factor(G, rows, decay, scale=scale, check_finite=False)

    def update_input_factor(self, layer: Layer, A: torch.Tensor, xs: list[torch.Tensor], decay: float,
                            tokens: str = "expand") -> None:
        """A <- (1-decay) A + decay sum_rows a a^T / rows over the inputs `xs` of the step's records."""
        X = self.factor_input_rows(layer, xs, tokens)
        fop_kernels.accumulate_factor(A, X, decay, scale=1.0 / X.shape[0], check_finite=False)

    def factor_input_rows(self, layer: Layer, xs: list[torch.Tensor], tokens: str = "expand") -> torch.Tensor:
        """The rows X of the input-factor update from the records' inputs `xs` (a column of ones for a bias), so
        that update_input_factor is A <- (1-decay) A + decay X^T X / rows (the sample-space inverses keep them)."""
        return _stacked_rows(xs, layer.bias is not None)

    def sub_batch_grad(self, layer: Layer, a: torch.Tensor, dy: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """sum over the samples of dy a^T as an out x in matrix [dW | db] in `dtype` (a, dy as `input` and
        `output_grad` return them). The bias column is dy's row sum: no ones column copied onto the inputs."""
        Y = _rows(dy.to(dtype), False)
        gw = Y.T @ _rows(a.to(dtype), False)
        return gw if layer.bias is None else torch.cat([gw, Y.sum(0).unsqueeze(1)], dim=1)

    def live_input_columns(self, layer: Layer, shape: torch.Size, device) -> torch.Tensor | None:
        """The columns of A that inputs of `shape` can make nonzero, where fewer than all (Conv2dType: the taps that
        read only padding are zero); None: any column."""
        return None

    # -- AdaFisher's diagonals (Kronecker layers: H = diag A, S = mean of s^2 over rows) ----------------------------
    def input_diagonal(self, layer: Layer, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        X = h.reshape(-1, h.shape[-1])
        bias = layer.bias is not None
        out = torch.ones(X.shape[1] + bias, dtype=dtype, device=h.device)  # the bias entry: mean of 1^2
        fop_kernels.accumulate_factor_diag(out[: X.shape[1]], X, 1.0, scale=1.0 / X.shape[0], check_finite=False)
        return out

    def output_diagonal(self, layer: Layer, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        Y = s.reshape(-1, s.shape[-1])
        out = torch.empty(Y.shape[1], dtype=dtype, device=s.device)
        return fop_kernels.accumulate_factor_diag(out, Y, 1.0, scale=1.0 / Y.shape[0], check_finite=False)

    def diagonal_sizes(self, layer: Layer) -> tuple[int, int]:
        """The lengths of H and S."""
        return self.weight_columns(layer) + (layer.bias is not None), self.out_dim(layer)

    def diagonal_fisher(self, layer: Layer, which: str, H: torch.Tensor, S: torch.Tensor, damping: float,
                        dtype: torch.dtype) -> torch.Tensor:
        """F~ = S_j H_i + damping shaped like the parameter `which` ("weight" or "bias")."""
        if which == "bias":
            return (S * H[-1] + damping).to(dtype)
        F = torch.outer(S, H[: self.weight_columns(layer)]).add_(damping)  # 3x faster on CPU than torch.addr
        return self.weight_from_matrix(layer, F.to(dtype))


class LinearType(LayerType):
    """y = a W^T + b over any leading dims (W out x in). Leading dims beyond the batch are tokens: "expand" makes
    every token a row of A and G (A = sum a a^T / (N T), G = sum g g^T / N); "reduce" first averages a and sums g
    over the tokens of each sample (A = sum_n a_n a_n^T / N, G = sum_n g_n g_n^T / N), Eschenhagen et al. 2023."""

    name = "linear"
    modules = (nn.Linear,)
    unbatched_dim = 2

    @staticmethod
    def _per_sample(t: torch.Tensor, how: str) -> torch.Tensor:
        """(N, T..., d) -> (N, d) by the mean or sum over the token dims; 2-D tensors as they are."""
        if t.dim() <= 2:
            return t
        dims = tuple(range(1, t.dim() - 1))
        return t.mean(dim=dims) if how == "mean" else t.sum(dim=dims)

    def output_rows(self, layer, dy, tokens="expand"):
        return self._per_sample(dy, "sum") if tokens == "reduce" else dy

    def factor_input_rows(self, layer, xs, tokens="expand"):
        if tokens == "reduce":
            xs = [self._per_sample(x, "mean") for x in xs]
        return super().factor_input_rows(layer, xs, tokens)


class TransposedLayout:
    """A weight stored in x out (transformers' Conv1D, an embedding's vocab x dim): the gradient matrix is its
    transpose, out x in."""

    def out_dim(self, layer):
        return layer.weight.shape[1]

    def weight_columns(self, layer):
        return layer.weight.shape[0]

    def weight_matrix(self, layer, w):
        return w.mT

    def weight_from_matrix(self, layer, m):
        return m.mT


class TransposedLinearType(TransposedLayout, LinearType):
    """transformers' `Conv1D` (GPT-2): y = a W + b with W in x out (`nf` outputs); a Linear with the weight
    transposed, matched by class name and attributes (no transformers import). Every optimizer works on its out x in
    gradient matrix (`weight_matrix`), FROG's rows included."""

    name = "conv1d_transposed"

    def matches(self, module):
        w = getattr(module, "weight", None)
        return (type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(w, torch.Tensor)
                and w.dim() == 2 and w.shape[1] == module.nf)



def _same_padding(module) -> tuple[int, ...] | None:
    """Symmetric per-side padding of padding='same' (stride 1), or None when a side would need uneven padding."""
    total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
    return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)


def _grouped_patches(x: torch.Tensor, c: dict, bias: bool, dtype: torch.dtype) -> torch.Tensor:
    """im2col rows of x per group, (groups, N*L, C/groups kh kw [+1]): group j's rows hold the patches of its input
    channels alone (the columns of its block of the weight), with a column of ones for a bias."""
    g = c["groups"]
    cols = F_nn.unfold(x.to(dtype), c["kernel_size"], dilation=c["dilation"], padding=c["padding"],
                       stride=c["stride"])  # N x (C kh kw) x L, channel-major: group j's columns are contiguous
    n, width, L = cols.shape
    d = width // g
    P = cols.new_empty(g, n * L, d + int(bias))
    P[..., :d].view(g, n, L, d).copy_(cols.view(n, g, d, L).permute(1, 0, 3, 2))
    if bias:
        P[..., d] = 1.0
    return P


_GROUPED_CHUNK = 2**22  # im2col entries per chunk of samples of the grouped input factor (16 MiB in float32)


def _ema_(state: torch.Tensor, update: torch.Tensor, decay: float) -> None:
    """state <- (1-decay) state + decay update; state is not read when decay == 1."""
    if decay == 1.0:
        state.copy_(update)
    else:
        state.mul_(1.0 - decay).add_(update.to(state.dtype), alpha=decay)


def _accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class Conv2dType(LayerType):
    """nn.Conv2d: A from im2col patches (divided by the positions), G from the output gradients at every position
    (Grosse and Martens 2016, KFC). K-FAC/FOP: zero padding, any groups; AdaFisher and FROG: any groups.

    A grouped conv (groups g, depthwise included) is g convs side by side; K-FAC treats each group as a layer of its
    own, so its Fisher approximation is block-diagonal over the groups, block j = A_j kron G_j with
    A_j = sum_{n,l} p_j p_j^T / (N L) over the patches p_j of group j's input channels and G_j = sum_{n,l} g_j g_j^T / N
    over group j's output channels; stored stacked, (g, a, a) and (g, out/g, out/g), and the gradient matrix out x a
    splits into g blocks of out/g rows."""

    name = "conv2d"
    modules = (nn.Conv2d,)
    unbatched_dim = 4

    def reason(self, module, family):
        if family not in self.forms:
            return NOT_SUPPORTED
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        if family != "kfac":
            return None
        if isinstance(module.padding, str):
            if module.padding == "same" and _same_padding(module) is None:
                return "padding='same' with an even kernel extent (asymmetric padding)"
            return None if module.padding in ("valid", "same") else f"padding={module.padding!r}"
        return None

    def _padding(self, m) -> tuple[int, ...]:
        padding = m.padding
        if isinstance(padding, str):  # "valid" or "same" (stride 1): resolve to explicit numbers per side
            if padding == "valid":
                return (0,) * len(m.kernel_size)
            padding = _same_padding(m)
            if padding is None:
                total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
                raise ValueError(f"padding='same' with an even total padding {total} is asymmetric; not supported")
        return tuple(padding)

    def geometry(self, m):
        return {"kernel_size": tuple(m.kernel_size), "stride": tuple(m.stride), "padding": self._padding(m),
                "dilation": tuple(m.dilation), "groups": m.groups}

    def describe(self, layer):
        c = layer.conv
        extra = f" k={c['kernel_size']} s={c['stride']} p={c['padding']} d={c['dilation']}"
        return extra + (f" groups={c['groups']}" if c["groups"] != 1 else "")

    def kernel_shape(self, layer) -> tuple[int, ...]:
        """The weight's shape as a 2-D conv kernel (out, in/groups, kh, kw)."""
        return tuple(layer.weight.shape)

    def blocks(self, layer):
        return layer.conv["groups"]

    def input_factor_shape(self, layer):
        g = self.blocks(layer)
        return (layer.in_dim,) * 2 if g == 1 else (g, layer.in_dim, layer.in_dim)

    def output_factor_shape(self, layer):
        g = self.blocks(layer)
        return (layer.out_dim,) * 2 if g == 1 else (g, layer.out_dim // g, layer.out_dim // g)

    def output_rows(self, layer, dy, tokens="expand"):
        return dy.movedim(1, -1)  # rows are (sample, position) pairs: a channels-last view, no copy

    def update_output_factor(self, layer, G, rows, decay, scale=1.0):
        g = self.blocks(layer)
        if g == 1:
            return super().update_output_factor(layer, G, rows, decay, scale)
        dtype = _accumulation_dtype(G, *rows)
        total = None
        for r in rows:  # (..., out) -> (g, rows, out/g): group j's output channels
            Y = r.reshape(-1, g, r.shape[-1] // g).to(dtype).transpose(0, 1)
            part = torch.bmm(Y.mT, Y)
            total = part if total is None else total.add_(part)
        _ema_(G, total.mul_(scale), decay)

    def update_input_factor(self, layer, A, xs, decay, tokens="expand"):
        bias = layer.bias is not None
        c = layer.conv
        if c["groups"] != 1:  # per group, in chunks of samples: sum_rows P_j^T P_j / rows
            dtype = _accumulation_dtype(A, *xs)
            total = torch.zeros(A.shape, dtype=dtype, device=A.device)
            rows = 0
            for x in xs:
                per_sample = x[0].numel() * c["kernel_size"][0] * c["kernel_size"][1]
                for chunk in x.split(max(1, _GROUPED_CHUNK // max(per_sample, 1))):
                    P = _grouped_patches(chunk, c, bias, dtype)
                    total.baddbmm_(P.mT, P)
                    rows += P.shape[1]
            _ema_(A, total.div_(rows), decay)
            return
        if all(x.shape[1:] == xs[0].shape[1:] for x in xs):
            x = xs[0] if len(xs) == 1 else torch.cat(xs)
            fop_kernels.accumulate_conv_factor(A, x, decay, c["kernel_size"], c["stride"], c["padding"],
                                               c["dilation"], bias=bias, scale=1.0 / x.shape[0],
                                               check_finite=False)  # the op divides by positions
            return
        X = self.factor_input_rows(layer, xs, tokens)
        fop_kernels.accumulate_factor(A, X, decay, scale=1.0 / X.shape[0], check_finite=False)

    def live_taps(self, layer, shape) -> list[int] | None:
        """The kernel taps (i kw + j, ascending) that read the image for some output position of an input of `shape`
        (a tap that reads only zero padding, as the off-centre taps of a 3x3 conv on a 1x1 map, multiplies exactly
        zero patch columns), or None when every tap does, or for a grouped conv. On the host, from the geometry."""
        c = layer.conv
        if c["groups"] != 1:
            return None
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = c["kernel_size"], c["stride"], c["padding"], c["dilation"]
        H, W = shape[-2], shape[-1]
        oh, ow = conv_output_size(H, W, c["kernel_size"], c["stride"], c["padding"], c["dilation"])

        def reads(tap: int, d: int, p: int, stride: int, out: int, size: int) -> bool:
            return any(0 <= o * stride - p + tap * d < size for o in range(out))

        taps = [i * kw + j for i in range(kh) if reads(i, dh, ph, sh, oh, H)
                for j in range(kw) if reads(j, dw, pw, sw, ow, W)]
        return None if len(taps) == kh * kw else taps

    def live_input_columns(self, layer, shape: torch.Size, device) -> torch.Tensor | None:
        """The sorted columns of A (its (c, i, j) order, the bias column last) that the patches of an input of `shape`
        can make nonzero: every channel at its `live_taps`; None when every tap is live, or for a grouped conv."""
        taps = self.live_taps(layer, shape)
        if taps is None:
            return None
        KK = layer.conv["kernel_size"][0] * layer.conv["kernel_size"][1]
        cols = (torch.arange(shape[1], device=device)[:, None] * KK + torch.tensor(taps, device=device)).flatten()
        if layer.bias is not None:
            cols = torch.cat([cols, torch.tensor([shape[1] * KK], device=device)])
        return cols

    def _live_patches(self, layer, x: torch.Tensor, taps: list[int], dtype: torch.dtype) -> torch.Tensor:
        """The patch matrix of x at the kernel taps `taps` alone, (N oh ow, C len(taps)) in (c, tap) order (the order
        of live_input_columns), gathered tap by tap from the padded input (no im2col)."""
        c = layer.conv
        kw, (sh, sw), (ph, pw), (dh, dw) = c["kernel_size"][1], c["stride"], c["padding"], c["dilation"]
        N, C, H, W = x.shape
        oh, ow = conv_output_size(H, W, c["kernel_size"], c["stride"], c["padding"], c["dilation"])
        xp = F_nn.pad(x.to(dtype), (pw, pw, ph, ph))
        per_tap = [xp[:, :, (t // kw) * dh:(t // kw) * dh + sh * (oh - 1) + 1:sh,
                      (t % kw) * dw:(t % kw) * dw + sw * (ow - 1) + 1:sw] for t in taps]
        return torch.stack(per_tap, dim=2).permute(0, 3, 4, 1, 2).reshape(N * oh * ow, C * len(taps))

    def update_input_factor_on_columns(self, layer, A, xs, decay, cols: torch.Tensor) -> torch.Tensor:
        """A[cols, cols] <- (1-decay) A[cols, cols] + decay sum_rows p_cols p_cols^T / rows in place, the rest of A
        untouched: the factor update for an A that is zero outside cols x cols, `cols` the live_input_columns of
        every x in xs (one shape, ungrouped): there it equals update_input_factor, without reading or writing the
        rest of A. The patch columns are gathered tap by tap (no full im2col). Returns the block written,
        A[cols, cols] (in A's dtype)."""
        taps = self.live_taps(layer, xs[0].shape)
        dtype = _accumulation_dtype(A, *xs)
        gram, rows = None, 0
        for x in xs:
            P = self._live_patches(layer, x, taps, dtype)
            if layer.bias is not None:
                P = torch.cat([P, P.new_ones(P.shape[0], 1)], dim=1)
            part = P.mT @ P
            gram = part if gram is None else gram.add_(part)
            rows += P.shape[0]
        index = (cols[:, None], cols[None, :])
        block = A[index].to(dtype)
        _ema_(block, gram.div_(rows), decay)
        block = block.to(A.dtype)
        A.index_put_(index, block)
        return block

    def factor_input_rows(self, layer, xs, tokens="expand"):
        """im2col rows (rows, a); a grouped conv: per group, (groups, rows, a) (A_j = X_j^T X_j / rows)."""
        bias = layer.bias is not None
        if layer.conv["groups"] != 1:
            dtype = _accumulation_dtype(*xs)
            return torch.cat([_grouped_patches(x, layer.conv, bias, dtype) for x in xs], dim=1)
        return torch.cat([_patches(x, layer.conv, bias) for x in xs])  # im2col rows

    def sub_batch_grad(self, layer, a, dy, dtype):
        """dy^T P: torch's conv weight gradient, or, where taps read only zero padding (live_taps), the
        product with the live patch columns alone, zero elsewhere (layer4 of a ResNet-18 at 32x32: 12 ms against
        0.2 for a 3x3 conv on 1x1 maps at 128 samples, torch's weight gradient visiting every tap)."""
        a, dy = a.to(dtype), dy.to(dtype)
        c = layer.conv
        taps = self.live_taps(layer, a.shape)
        if taps is not None:  # (out, C, kh kw), the live taps' columns filled
            gw = dy.new_zeros(layer.out_dim, a.shape[1], c["kernel_size"][0] * c["kernel_size"][1])
            live = dy.movedim(1, -1).reshape(-1, layer.out_dim).mT @ self._live_patches(layer, a, taps, dtype)
            gw[:, :, taps] = live.view(layer.out_dim, a.shape[1], len(taps))
        else:
            gw = torch.nn.grad.conv2d_weight(a, self.kernel_shape(layer), dy, stride=c["stride"],
                                             padding=c["padding"], dilation=c["dilation"], groups=c.get("groups", 1))
        gw = gw.reshape(layer.out_dim, -1)
        if layer.bias is not None:
            gw = torch.cat([gw, dy.sum(dim=(0, 2, 3)).unsqueeze(1)], dim=1)
        return gw

    def input_diagonal(self, layer, h, dtype):
        bias = layer.bias is not None
        c = layer.conv
        out = torch.zeros(h.shape[1] * c["kernel_size"][0] * c["kernel_size"][1] + bias, dtype=dtype,
                          device=h.device)
        return fop_kernels.accumulate_conv_factor_diag(out, h, 1.0, c["kernel_size"], c["stride"], c["padding"],
                                                       c["dilation"], bias=bias, scale=1.0 / h.shape[0],
                                                       check_finite=False)

    def output_diagonal(self, layer, s, dtype):  # N x R x positions: mean of s^2 (vecdot: no copies)
        s3 = s.to(dtype).reshape(s.shape[0], s.shape[1], -1)
        return torch.linalg.vecdot(s3, s3).sum(0) / (s3.shape[0] * s3.shape[2])

    def diagonal_sizes(self, layer):
        c = layer.conv
        return c["groups"] * self.weight_columns(layer) + (layer.bias is not None), self.out_dim(layer)

    def diagonal_fisher(self, layer, which, H, S, damping, dtype):
        groups = layer.conv["groups"]
        if which == "bias" or groups == 1:
            return super().diagonal_fisher(layer, which, H, S, damping, dtype)
        W = layer.weight  # row j of group g uses the H entries of g's input channels
        R, d_w = W.shape[0], W[0].numel()
        F = torch.mul(S.reshape(groups, R // groups, 1), H[: groups * d_w].reshape(groups, 1, d_w)).add_(damping)
        return F.to(dtype).reshape(W.shape)


class Conv1dType(Conv2dType):
    """nn.Conv1d as a 2-D conv over N x C x 1 x L (kernel 1 x k): the same factors. FROG's row systems are 2-D:
    not preconditioned there."""

    name = "conv1d"
    modules = (nn.Conv1d,)
    forms = frozenset({"kfac", "adafisher"})
    unbatched_dim = 3

    def geometry(self, m):
        return {"kernel_size": (1, m.kernel_size[0]), "stride": (1, m.stride[0]), "padding": (0, self._padding(m)[0]),
                "dilation": (1, m.dilation[0]), "groups": m.groups}

    def kernel_shape(self, layer):
        o, i, k = layer.weight.shape
        return (o, i, 1, k)

    def input(self, layer, x):
        return x.unsqueeze(-2) if x.dim() == 3 else x

    def output_grad(self, layer, g):
        return g.unsqueeze(-2) if g.dim() == 3 else g


class EmbeddingType(TransposedLayout, LayerType):
    """nn.Embedding and nn.EmbeddingBag (mode "sum" or "mean", dense gradients): a Linear over one-hot (bag:
    count) input rows c, with the weight (vocab x dim) transposed: the gradient matrix is dim x vocab. A is the
    diagonal of sum_rows c c^T / rows, stored as a vector (token counts; a bag's c_v is the count of token v in it,
    divided by the bag's size for "mean"; padding_idx counts 0), G = sum g g^T / N from the output gradients, so
    the update is G^-1 dW^T diag(A + damping)^-1. Rows: every token of an Embedding input (K-FAC-expand; the
    token treatment does not apply), every bag of an EmbeddingBag. K-FAC/FOP (inverse_method="eigh", one process)
    and AdaFisher."""

    name = "embedding"
    modules = (nn.Embedding, nn.EmbeddingBag)
    forms = frozenset({"kfac", "adafisher"})

    def reason(self, module, family):
        if family not in self.forms:
            return NOT_SUPPORTED
        if module.sparse:
            return "sparse gradients (sparse=True)"
        if isinstance(module, nn.EmbeddingBag) and module.mode not in ("sum", "mean"):
            return f"EmbeddingBag mode={module.mode!r} (the max has no Kronecker form)"
        return None

    def input_factor_shape(self, layer):
        return (layer.in_dim,)


    def read_input(self, layer, inputs, kwargs):
        """The token ids, one row per sample: an Embedding's input as it is; an EmbeddingBag's bags as an
        (N, longest bag) tensor padded with -1 (from a 2-D input, or a 1-D input with its offsets)."""
        x = super().read_input(layer, inputs, kwargs)
        if x is None or not isinstance(layer.module, nn.EmbeddingBag):
            return x
        offsets = inputs[1] if len(inputs) > 1 else kwargs.get("offsets")
        weights = inputs[2] if len(inputs) > 2 else kwargs.get("per_sample_weights")
        if weights is not None:
            raise ValueError(f"layer {layer.name}: EmbeddingBag with per_sample_weights has no K-FAC form here; "
                             "leave it out with exclude=[...]")
        if x.dim() != 1 or offsets is None:
            return x
        if layer.module.include_last_offset:
            ends = offsets[1:]
        else:
            ends = torch.cat([offsets[1:], offsets.new_tensor([x.numel()])])
        starts = offsets[: ends.numel()]
        sizes = ends - starts
        width = int(sizes.max()) if sizes.numel() else 0
        pos = torch.arange(width, device=x.device)
        inside = pos[None, :] < sizes[:, None]
        padded = x.new_full((sizes.numel(), width), -1)
        padded[inside] = x[(starts[:, None] + pos[None, :])[inside]]
        return padded

    def _bags(self, layer, x: torch.Tensor):
        """(token ids, row of each id, weight of each id, rows): the nonzero entries of the count rows c."""
        m = layer.module
        if isinstance(m, nn.EmbeddingBag):
            rows = x.shape[0]
            row = torch.arange(rows, device=x.device)[:, None].expand_as(x)
            keep = x >= 0
            if m.padding_idx is not None:
                keep &= x != m.padding_idx
            w = torch.ones(x.shape, dtype=torch.float64, device=x.device)
            if m.mode == "mean":  # torch's mean leaves the padding_idx entries out of the bag's size
                w = w / keep.sum(1, keepdim=True).clamp_min(1)
            return x[keep], row[keep], w[keep], rows
        flat = x.reshape(-1)
        keep = flat != m.padding_idx if m.padding_idx is not None else torch.ones_like(flat, dtype=torch.bool)
        row = torch.arange(flat.numel(), device=x.device)
        return flat[keep], row[keep], torch.ones(int(keep.sum()), dtype=torch.float64, device=x.device), flat.numel()

    def _diagonal(self, layer, xs: list[torch.Tensor], dtype) -> torch.Tensor:
        """sum_rows c_v^2 / rows per token v over the records `xs`."""
        V = layer.weight.shape[0]
        total = torch.zeros(V, dtype=torch.float64, device=layer.weight.device)
        rows = 0
        for x in xs:
            ids, row, w, n = self._bags(layer, x)
            key = row * V + ids  # one entry per (row, token): the count of token v in row r, summed over repeats
            uniq, inv = torch.unique(key, return_inverse=True)
            c = torch.zeros(uniq.numel(), dtype=torch.float64, device=x.device).index_add_(0, inv, w)
            total.index_add_(0, (uniq % V).to(total.device), c.square().to(total.device))
            rows += n
        return (total / rows).to(dtype)

    def update_input_factor(self, layer, A, xs, decay, tokens="expand"):
        diag = self._diagonal(layer, xs, A.dtype)
        if decay == 1.0:
            A.copy_(diag)
        else:
            A.mul_(1.0 - decay).add_(diag, alpha=decay)

    def output_rows(self, layer, dy, tokens="expand"):
        return dy

    def sub_batch_grad(self, layer, a, dy, dtype):
        ids, row, w, _ = self._bags(layer, a)
        rows = dy.reshape(-1, dy.shape[-1]).to(dtype)
        grad = torch.zeros(layer.weight.shape, dtype=dtype, device=dy.device)
        grad.index_add_(0, ids.to(dy.device), rows[row.to(dy.device)] * w.to(device=dy.device, dtype=dtype)[:, None])
        return grad.mT

    def input_diagonal(self, layer, h, dtype):  # h holds token ids: the dtype follows the weight's
        return self._diagonal(layer, [h], torch.float64 if layer.weight.dtype == torch.float64 else torch.float32)


class NormType(LayerType):
    """A normalization layer's affine scale and shift (AdaFisher's EFIM blocks, its paper's Proposition 3.1)."""

    forms = frozenset({"adafisher"})

    def reduced(self, t: torch.Tensor, features: int) -> tuple[torch.Tensor, int, int]:
        """(sum over the normalization's reduced dims per feature, N samples, T positions per sample)."""
        rows = t.reshape(-1, features)  # (N, ..., *normalized_shape): reduce every leading dim
        return rows.sum(0), t.shape[0], rows.shape[0] // t.shape[0]

    def diagonal_sizes(self, layer):
        return layer.weight.numel(), layer.weight.numel()

    def diagonal_fisher(self, layer, which, H, S, damping, dtype):
        F = S * H[0 if which == "weight" else 1] + damping
        return F.to(dtype).reshape(layer.weight.shape)


class PerSampleNormType(NormType):
    """A norm that normalizes each sample on its own (LayerNorm, RMSNorm), y = w * xhat (+ b) per feature. K-FAC/FOP:
    the affine map is a per-feature linear layer on xhat, so its Fisher block is block-diagonal over the features,
    feature c's block A_c kron G_c (Kronecker per unit, a depthwise 1 x 1 conv's form) with
        A_c = mean over rows of [xhat_c, 1]^T [xhat_c, 1]   (2 x 2; 1 x 1 without a bias)
        G_c = sum over rows of g_c^2 / N                    (1 x 1)
    over rows = samples x positions (tokens), xhat recomputed from the captured input; the gradient matrix is
    features x [w | b]. Stored as the grouped layers' blocks (`blocks` = the features)."""

    forms = frozenset({"adafisher", "kfac"})

    def features(self, layer) -> int:
        return layer.weight.numel()

    def normalized(self, layer, x: torch.Tensor) -> torch.Tensor:
        """xhat of the captured input (in the form `input` returns it), without the affine map."""
        raise NotImplementedError

    def out_dim(self, layer):
        return self.features(layer)

    def weight_columns(self, layer):
        return 1

    def blocks(self, layer):
        return self.features(layer)

    def input_factor_shape(self, layer):
        return (self.features(layer), layer.in_dim, layer.in_dim)

    def output_factor_shape(self, layer):
        return (self.features(layer), 1, 1)

    def _rows(self, layer, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.normalized(layer, x.to(dtype)).reshape(-1, self.features(layer))

    def update_input_factor(self, layer, A, xs, decay, tokens="expand"):
        dtype = _accumulation_dtype(A, *xs)
        X = torch.cat([self._rows(layer, x, dtype) for x in xs])
        total = torch.empty(A.shape, dtype=dtype, device=A.device)
        total[:, 0, 0] = X.square().mean(0)
        if layer.bias is not None:
            total[:, 0, 1] = total[:, 1, 0] = X.mean(0)
            total[:, 1, 1] = 1.0
        _ema_(A, total, decay)

    def factor_input_rows(self, layer, xs, tokens="expand"):
        dtype = _accumulation_dtype(*xs)
        X = torch.cat([self._rows(layer, x, dtype) for x in xs]).T.unsqueeze(-1)  # (features, rows, 1)
        return torch.cat([X, torch.ones_like(X)], dim=-1) if layer.bias is not None else X

    def output_rows(self, layer, dy, tokens="expand"):
        return dy.reshape(-1, self.features(layer))

    def update_output_factor(self, layer, G, rows, decay, scale=1.0):
        dtype = _accumulation_dtype(G, *rows)
        total = sum(r.to(dtype).square().sum(0) for r in rows) * scale
        _ema_(G, total.view(-1, 1, 1), decay)

    def sub_batch_grad(self, layer, a, dy, dtype):
        X, Y = self._rows(layer, a, dtype), dy.to(dtype).reshape(-1, self.features(layer))
        cols = [(Y * X).sum(0)] + ([Y.sum(0)] if layer.bias is not None else [])
        return torch.stack(cols, dim=1)


class LayerNormType(PerSampleNormType):
    name = "layernorm"
    modules = (nn.LayerNorm,)
    unbatched_dim = 2

    def normalized(self, layer, x):
        m = layer.module
        return F_nn.layer_norm(x, m.normalized_shape, eps=m.eps)


class ChannelsFirstLayerNormType(LayerNormType):
    """A LayerNorm subclass over the channels of N x C x H x W inputs (timm's `LayerNorm2d`, matched by class name):
    its statistics read the input and output gradient channels-last."""

    name = "layernorm2d"

    def matches(self, module):
        return isinstance(module, nn.LayerNorm) and type(module).__name__ == "LayerNorm2d"

    unbatched_dim = 4

    def input(self, layer, x):
        return x.movedim(1, -1)

    def output_grad(self, layer, g):
        return g.movedim(1, -1)


class RMSNormType(PerSampleNormType):
    """nn.RMSNorm (torch >= 2.4): xhat = x / sqrt(mean(x^2) + eps) over the normalized shape, a scale and no shift.
    K-FAC/FOP only (AdaFisher's EFIM is a LayerNorm's)."""

    name = "rmsnorm"
    modules = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
    forms = frozenset({"kfac"})
    unbatched_dim = 2

    def normalized(self, layer, x):
        m = layer.module
        return F_nn.rms_norm(x, m.normalized_shape, eps=m.eps)


class BatchNorm2dType(NormType):
    name = "batchnorm2d"
    modules = (nn.BatchNorm2d,)

    def reason(self, module, family):
        if family == "kfac":
            return "batch statistics: a sub-batch's normalized input needs the whole batch's statistics"
        return super().reason(module, family)

    def reduced(self, t, features):  # N x C x H x W: reduce N, H, W
        return t.sum((0, 2, 3)), t.shape[0], t.shape[2] * t.shape[3]


class AttentionProjectionType(LinearType):
    """A projection of nn.MultiheadAttention as a Linear over its batch-first N x L x E tokens: the packed input
    projection (`in_proj_weight`, 3E x E, on the query of a self-attention call), one of the separate ones
    (`q_proj_weight` E x E on the query, `k_proj_weight` E x kdim on the key, `v_proj_weight` E x vdim on the value)
    or `out_proj` (on the attention output). Its module never calls it: fop._attention shows the call to the hooks.
    Made by MultiheadAttentionType only (`modules` is empty: never matched on its own)."""

    modules = ()

    def __init__(self, projection: str):
        super().__init__()
        self.projection = projection  # "in" | "q" | "k" | "v" | "out": which call of the forward (fop._attention)
        self.name = f"attention_{projection}_proj"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.projection!r})"


ATTENTION_IN_PROJ = AttentionProjectionType("in")
ATTENTION_SEPARATE_PROJ = {p: AttentionProjectionType(p) for p in ("q", "k", "v")}
ATTENTION_OUT_PROJ = AttentionProjectionType("out")


class MultiheadAttentionType(LayerType):
    """nn.MultiheadAttention. Packed `in_proj_weight` (kdim = vdim = embed_dim): two Linear layers, its input
    projection (3E outputs, one A over the query tokens and one G over q, k and v together) and its out projection.
    Separate weights (kdim or vdim != embed_dim): four, `q_proj_weight`, `k_proj_weight`, `v_proj_weight` (each with
    the A of its own input: query, key, value) and the out projection; their shared `in_proj_bias` (3E) belongs to no
    one layer and takes the plain update. Each with K-FAC-expand or -reduce token rows as a Linear."""

    name = "multihead_attention"
    modules = (nn.MultiheadAttention,)

    def layers_of(self, name, module):
        out = module.out_proj
        prefix = f"{name}." if name else ""
        if module._qkv_same_embed_dim and module.in_proj_weight is not None:
            inputs = [Layer(f"{prefix}in_proj", module, module.in_proj_weight, module.in_proj_bias, ATTENTION_IN_PROJ,
                            host=module)]
        else:
            inputs = [Layer(f"{prefix}{p}_proj", module, getattr(module, f"{p}_proj_weight"), None, t, host=module)
                      for p, t in ATTENTION_SEPARATE_PROJ.items()]
        return [*inputs, Layer(f"{prefix}out_proj", out, out.weight, out.bias, ATTENTION_OUT_PROJ, host=module)]

    def claimed(self, module):
        return [module.out_proj]


BUILTIN_TYPES: tuple[LayerType, ...] = (TransposedLinearType(), LinearType(), Conv2dType(), Conv1dType(),
                                        EmbeddingType(), MultiheadAttentionType(), BatchNorm2dType(),
                                        ChannelsFirstLayerNormType(), LayerNormType(), RMSNormType())
_registered: list[LayerType] = []  # the user's, newest first: they take precedence over the built-in ones


def register_layer_type(layer_type: LayerType) -> LayerType:
    """Add a layer type (an instance of a LayerType subclass) to the registry; it is tried before the types
    registered earlier and the built-in ones. Returns it. Optimizers built afterwards use it."""
    if not isinstance(layer_type, LayerType):
        raise TypeError(f"register_layer_type takes a LayerType instance, got {type(layer_type).__name__}")
    _registered.insert(0, layer_type)
    return layer_type


def unregister_layer_type(layer_type: LayerType) -> None:
    """Remove a type added by register_layer_type (ValueError if it is not registered)."""
    if not any(t is layer_type for t in _registered):
        raise ValueError(f"{layer_type!r} is not a registered layer type")
    _registered[:] = [t for t in _registered if t is not layer_type]


def register_as_linear(module_class: type) -> LayerType:
    """Precondition every instance of `module_class` as an nn.Linear: it must hold `weight` (out x in) and an
    optional `bias`, and compute y = a W^T + b on its first input. Returns the registered type."""
    if not (isinstance(module_class, type) and issubclass(module_class, nn.Module)):
        raise TypeError(f"register_as_linear takes an nn.Module subclass, got {module_class!r}")
    return register_layer_type(LinearType(modules=(module_class,)))


def layer_type_of(module: nn.Module) -> LayerType | None:
    """The registered type that matches `module` first (the user's before the built-in ones), or None."""
    for t in (*_registered, *BUILTIN_TYPES):
        if t.matches(module):
            return t
    return None


def support_for(family: str) -> Callable[[nn.Module], str | None]:
    """The support predicate of an optimizer family: module -> None when preconditioned, else why not."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")

    def support(module: nn.Module) -> str | None:
        t = layer_type_of(module)
        return NOT_SUPPORTED if t is None else t.reason(module, family)

    support.__doc__ = f"None when the {family} family preconditions `module`, else why not (the layer registry)."
    return support


def without_norms(support: Callable[[nn.Module], str | None]) -> Callable[[nn.Module], str | None]:
    """`support`, leaving out LayerNorm/RMSNorm (PerSampleNormType): K-FAC/FOP with precondition_norms=False."""

    def restricted(module: nn.Module) -> str | None:
        reason = support(module)
        if reason is None and isinstance(layer_type_of(module), PerSampleNormType):
            return "norm layer: takes the unpreconditioned step (precondition_norms=True: one block per feature)"
        return reason

    return restricted


kfac_support = support_for("kfac")  # the registry's K-FAC/FOP forms, norm layers included (precondition_norms=True)
unsupported_reason = without_norms(kfac_support)  # K-FAC/FOP's default


def without_blocks(support: Callable[[nn.Module], str | None], who: str) -> Callable[[nn.Module], str | None]:
    """`support`, leaving out the modules whose layers have block-diagonal factors (grouped convs, norm layers:
    `LayerType.blocks` > 1), with the reason that `who` has no form for them."""

    def restricted(module: nn.Module) -> str | None:
        reason = support(module)
        t = layer_type_of(module)
        if reason is None and t is not None and any(t.blocks(layer) > 1 for layer in t.layers_of("", module)):
            return f"block-diagonal factors (one Kronecker block per group or feature): not supported by {who}"
        return reason

    return restricted



@dataclass
class Layer:
    """One preconditioned layer: its module, parameters, type and the shape of its gradient matrix [W | b]."""

    name: str
    module: nn.Module
    weight: nn.Parameter
    bias: nn.Parameter | None
    type: LayerType
    conv: dict = field(default_factory=dict)  # kernel_size, stride, padding, dilation, groups for convs
    host: nn.Module | None = None  # the module whose forward applies this layer's weight (nn.MultiheadAttention)
    batch_dim: int = 0  # the dim of its batched inputs that holds the samples (1: inside a seq-first transformer)

    @property
    def kind(self) -> str:
        """The layer type's name ("linear", "conv2d", ...)."""
        return self.type.name

    @property
    def out_dim(self) -> int:
        return self.type.out_dim(self)

    @property
    def in_dim(self) -> int:
        """Columns of the gradient matrix: C_in kh kw (conv) or in_features (linear), plus 1 with a bias."""
        return self.type.weight_columns(self) + (self.bias is not None)

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
        gw = self.type.weight_matrix(self, tensors[0])
        if self.bias is not None:
            gw = torch.cat([gw, tensors[1].reshape(-1, 1)], dim=1)
        return gw if dtype is None else gw.to(dtype)

    def split(self, matrix: torch.Tensor) -> list[torch.Tensor]:
        """The inverse of grad_matrix: views shaped like [weight] or [weight, bias]."""
        w = self.type.weight_from_matrix(self, matrix[:, : self.type.weight_columns(self)])
        if self.bias is None:
            return [w]
        return [w, matrix[:, -1].reshape(self.bias.shape)]  # a LayerNorm over (2, 3): a 2-D bias

    def describe(self) -> str:
        bias = "+bias" if self.bias is not None else ""
        g, o = self.type.blocks(self), self.out_dim // self.type.blocks(self)
        blocks = "" if g == 1 else f"{g} blocks of "
        return (f"{self.name}: {type(self.module).__name__}{self.type.describe(self)} weight{tuple(self.weight.shape)}"
                f"{bias} -> {blocks}G {o}x{o}, A {self.in_dim}x{self.in_dim}")


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


def parameter_holders(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> names of every module that holds it directly (more than one: a tied weight)."""
    holders: dict[int, list[str]] = defaultdict(list)
    for name, m in model.named_modules():
        for p in m._parameters.values():
            if p is not None:
                holders[id(p)].append(name or type(m).__name__)
    return holders


def _parameter_reason(layer: Layer, optimized: set[int] | None) -> str | None:
    """Why the parameters of `layer` keep it from being preconditioned (frozen, or not optimized), or None."""
    for what, p in (("weight", layer.weight), ("bias", layer.bias)):
        if p is None:
            continue
        if not p.requires_grad:
            return f"{what} does not require grad"
        if optimized is not None and id(p) not in optimized:
            return f"{what} is not among the optimizer's parameters"
    return None


def discover_layers(model: nn.Module, params: Iterable[nn.Parameter] | None = None, exclude=None,
                    support: Callable[[nn.Module], str | None] = unsupported_reason
                    ) -> tuple[list[Layer], list[tuple[str, str]]]:
    """The supported layers of `model` (unwrapped) whose weight requires grad and is optimized.

    `params`: the optimizer's parameters; a layer whose weight is not among them is skipped. Returns the layers
    (in module order) and a list of (name, reason) for the modules with parameters that are not preconditioned.
    `support(module)`: None when the optimizer supports the module, else why not (default: K-FAC's
    `unsupported_reason`); the module must match a registered layer type.
    A parameter that two modules hold (a tied weight: GPT-2's lm_head and its token embedding), whether or not the
    other module is supported, is preconditioned by neither (its gradient mixes two uses' statistics); a warning
    names the modules. A type may make several layers of one module and claim its submodules
    (nn.MultiheadAttention: its input projection and its `out_proj`, which it applies functionally)."""
    model = unwrap_model(model)
    excluded = _resolve_exclude(model, exclude)
    optimized = None if params is None else {id(p) for p in params}
    claimed: dict[int, str | None] = {}  # id(submodule) -> why it is not preconditioned, None: its host's layer
    layers, skipped = [], []
    for name, m in model.named_modules():
        if id(m) in claimed:
            if claimed[id(m)] is not None:
                skipped.append((name, claimed[id(m)]))
            continue
        has_params = next(m.parameters(recurse=False), None) is not None
        if id(m) in excluded:
            if has_params:
                skipped.append((name, "excluded"))
            continue
        matched = layer_type_of(m)
        reason = support(m) if has_params or matched is not None else None
        for child in matched.claimed(m) if matched is not None else []:
            claimed[id(child)] = None if reason is None else \
                f"applied by {type(m).__name__} {name or type(m).__name__}, which is not preconditioned ({reason})"
        if not has_params:
            continue
        if reason is None and matched is None:
            raise ValueError(f"support() accepted module {name or type(m).__name__} ({type(m).__name__}), which "
                             "matches no registered layer type (fop.register_layer_type)")
        if reason is not None:
            skipped.append((name, reason))
            continue
        for layer in matched.layers_of(name or type(m).__name__, m):
            reason = "excluded" if id(layer.module) in excluded else _parameter_reason(layer, optimized)
            if reason is None:
                layers.append(layer)
            else:
                skipped.append((layer.name, reason))
    holders = parameter_holders(model)
    seq_first = seq_first_modules(model)
    kept = []
    for layer in layers:
        if layer.host is None and id(layer.module) in seq_first:
            layer.batch_dim = 1
        shared = sorted({h for p in layer.params if len(holders[id(p)]) > 1 for h in holders[id(p)]})
        if shared:
            logger.warning("tied weight: a parameter of %s is held by modules %s; it is not preconditioned (its "
                           "gradient mixes their statistics)", layer.name, ", ".join(shared))
            skipped.append((layer.name, "parameter shared with another layer"))
        else:
            kept.append(layer)
    return kept, skipped


def seq_first_modules(model: nn.Module) -> set[int]:
    """ids of the submodules that torch's transformer layers (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    apply to sequence-first (T x N x E) tensors: their Linear and norm layers when batch_first=False, torch's default,
    and the final norm of an nn.TransformerEncoder / nn.TransformerDecoder of such layers.
    Their inputs and output gradients are captured with the batch dim moved first (fop._capture), so that K-FAC counts
    samples, and FOP splits the batch, along N and not T. A model's own layers on sequence-first tensors are not
    recognised: the leading dim is taken as the samples."""
    out = set()
    for m in model.modules():
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and not m.self_attn.batch_first:
            out.update(id(c) for c in m.children() if not isinstance(c, nn.MultiheadAttention))
        elif isinstance(m, (nn.TransformerEncoder, nn.TransformerDecoder)) and m.norm is not None and len(m.layers) \
                and not m.layers[0].self_attn.batch_first:  # the stack's final norm, on the last layer's output
            out.add(id(m.norm))
    return out


def parameter_map(layers: list[Layer]) -> dict[int, tuple[int, str]]:
    """id(parameter) -> (layer index, "weight" | "bias"): explicit, never by position in a param group."""
    out = {}
    for i, layer in enumerate(layers):
        out[id(layer.weight)] = (i, "weight")
        if layer.bias is not None:
            out[id(layer.bias)] = (i, "bias")
    return out
