"""QP solvers called directly on the compiled data of :mod:`cbo.qp`, one module per backend.

Every backend's ``solve(P, q, A, b, n_eq, options, state)`` solves

    min_z 1/2 z^T P z + q^T z   s.t.  A z + b in {0}^p x R_+^(m - p)

(cvxpy's cone-program convention: the first ``p = n_eq`` rows are
equalities) and returns ``(z, lam, status)``: the primal solution, the
multipliers of the Lagrangian 1/2 z'Pz + q'z - lam^T (A z + b) (lam >= 0 on
the inequality rows: cvxpy's dual values) and a cvxpy status string.
``P`` and ``A`` are dense arrays or scipy sparse matrices. Each backend starts
from tight tolerances (its ``DEFAULT_OPTIONS``): the active set read from the
solution must be right, and :mod:`cbo.qp` then solves the active-set KKT
system exactly. Which backend is the default, by size, is decided by
``benchmarks/qp_solvers.py``.
"""
from __future__ import annotations

from types import ModuleType

import numpy as np

from . import clarabel, daqp, piqp

__all__ = ["QP_SOLVERS", "solve_qp"]

QP_SOLVERS: dict[str, ModuleType] = {"CLARABEL": clarabel, "DAQP": daqp, "PIQP": piqp}


def solve_qp(name: str, P, q, A, b, n_eq: int, options: dict | None = None, state: dict | None = None
             ) -> tuple[np.ndarray, np.ndarray, str]:
    """Solve the QP above with backend ``name`` and ``options`` on top of its tight defaults. ``state``, a
    dict the caller keeps while P and A stay the same, lets a backend warm-start (DAQP keeps its model)."""
    backend = QP_SOLVERS[name]
    return backend.solve(P, q, A, b, n_eq, {**backend.DEFAULT_OPTIONS, **(options or {})}, state)
