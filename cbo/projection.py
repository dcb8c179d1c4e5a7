r"""Euclidean projection onto the outer constraint set of :func:`cbo.minimize`.

    P_C(v) = argmin_{z in C} ||z - v||^2,   C = {x : outer constraints}

The constraints are cvxpy constraints written on the problem's
``cp.Parameter`` objects; each parameter becomes a variable z of its shape and
the projection is a small cvxpy problem compiled once (the point v enters as a
parameter). When C is a box lo <= z <= hi, possibly with a fixed sum
sum(z) = total (the simplex, a budget), no solver runs: the projection is the
shifted clip

    P_C(v) = clip(v - tau, lo, hi),   sum(clip(v - tau, lo, hi)) = total

(tau = 0 without a sum), the KKT conditions of the projection with tau the
multiplier of the sum.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import cvxpy as cp
import numpy as np
import torch

from .errors import ProblemDefinitionError
from .reformulate import substitute

__all__ = ["OuterProjection"]

PROJECTION_QP_SOLVER = {"solver": "OSQP", "polishing": True, "eps_abs": 1e-10, "eps_rel": 1e-10, "max_iter": 20_000}
PROJECTION_CONIC_SOLVER = {"solver": "CLARABEL", "tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10}
FEASIBILITY_TOL = 1e-12  # a point violating no outer constraint by more than this is its own projection
_SOLVED = (cp.OPTIMAL, cp.OPTIMAL_INACCURATE)
_INFEASIBLE = (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE)

# (lower, upper, total) bounds of one variable: lower <= z <= upper and, unless total is None, sum(z) = total.
BoxAndSum = tuple[np.ndarray, np.ndarray, float | None]


class OuterProjection:
    r"""Euclidean projection onto the outer constraints, P_C(v) = argmin_{z in C} ||z - v||^2.

    The constraints are written on the problem's ``cp.Parameter`` objects; each
    parameter is replaced by a variable z of its shape, and the projection is
    compiled once by cvxpy (the point v enters as a parameter). A parameter
    declared ``nonneg=True`` (``nonpos=True``) adds z >= 0 (z <= 0).

    Raises
    ------
    ProblemDefinitionError
        If a constraint involves an inner variable, none of the parameters, or
        is not DCP once the parameters become variables; or, when called, if
        the constraints are infeasible.
    """

    def __init__(self, parameters: Sequence[cp.Parameter], constraints: Sequence[cp.Constraint]):
        self.constraints = list(constraints) + _sign_constraints(parameters)
        self._signs = [(p.is_nonneg(), p.is_nonpos()) for p in parameters]
        self._shapes = [p.shape for p in parameters]
        if not self.constraints:
            self._problem = None
            return
        self._points = [cp.Parameter(p.shape) for p in parameters]
        self._projected = [cp.Variable(p.shape, name=f"{p.name()}_projected") for p in parameters]
        substitution = {p.id: z for p, z in zip(parameters, self._projected)}
        rewritten = [_rewrite_outer_constraint(c, i, parameters, substitution) for i, c in enumerate(self.constraints)]
        distance = sum(cp.sum_squares(z - v) for z, v in zip(self._projected, self._points))
        self._problem = cp.Problem(cp.Minimize(distance), rewritten)
        self._box_and_sum = _box_and_sum(self._projected, rewritten)
        # An interior-point solution of a projection that lands on a bound is off by about
        # sqrt(tolerance) there (z_i s_i = mu): OSQP's polish finds the exact face of a QP.
        # Clarabel is the fallback when OSQP stops short.
        self._solvers = [PROJECTION_QP_SOLVER, PROJECTION_CONIC_SOLVER] if self._problem.is_qp() \
            else [PROJECTION_CONIC_SOLVER]

    def __call__(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """P_C(xs), as tensors like ``xs``; a point of C is returned as it is."""
        if self._problem is None:
            return xs
        values = [x.detach().cpu().numpy() for x in xs]
        if self._contains(values):
            return xs
        if self._box_and_sum is not None:
            projected = [_project_box_and_sum(v, *part) for v, part in zip(values, self._box_and_sum)]
        else:
            projected = self._solve(values)
        return [torch.as_tensor(np.asarray(v, dtype=float), dtype=x.dtype, device=x.device).reshape(x.shape)
                for v, x in zip(projected, xs)]

    def box(self) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
        """(lower, upper) bounds per parameter if C is a box lo <= x <= hi (infinite entries where a side is
        free; C = everything without constraints), else None (C has a sum or a constraint other than a bound)."""
        if self._problem is None:
            return [np.full(s, -np.inf) for s in self._shapes], [np.full(s, np.inf) for s in self._shapes]
        if self._box_and_sum is None or any(total is not None for _, _, total in self._box_and_sum):
            return None
        return [lo for lo, _, _ in self._box_and_sum], [hi for _, hi, _ in self._box_and_sum]

    def _contains(self, values: list[np.ndarray]) -> bool:
        """v in C: no constraint is violated by more than FEASIBILITY_TOL at z = v."""
        for z, value in zip(self._projected, values):
            z.value = value
        return all(np.all(c.violation() <= FEASIBILITY_TOL) for c in self._problem.constraints)

    def _solve(self, values: list[np.ndarray]) -> list[np.ndarray]:
        """argmin_{z in C} ||z - v||^2 by the compiled cvxpy problem, clipped to the parameters' signs."""
        for point, value in zip(self._points, values):
            point.value = value
        for solver in self._solvers:
            with warnings.catch_warnings():  # the status is checked below
                warnings.filterwarnings("ignore", message="Solution may be inaccurate.*")
                try:
                    self._problem.solve(**solver)
                except cp.error.SolverError:
                    continue
            if self._problem.status in _SOLVED + _INFEASIBLE:
                break
        if self._problem.status in _INFEASIBLE:
            raise ProblemDefinitionError(
                "The outer constraints are infeasible: no x satisfies "
                f"{'; '.join(str(c) for c in self.constraints)}. Check their bounds and signs."
            )
        if self._problem.status not in _SOLVED:
            raise ProblemDefinitionError(f"Projecting x onto the outer constraints failed (cvxpy status "
                                         f"{self._problem.status!r}). Simplify the constraints or rescale x.")
        return [_clip_to_sign(z.value, *sign) for z, sign in zip(self._projected, self._signs)]


def _clip_to_sign(value: np.ndarray, nonneg: bool, nonpos: bool) -> np.ndarray:
    """max(value, 0) if nonneg, min(value, 0) if nonpos: solver round-off must not step outside a sign
    attribute (cvxpy rejects -1e-9 for a parameter declared nonneg=True)."""
    return np.clip(value, 0 if nonneg else None, 0 if nonpos else None) if nonneg or nonpos else value


def _box_and_sum(variables: Sequence[cp.Variable], constraints: Sequence[cp.Constraint]) -> list[BoxAndSum] | None:
    """(lower, upper, total) per variable if every constraint is a bound ``z <= c`` / ``c <= z`` with c
    constant (broadcast to z's shape) or ``cp.sum(z) == c`` (total None without one), else None
    (also when the bounds are infeasible: the solver path reports that)."""
    parts = {v.id: [np.full(v.shape, -np.inf), np.full(v.shape, np.inf), None] for v in variables}
    for c in constraints:
        if isinstance(c, cp.constraints.Equality):
            known = _add_sum(parts, *c.args)
        elif isinstance(c, cp.constraints.Inequality):
            known = _add_bound(parts, *c.args)
        else:
            known = False
        if not known:
            return None
    for lo, hi, total in parts.values():
        if np.any(lo > hi) or (total is not None and not lo.sum() <= total <= hi.sum()):
            return None
    return [tuple(parts[v.id]) for v in variables]


def _constant(expr: cp.Expression) -> bool:
    """expr is a number: constant and free of parameters."""
    return expr.is_constant() and not expr.parameters()


def _add_sum(parts: dict, lhs: cp.Expression, rhs: cp.Expression) -> bool:
    """Record ``sum(z) == total`` (either side) in ``parts[z.id]``; False if the equality is not of that form
    or z already has a sum."""
    summed, total = (lhs, rhs) if isinstance(lhs, cp.atoms.affine.sum.Sum) else (rhs, lhs)
    z = summed.args[0] if isinstance(summed, cp.atoms.affine.sum.Sum) and summed.axis is None else None
    if getattr(z, "id", None) not in parts or not _constant(total) or parts[z.id][2] is not None:
        return False
    parts[z.id][2] = float(total.value)
    return True


def _add_bound(parts: dict, lhs: cp.Expression, rhs: cp.Expression) -> bool:
    """Record ``z <= c`` (upper = min(upper, c)) or ``c <= z`` (lower = max(lower, c)) in ``parts[z.id]``;
    False if the inequality is not a constant bound on a variable."""
    if getattr(lhs, "id", None) in parts and _constant(rhs):
        part = parts[lhs.id]
        part[1] = np.minimum(part[1], np.broadcast_to(rhs.value, lhs.shape))
    elif getattr(rhs, "id", None) in parts and _constant(lhs):
        part = parts[rhs.id]
        part[0] = np.maximum(part[0], np.broadcast_to(lhs.value, rhs.shape))
    else:
        return False
    return True


def _project_box_and_sum(v: np.ndarray, lo: np.ndarray, hi: np.ndarray, total: float | None) -> np.ndarray:
    r"""argmin ||z - v||^2 s.t. lo <= z <= hi (and sum(z) = total): z = clip(v - tau, lo, hi), with the
    shift tau = 0 without a sum, else the root of the nonincreasing sum(clip(v - tau, lo, hi)) = total."""
    if total is None:
        return np.clip(v, lo, hi)
    return np.clip(v - _sum_shift(v, lo, hi, total), lo, hi)


def _sum_shift(v: np.ndarray, lo: np.ndarray, hi: np.ndarray, total: float) -> float:
    r"""The root tau of excess(tau) = sum(clip(v - tau, lo, hi)) - total, nonincreasing in tau: bracketed
    by bisection, then solved exactly on the entries strictly between their bounds,

        tau = (sum_{free} v_i + sum_{clipped} z_i - total) / |free|.
    """
    excess = lambda tau: np.clip(v - tau, lo, hi).sum() - total  # noqa: E731
    low, high = v.min() - abs(total) - 1.0, v.max() + abs(total) + 1.0  # excess(low) >= 0 >= excess(high)
    while excess(low) < 0:  # unbounded above: widen (excess(low) grows without limit)
        low -= 2 * (high - low)
    while excess(high) > 0:
        high += 2 * (high - low)
    for _ in range(100):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if excess(middle) > 0 else (low, middle)
    free = (v - high > lo) & (v - high < hi)
    if not free.any():
        return high
    clipped = np.clip(v - high, lo, hi)
    return (v[free].sum() + clipped[~free].sum() - total) / free.sum()


def _sign_constraints(parameters: Sequence[cp.Parameter]) -> list[cp.Constraint]:
    """x >= 0 for parameters declared ``nonneg=True`` (x <= 0 for ``nonpos``): implied outer constraints."""
    return [p >= 0 for p in parameters if p.is_nonneg()] + [p <= 0 for p in parameters if p.is_nonpos()]


def _rewrite_outer_constraint(constraint: cp.Constraint, index: int, parameters: Sequence[cp.Parameter],
                              substitution: dict) -> cp.Constraint:
    """The constraint with each outer parameter replaced by its projection variable."""
    where = f"Outer constraint {index} (`{constraint}`)"
    if constraint.variables():
        raise ProblemDefinitionError(
            f"{where} involves the variable(s) {[v.name() for v in constraint.variables()]}. Outer "
            "constraints restrict the parameters x only; constraints on y belong in the inner problem.")
    if not any(p.id in substitution for p in constraint.parameters()):
        raise ProblemDefinitionError(
            f"{where} involves none of the problem's parameters {[p.name() for p in parameters]}. "
            "Write it on the same cp.Parameter objects that were given to BilevelProblem.")
    rewritten = substitute(constraint, substitution)
    if not rewritten.is_dcp():
        raise ProblemDefinitionError(
            f"{where} is not convex in x (not DCP once x is a variable); the projection onto it is not "
            "defined. Rewrite it following cvxpy's DCP rules.")
    return rewritten
