"""DAQP (dual active-set method; dense), called directly.

``solve(P, q, A, b, n_eq, options, state) -> (z, lam, status)`` for
min 1/2 z'Pz + q'z s.t. A z + b in {0}^n_eq x R_+^(m - n_eq); see :mod:`cbo.qp_solvers`.
"""
from __future__ import annotations

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

__all__ = ["solve", "DEFAULT_OPTIONS"]

DEFAULT_OPTIONS = {}


def solve(P, q, A, b, n_eq, options, state=None):
    """DAQP solves min 1/2 z'Hz + f'z s.t. lower <= A z <= upper, a row of sense 5 being an equality:
    here lower = -b on every row, upper = -b on the equality rows and +inf on the others. Its
    multipliers satisfy H z + f + A^T lam_daqp = 0 (lam_daqp <= 0 at an active lower bound): lam = -lam_daqp.

    With ``state`` (kept by the caller while H and A stay the same) the model is set up once (its
    factorizations are O(n^3)) and later calls update f and the bounds only: DAQP then starts from
    the previous working set, often one iteration from the answer.
    """
    import daqp
    from ctypes import c_double, c_int

    m = A.shape[0]
    lower = np.ascontiguousarray(-b, dtype=c_double)
    upper = np.full(m, 1e30)
    upper[:n_eq] = lower[:n_eq]
    f = np.ascontiguousarray(q, dtype=c_double)
    if state is None or options or m == 0:  # DAQP's update fails on empty bounds (IndexError): no state there
        H, A_dense = (np.ascontiguousarray(M.toarray() if sp.issparse(M) else M) for M in (P, A))
        sense = np.zeros(m, dtype=c_int)
        sense[:n_eq] = 5
        z, _, exitflag, info = daqp.solve(H, f, A_dense, upper, lower, sense, **options)
    else:
        if "daqp" not in state:
            H, A_dense = (np.ascontiguousarray(M.toarray() if sp.issparse(M) else M) for M in (P, A))
            sense = np.zeros(m, dtype=c_int)
            sense[:n_eq] = 5
            state["daqp"] = daqp.Model()
            state["daqp"].setup(H, f, A_dense, upper, lower, sense)
        else:
            state["daqp"].update(f=f, bupper=upper, blower=lower)
        z, _, exitflag, info = state["daqp"].solve()
    status = cp.OPTIMAL if exitflag in (1, 2) else (cp.INFEASIBLE if exitflag == -1 else
                                                       cp.UNBOUNDED if exitflag == -3 else f"DAQP exitflag {exitflag}")
    return np.asarray(z), -np.asarray(info["lam"]), status
