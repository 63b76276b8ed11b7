"""Machinery shared by the curvature optimizers: construction from a model, hyperparameter validation, AMP and
non-finite handling, the SGD-style outer update, and extra state in state_dict.

Subclasses implement `_curvature_step(inv_scale)` (returns {id(param): direction}) and the
`_extra_state` / `_load_extra_state` pair; `CurvatureOptimizer.step` does the rest:

1. GradScaler (`_step_supports_amp_scaling`): the scaler hands `grad_scale` and `found_inf` to the optimizer. A step
   with inf/NaN gradients is skipped before anything changes (parameters, state, counters); otherwise the
   gradients are unscaled in place and the captured output gradients are unscaled by the same factor.
2. Without a scaler and with `check_finite=True` (default) a non-finite gradient raises FloatingPointError and
   nothing changes. The gradient norms are read together with the norms of the new curvature and of the
   directions: one reduction and one host sync per step, the only one in `step()`.
3. The subclass's direction per parameter, computed without changing any state tensor in place (new factors,
   decompositions, moments are new tensors the step rebinds). Any error up to here, or a non-finite new factor or
   direction from finite gradients (FloatingPointError naming it), puts the saved references back: parameters,
   state and counters are exactly as before, and the next good batch trains on (docs/faults.md). A parameter
   without a gradient is skipped as torch's optimizers skip it; a step where none has one does nothing.
4. The commit, the outer update per param group (momentum mu, weight decay wd, learning rate lr; each group's
   values checked before the step): coupled `d <- d + wd p`, or decoupled `p <- (1 - lr wd) p`; `m <- mu m + d`;
   `p <- p - lr m`.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import sys
import warnings
from typing import Callable, Iterable

import torch
from torch import nn

from fop._capture import Capture
from fop._layers import Layer, discover_layers, parameter_map, unsupported_reason, unwrap_model
from fop.distributed import NullComm

logger = logging.getLogger("fop")


# -- hyperparameter validation: each raises ValueError naming the value ----------------------------------------------
def check_float(name: str, value, *, low: float | None = None, high: float | None = None, low_open: bool = False,
                high_open: bool = False) -> float:
    """A finite float in [low, high] (open ends where asked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def check_int(name: str, value, *, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_choice(name: str, value, choices: Iterable) -> object:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_range(name: str, value) -> tuple[float, float]:
    """A (low, high) pair of finite floats with low <= high."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ValueError(f"{name} must be (low, high) with finite low <= high, got {value!r}")
    return (low, high)


def check_schedule(name: str, value, *, low: float = 0.0, low_open: bool = False) -> float | Callable[[int], float]:
    """A float >= low (> low with `low_open`), or a callable of the step count returning one (checked when
    called)."""
    if callable(value):
        return value
    return check_float(name, value, low=low, low_open=low_open)


def eval_schedule(name: str, value, step: int, *, low: float = 0.0, low_open: bool = False) -> float:
    """The value of a constant-or-callable hyperparameter at `step`, validated."""
    return check_float(f"{name}({step})" if callable(value) else name, value(step) if callable(value) else value,
                       low=low, low_open=low_open)


def check_outer_hyperparameters(lr, momentum, weight_decay) -> None:
    check_float("lr", lr, low=0.0)
    check_float("momentum", momentum, low=0.0, high=1.0, high_open=True)
    check_float("weight_decay", weight_decay, low=0.0)


class CurvatureOptimizer(torch.optim.Optimizer):
    """A torch.optim.Optimizer over a model's parameters with curvature hooks on its supported layers.

    Args: `params_or_model` is the model (its parameters are optimized) or an iterable of parameters / param
    groups, in which case `model=` must be given. `exclude`: modules or module names (with everything under
    them) left unpreconditioned. `loss_reduction`: "mean" or "sum", how the loss was reduced over samples
    (sets the scale of the output gradients, see fop._capture). `check_finite`: raise on a non-finite gradient
    (one host sync per step); with a GradScaler such steps are skipped instead. The base runs in one process
    (`NullComm`); each subclass builds its communicator from its `distributed` argument (fop.distributed,
    fop.distributed_rows)."""

    _step_supports_amp_scaling = True
    # param-group hyperparameters checked before every step (check_float limits); subclasses replace it
    group_checks = {"lr": dict(low=0.0), "momentum": dict(low=0.0, high=1.0, high_open=True),
                    "weight_decay": dict(low=0.0)}
    _step_attrs: tuple[str, ...] = ()  # attributes a step may rebind before committing (restored on failure)
    # keys of the per-layer curvature statistics a subclass keeps in layer_state[i] (saved under "curvature")
    layer_state_keys: tuple[str, ...] = ()
    layer_support = staticmethod(unsupported_reason)  # module -> None if preconditioned, else why not

    def __init__(self, params_or_model, defaults: dict, *, model: nn.Module | None = None, exclude=None,
                 loss_reduction: str = "mean", check_finite: bool = True, grad_scaler=None):
        if isinstance(params_or_model, nn.Module):
            if model is not None and model is not params_or_model:
                raise ValueError("pass the model either first or as model=, not two different models")
            model = params_or_model
            params = [p for p in params_or_model.parameters() if p.requires_grad]
        else:
            if model is None:
                raise ValueError(f"{type(self).__name__} needs the model to register its hooks: "
                                 f"{type(self).__name__}(model, ...) or {type(self).__name__}(params, model=model)")
            params = params_or_model
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        check_choice("loss_reduction", loss_reduction, ("mean", "sum"))
        super().__init__(params, defaults)
        self.model = unwrap_model(model)
        optimized = [p for g in self.param_groups for p in g["params"]]
        own = {id(p) for p in self.model.parameters()}
        if optimized and not any(id(p) in own for p in optimized):
            raise ValueError(f"none of the parameters given to {type(self).__name__} belongs to model=; pass the "
                             "model the parameters come from (its layers get the hooks)")
        self.layers, self.skipped = discover_layers(self.model, optimized, exclude, self.layer_support)
        self.param_to_layer = parameter_map(self.layers)
        self.param_names = {id(p): n for n, p in self.model.named_parameters()}
        self.capture = Capture(self.layers, loss_reduction)
        self.layer_state: list[dict] = [{} for _ in self.layers]  # per-layer curvature statistics, layer order
        self.check_finite = bool(check_finite)
        self.grad_scaler = grad_scaler
        self.steps = 0  # completed (not skipped) steps; a host int so schedules never sync
        self.hooks_removed = False
        self._grad_norms: torch.Tensor | None = None  # queued by _prepare_gradients, read by _check_update
        self._to_check: list[tuple[str, torch.Tensor]] = []  # new curvature of the step in progress
        self._undo: list[Callable[[], None]] = []  # in-place changes of the step in progress, undone if it fails
        self.comm = NullComm()  # one process; a subclass builds its own (KFAC: fop.distributed.make_comm)
        self._report_coverage()

    # -- hooks ---------------------------------------------------------------------------------------------------
    def remove_hooks(self) -> None:
        """Remove every hook this optimizer put on the model (as happens when the optimizer is garbage collected:
        the hooks hold it weakly, and at the end of `with FOP(model) as opt:`). step() raises afterwards."""
        self.capture.remove()
        self.comm.remove()
        self.hooks_removed = True

    def __reduce_ex__(self, protocol):
        """copy.copy, copy.deepcopy and pickling (torch.save of the object) are refused with the way that works: the
        optimizer's hooks belong to the model it was built on, and torch's default would make an object without
        them (and, for deepcopy, with copies of the parameters that no model uses)."""
        raise TypeError(f"a {type(self).__name__} cannot be copied or pickled: its forward hooks belong to the model "
                        "it was built on. Save optimizer.state_dict() (torch.save it, or copy.deepcopy it) and load "
                        "it into a new optimizer built on the model with load_state_dict")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove_hooks()

    # -- what is preconditioned ----------------------------------------------------------------------------------
    def preconditioned(self) -> list[str]:
        """One line per preconditioned layer (name, type, geometry, factor sizes), for logging."""
        return [layer.describe() for layer in self.layers]

    def not_preconditioned(self) -> list[tuple[str, str]]:
        """(module name, reason) for every module with parameters that gets the plain outer update."""
        return list(self.skipped)

    def _preconditioned_ids(self) -> set[int]:
        """ids of the parameters that get a curvature preconditioner (FROG: biases only when folded)."""
        return set(self.param_to_layer)

    def coverage(self) -> dict[str, dict[str, float]]:
        """Per module type (the class of the module holding each optimized parameter, in model order) and "total":
        {"preconditioned": entries, "total": entries, "share": preconditioned / total}, counted in parameter
        entries (numel) over this optimizer's parameters."""
        holder = {}
        for m in self.model.modules():
            for p in m._parameters.values():
                if p is not None:
                    holder.setdefault(id(p), type(m).__name__)
        pre = self._preconditioned_ids()
        rows: dict[str, list[int]] = {}
        seen = set()
        for g in self.param_groups:
            for p in g["params"]:
                if id(p) in seen:
                    continue
                seen.add(id(p))
                row = rows.setdefault(holder.get(id(p), "(not in the model)"), [0, 0])
                row[0] += p.numel() if id(p) in pre else 0
                row[1] += p.numel()
        done, total = sum(r[0] for r in rows.values()), sum(r[1] for r in rows.values())
        table = {k: {"preconditioned": a, "total": b, "share": a / b if b else 0.0} for k, (a, b) in rows.items()}
        table["total"] = {"preconditioned": done, "total": total, "share": done / total if total else 0.0}
        return table

    def _report_coverage(self) -> None:
        """Log (INFO) the preconditioned share by module type; warn when it is under half of the parameters."""
        table = self.coverage()
        share = table["total"]["share"]
        parts = ", ".join(f"{k} {v['share']:.0%} of {v['total']}" for k, v in table.items() if k != "total")
        logger.info("%s preconditions %.1f%% of %d parameter entries: %s", type(self).__name__, 100 * share,
                    table["total"]["total"], parts)
        if table["total"]["total"] and share < 0.5:
            uncovered = sorted(((v["total"] - v["preconditioned"], k) for k, v in table.items() if k != "total"),
                               reverse=True)[:3]
            warnings.warn(f"{type(self).__name__} preconditions only {share:.0%} of the parameters; the largest "
                          f"parts left out: {', '.join(f'{k} ({n})' for n, k in uncovered if n)}. See "
                          "optimizer.coverage() and optimizer.not_preconditioned(); the rest gets the optimizer's "
                          "update for non-preconditioned parameters",
                          stacklevel=_caller_level())

    # -- step ------------------------------------------------------------------------------------------------------
    def _params_with_grad(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    def _nonfinite_names(self) -> list[str]:
        return [self.param_names.get(id(p), f"param {i}") for i, p in enumerate(self._params_with_grad())
                if not bool(torch.isfinite(p.grad).all())]

    def _prepare_gradients(self) -> tuple[bool, torch.Tensor | None]:
        """(skip, inv_scale): handle a GradScaler's grad_scale/found_inf; nothing changes when skipping or raising.
        `inv_scale` (a device tensor) unscales captured output gradients. With `check_finite` and no scaler the
        gradient norms are queued here and read with the update's in `_check_update` (one host sync)."""
        self._grad_norms = None
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        if found_inf is not None:
            if bool(found_inf):  # host sync; GradScaler's own step path makes the same one
                return True, None
            grads = [p.grad for p in self._params_with_grad()]
            if grad_scale is not None:
                inv_scale = grad_scale.double().reciprocal().float()
                if grads:
                    torch._foreach_mul_(grads, inv_scale.to(grads[0].device))
                return False, inv_scale
            if self.layers:  # the user called scaler.unscale_(optimizer): .grad is unscaled, the captures are not
                if self.grad_scaler is None:
                    raise RuntimeError(
                        "scaler.unscale_(optimizer) was called before step(): the gradients captured by the hooks are "
                        "still scaled. Pass grad_scaler=scaler to the optimizer so that it can unscale them.")
                return False, self.grad_scaler._get_scale_async().double().reciprocal().float()
            return False, None
        if self.check_finite:
            grads = [p.grad for p in self._params_with_grad()]
            if grads:
                # L2 norms: NaN/inf anywhere makes them non-finite, and they run ~80x faster on CPU than the inf
                # norm; a norm that overflows on finite values is told apart by the exact check before raising.
                self._grad_norms = torch.stack([n.float() for n in torch._foreach_norm(grads, 2)])
        return False, None

    def _check_groups(self) -> None:
        """Every param group's hyperparameters (an LR scheduler or the user may have changed them) are numbers in
        range, so that the outer update, which commits the step, cannot fail part-way."""
        for k, group in enumerate(self.param_groups):
            for key, limits in self.group_checks.items():
                if key not in group:
                    raise ValueError(f"param_groups[{k}] has no {key!r} entry (a scheduler or the user removed it)")
                check_float(f"param_groups[{k}][{key!r}]", group[key], **limits)

    def _check_records(self) -> None:
        """A layer whose captured forward passes hold 0 samples has no statistics: raise before anything changes."""
        if self.capture.unbatched:
            i, shape = next(iter(self.capture.unbatched.items()))
            raise ValueError(f"layer {self.layers[i].name} was called on an input of shape {shape} without a batch "
                             "dimension; the curvature needs one (x.unsqueeze(0)); nothing was changed")
        for i, layer in enumerate(self.layers):
            recs = self.capture.done(i)
            if recs and sum(r.n for r in recs) == 0:
                raise ValueError(f"layer {layer.name} saw a batch of 0 samples in this step's forward/backward; "
                                 "nothing was changed (skip empty batches before the forward pass)")

    def _check_update(self, directions: dict[int, torch.Tensor]) -> None:
        """With `check_finite`: the gradient norms, the new curvature (`self._to_check`) and the directions read in
        one host sync; raise naming what is non-finite (nothing is committed yet)."""
        if not self.check_finite:
            return
        parts = [] if self._grad_norms is None else [self._grad_norms]
        tensors = [t for _, t in self._to_check] + list(directions.values())
        if tensors:
            parts.append(torch.stack([n.float().to(parts[0].device if parts else n.device)
                                      for n in torch._foreach_norm(tensors, 2)]))
        if parts and not bool(torch.isfinite(torch.cat(parts)).all()):  # the one documented host sync of step()
            self._raise_nonfinite(directions)

    def _raise_nonfinite(self, directions: dict[int, torch.Tensor] | None, cause: Exception | None = None) -> None:
        """Raise FloatingPointError naming the first non-finite thing among the gradients, the new curvature and
        the directions (exact checks; only after a failure). Returns when everything is finite."""
        names = self._nonfinite_names()
        if names:
            raise FloatingPointError(
                f"non-finite gradient (NaN or inf) in {', '.join(names)}; nothing was changed. Use "
                "torch.amp.GradScaler to skip such steps, or fix the loss.") from cause
        for what, t in self._to_check:
            if not bool(torch.isfinite(t).all()):
                raise FloatingPointError(
                    f"{what} is non-finite (NaN or inf) although the gradients are finite: the inputs or output "
                    "gradients of this step overflowed it; nothing was changed") from cause
        bad = [self.param_names.get(pid, "a parameter") for pid, d in (directions or {}).items()
               if not bool(torch.isfinite(d).all())]
        if bad:
            raise FloatingPointError(
                f"the update of {', '.join(bad)} is non-finite (NaN or inf) from finite gradients: the curvature "
                "overflowed or the damping is too small for it; nothing was changed") from cause

    def _save_step_state(self):
        """What a step may rebind before it commits: the counters, each parameter's state dict and each layer's
        (shallow) and the subclass's `_step_attrs` (shallow). A step changes a state tensor in place before its
        commit only with a way back in `self._undo` (K-FAC's large conv factors updated on their live columns), so
        running those and putting these references back restores the optimizer exactly."""
        return (self.steps, {p: dict(s) for p, s in self.state.items()}, [dict(s) for s in self.layer_state],
                {a: copy.copy(getattr(self, a)) for a in self._step_attrs})

    def _restore_step_state(self, saved) -> None:
        steps, state, layer_state, attrs = saved
        self.steps = steps
        self.state.clear()
        self.state.update(state)
        self.layer_state = layer_state
        for a, v in attrs.items():
            setattr(self, a, v)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's zero_grad; what the hooks captured of the backward passes since the last step goes with the
        gradients (a backward that raised would otherwise leave some layers' statistics for the next step). A
        forward pass still waiting for its backward is kept: forward, zero_grad, backward is a common order."""
        super().zero_grad(set_to_none)
        self.capture.forget_backward()
        self.comm.forget_backward()

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step (see the class docstring for the update). Transactional: everything new is computed
        and checked first, then committed (the outer update); an error on any rank raises on every rank and leaves
        parameters, state and counters as they were. A step where no parameter has a gradient does nothing."""
        if self.hooks_removed:
            raise RuntimeError(f"{type(self).__name__}.remove_hooks() was called (or its with-block ended): it sees "
                               "no forward pass any more; build a new optimizer (load_state_dict resumes)")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            with self.comm.guard():  # distributed: if one rank raises here, every rank raises
                self._check_groups()
                self._check_records()
                self._validate_before_step()
                skip, inv_scale = self._prepare_gradients()
        except BaseException:
            self._after_skipped_step()
            raise
        if skip or not self._params_with_grad():
            self.comm.end_step()
            self._after_skipped_step()
            return loss
        saved = self._save_step_state()
        self._to_check = []  # (description, tensor): new curvature that _check_update reads with the directions
        self._undo = []
        try:
            with self.comm.agree():
                try:
                    directions = self._curvature_step(inv_scale)
                    self._check_update(directions)
                except Exception as err:
                    if self.check_finite and not isinstance(err, FloatingPointError):
                        self._raise_nonfinite(None, cause=err)
                    raise
        except BaseException:
            for undo in reversed(self._undo):
                undo()
            self._restore_step_state(saved)
            self.comm.end_step(failed=True)
            self._after_skipped_step()
            raise
        finally:
            self._to_check = []
            self._undo = []
        self._outer_update(directions)
        self.steps += 1
        self.comm.end_step()
        self._after_step()
        return loss

    def _validate_before_step(self) -> None:
        """Subclass checks that must raise before anything (gradients included) is modified."""

    def _curvature_step(self, inv_scale: torch.Tensor | None) -> dict[int, torch.Tensor]:
        """{id(param): preconditioned direction} for the preconditioned parameters."""
        raise NotImplementedError

    def _arm(self) -> None:
        """Arm the hooks for the coming forward/backward when the next step needs captures (subclasses decide)."""

    def _after_step(self) -> None:
        """Release the captures and arm the hooks for the next step."""
        self.capture.release()
        self._arm()

    def _after_skipped_step(self) -> None:
        """A skipped step keeps the counters; drop its captures and arm again as for the step that was skipped."""
        settings = self.capture.settings()
        self.capture.release()
        if settings is not None:
            self.capture.arm(**settings)

    def _outer_update(self, directions: dict[int, torch.Tensor]) -> None:
        """Per param group: coupled (d += wd p) or decoupled (p *= 1 - lr wd) weight decay, momentum, p -= lr m."""
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            decoupled = group.get("decoupled", False)
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = directions.get(id(p))
                d = p.grad if d is None else d.to(p.dtype)
                if wd != 0:
                    if decoupled:
                        p.mul_(1 - lr * wd)
                    else:
                        d = d.add(p, alpha=wd)
                if mu != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        state["momentum_buffer"] = buf = d.detach().clone()
                    else:
                        buf.mul_(mu).add_(d)
                    d = buf
                p.add_(d, alpha=-lr)

    # -- extra state -----------------------------------------------------------------------------------------------
    def _extra_state(self) -> dict:
        """The curvature state (saved as `state_dict()["curvature"]`; subclasses extend it): the class, the step
        counter, the preconditioned layers' names and, where the class keeps some, `layer_state` (one dict per
        layer). torch's per-parameter `state` holds the outer update's moments only (docs/design.md, "State")."""
        extra = {"optimizer": type(self).__name__, "steps": self.steps, "layers": [layer.name for layer in self.layers]}
        if self.layer_state_keys:
            extra["layer_state"] = [dict(s) for s in self.layer_state]
        return extra

    def _load_extra_state(self, extra: dict) -> dict:
        """Check `extra` against this optimizer and return {attribute: new value} to assign; change nothing
        (load_state_dict assigns them once everything is checked). Subclasses extend the dict."""
        saved_for = extra.get("optimizer")
        if saved_for is not None and saved_for != type(self).__name__:
            raise ValueError(f"state_dict was saved by {saved_for}, not {type(self).__name__}")
        names = [layer.name for layer in self.layers]
        if extra.get("layers") != names:
            raise ValueError(f"state_dict was saved for preconditioned layers {extra.get('layers')}, "
                             f"but this optimizer preconditions {names}")
        new = {"steps": state_counter(extra, "steps")}
        if self.layer_state_keys:
            new["layer_state"] = self._load_layer_state(extra.get("layer_state"))
        return new

    def _layer_state_shape(self, i: int, key: str) -> tuple[int, ...]:
        """The shape of layer i's `layer_state` tensor `key` (subclasses with layer_state_keys define it)."""
        raise NotImplementedError

    def _load_layer_state(self, saved) -> list[dict]:
        """The saved per-layer statistics checked (one dict per layer, known keys, finite tensors of the expected
        shapes, counters >= 0) and moved to each layer's device, dtype kept; ValueError naming what does not fit."""
        if not isinstance(saved, list) or len(saved) != len(self.layers):
            got = f"{len(saved)} entries" if isinstance(saved, list) else repr(type(saved).__name__)
            raise ValueError(f"state_dict curvature['layer_state'] must hold one dict per preconditioned layer "
                             f"({len(self.layers)}), got {got}")
        out = []
        for i, (layer, entry) in enumerate(zip(self.layers, saved)):
            if not isinstance(entry, dict) or not set(entry) <= set(self.layer_state_keys):
                raise ValueError(f"state_dict layer_state of layer {layer.name} must be a dict with keys among "
                                 f"{self.layer_state_keys}, got {entry!r:.200}")
            loaded = {}
            for key, value in entry.items():
                what = f"state_dict layer_state {key!r} of layer {layer.name}"
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    shape = self._layer_state_shape(i, key)
                    if tuple(value.shape) != shape:
                        raise ValueError(f"{what} has shape {tuple(value.shape)}, expected {shape}")
                    if not bool(torch.isfinite(value).all()):
                        raise ValueError(f"{what} contains non-finite values")
                    loaded[key] = layer_device_tensor(value, layer.weight)
                else:
                    loaded[key] = state_counter(entry, key, what)
            out.append(loaded)
        return out

    def _check_param_state(self, state_dict: dict) -> None:
        """torch's part of a state_dict: groups of matching sizes with valid hyperparameters, and per-parameter
        state of finite tensors (moments shaped like their parameter, step counts >= 0)."""
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or not isinstance(state_dict.get("state"), dict):
            raise ValueError("state_dict has no 'state' dict and 'param_groups' list")
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} param groups, this optimizer {len(self.param_groups)}")
        index = {}
        for k, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if len(saved.get("params", ())) != len(group["params"]):
                raise ValueError(f"param_groups[{k}] of the state_dict has {len(saved.get('params', ()))} "
                                 f"parameters, this optimizer's {len(group['params'])}")
            for key, limits in self.group_checks.items():
                if key in saved:
                    check_float(f"state_dict param_groups[{k}][{key!r}]", saved[key], **limits)
            index.update(zip(saved["params"], group["params"]))
        for pid, entry in state_dict["state"].items():
            p = index.get(pid)
            if p is None or not isinstance(entry, dict):
                raise ValueError(f"state_dict state[{pid!r}] belongs to no parameter of this optimizer")
            name = self.param_names.get(id(p), f"parameter {pid}")
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    if key in ("momentum_buffer", "exp_avg", "graft_sq") and value.shape != p.shape:
                        raise ValueError(f"state_dict {key} of {name} has shape {tuple(value.shape)}, the "
                                         f"parameter {tuple(p.shape)}")
                    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                        raise ValueError(f"state_dict {key} of {name} contains non-finite values")
                elif key in ("step", "graft_step"):
                    state_counter(entry, key, f"state_dict {key} of {name}")

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["curvature"] = self._extra_state()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Atomic: the whole dict is checked against this optimizer (class, layers, shapes, dtypes, counters,
        finite values, inverse method) before anything changes; a mismatch raises ValueError naming it."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        extra = state_dict.pop("curvature", None)
        if not isinstance(extra, dict):
            raise ValueError(f"state_dict has no 'curvature' entry: it was not saved by {type(self).__name__}")
        self._check_param_state(state_dict)
        try:
            new = self._load_extra_state(extra)
        except (KeyError, TypeError, IndexError, AttributeError, RuntimeError) as err:
            raise ValueError(f"state_dict does not fit {type(self).__name__}: {type(err).__name__}: {err}") from err
        super().load_state_dict(state_dict)  # checks its groups before it changes anything
        for attr, value in new.items():
            setattr(self, attr, value)
        self._after_load()

    def _after_load(self) -> None:
        """Drop any captures and arm the hooks for the next step after a load."""
        self.capture.release()
        self._arm()


def _caller_level() -> int:
    """The warnings stacklevel of the first frame outside the fop package (the user's line that built the
    optimizer), counted from the function that calls warnings.warn."""
    here, level, frame = os.path.dirname(os.path.abspath(__file__)), 2, sys._getframe(2)
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == here:
        level, frame = level + 1, frame.f_back
    return level


def state_counter(entry: dict, key: str, what: str | None = None, low: int = 0) -> int:
    """entry[key] as an int >= low (a loaded counter), else ValueError naming it."""
    value = entry[key]
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{what or 'state_dict ' + key} must be an integer >= {low}, got {value!r}")
    return value


GRAFT_BETA2, GRAFT_EPS = 0.999, 1e-8  # the grafted direction's diagonal second moment (Adam's constants)
UNPRECONDITIONED = ("graft", "sgd")  # what the parameters of no preconditioned layer take (docs/optimizers.md)


def graft_denominator(state: dict, grad: torch.Tensor) -> torch.Tensor:
    """sqrt(v / (1 - b2^t)) + 1e-8 with v <- b2 v + (1 - b2) g^2 (b2 = 0.999): the Adam-like denominator of a grafted
    direction, in at least float32. `state["graft_sq"]` (v) and `state["graft_step"]` (t) are rebound to new
    values, never changed in place, so that a step that fails leaves them as they were."""
    g = grad.to(torch.promote_types(grad.dtype, torch.float32))
    t = state.get("graft_step", 0) + 1
    b2 = GRAFT_BETA2
    sq = g.square().mul_(1 - b2) if t == 1 else state["graft_sq"].mul(b2).addcmul_(g, g, value=1 - b2)
    state["graft_sq"], state["graft_step"] = sq, t
    return (sq / (1 - b2 ** t)).sqrt_().add_(GRAFT_EPS)


def stack_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a_j, b_j> for each entry j of two (B, ...) stacks: torch.linalg.vecdot over the flattened stacks, or, for
    entries of 2^16 elements or more, one BLAS dot per entry (vecdot forms a * b first there: 8x slower on a (3, 512,
    4608) stack; on many small entries, a depthwise conv's blocks, one call per entry costs more than it saves)."""
    if a[0].numel() < 1 << 16:
        return torch.linalg.vecdot(a.flatten(1), b.flatten(1))
    return torch.stack([torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b)])


def rms_per_entry(tensors: list[torch.Tensor]) -> torch.Tensor:
    """s = sqrt(sum_l ||t_l||^2 / sum_l numel(t_l)) over `tensors` (the step's preconditioned directions), a 0-d
    float64 device tensor: the scale a grafted direction is given."""
    norms = torch.stack([n.double() for n in torch._foreach_norm(tensors)])
    return torch.linalg.vector_norm(norms) / math.sqrt(sum(t.numel() for t in tensors))


def grafted_direction(state: dict, grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """g / (sqrt(v^) + 1e-8) * scale in g's dtype (`graft_denominator`, which rebinds the state's second moment)."""
    denom = graft_denominator(state, grad)
    return (grad.to(denom.dtype) / denom).mul_(scale.to(denom.device)).to(grad.dtype)


def layer_device_tensor(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A loaded state tensor moved to the device of `like`, dtype kept (bit-identical resume)."""
    return t.detach().to(device=like.device).clone()


__all__ = ["CurvatureOptimizer", "Layer", "check_choice", "check_float", "check_int", "check_range",
           "check_schedule", "eval_schedule", "check_outer_hyperparameters", "grafted_direction", "layer_device_tensor",
           "logger", "rms_per_entry", "state_counter"]
