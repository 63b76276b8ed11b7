"""nn.MultiheadAttention's projections as linear calls that the capture hooks see.

nn.MultiheadAttention holds its input projection as a bare parameter (`in_proj_weight`, 3E x E, with
`in_proj_bias`) and applies its `out_proj` Linear functionally: both go through
`F.multi_head_attention_forward`, which a module hook cannot look into. While a consumer (the capture, the
distributed half-batch hooks) is armed, an interceptor on the module runs that call in an equivalent form whose
projections are explicit:

    y_in = F.linear(query, W_in, b_in)                      self-attention (query is key is value), packed weights
    z, w = F.multi_head_attention_forward(q, k, v, ..., q/k/v projection = I, out projection = I)
    y    = F.linear(z, W_o, b_o)

(q, k, v the three column blocks of y_in; multiplying by the identity is exact in every dtype). With separate
weights (kdim or vdim != embed_dim) the input projections are three calls, `q = F.linear(query, W_q, b_q)`,
`k = F.linear(key, W_k, b_k)`, `v = F.linear(value, W_v, b_v)` (b_q, b_k, b_v the blocks of `in_proj_bias`), each
shown to its own hook, whatever the three inputs are. So every mask,
dropout, bias_k/bias_v and head option keeps torch's own semantics. Each consumer sees the two linear calls as a
Linear layer's forward hook sees its call, with the tensors batch-first (N x L x E, one sample per row of dim 0,
whatever `batch_first` is; an unbatched call is a batch of 1). The identity projections cost about as much as the
real ones (4 E^2 multiply-adds per token) on the steps the optimizer captures; unarmed forwards run unchanged.

Cross-attention with packed weights (query not key or value) applies the three row blocks of `in_proj_weight` to
different inputs, which one Kronecker factor pair does not describe: its input projection is then not captured, and
the consumer is told (`on_skip`), so that the optimizer gives it the plain update on that step. Its out projection is
captured as usual. (Separate weights have no such case: each projection has its one input.)
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F_nn
from torch import nn
from torch.overrides import TorchFunctionMode

CROSS_ATTENTION = "cross-attention (query is not key and value): its input projection has no single input factor"


@dataclass
class _Consumer:
    active: Callable[[], bool]
    hooks: dict[str, Callable]  # "in" | "out" -> hook(inputs, output), inputs = (x,), both batch-first
    on_skip: Callable[[str], None] | None


class _Interceptor:
    """The forward pre-hook and hook on one nn.MultiheadAttention that run its call in the explicit form while a
    consumer is active; one per module, shared by every consumer."""

    def __init__(self, mha: nn.MultiheadAttention):
        self.consumers: list[_Consumer] = []
        self.modes: list[_Mode] = []
        # weakly: a copy.deepcopy of the model copies these hooks and this object, but not the module it refers to,
        # so the copy's calls are told apart (and not captured for the original's optimizer)
        self.module = weakref.ref(mha)
        self.handles = [mha.register_forward_pre_hook(self._enter),
                        mha.register_forward_hook(self._exit, always_call=True)]

    def _enter(self, module, args):
        ours = module is self.module() and torch.is_grad_enabled()
        active = [c for c in self.consumers if c.active()] if ours else []
        if active:
            mode = _Mode(active)
            mode.__enter__()
            self.modes.append(mode)

    def _exit(self, module, args, output):
        if self.modes:
            self.modes.pop().__exit__(None, None, None)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class _Mode(TorchFunctionMode):
    """Active during one armed nn.MultiheadAttention forward: runs its F.multi_head_attention_forward call once in
    the explicit form (module docstring); every other function as it is."""

    def __init__(self, consumers: list[_Consumer]):
        super().__init__()
        self.consumers = consumers
        self.done = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F_nn.multi_head_attention_forward and not self.done:
            self.done = True
            return explicit_attention(func, args, kwargs, self.consumers)
        return func(*args, **kwargs)


_SIGNATURE = inspect.signature(F_nn.multi_head_attention_forward)


def _observed(consumers: list[_Consumer], which: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Show the call y = linear(x) to the consumers batch-first (L x N x E -> N x L x E; unbatched L x E -> 1 x L x E)
    and return y as a view of the tensor they hooked, so that its gradient flows through their hooks."""
    hooks = [c.hooks[which] for c in consumers if which in c.hooks]
    if not hooks:
        return y
    batched = x.dim() == 3
    xs, ys = (x.transpose(0, 1), y.transpose(0, 1)) if batched else (x.unsqueeze(0), y.unsqueeze(0))
    for hook in hooks:
        hook((xs,), ys)
    return ys.transpose(0, 1) if batched else ys.squeeze(0)


def _identity(w: torch.Tensor) -> torch.Tensor:
    """The E x E identity in w's dtype and device (E = w's columns), made once per configuration and reused."""
    key = (w.shape[1], w.dtype, w.device)
    eye = _IDENTITIES.get(key)
    if eye is None:
        eye = _IDENTITIES[key] = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
    return eye


_IDENTITIES: dict[tuple, torch.Tensor] = {}


def explicit_attention(func, args: tuple, kwargs: dict, consumers: list[_Consumer]):
    """F.multi_head_attention_forward(*args, **kwargs) with its projections as explicit, observed linear calls."""
    bound = _SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    call = dict(bound.arguments)
    query, key, value = call["query"], call["key"], call["value"]
    w_in, b_in, w_out = call["in_proj_weight"], call["in_proj_bias"], call["out_proj_weight"]
    wanted = {w for c in consumers for w in c.hooks}
    wants_in = bool(wanted & {"in", "q", "k", "v"})
    plain = call["static_k"] is None and call["static_v"] is None
    if "in" in wanted and plain and not call["use_separate_proj_weight"] and query is key and key is value:
        y = _observed(consumers, "in", query, F_nn.linear(query, w_in, b_in))
        eye = _identity(w_in)
        q, k, v = y.chunk(3, dim=-1)
        call.update(query=q, key=k, value=v, use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye,
                    v_proj_weight=eye, in_proj_weight=None, in_proj_bias=None)
    elif wanted & {"q", "k", "v"} and plain and call["use_separate_proj_weight"]:
        biases = (None,) * 3 if b_in is None else b_in.chunk(3)
        q, k, v = (_observed(consumers, p, x, F_nn.linear(x, call[f"{p}_proj_weight"], b))
                   for p, x, b in zip("qkv", (query, key, value), biases))
        eye = _identity(call["q_proj_weight"])
        call.update(query=q, key=k, value=v, q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye,
                    in_proj_bias=None)
    elif wants_in:
        for c in consumers:
            if c.on_skip is not None and set(c.hooks) & {"in", "q", "k", "v"}:
                c.on_skip(CROSS_ATTENTION)
    if not any("out" in c.hooks for c in consumers):
        return func(**call)
    b_out = call["out_proj_bias"]
    call.update(out_proj_weight=_identity(w_out), out_proj_bias=None)
    z, weights = func(**call)
    return _observed(consumers, "out", z, F_nn.linear(z, w_out, b_out)), weights


_interceptors: weakref.WeakKeyDictionary[nn.Module, _Interceptor] = weakref.WeakKeyDictionary()


class ConsumerHandle:
    """Removes one consumer's hooks from an nn.MultiheadAttention (and the interceptor with the last one)."""

    def __init__(self, mha: nn.MultiheadAttention, consumer: _Consumer):
        self.mha = weakref.ref(mha)
        self.consumer = consumer

    def remove(self) -> None:
        mha = self.mha()
        interceptor = _interceptors.get(mha) if mha is not None else None
        if interceptor is None:
            return
        interceptor.consumers = [c for c in interceptor.consumers if c is not self.consumer]
        if not interceptor.consumers:
            interceptor.remove()
            del _interceptors[mha]


def observe_attention(mha: nn.MultiheadAttention, hooks: dict[str, Callable], active: Callable[[], bool],
                      on_skip: Callable[[str], None] | None = None) -> ConsumerHandle:
    """Call `hooks["in"]` (packed weights), `hooks["q"]`, `hooks["k"]`, `hooks["v"]` (separate weights) and
    `hooks["out"]` as `hook(inputs, output)` on that projection of every forward of `mha` with grad enabled while
    `active()`; `on_skip(reason)` when the input projection is not captured (cross-attention with packed weights,
    static keys or values). Returns a handle whose remove() undoes it."""
    interceptor = _interceptors.get(mha)
    if interceptor is None:
        interceptor = _interceptors[mha] = _Interceptor(mha)
    consumer = _Consumer(active, dict(hooks), on_skip)
    interceptor.consumers.append(consumer)
    return ConsumerHandle(mha, consumer)
