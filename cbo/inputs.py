"""Where tensors enter and leave cbo: parameter values checked, broadcast over a batch, returned like the input.

Shared by :func:`cbo.hypergrad`, :class:`cbo.ArgminLayer` and :func:`cbo.minimize`,
so that every entry point checks shapes and finiteness the same way and
returns results in the caller's dtype and on the caller's device.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Sequence

import numpy as np
import torch

__all__ = ["as_parameter_tensors", "broadcast_inputs", "check_finite", "like_input", "timed", "item_names"]


def as_parameter_tensors(problem, x) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Validate x against ``problem.parameters``; return float64 copies and the originals.

    Raises ValueError for a wrong count, a wrong shape, or non-finite values.
    """
    values = list(x) if isinstance(x, (list, tuple)) else [x]
    if len(values) != len(problem.parameters):
        raise ValueError(
            f"Got {len(values)} parameter value(s) for {len(problem.parameters)} parameter(s) "
            f"{[p.name() for p in problem.parameters]}: pass one tensor per parameter, in that order."
        )
    originals = [v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v, dtype=float)) for v in values]
    device = originals[0].device
    xs = []
    for param, value in zip(problem.parameters, originals):
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(
                f"Parameter {param.name()} has shape {tuple(param.shape)}, but the value given has shape "
                f"{tuple(value.shape)}. Pass a tensor of shape {tuple(param.shape)}."
            )
        if not value.is_floating_point() and value.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"Parameter {param.name()}: expected a real tensor, got dtype {value.dtype}.")
        check_finite(param, value)
        xs.append(value.detach().to(device=device, dtype=torch.float64))
    return xs, originals


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
                f"Input for parameter {param.name()} has shape {tuple(t.shape)}; expected {tuple(param.shape)} "
                f"or (*batch, {', '.join(map(str, param.shape))})."
            )
        batch_shapes.append(tuple(t.shape[: t.dim() - param.ndim]))
        check_finite(param, t)
    try:
        batch_shape = torch.broadcast_shapes(*batch_shapes)
    except RuntimeError as err:
        described = ", ".join(f"{p.name()}: {s}" for p, s in zip(problem.parameters, batch_shapes))
        raise ValueError(f"The inputs' batch shapes do not broadcast ({described}).") from err
    batch = int(torch.Size(batch_shape).numel())
    flat = [t.detach().to(device=device, dtype=torch.float64).expand(torch.Size([*batch_shape, *p.shape]))
            .reshape(batch, *p.shape) for p, t in zip(problem.parameters, tensors)]
    return flat, tuple(batch_shape)


def check_finite(param, value: torch.Tensor) -> None:
    """Raise ValueError naming ``param`` if ``value`` has NaN or infinite entries."""
    if not bool(torch.isfinite(value).all()):
        raise ValueError(
            f"Parameter {param.name()} contains NaN or infinite entries; the inner problem is not "
            "defined there. Check the outer iterate (a diverging outer step size is a common cause)."
        )


def like_input(tensors, x, like):
    """``tensors`` (one per parameter) typed and placed like the inputs ``like``; one tensor if ``x`` was one."""
    tensors = [t.detach().to(dtype=o.dtype, device=o.device) for t, o in zip(tensors, like)]
    return tensors[0] if len(like) == 1 and not isinstance(x, (list, tuple)) else tensors


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
