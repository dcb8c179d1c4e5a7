"""QP solvers called directly on the compiled data of :mod:`cbo.qp`, one function per backend.

Every backend solves

    min_z 1/2 z^T P z + q^T z   s.t.  A z + b in {0}^p x R_+^(m - p)

(cvxpy's cone-program convention: the first ``p`` rows are equalities) and
returns ``(z, lam, status)``: the primal solution, the multipliers of the
Lagrangian 1/2 z'Pz + q'z - lam^T (A z + b) (lam >= 0 on the inequality rows,
which are cvxpy's ``dual_value``\\ s) and a cvxpy status string. ``P`` and ``A``
are dense arrays or scipy sparse matrices.

Which backend is the default is decided by ``benchmarks/qp_solvers.py``.
"""
from __future__ import annotations

from typing import Callable

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

__all__ = ["QP_SOLVERS", "solve_qp", "DEFAULT_QP_OPTIONS"]

# Tight tolerances: the active set read from the solution must be right; cbo.qp then solves the
# active-set KKT system exactly.
DEFAULT_QP_OPTIONS = {
    "CLARABEL": {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10, "tol_ktratio": 1e-8, "max_iter": 200},
    "DAQP": {},
    "PIQP": {"eps_abs": 1e-10, "eps_rel": 1e-10},
}


def _clarabel(P, q, A, b, n_eq, options):
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


def _dense(M) -> np.ndarray:
    return M.toarray() if sp.issparse(M) else np.asarray(M)


def _daqp(P, q, A, b, n_eq, options):
    """DAQP, a dual active-set method for dense QPs: rows written as lower <= -A z <= upper... here
    A z + b = 0 (sense 5: equality) and A z + b >= 0, i.e. -b <= A z."""
    import daqp
    from ctypes import c_double, c_int

    m = A.shape[0]
    H, A_dense = np.ascontiguousarray(_dense(P)), np.ascontiguousarray(_dense(A))
    lower = np.ascontiguousarray(-b, dtype=c_double)
    upper = np.full(m, 1e30)
    upper[:n_eq] = lower[:n_eq]
    sense = np.zeros(m, dtype=c_int)
    sense[:n_eq] = 5
    z, _, exitflag, info = daqp.solve(H, np.ascontiguousarray(q), A_dense, upper, lower, sense, **options)
    # DAQP's multipliers: H z + q + A^T lam_daqp = 0, lam_daqp <= 0 on active lower bounds.
    status = cp.OPTIMAL if exitflag in (1, 2) else (cp.INFEASIBLE if exitflag == -1 else
                                                       cp.UNBOUNDED if exitflag == -3 else f"DAQP exitflag {exitflag}")
    return np.asarray(z), -np.asarray(info["lam"]), status


def _piqp(P, q, A, b, n_eq, options):
    import piqp

    sparse = sp.issparse(P) or sp.issparse(A)
    solver = piqp.SparseSolver() if sparse else piqp.DenseSolver()
    solver.settings.verbose = False
    for key, value in options.items():
        setattr(solver.settings, key, value)
    if sparse:
        P_, A_eq, A_in = sp.csc_matrix(P), sp.csc_matrix(A[:n_eq]), sp.csc_matrix(-A[n_eq:])
    else:
        P_, A_eq, A_in = _dense(P), _dense(A)[:n_eq], -_dense(A)[n_eq:]
    # PIQP: min 1/2 z'Pz + c'z  s.t.  A z = b,  h_l <= G z <= h_u
    solver.setup(P_, q, A_eq, -b[:n_eq], A_in, None, b[n_eq:])
    status = solver.solve()
    result = solver.result
    lam = np.concatenate([-np.asarray(result.y), np.asarray(result.z_u) - np.asarray(result.z_l)])
    status = {piqp.PIQP_SOLVED: cp.OPTIMAL, piqp.PIQP_PRIMAL_INFEASIBLE: cp.INFEASIBLE,
              piqp.PIQP_DUAL_INFEASIBLE: cp.UNBOUNDED}.get(status, str(status))
    return np.asarray(result.x), lam, status


QP_SOLVERS: dict[str, Callable] = {"CLARABEL": _clarabel, "DAQP": _daqp, "PIQP": _piqp}


def solve_qp(name: str, P, q, A, b, n_eq: int, options: dict | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Solve the QP above with backend ``name`` and ``options`` on top of its tight defaults."""
    return QP_SOLVERS[name](P, q, A, b, n_eq, {**DEFAULT_QP_OPTIONS.get(name, {}), **(options or {})})
