"""Input checks shared by the public ops: each raises an error naming the argument and the problem."""

from __future__ import annotations

import math
import operator
from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def tensor(name: str, t, *, ndim: int | None = None, dtypes: Iterable[torch.dtype] = FLOAT_DTYPES,
           device: torch.device | None = None) -> torch.Tensor:
    """Check that `t` is a tensor of an allowed dtype, rank and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dtypes = tuple(dtypes)
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has unsupported dtype {t.dtype}; expected one of {list(dtypes)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} is on {t.device}, expected {device} like the other inputs")
    return t


def shape(name: str, t: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(expected)}")


def finite(name: str, t: torch.Tensor) -> None:
    """Raise if `t` holds NaN or inf (one reduction; a host sync, so only on inputs that would poison state)."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def tensor_list(name: str, ts, *, ndim: int | None = None, dtypes: Iterable[torch.dtype] = FLOAT_DTYPES,
                allow_empty: bool = False) -> list[torch.Tensor]:
    """Check a list of tensors; errors name the offending index as `name[i]`."""
    if isinstance(ts, torch.Tensor) or not isinstance(ts, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(ts).__name__}")
    if not ts and not allow_empty:
        raise ValueError(f"{name} is empty; expected at least one tensor")
    out = [tensor(f"{name}[{i}]", t, ndim=ndim, dtypes=dtypes) for i, t in enumerate(ts)]
    if out:
        dev = out[0].device
        for i, t in enumerate(out):
            if t.device != dev:
                raise ValueError(f"{name}[{i}] is on {t.device}, but {name}[0] is on {dev}")
    return out


def unit_interval(name: str, x) -> float:
    x = float(x)
    if not (0.0 <= x <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {x}")
    return x


def damping(name: str, x, *, dtypes: Iterable[torch.dtype] = FLOAT_DTYPES, device: torch.device | None = None):
    """The damping of an op, the same check for every backend: a finite number >= 0, or a 0-d floating tensor
    (on `device` when given) holding one. A CPU tensor's value is read (CPU memory, no device sync); a device
    tensor's is not, so that no op syncs the host."""
    if isinstance(x, torch.Tensor):
        tensor(name, x, ndim=0, dtypes=dtypes, device=device)
        if x.device.type == "cpu":
            value = float(x)
            if not (value >= 0.0) or math.isinf(value):
                raise ValueError(f"{name} must be a finite value >= 0, got {value}")
        return x
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(x).__name__}")
    x = float(x)
    if not (x >= 0.0) or math.isinf(x):
        raise ValueError(f"{name} must be a finite value >= 0, got {x}")
    return x


def integer(name: str, x, low: int = 0) -> int:
    """An integer (a Python or numpy int, not a float or a string) >= low."""
    if isinstance(x, bool):
        raise TypeError(f"{name} must be an integer, got {x!r}")
    try:
        value = operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {x!r}") from None
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def nonnegative_float(name: str, x) -> float:
    """A finite number >= 0 (not a string)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a number, got {x!r}")
    x = float(x)
    if not (x >= 0.0) or math.isinf(x):
        raise ValueError(f"{name} must be >= 0 and finite, got {x}")
    return x


def positive_int(name: str, x) -> int:
    return integer(name, x, low=1)
