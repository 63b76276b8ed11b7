"""Forward/backward hooks that capture what a Kronecker-factored optimizer needs, only when it is armed.

Per layer and per forward pass (a "record"), the hooks keep the layer input `a` (N x ... x d_in, or the conv input
N x C x H x W) and the gradient of the layer output `dy` as autograd computes it, both in the form the layer's type
reads them (fop._layers: `read_input`, `input`, `output_grad`; the type also forms the rows of A and G and the
sub-batch sum). Conventions:

- `dy` is the gradient of whatever loss was backpropagated. With `loss_reduction="mean"` (the usual mean-reduced
  loss, with gradient accumulation dividing by the number of micro-batches) the per-sample gradient of the summed
  loss is `g = N_total dy`, N_total the number of samples captured since the last step; with `"sum"`, `g = dy`.
- Factors (docs/design.md, docs/layers.md): `A = sum_rows a a^T / rows` over all rows (samples x positions; conv
  rows are im2col patches, computed by fop_kernels' conv-factor op; `tokens="reduce"`: one row per sample for a
  Linear), `G = g^T g / N_total` summed over positions.
- FOP's half-batch gradient: the first `floor(n/2)` samples of every record, `S1 = sum_{first halves} dy a^T`
  (conv: torch's conv weight gradient of the half batch), in the same scale as `.grad`, reduced in the backward
  hook as each output gradient arrives (`arm(half_grads=True)`), so that no half-batch input or output gradient is
  held until the step.
- fisher="mc": the sampled-label output gradients serve G alone, so the hook reduces them at once to their Gram
  `sum_rows g g^T` (in the factor dtype) instead of holding a batch of them until the step; on such a step the
  training output gradients are not kept either unless the half batch needs them (`arm(keep_dy=...)`). At batch
  2048 on the MNIST CNN that is about 300 MiB less held per backward pass.

Arming: `arm(full=...)` makes the next forward passes record (full batch on factor steps, else only the first
half of each batch); `release()` drops everything after the optimizer step. Several backward passes between two
steps (gradient accumulation) give several records per layer, all used. Forward passes without grad (evaluation
under `torch.no_grad()`) record nothing; a record whose backward never came is ignored.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from fop._attention import observe_attention
from fop._layers import TOKEN_MODES, Layer

LOSS_REDUCTIONS = ("mean", "sum")


@dataclass
class Record:
    """What one forward pass of one layer left: input rows kept, output gradient, sample counts."""

    a: torch.Tensor | None  # set by its backward; None on a half-batch record whose hook reduces it (half_grads)
    n: int  # samples in the forward pass
    n_half: int  # samples of its first half: floor(n / 2)
    full: bool  # True: a and dy hold all n samples; False: only the first n_half
    dy: torch.Tensor | None = None  # None after the backward too when the capture does not keep it (keep_dy)
    backward_done: bool = False
    gram_mc: torch.Tensor | None = None  # sum over rows of g g^T, g the sampled-label output gradient (fisher="mc")
    s1: torch.Tensor | None = None  # sum over the first half of dy a^T (arm(half_grads=True)), out x in
    output: torch.Tensor | None = None  # the layer output, kept until the MC backward (fisher="mc")
    rows: torch.Tensor | None = None  # the samples kept (arm(rows=...)): a and dy hold only these


class Capture:
    """Hooks on `layers`; records when armed. `records[i]` is the list of records of layer i."""

    def __init__(self, layers: list[Layer], loss_reduction: str = "mean", tokens: str = "expand"):
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
        if tokens not in TOKEN_MODES:
            raise ValueError(f"tokens must be one of {TOKEN_MODES}, got {tokens!r}")
        self.tokens = tokens  # rows of a Linear's factors over token dims: K-FAC-expand or -reduce (LinearType)
        self.layers = layers
        self.loss_reduction = loss_reduction
        self.records: list[list[Record]] = [[] for _ in layers]
        self.armed = False
        self.full = False
        self.keep_outputs = False
        self.keep_dy = True
        self.half_grads = False
        self.mc_active = False
        self.rows = None
        self.stat_dtype = torch.float32  # of what the hooks reduce (Grams, S1): the optimizer's factor dtype
        self.unbatched: dict[int, tuple] = {}  # layer index -> shape of an input without a batch dimension
        self.skipped_calls: dict[int, str] = {}  # layer index -> why a call of it was not captured this step
        ref = weakref.ref(self)
        self._handles = [attach_forward_hook(layer, self._forward_hook(i), lambda: (c := ref()) is not None and c.armed,
                                             self._skip_hook(i))
                         for i, layer in enumerate(layers)]
        # the hooks hold the capture weakly, and go when it goes (with its optimizer)
        self._finalizer = weakref.finalize(self, remove_handles, self._handles)

    # -- arming ------------------------------------------------------------------------------------------------
    def arm(self, full: bool, keep_outputs: bool = False, rows=None, keep_dy: bool = True,
            half_grads: bool = False) -> None:
        """Record the next forward passes: whole batches when `full`, else the first half of each.

        `rows`: a callable (n, device) -> index tensor; each record then keeps only those samples of its batch
        (FROG's fresh sample per layer and step). `keep_dy=False`: the training output gradients are not kept (the
        backward is only noted), for an MC-Fisher step that has no other use for them. `half_grads`: the hook
        reduces each record's first half to S1 as its gradient arrives (FOP's sub-batch gradient); a half-batch
        record then keeps neither its input nor its output gradient."""
        self.armed, self.full, self.keep_outputs, self.rows = True, bool(full), bool(keep_outputs), rows
        self.keep_dy, self.half_grads = bool(keep_dy), bool(half_grads)

    def settings(self) -> dict | None:
        """The arguments of the last arm() while armed (to arm again after a skipped step), else None."""
        if not self.armed:
            return None
        return dict(full=self.full, keep_outputs=self.keep_outputs, rows=self.rows, keep_dy=self.keep_dy,
                    half_grads=self.half_grads)

    def release(self) -> None:
        """Drop every record and disarm (after the optimizer step)."""
        self.records = [[] for _ in self.layers]
        self.unbatched = {}
        self.skipped_calls = {}
        self.armed = self.full = self.keep_outputs = self.half_grads = False
        self.keep_dy = True
        self.rows = None

    def forget_backward(self) -> None:
        """Drop the records whose backward has run (optimizer.zero_grad: their gradients are gone); keep those of
        forward passes still waiting for their backward."""
        self.records = [[r for r in recs if not r.backward_done] for recs in self.records]

    def remove(self) -> None:
        """Remove the hooks from the modules."""
        self._finalizer()
        self.release()

    # -- hooks -------------------------------------------------------------------------------------------------
    def _forward_hook(self, i: int):
        ref = weakref.ref(self)

        def hook(module, inputs, kwargs, output):
            self = ref()
            if self is None or not self.armed or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
                return
            layer = self.layers[i]
            if module is not layer.module:  # a copy.deepcopy of the model carries this hook: its calls are not ours
                return
            x = layer.type.read_input(layer, inputs, kwargs)
            if not output.requires_grad or x is None:
                return
            if x.dim() < layer.type.unbatched_dim:
                self.unbatched[i] = tuple(x.shape)  # no batch dimension: step() raises naming the layer
                return
            x = layer.type.input(layer, batch_first(layer, x.detach()))
            n = x.shape[0]
            rows = None if self.rows is None else self.rows(n, x.device)
            a = x.index_select(0, rows) if rows is not None else x if self.full else x[: n // 2]
            # the record takes its input when its backward runs: until then the hook's closure holds it, as long as
            # the graph does, so a forward whose graph is dropped without a backward (a validation pass with grad
            # enabled) leaves no input behind; a half-batch record reduced in the hook never keeps it (every
            # backward through the graph adds to S1)
            reduced = self.half_grads and not self.full and rows is None
            rec = Record(a=None, n=n, n_half=n // 2, full=self.full, rows=rows)
            if self.keep_outputs:
                rec.output = output
            self.records[i].append(rec)
            output.register_hook(self._grad_hook(rec, self.layers[i], a, keep=not reduced))

        return hook

    def _skip_hook(self, i: int):
        ref = weakref.ref(self)

        def skip(reason: str) -> None:
            self = ref()
            if self is not None and self.armed:
                self.skipped_calls[i] = reason

        return skip

    def _grad_hook(self, rec: Record, layer: Layer, a: torch.Tensor, keep: bool):
        def hook(grad):
            if keep:
                rec.a = a
            g = layer.type.output_grad(layer, batch_first(layer, grad.detach()))
            if self.mc_active:  # only G needs it: reduce it now rather than hold a batch of output gradients
                rows = layer.type.output_rows(layer, g, self.tokens)
                rec.gram_mc = torch.empty(layer.type.output_factor_shape(layer), dtype=self.stat_dtype,
                                          device=g.device)
                layer.type.update_output_factor(layer, rec.gram_mc, [rows], 1.0)
                return
            rec.backward_done = True
            if self.half_grads and rec.rows is None:  # linear in dy: several backwards add up
                if rec.n_half > 0:
                    part = sub_batch_grad(layer, a[: rec.n_half], g[: rec.n_half], self.stat_dtype)
                    rec.s1 = part if rec.s1 is None else rec.s1 + part
                if not rec.full:  # a half-batch record needs nothing more
                    return
            if not self.keep_dy:
                return
            if rec.rows is not None:
                g = g.index_select(0, rec.rows)
            elif not rec.full:
                g = g[: rec.n_half]
            rec.dy = g if rec.dy is None else rec.dy + g  # two backwards through one graph (retain_graph) add up

        return hook

    # -- what the optimizer reads ------------------------------------------------------------------------------
    def done(self, i: int) -> list[Record]:
        """Records of layer i whose backward has run."""
        return [r for r in self.records[i] if r.backward_done]

    def broadcast(self, i: int) -> bool:
        """Whether layer i's completed records all hold 1 sample while another layer's hold more: its input was
        broadcast over the batch (GPT-2's and BERT's position ids are (1, T)), so its output gradient is the sum over
        the samples, not a per-sample gradient, and its statistics are not a Fisher's."""
        recs = self.done(i)
        if not recs or any(r.n != 1 for r in recs):
            return False
        return any(r.n > 1 for others in self.records for r in others if r.backward_done)

    def plain_reason(self, i: int) -> str | None:
        """Why layer i takes the plain update this step though it has a gradient (a broadcast batch, or a call the
        hooks could not capture: Capture.skipped_calls), or None."""
        if i in self.skipped_calls:
            return self.skipped_calls[i]
        if self.broadcast(i):
            return ("it saw a batch of 1 while other layers saw more: a broadcast input (a position embedding's "
                    "(1, T) ids?) whose output gradient sums the batch")
        return None

    def has_factor_data(self, mc: bool = False) -> bool:
        """True when every layer has at least one full record whose backward ran (mc: whose sampled-label Gram
        exists)."""
        return bool(self.layers) and all(self.has_layer_factor_data(i, mc) for i in range(len(self.layers)))

    def has_layer_factor_data(self, i: int, mc: bool = False) -> bool:
        """True when layer i has a full record whose backward ran (mc: whose sampled-label Gram exists)."""
        return any(r.full and (r.gram_mc is not None if mc else r.backward_done) for r in self.records[i])

    def layers_without_records(self) -> list[str]:
        """Names of the layers with no completed record while some other layer has one."""
        done = [bool(self.done(i)) for i in range(len(self.layers))]
        if not any(done):
            return []
        return [layer.name for layer, d in zip(self.layers, done) if not d]

    def sample_counts_of(self, i: int) -> tuple[int, int]:
        """(N_total, N1_total) of layer i's completed records: samples seen, and samples in their first halves."""
        recs = self.done(i)
        return sum(r.n for r in recs), sum(r.n_half for r in recs)

    def mc_outputs(self) -> list[torch.Tensor]:
        """Layer outputs awaiting the MC backward (fisher="mc")."""
        return [r.output for recs in self.records for r in recs if r.output is not None and r.gram_mc is None]

    def drop_outputs(self) -> None:
        for recs in self.records:
            for r in recs:
                r.output = None

    # -- factor statistics -------------------------------------------------------------------------------------
    def _input_factor_records(self, i: int) -> list[Record]:
        return [r for r in self.records[i] if r.full and (r.dy is not None or r.gram_mc is not None)]

    def update_input_factor(self, i: int, A: torch.Tensor, decay: float) -> bool:
        """A <- (1-decay) A + decay sum_rows a a^T / rows over layer i's full records. False if none."""
        layer = self.layers[i]
        recs = self._input_factor_records(i)
        if not recs:
            return False
        layer.type.update_input_factor(layer, A, [r.a for r in recs], decay, self.tokens)
        return True

    def live_input_columns(self, i: int) -> torch.Tensor | None:
        """The columns of layer i's A that this update's rows can make nonzero (the layer type's
        `live_input_columns`), or None: every column, or records of different input shapes."""
        layer = self.layers[i]
        recs = self._input_factor_records(i)
        if not recs:
            return None
        shape = recs[0].a.shape
        if any(r.a.shape[1:] != shape[1:] for r in recs):
            return None
        return layer.type.live_input_columns(layer, shape, recs[0].a.device)

    def update_input_factor_on_columns(self, i: int, A: torch.Tensor, decay: float,
                                       cols: torch.Tensor) -> torch.Tensor:
        """update_input_factor on the columns `cols` alone, in place (`live_input_columns`: A and the rows are zero
        outside them); returns the block written, A[cols, cols]."""
        layer = self.layers[i]
        recs = self._input_factor_records(i)
        return layer.type.update_input_factor_on_columns(layer, A, [r.a for r in recs], decay, cols)

    def update_output_factor(self, i: int, G: torch.Tensor, decay: float, mc: bool = False,
                             dy_scale: torch.Tensor | None = None) -> bool:
        """G <- (1-decay) G + decay g^T g / N_total, g the per-sample gradient of the summed loss (see module doc).

        `mc`: from the sampled-label Grams (already per-sample gradients of a summed loss, reduced in the hook).
        `dy_scale`: a device scalar multiplying the training output gradients (a GradScaler's 1/scale)."""
        if mc:
            recs = [r for r in self.records[i] if r.full and r.gram_mc is not None]
            if not recs:
                return False
            total = _summed([r.gram_mc for r in recs], G.dtype)
            coef = decay / sum(r.n for r in recs)
            if decay == 1.0:
                G.copy_(total).mul_(coef)
            else:
                G.mul_(1.0 - decay).add_(total, alpha=coef)
            return True
        recs = [r for r in self.records[i] if r.full and r.dy is not None]
        if not recs:
            return False
        n_total = sum(r.n for r in recs)
        layer = self.layers[i]
        rows = [layer.type.output_rows(layer, r.dy, self.tokens) for r in recs]
        scale = 1.0 / n_total if self.loss_reduction == "sum" else float(n_total)
        if dy_scale is not None:
            rows = [dy * dy_scale.to(device=dy.device, dtype=torch.float32) for dy in rows]
        layer.type.update_output_factor(layer, G, rows, decay, scale)
        return True

    def half_batch_grad(self, i: int, dtype: torch.dtype) -> torch.Tensor:
        """S1 = sum over the first halves of every record of dy a^T (reduced by the hooks, arm(half_grads=True)),
        as an out x in matrix [dW | db] in `dtype`."""
        layer = self.layers[i]
        parts = [r.s1 for r in self.done(i) if r.s1 is not None]
        if not parts:
            return torch.zeros(layer.shape, dtype=dtype, device=layer.weight.device)
        return _summed(parts, dtype)


def batch_first(layer: Layer, t: torch.Tensor) -> torch.Tensor:
    """A layer's batched input or output gradient with its samples' dim first (`layer.batch_dim`: 1 for the layers
    of a sequence-first transformer layer, fop._layers.seq_first_modules), as a view; unbatched ones (T x E) as
    they are."""
    return t.movedim(layer.batch_dim, 0) if layer.batch_dim and t.dim() > layer.batch_dim + 1 else t


def attach_forward_hook(layer: Layer, hook: Callable, active: Callable[[], bool],
                        on_skip: Callable[[str], None] | None = None):
    """Run `hook(module, inputs, kwargs, output)` after every forward of `layer`: a forward hook on its module, or,
    for a projection its host applies functionally (nn.MultiheadAttention), on the call fop._attention makes explicit
    while `active()` (`on_skip(reason)` when a call cannot be captured). Returns a handle with remove()."""
    if layer.host is None:
        return layer.module.register_forward_hook(hook, with_kwargs=True)
    module = layer.module

    def call(inputs: tuple, output: torch.Tensor) -> None:
        hook(module, inputs, {}, output)

    return observe_attention(layer.host, {layer.type.projection: call}, active, on_skip)


def remove_handles(handles: list) -> None:
    """Remove hook handles (once: the list is emptied)."""
    for h in handles:
        h.remove()
    handles.clear()


def _summed(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The sum of the per-record statistics `parts` (in order), in `dtype`."""
    total = parts[0].to(dtype)
    for part in parts[1:]:
        total = total + part.to(dtype)
    return total


def sub_batch_grad(layer: Layer, a: torch.Tensor, dy: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sum_samples dy a^T of one layer as an out x in matrix [dW | db] in `dtype` (its type's `sub_batch_grad`)."""
    return layer.type.sub_batch_grad(layer, a, dy, dtype)
