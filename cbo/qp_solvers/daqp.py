"""DAQP (dual active-set method; dense), called directly.

``solve(P, q, A, b, n_eq, options) -> (z, lam, status)`` for
min 1/2 z'Pz + q'z s.t. A z + b in {0}^n_eq x R_+^(m - n_eq); see :mod:`cbo.qp_solvers`.
"""
from __future__ import annotations

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

__all__ = ["solve", "DEFAULT_OPTIONS"]

DEFAULT_OPTIONS = {}


def solve(P, q, A, b, n_eq, options):
    """DAQP solves min 1/2 z'Hz + f'z s.t. lower <= A z <= upper, a row of sense 5 being an equality:
    here lower = -b on every row, upper = -b on the equality rows and +inf on the others. Its
    multipliers satisfy H z + f + A^T lam_daqp = 0 (lam_daqp <= 0 at an active lower bound): lam = -lam_daqp."""
    import daqp
    from ctypes import c_double, c_int

    m = A.shape[0]
    H, A_dense = (np.ascontiguousarray(M.toarray() if sp.issparse(M) else M) for M in (P, A))
    lower = np.ascontiguousarray(-b, dtype=c_double)
    upper = np.full(m, 1e30)
    upper[:n_eq] = lower[:n_eq]
    sense = np.zeros(m, dtype=c_int)
    sense[:n_eq] = 5
    z, _, exitflag, info = daqp.solve(H, np.ascontiguousarray(q), A_dense, upper, lower, sense, **options)
    status = cp.OPTIMAL if exitflag in (1, 2) else (cp.INFEASIBLE if exitflag == -1 else
                                                       cp.UNBOUNDED if exitflag == -3 else f"DAQP exitflag {exitflag}")
    return np.asarray(z), -np.asarray(info["lam"]), status

