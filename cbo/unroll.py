r"""Hypergradients through a fixed-point map: implicit and unrolled methods.

The inner problem is given by a torch map Phi (an optimizer step, a layer
update, ...) with fixed point w*(lam) = Phi(w*(lam), lam), and an outer
objective E(w, lam). With A = dPhi/dw and B = dPhi/dlam at (w, lam):

* implicit methods (at w*): dE/dlam = d_lam E + B^T v with (I - A^T) v = d_w E,
  solved by fixed-point iteration v <- A^T v + d_w E ("fixed_point"), its
  truncated series ("neumann", ``steps`` terms), or CG when A is symmetric
  ("cg");
* unrolled methods through T = ``steps`` applications w_{t+1} = Phi(w_t, lam)
  from w_0 (Franceschi et al. 2017; Shaban et al. 2018): reverse mode ("reverse", RMD: h_{t-1} = h_t + B_t^T a_t,
  a_{t-1} = A_t^T a_t, memory O(M T)), truncated reverse mode ("truncated",
  K-RMD: back-propagation through the last K = ``truncate`` steps only, memory
  O(M K), bias decaying geometrically in K), and forward mode ("forward", FMD:
  Z_{t+1} = A_{t+1} Z_t + B_{t+1}, no stored trajectory, cost x dim(lam)).

All methods share one operator: products with A^T and B^T by autograd on the
graph of Phi; the methods differ only in how they use it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.func import jvp, vmap

from .linsolve import cg

__all__ = ["fixed_point_hypergrad", "UnrollInfo", "IMPLICIT_METHODS", "ITERATIVE_METHODS"]

FixedPointMap = Callable[[torch.Tensor, Sequence[torch.Tensor]], torch.Tensor]
OuterObjective = Callable[[torch.Tensor, Sequence[torch.Tensor]], torch.Tensor]


@dataclass
class UnrollInfo:
    """Diagnostics of :func:`fixed_point_hypergrad`.

    ``iterations``: fixed-point/CG iterations or series terms (implicit methods),
    steps of Phi (unrolled methods); ``residual``: ||(I - A^T) v - d_w E|| /
    ||d_w E|| for the implicit methods, ||Phi(w_T) - w_T|| for the unrolled ones.
    """

    method: str
    iterations: int
    residual: float
    seconds: float
    extra: dict = field(default_factory=dict)


class FixedPointOperator:
    """Products with A^T = (dPhi/dw)^T and B^T = (dPhi/dlam)^T at one point (w, lam)."""

    def __init__(self, phi: FixedPointMap, w: torch.Tensor, params: Sequence[torch.Tensor]):
        self.w = w.detach().requires_grad_(True)
        self.params = [p.detach().requires_grad_(True) for p in params]
        with torch.enable_grad():
            self.out = phi(self.w, self.params)

    def transpose_w(self, v: torch.Tensor) -> torch.Tensor:
        """A^T v."""
        (g,) = torch.autograd.grad(self.out, self.w, v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(v) if g is None else g

    def transpose_params(self, v: torch.Tensor) -> list[torch.Tensor]:
        """B^T v, one tensor per parameter."""
        grads = torch.autograd.grad(self.out, self.params, v, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]


def _outer_gradients(outer: OuterObjective, w: torch.Tensor, params: Sequence[torch.Tensor]):
    """(d_w E, [d_lam E]) at (w, lam)."""
    w = w.detach().requires_grad_(True)
    params = [p.detach().requires_grad_(True) for p in params]
    with torch.enable_grad():
        E = outer(w, params)
        grads = torch.autograd.grad(E, [w, *params], allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip([w, *params], grads)]
    return grads[0], grads[1:]


# ---------------------------------------------------------------- implicit methods

def _fixed_point_adjoint(op: FixedPointOperator, b: torch.Tensor, tol: float, maxiter: int):
    """v <- A^T v + b until the update is below tol ||v||; the Neumann partial sums from v = 0."""
    v = torch.zeros_like(b)
    for iteration in range(1, maxiter + 1):
        new = op.transpose_w(v) + b
        change = float((new - v).norm())
        v = new
        if change <= tol * float(v.norm()):
            return v, iteration
    return v, maxiter


def _neumann_adjoint(op: FixedPointOperator, b: torch.Tensor, terms: int):
    """v = sum_{k<terms} (A^T)^k b."""
    v, term = b.clone(), b
    for _ in range(terms - 1):
        term = op.transpose_w(term)
        v = v + term
    return v, terms


def _cg_adjoint(op: FixedPointOperator, b: torch.Tensor, tol: float, maxiter: int):
    """CG on (I - A^T) v = b: sound when A is symmetric with eigenvalues below 1 (Phi a
    gradient step of a smooth strongly convex function with a small enough step)."""
    flat = b.reshape(1, -1)
    v, iterations = cg(lambda u: u - op.transpose_w(u.reshape(b.shape)).reshape(1, -1), flat, tol=tol,
                       maxiter=maxiter)
    return v.reshape(b.shape), iterations


def _implicit(phi, w_star, params, outer, method, steps, tol, maxiter):
    op = FixedPointOperator(phi, w_star, params)
    dE_dw, dE_dparams = _outer_gradients(outer, w_star, params)
    if method == "fixed_point":
        v, iterations = _fixed_point_adjoint(op, dE_dw, tol, maxiter)
    elif method == "neumann":
        v, iterations = _neumann_adjoint(op, dE_dw, steps)
    else:
        v, iterations = _cg_adjoint(op, dE_dw, tol, maxiter)
    residual = float((v - op.transpose_w(v) - dE_dw).norm() / dE_dw.norm().clamp_min(1e-300))
    grads = [g + h for g, h in zip(dE_dparams, op.transpose_params(v))]
    return grads, iterations, residual


# ---------------------------------------------------------------- unrolled methods

def _unrolled_reverse(phi, w0, params, outer, steps: int, truncate: int):
    """Reverse mode through the last ``truncate`` of ``steps`` applications of Phi."""
    params = [p.detach().requires_grad_(True) for p in params]
    w = w0.detach()
    with torch.no_grad():
        for _ in range(steps - truncate):
            w = phi(w, params)
    with torch.enable_grad():
        for _ in range(truncate):
            w = phi(w, params)
        E = outer(w, params)
        grads = torch.autograd.grad(E, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return grads, w.detach()


def _unrolled_forward(phi, w0, params, outer, steps: int):
    """Forward mode: Z_{t+1} = A_{t+1} Z_t + B_{t+1}, one tangent per entry of lam, no trajectory stored."""
    sizes = [p.numel() for p in params]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def unflatten(v):
        return [t.reshape(p.shape) for t, p in zip(torch.split(v, sizes), params)]

    def step(w, lam):
        return phi(w, unflatten(lam))

    w = w0.detach()
    Z = torch.zeros(flat.numel(), *w.shape, dtype=w.dtype, device=w.device)
    basis = torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device)
    with torch.no_grad():
        for _ in range(steps):
            Z = vmap(lambda z, e: jvp(step, (w, flat), (z, e))[1])(Z, basis)
            w = step(w, flat)
    dE_dw, dE_dparams = _outer_gradients(outer, w, params)
    total = torch.cat([g.reshape(-1) for g in dE_dparams]) + Z.reshape(flat.numel(), -1) @ dE_dw.reshape(-1)
    return unflatten(total), w


IMPLICIT_METHODS = ("fixed_point", "cg", "neumann")
ITERATIVE_METHODS = ("reverse", "truncated", "forward")


def fixed_point_hypergrad(
    phi: FixedPointMap,
    w_star: torch.Tensor,
    params: Sequence[torch.Tensor],
    outer: OuterObjective,
    method: str = "fixed_point",
    *,
    steps: int = 100,
    truncate: int | None = None,
    w0: torch.Tensor | None = None,
    tol: float = 1e-10,
    maxiter: int = 10000,
    return_info: bool = False,
):
    r"""dE/dlam for the fixed point w*(lam) = Phi(w*(lam), lam) of a torch map.

    Parameters
    ----------
    phi : callable ``phi(w, params) -> w``
        The fixed-point map, e.g. a gradient step ``w - a * grad_w g(w, params)``.
        Must be written in torch operations (``torch.func`` transforms it for "forward").
    w_star : tensor
        The fixed point (implicit methods), or where the unrolled methods end up.
    params : list of tensors
        The outer variables lam.
    outer : callable ``outer(w, params) -> scalar``
        The outer objective E.
    method : {"fixed_point", "cg", "neumann", "reverse", "truncated", "forward"}
        See the module docstring.
    steps : int
        Terms of the Neumann series; steps T of Phi for the unrolled methods.
    truncate : int, optional
        K for "truncated": back-propagate through the last K of the T steps.
    w0 : tensor, optional
        Start of the unrolled methods (default ``w_star``; it must not depend on lam).
    tol : float
        Tolerance of "fixed_point" and "cg".
    maxiter : int
        Iteration cap of "fixed_point" and "cg".

    Returns
    -------
    list of tensors (one per parameter), and a :class:`UnrollInfo` if ``return_info``.
    """
    if method not in IMPLICIT_METHODS + ITERATIVE_METHODS:
        raise ValueError(f"Unknown method {method!r}. Known methods: {', '.join(IMPLICIT_METHODS + ITERATIVE_METHODS)}.")
    if steps < 1:
        raise ValueError(f"steps must be a positive number of iterations, got {steps}.")
    params = list(params)
    start = time.perf_counter()
    extra: dict = {}
    if method in IMPLICIT_METHODS:
        grads, iterations, residual = _implicit(phi, w_star, params, outer, method, steps, tol, maxiter)
    else:
        w0 = w_star if w0 is None else w0
        if method == "forward":
            grads, w_T = _unrolled_forward(phi, w0, params, outer, steps)
        else:
            K = steps if method == "reverse" else truncate
            if K is None or not 1 <= K <= steps:
                raise ValueError(f"truncate must be between 1 and steps={steps} for method='truncated', got {K}.")
            grads, w_T = _unrolled_reverse(phi, w0, params, outer, steps, K)
            extra["truncate"] = K
        iterations = steps
        with torch.no_grad():
            residual = float((phi(w_T, params) - w_T).norm())
    grads = [g.detach() for g in grads]
    if not return_info:
        return grads
    return grads, UnrollInfo(method, iterations, residual, time.perf_counter() - start, extra)
