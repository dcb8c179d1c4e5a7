"""Where tensors enter and leave cbo: parameter values checked, broadcast over a batch, returned like the input.

Shared by :func:`cbo.hypergrad`, :class:`cbo.ArgminLayer` and :func:`cbo.minimize`,
so that every entry point checks shapes and finiteness the same way and
returns results in the caller's dtype and on the caller's device.

Two conventions hold at every entry point:

* **Integer and bool input** is promoted: the computation runs in float64
  and results (gradients, layer outputs) are float64, never truncated to the
  input's integer dtype. Floating-point input keeps its dtype.
* **Symmetric matrix parameters** (``cp.Parameter((n, n), symmetric=True)``,
  ``PSD=True`` or ``NSD=True``) take the symmetric part of their value,

      sym(X) = (X + X^T) / 2,

  so the map is X -> f(sym(X)), defined for every square X; its gradient is
  sym(grad f), the gradient of the symmetric function, and a perturbation
  that breaks symmetry (``torch.autograd.gradcheck``) is well defined.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Sequence

import numpy as np
import torch

from .errors import NoneInputError

__all__ = ["as_parameter_tensors", "broadcast_inputs", "check_finite", "is_symmetric", "layer_inputs",
           "like_input", "result_dtype", "symmetric_part", "timed", "item_names"]

_SYMMETRIC_ATTRIBUTES = ("symmetric", "PSD", "NSD")


def as_parameter_tensors(problem, x) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Validate x against ``problem.parameters``; return float64 copies (symmetric parameters at their
    symmetric part) and the originals.

    Raises ValueError for a wrong count, a wrong shape, or non-finite values,
    TypeError for a missing (None) or complex value.
    """
    values = list(x) if isinstance(x, (list, tuple)) else [x]
    if len(values) != len(problem.parameters):
        raise ValueError(
            f"Got {len(values)} parameter value(s) for {len(problem.parameters)} parameter(s) "
            f"{[p.name() for p in problem.parameters]}: pass one tensor per parameter, in that order."
        )
    originals = [_as_real_tensor(param, v) for param, v in zip(problem.parameters, values)]
    device = originals[0].device
    xs = []
    for param, value in zip(problem.parameters, originals):
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(
                f"Parameter {param.name()} has shape {tuple(param.shape)}, but the value given has shape "
                f"{tuple(value.shape)}. Pass a tensor of shape {tuple(param.shape)}."
            )
        check_finite(param, value)
        xs.append(symmetric_part(param, value.detach().to(device=device, dtype=torch.float64)))
    return xs, originals


def layer_inputs(parameters, inputs: Sequence) -> list[torch.Tensor]:
    """The inputs of :class:`cbo.ArgminLayer` as tensors (numpy arrays and floats as float64), each
    symmetric parameter's at its symmetric part, through torch operations (so autograd returns the
    gradient of the symmetric function). Raises TypeError for a None or complex input."""
    return [symmetric_part(param, _as_real_tensor(param, t)) for param, t in zip(parameters, inputs)]


def broadcast_inputs(problem, inputs: Sequence[torch.Tensor]):
    """Inputs as float64 (B, *shape) tensors, and the common batch shape.

    Each input is shaped like its parameter or has leading batch dimensions;
    the batch dimensions of all inputs broadcast to one batch shape.
    """
    tensors = [torch.as_tensor(t) for t in inputs]
    device = tensors[0].device
    batch_shapes = []
    for param, t in zip(problem.parameters, tensors):
        if t.dim() < param.ndim or tuple(t.shape[t.dim() - param.ndim:]) != tuple(param.shape):
            raise ValueError(
                f"Invalid parameter shape: the input for parameter {param.name()} has shape {tuple(t.shape)}; "
                f"expected {tuple(param.shape)} or (*batch, {', '.join(map(str, param.shape))})."
            )
        batch_shapes.append(tuple(t.shape[: t.dim() - param.ndim]))
        check_finite(param, t)
    try:
        batch_shape = torch.broadcast_shapes(*batch_shapes)
    except RuntimeError as err:
        described = ", ".join(f"{p.name()}: {s}" for p, s in zip(problem.parameters, batch_shapes))
        raise ValueError(f"Inconsistent batch sizes: the inputs' batch shapes do not broadcast ({described}).") \
            from err
    batch = int(torch.Size(batch_shape).numel())
    flat = [t.detach().to(device=device, dtype=torch.float64).expand(torch.Size([*batch_shape, *p.shape]))
            .reshape(batch, *p.shape) for p, t in zip(problem.parameters, tensors)]
    return flat, tuple(batch_shape)


def is_symmetric(param) -> bool:
    """Whether the cvxpy parameter is declared ``symmetric``, ``PSD`` or ``NSD``."""
    return any(param.attributes.get(a) for a in _SYMMETRIC_ATTRIBUTES)


def symmetric_part(param, value: torch.Tensor) -> torch.Tensor:
    """sym(X) = (X + X^T) / 2 over the last two dimensions for a parameter declared ``symmetric``,
    ``PSD`` or ``NSD``; ``value`` itself otherwise. Exactly symmetric in floating point (a + b = b + a)."""
    if not is_symmetric(param):
        return value
    return (value + value.transpose(-1, -2)) / 2


# Input dtypes whose finiteness check_finite reads through numpy (torch.Tensor.numpy() refuses bfloat16).
_NUMPY_DTYPES = (torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.bool)


def check_finite(param, value: torch.Tensor) -> None:
    """Raise ValueError naming ``param`` if ``value`` has NaN or infinite entries."""
    if value.device.type == "cpu" and value.dtype in _NUMPY_DTYPES:  # numpy: a fifth of torch's per-call cost
        finite = np.isfinite(value.detach().numpy()).all()
    else:  # a GPU tensor, or a dtype numpy does not have (bfloat16)
        finite = torch.isfinite(value).all()
    if not bool(finite):
        raise ValueError(
            f"Parameter {param.name()} contains NaN or infinite entries; the inner problem is not "
            "defined there. Check the outer iterate (a diverging outer step size is a common cause)."
        )


def result_dtype(like: torch.Tensor) -> torch.dtype:
    """The dtype of results for input ``like``: its own if floating point, else (integer, bool) float64."""
    return like.dtype if like.is_floating_point() else torch.float64


def like_input(tensors, x, like, parameters=None):
    """``tensors`` (one per parameter) typed (:func:`result_dtype`) and placed like the inputs ``like``;
    one tensor if ``x`` was one. With ``parameters``, the gradients of symmetric ones are symmetrized:
    the gradient of X -> f(sym(X))."""
    parameters = parameters or [None] * len(like)
    tensors = [t.detach() if p is None else symmetric_part(p, t.detach()) for t, p in zip(tensors, parameters)]
    tensors = [t.to(dtype=result_dtype(o), device=o.device) for t, o in zip(tensors, like)]
    return tensors[0] if len(like) == 1 and not isinstance(x, (list, tuple)) else tensors


def _as_real_tensor(param, value) -> torch.Tensor:
    """``value`` as a tensor (numpy arrays and numbers as float64); TypeError naming ``param`` for None
    or complex values."""
    if value is None:
        raise NoneInputError(f"The value of parameter {param.name()} is None: pass a tensor of shape "
                             f"{tuple(param.shape)} (or with leading batch dimensions, for ArgminLayer).")
    if not isinstance(value, torch.Tensor):
        array = np.asarray(value)
        value = torch.as_tensor(array if array.dtype.kind == "c" else array.astype(float))
    if value.is_complex():
        raise TypeError(f"Parameter {param.name()}: expected a real tensor, got dtype {value.dtype}. cbo "
                        "differentiates real parameters: pass the real and imaginary parts as two parameters.")
    return value


@contextmanager
def timed(timings: dict, phase: str):
    """Add the seconds spent in the block to ``timings[phase]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - start


def item_names(batch_shape: tuple):
    """batch item b -> 'batch item (i, j): ' in the caller's batch shape."""
    def where(b: int) -> str:
        if len(batch_shape) <= 1:
            return f"batch item {b}: "
        return f"batch item {tuple(int(i) for i in torch.unravel_index(torch.tensor(b), batch_shape))}: "
    return where
