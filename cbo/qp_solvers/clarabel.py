"""Clarabel (interior point, conic; sparse), called directly.

``solve(P, q, A, b, n_eq, options, state) -> (z, lam, status)`` for
min 1/2 z'Pz + q'z s.t. A z + b in {0}^n_eq x R_+^(m - n_eq); see :mod:`cbo.qp_solvers`.
"""
from __future__ import annotations

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

__all__ = ["solve", "DEFAULT_OPTIONS"]

DEFAULT_OPTIONS = {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10, "tol_ktratio": 1e-8, "max_iter": 200}


def solve(P, q, A, b, n_eq, options, state=None):
    """Clarabel solves min 1/2 z'Pz + q'z s.t. A_c z + s = b_c, s in K with P upper triangular: here
    A_c = -A, b_c = b, K = zero cone x nonnegative cone; its dual z is lam."""
    import clarabel

    settings = clarabel.DefaultSettings()
    settings.verbose = False
    for key, value in options.items():
        setattr(settings, key, value)
    cones = []
    if n_eq:
        cones.append(clarabel.ZeroConeT(n_eq))
    if A.shape[0] > n_eq:
        cones.append(clarabel.NonnegativeConeT(A.shape[0] - n_eq))
    solution = clarabel.DefaultSolver(sp.triu(sp.csc_array(P)).tocsc(), q, sp.csc_array(-A), b, cones,
                                      settings).solve()
    status = {"Solved": cp.OPTIMAL, "AlmostSolved": cp.OPTIMAL_INACCURATE, "PrimalInfeasible": cp.INFEASIBLE,
              "AlmostPrimalInfeasible": cp.INFEASIBLE_INACCURATE, "DualInfeasible": cp.UNBOUNDED,
              "AlmostDualInfeasible": cp.UNBOUNDED_INACCURATE}.get(str(solution.status), str(solution.status))
    return np.asarray(solution.x), np.asarray(solution.z), status
