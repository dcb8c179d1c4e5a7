"""Solve the inner problem with cvxpy and read y*, mu and nu in cvxpy's sign convention.

A DPP inner problem is canonicalized once by cvxpy and re-solved for each new
x from its cached parameter map; a non-DPP one is canonicalized per x.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Sequence

import cvxpy as cp
import numpy as np

from .errors import InaccurateSolutionWarning, InnerSolveError
from .problem import BilevelProblem

__all__ = ["InnerSolution", "solve_inner", "DEFAULT_SOLVER", "DEFAULT_SOLVER_OPTIONS"]

DEFAULT_SOLVER = "CLARABEL"
# Tight tolerances: the hypergradient is no more accurate than y*. cbo's
# Newton polish on the active-set KKT system (cbo.kkt.polish) tightens further.
DEFAULT_SOLVER_OPTIONS = {
    "CLARABEL": {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10, "tol_ktratio": 1e-8, "max_iter": 200},
}


@dataclass
class InnerSolution:
    """The inner solution as cvxpy returned it.

    ``y`` is the stacked vector of all variables (C order), ``mu`` the stacked
    inequality multipliers (>= 0), ``nu`` the stacked equality multipliers.
    """

    y: np.ndarray
    mu: np.ndarray
    nu: np.ndarray
    status: str
    solver: str
    solve_time: float


def solve_inner(
    problem: BilevelProblem,
    x: Sequence[np.ndarray],
    solver: str | None = None,
    solver_options: dict | None = None,
) -> InnerSolution:
    """Set the parameters to ``x``, solve the inner problem and read y*, mu, nu.

    Raises
    ------
    InnerSolveError
        If the problem is infeasible, unbounded, or the solver fails.
    """
    for param, value in zip(problem.parameters, x):
        try:
            param.value = value
        except ValueError as err:  # cvxpy checks sign attributes (nonneg=True, ...)
            raise ValueError(f"Cannot set parameter {param.name()} to this value: {err}") from err
    solver = (solver or DEFAULT_SOLVER).upper()
    options = {**DEFAULT_SOLVER_OPTIONS.get(solver, {}), **(solver_options or {})}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # cbo re-canonicalizes non-DPP problems on purpose; cvxpy's notice is noise here.
            warnings.filterwarnings("ignore", message=".*not DPP.*")
            problem.inner.solve(solver=solver, **options)
    except cp.error.SolverError as err:
        raise InnerSolveError(
            f"The inner solver {solver} failed: {err}. Try another solver "
            "(hypergrad(..., solver='SCS' or 'ECOS' or 'OSQP')) or looser solver_options."
        ) from err
    elapsed = time.perf_counter() - start
    status = problem.inner.status
    _check_status(status, solver)
    return InnerSolution(
        y=np.concatenate([np.asarray(v.value, dtype=float).reshape(-1) for v in problem.all_variables]),
        mu=_stacked_duals(problem.inequalities),
        nu=_stacked_duals(problem.equalities),
        status=status,
        solver=solver,
        solve_time=elapsed,
    )


def _check_status(status: str, solver: str) -> None:
    if status in (cp.OPTIMAL,):
        return
    if status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
        raise InnerSolveError(
            f"The inner problem is infeasible for this x (solver status '{status}'): no y satisfies "
            "the constraints, so y*(x) does not exist. Check the constraints, or keep x in the region "
            "where the inner problem is feasible (e.g. with outer constraints)."
        )
    if status in (cp.UNBOUNDED, cp.UNBOUNDED_INACCURATE):
        raise InnerSolveError(
            f"The inner problem is unbounded for this x (solver status '{status}'): the objective "
            "decreases without limit, so y*(x) does not exist. Add bounds on y or a strongly convex "
            "term (e.g. a small ridge penalty) to the inner objective."
        )
    if status == cp.OPTIMAL_INACCURATE:
        warnings.warn(
            f"The inner solver {solver} returned 'optimal_inaccurate'; cbo polishes the solution on "
            "the KKT system, but check info.kkt_residual.",
            InaccurateSolutionWarning,
            stacklevel=4,
        )
        return
    raise InnerSolveError(f"The inner solver {solver} stopped with status '{status}'. Try another solver.")


def _stacked_duals(blocks) -> np.ndarray:
    if not blocks:
        return np.zeros(0)
    return np.concatenate([np.asarray(b.constraint.dual_value, dtype=float).reshape(-1) for b in blocks])
