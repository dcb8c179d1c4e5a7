"""PIQP (proximal interior point; dense or sparse), called directly.

``solve(P, q, A, b, n_eq, options, state) -> (z, lam, status)`` for
min 1/2 z'Pz + q'z s.t. A z + b in {0}^n_eq x R_+^(m - n_eq); see :mod:`cbo.qp_solvers`.
"""
from __future__ import annotations

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

__all__ = ["solve", "DEFAULT_OPTIONS"]

DEFAULT_OPTIONS = {"eps_abs": 1e-10, "eps_rel": 1e-10}


def solve(P, q, A, b, n_eq, options, state=None):
    """PIQP solves min 1/2 z'Pz + c'z s.t. A_eq z = b_eq, h_l <= G z <= h_u: here A_eq z = -b on the
    equality rows and G = -A <= b on the others. Its multipliers y (equalities) and z_u - z_l enter
    P z + c + A_eq^T y + G^T (z_u - z_l) = 0, so lam = (-y, z_u - z_l)."""
    import piqp

    sparse = sp.issparse(P) or sp.issparse(A)
    solver = piqp.SparseSolver() if sparse else piqp.DenseSolver()
    solver.settings.verbose = False
    for key, value in options.items():
        setattr(solver.settings, key, value)
    if sparse:
        P_, A_eq, A_in = sp.csc_matrix(P), sp.csc_matrix(A[:n_eq]), sp.csc_matrix(-A[n_eq:])
    else:
        P_, A_eq, A_in = P, A[:n_eq], -A[n_eq:]
    solver.setup(P_, q, A_eq, -b[:n_eq], A_in, None, b[n_eq:])
    status = solver.solve()
    result = solver.result
    lam = np.concatenate([-np.asarray(result.y), np.asarray(result.z_u) - np.asarray(result.z_l)])
    status = {piqp.PIQP_SOLVED: cp.OPTIMAL, piqp.PIQP_PRIMAL_INFEASIBLE: cp.INFEASIBLE,
              piqp.PIQP_DUAL_INFEASIBLE: cp.UNBOUNDED}.get(status, str(status))
    return np.asarray(result.x), lam, status

