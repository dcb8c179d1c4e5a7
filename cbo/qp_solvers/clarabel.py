"""Clarabel (interior point, conic; sparse), called directly.

``solve(P, q, A, b, n_eq, options, state) -> (z, lam, status)`` for
min 1/2 z'Pz + q'z s.t. A z + b in {0}^n_eq x R_+^(m - n_eq); see :mod:`cbo.qp_solvers`.
"""
from __future__ import annotations

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

__all__ = ["solve", "DEFAULT_OPTIONS"]

DEFAULT_OPTIONS = {"max_iter": 200}


def solve(P, q, A, b, n_eq, options, state=None):
    """Clarabel solves min 1/2 z'Pz + q'z s.t. A_c z + s = b_c, s in K with P upper triangular: here
    A_c = -A, b_c = b, K = zero cone x nonnegative cone; its dual z is lam.

    With ``state`` (kept by the caller while P and A stay the same) the solver object is built once
    (its scaling and symbolic factorization) and later calls update q and b only.
    """
    solver = state.get("clarabel") if state is not None else None
    if solver is not None and solver.is_data_update_allowed():
        solver.update(q=q, b=b)
    else:
        solver = _new_solver(P, q, A, b, n_eq, options, presolve=state is None)
        if state is not None:
            state["clarabel"] = solver
    solution = solver.solve()
    status = {"Solved": cp.OPTIMAL, "AlmostSolved": cp.OPTIMAL_INACCURATE, "PrimalInfeasible": cp.INFEASIBLE,
              "AlmostPrimalInfeasible": cp.INFEASIBLE_INACCURATE, "DualInfeasible": cp.UNBOUNDED,
              "AlmostDualInfeasible": cp.UNBOUNDED_INACCURATE}.get(str(solution.status), str(solution.status))
    return np.asarray(solution.x), np.asarray(solution.z), status


def _new_solver(P, q, A, b, n_eq, options, presolve: bool):
    """A Clarabel solver for the data; without presolve where its data will be updated (Clarabel allows
    updates only then)."""
    import clarabel

    settings = clarabel.DefaultSettings()
    settings.verbose = False
    settings.presolve_enable = presolve
    for key, value in options.items():
        setattr(settings, key, value)
    cones = []
    if n_eq:
        cones.append(clarabel.ZeroConeT(n_eq))
    if A.shape[0] > n_eq:
        cones.append(clarabel.NonnegativeConeT(A.shape[0] - n_eq))
    return clarabel.DefaultSolver(sp.triu(sp.csc_array(P)).tocsc(), q, sp.csc_array(-A), b, cones, settings)
