"""DAQP (dual active-set method; dense), called directly.

``solve(P, q, A, b, n_eq, options, state) -> (z, lam, status)`` for
min 1/2 z'Pz + q'z s.t. A z + b in {0}^n_eq x R_+^(m - n_eq); see :mod:`cbo.qp_solvers`.
"""
from __future__ import annotations

import cvxpy as cp
import daqp
import numpy as np
import scipy.sparse as sp

__all__ = ["solve", "DEFAULT_OPTIONS"]

DEFAULT_OPTIONS = {}
EQUALITY = 5  # DAQP's sense of an equality row (0: an inequality)
NO_BOUND = 1e30  # DAQP's infinity
STATUS = {1: cp.OPTIMAL, 2: cp.OPTIMAL, -1: cp.INFEASIBLE, -3: cp.UNBOUNDED}  # by DAQP's exit flag


def solve(P, q, A, b, n_eq, options, state=None):
    """DAQP solves min 1/2 z'Hz + f'z s.t. lower <= A z <= upper, a row of sense 5 being an equality:
    here lower = -b on every row, upper = -b on the equality rows and +inf on the others. Its
    multipliers satisfy H z + f + A^T lam_daqp = 0 (lam_daqp <= 0 at an active lower bound): lam = -lam_daqp.

    With ``state`` (kept by the caller while H and A stay the same) the model is set up once (its
    factorizations are O(n^3)) and later calls update f and the bounds only: DAQP then starts from
    the previous working set, often one iteration from the answer.
    """
    lower = np.ascontiguousarray(-b, dtype=np.float64)
    upper = np.full(lower.size, NO_BOUND)
    upper[:n_eq] = lower[:n_eq]
    f = np.ascontiguousarray(q, dtype=np.float64)
    if state is None or options or lower.size == 0:  # DAQP's update fails on empty bounds (IndexError): no state
        H, A_dense = _matrices(P, A)
        z, _, exitflag, info = daqp.solve(H, f, A_dense, upper, lower, _sense(lower.size, n_eq), **options)
    else:
        if "daqp" not in state:
            state["daqp"] = daqp.Model()
            H, A_dense = _matrices(P, A)
            state["daqp"].setup(H, f, A_dense, upper, lower, _sense(lower.size, n_eq))
        else:
            state["daqp"].update(f=f, bupper=upper, blower=lower)
        z, _, exitflag, info = state["daqp"].solve()
    return np.asarray(z), -np.asarray(info["lam"]), STATUS.get(exitflag, f"DAQP exitflag {exitflag}")


def _matrices(P, A) -> tuple[np.ndarray, np.ndarray]:
    """H and A as DAQP takes them: dense, C-contiguous."""
    return tuple(np.ascontiguousarray(M.toarray() if sp.issparse(M) else M, dtype=np.float64) for M in (P, A))


def _sense(m: int, n_eq: int) -> np.ndarray:
    """DAQP's row senses (C ints): the first n_eq rows are equalities."""
    sense = np.zeros(m, dtype=np.intc)
    sense[:n_eq] = EQUALITY
    return sense
