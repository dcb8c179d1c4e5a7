r"""The QP fast path: an inner QP compiled once, so that one hypergradient costs about one solve.

cvxpy compiles a DPP inner problem whose cone program has only zero and
nonnegative cones into the QP

    min_z 1/2 z^T P z + q^T z   s.t.  A z + b in {0}^p x R_+^(m - p)

with (P, q, A, b) affine in the parameter vector theta (the parameters'
values, then a 1) by fixed sparse maps (``param_prob``'s tensors; cvxpylayers
and CVXPYgen use the same maps). The Lagrangian is
1/2 z'Pz + q'z - lam^T (A z + b), and lam on the rows of a user's constraint
is that constraint's ``dual_value``. Per call only numbers move:

1. **Data**: P, q, A, b = maps @ theta (P and A computed once when constant).
2. **Active set**: the previous call's active set S (equality rows and the
   active inequality rows) is tried first: with omega = -lam_S,

       K_S [z; omega] = [-q; -b_S],   K_S = [[P, A_S^T], [A_S, 0]],

   and accepted when lam_S > 0 and the other rows are strictly feasible: these
   are the KKT conditions of a convex QP, so (z, lam) *is* the solution.
   Otherwise the QP solver (:mod:`cbo.qp_solvers`) runs and the solve above,
   on the solver's active set, polishes its answer to machine precision; where
   the polish contradicts a sign (a row the solver's tolerance left undecided),
   primal-dual active-set steps correct the set. Weakly active rows (a zero
   multiplier on a tight constraint) stay inactive, with the general route's
   :class:`~cbo.errors.DegenerateKKTWarning`.
3. **One factorization** of K_S serves the polish, the checks and the adjoint.
   Since P is positive semidefinite, K_S is nonsingular exactly when the active
   rows are independent (LICQ) and P is positive definite on their null space
   (a unique y*): its reciprocal condition number is the check. Where it fails,
   :class:`GeneralPathNeeded` hands the call to the general route of
   :mod:`cbo.kkt`, which says which of the two failed and what to do.
4. **Adjoint**: K_S [v_z; v_omega] = [dF/dz; 0], and differentiating the KKT
   conditions gives the gradient in the data

       dF/dq = -v_z,   dF/db_S = -v_omega,   dF/dA_S = lam_S v_z^T - v_omega z^T,   dF/dP = -v_z z^T,

   which the transposed maps carry to theta: no autograd graph, no dense
   parameter Jacobian.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import cvxpy as cp
import numpy as np
import scipy.linalg as la
import scipy.sparse as sp
import scipy.sparse.linalg as spla

import torch

from .dpp import DPPForm, dpp_form
from .errors import check_status, warn_weakly_active
from .translate import Env
from .qp_solvers import solve_qp

__all__ = ["QPProgram", "QPPoint", "GeneralPathNeeded", "compile_qp"]

# The data and K_S are dense (LAPACK LU) up to DENSE_LIMIT rows of K, and up to DENSE_FILL_LIMIT rows
# where K is more than DENSE_FILL_DENSITY full (random sparsity patterns fill a sparse LU in almost
# completely: at n + m = 2700, 66 % fill, SuperLU 1.3 s against 0.2 s for the dense LU); sparse otherwise:
# QDLDL's LDL^T of the regularized K_S, refined (2.5-3.8x faster than SuperLU at n = 1000-20000 on banded
# patterns, benchmarks/qp_solvers.py), SuperLU where the refinement does not converge.
DENSE_LIMIT, DENSE_FILL_LIMIT, DENSE_FILL_DENSITY = 600, 4000, 0.02
# Default QP solver (benchmarks/qp_solvers.py): DAQP, a dense active-set method, for QPs with n + m up to
# SMALL_QP, and up to WARM_DAQP_LIMIT where P and A are constant (its model is set up once and restarts
# from the previous working set: 2.7 ms at n = 1000 against 100-200 ms for the interior-point solvers);
# above, PIQP (proximal interior point) on dense data and Clarabel on sparse data. PIQP is 1.4-2.2x
# faster than Clarabel on banded sparse QPs but 10x slower where the sparse factorization fills in
# (n = 5000 with a random pattern: 187 s against 17 s), which the size and density do not tell apart.
SMALL_QP, WARM_DAQP_LIMIT = 400, 2500
# The solver that decides where the default one does not return "optimal" (Clarabel equilibrates its data).
FALLBACK_SOLVER = "CLARABEL"
# Parameter maps with at most this many entries (rows x parameters) are stored dense.
DENSE_MAP_LIMIT = 200_000
# Dense programs with at least this many variables, constant P and A and P positive definite solve K_S in
# range-space form (P factored once, then the Schur complement A_S P^-1 A_S^T per active set: at n = 1000,
# about 4x cheaper than an LU of K_S); smaller ones factor K_S whole.
RANGE_SPACE_MIN = 50
# Dense factorizations of K_S with this many rows run on one BLAS thread (_blas_threads).
SINGLE_THREAD_SIZES = (64, 2000)
_BLAS_LIBRARIES = None
# A multiplier or slack below -SIGN_TOL (equilibrated, relative units) is a sign the polish contradicts.
SIGN_TOL = 1e-9
TINY = np.finfo(float).tiny  # the floor of normalized_complementarity's denominators
# K_S counts as singular below this reciprocal condition number (of its equilibrated form).
SINGULAR_RCOND = 1e-13
# The sparse LDL^T of K_S (QDLDL) factors the equilibrated K_S + diag(delta I, -delta I), quasi-definite, and
# refines on K_S itself: at most this many refinement steps to reach REFINE_TOL (relative residual).
QUASIDEFINITE_DELTA, REFINE_STEPS, REFINE_TOL = 1e-10, 6, 1e-14


class GeneralPathNeeded(Exception):
    """The fast path cannot certify this point (K_S singular or ill-conditioned, an active set the polish
    keeps contradicting): the general route of :mod:`cbo.kkt` takes the call and diagnoses it."""


def _default_solver(size: int, dense: bool, constant_matrices: bool) -> str:
    """The QP solver called by default for a QP with ``size`` = n + m (see SMALL_QP)."""
    if size <= SMALL_QP or (dense and constant_matrices and size <= WARM_DAQP_LIMIT):
        return "DAQP"
    return "PIQP" if dense else "CLARABEL"


def _factor_densely(size: int, nonzeros: int) -> bool:
    """Dense data and factorization for K of ``size`` rows with ``nonzeros`` entries (see DENSE_LIMIT)."""
    return size <= DENSE_LIMIT or (size <= DENSE_FILL_LIMIT and nonzeros >= DENSE_FILL_DENSITY * size ** 2)


def _entry_map(tensor: sp.coo_array, start: int, stop: int, columns: int, keep_all: bool = False):
    """The rows start..stop-1 of cvxpy's parameter tensor as (entries, map): ``entries`` are the rows (minus
    ``start``) that any parameter or the constant reaches (all of them with ``keep_all``), built in O(nnz)."""
    inside = (tensor.row >= start) & (tensor.row < stop)
    row, col, data = tensor.row[inside] - start, tensor.col[inside], tensor.data[inside]
    entries = np.arange(stop - start) if keep_all else np.unique(row)
    matrix = sp.csr_array((data, (np.searchsorted(entries, row), col)), shape=(entries.size, columns))
    return entries, _AffineMap(matrix)


class _AffineMap:
    """entries = matrix @ theta for a fixed set of positions; ``value`` when it does not depend on theta.

    Small maps are kept dense (a dense product is faster than scipy's sparse one below ~10^5 entries);
    the transpose is formed once, for the vector-Jacobian products."""

    def __init__(self, matrix):
        matrix = sp.csr_array(matrix)
        constant = matrix[:, :-1].nnz == 0
        self.value = np.asarray(matrix[:, -1].toarray()).ravel() if constant else None
        if np.prod(matrix.shape) <= DENSE_MAP_LIMIT:
            self.matrix, self.matrix_T = matrix.toarray(), np.ascontiguousarray(matrix.toarray().T)
        else:
            self.matrix, self.matrix_T = matrix, sp.csr_array(matrix.T)

    def __call__(self, theta: np.ndarray) -> np.ndarray:
        return self.value if self.value is not None else self.matrix @ theta

    def transpose(self, cotangent: np.ndarray) -> np.ndarray:
        return self.matrix_T @ cotangent


@dataclass
class _Factor:
    """A factorization of K_S: its solve, its product (for residuals), its kind and reciprocal condition
    number, and the rows of A in K_S (the equalities, then the active inequalities)."""

    solve: Callable[[np.ndarray], np.ndarray]
    rcond: float
    matvec: Callable[[np.ndarray], np.ndarray]
    size: int
    kind: str
    rows: np.ndarray | None = None


@contextlib.contextmanager
def _blas_threads(size: int):
    """One BLAS thread for a mid-sized dense factorization: with several threads, OpenBLAS's LU of a
    140-600-row matrix stalled for ~0.1 s on a busy 2-core machine (no speed-up to lose at these sizes).
    threadpoolctl finds the BLAS libraries once; their thread counts are then set directly (its ``limit``
    context re-inspects every library on each entry, ~10 us)."""
    if not SINGLE_THREAD_SIZES[0] <= size <= SINGLE_THREAD_SIZES[1]:
        yield
        return
    global _BLAS_LIBRARIES
    if _BLAS_LIBRARIES is None:
        from threadpoolctl import ThreadpoolController

        _BLAS_LIBRARIES = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
    threads = [lib.get_num_threads() for lib in _BLAS_LIBRARIES]
    for lib in _BLAS_LIBRARIES:
        lib.set_num_threads(1)
    try:
        yield
    finally:
        for lib, count in zip(_BLAS_LIBRARIES, threads):
            lib.set_num_threads(count)


def _factor(K) -> _Factor:
    """Factor K_S with row/column equilibration D K D (D = 1/sqrt(max |row|)), so that the reciprocal
    condition number does not depend on the scales of the variables and constraints: dense, LAPACK's LU
    (its symmetric indefinite LDL^T, dsytrf, was 1.4x faster single-threaded in benchmarks/qp_solvers.py
    but 2-5x slower than LU with two threads on a busy machine); sparse, SuperLU's LU (:func:`_sparse_lu`),
    which the fast path uses where the refined LDL^T of :class:`_PatternLDL` does not reach machine
    precision (K_S near singular)."""
    if sp.issparse(K):
        K = sp.csc_array(K)
        d = 1.0 / np.sqrt(np.maximum(abs(K).max(axis=1).toarray().ravel(), 1e-300))
        factor = _sparse_lu(sp.csc_array(sp.diags_array(d) @ K @ sp.diags_array(d)))
        solve = factor.solve
        return _Factor(lambda rhs: d * solve(d * rhs), factor.rcond, K.__matmul__, K.shape[0], factor.kind)
    d = 1.0 / np.sqrt(np.maximum(np.abs(K).max(axis=1), 1e-300))
    scaled = d[:, None] * K * d[None, :]
    with _blas_threads(K.shape[0]):
        lu, piv, info = la.lapack.dgetrf(scaled)
    if info > 0:
        raise GeneralPathNeeded("the active-set KKT matrix is singular")
    rcond, _ = la.lapack.dgecon(lu, np.abs(scaled).sum(axis=0).max(), norm="1")
    return _Factor(lambda rhs: d * la.lapack.dgetrs(lu, piv, d * rhs)[0], float(rcond), K.__matmul__, K.shape[0],
                   "dense LU (LAPACK)")


class _PatternLDL:
    r"""The sparse K_S of every active set S inside one fixed pattern, so that QDLDL orders and analyses it once.

    K(a) = [[P, A^T diag(a)], [diag(a) A, -diag(1 - a)]] (n + m rows, a_i = 1 on the equalities and the active
    rows) has K_S's solution on the active rows and zero multipliers on the others, and the same nonzero
    pattern for every a (entries multiplied by 0 stay stored). Its equilibrated, quasi-definite
    regularization D K D + diag(delta I, -delta I) is analysed (AMD ordering, symbolic factorization) at the
    first call and only refactored numerically after (``qdldl.Solver.update``); solves are refined on D K D
    (:func:`_refined_solver`). One solver serves all factorizations: a factor whose numbers are no
    longer the solver's is refactored before it solves (a layer's backward pass over its batch items).
    """

    def __init__(self, P: sp.csr_array, A: sp.csr_array):
        n, m = P.shape[0], A.shape[0]
        self.n, self.m, self.size = n, m, n + m
        P_rows, P_cols = _csr_coordinates(P)
        A_rows, A_cols = _csr_coordinates(A)
        self.P_upper = P_rows <= P_cols
        self.A_rows = A_rows
        rows = np.concatenate([P_rows[self.P_upper], A_cols, np.arange(n + m)])
        cols = np.concatenate([P_cols[self.P_upper], n + A_rows, np.arange(n + m)])
        keys, self.slots = np.unique(cols.astype(np.int64) * (n + m) + rows, return_inverse=True)
        self.indices = (keys % (n + m)).astype(np.int32)
        self.indptr = np.searchsorted(keys // (n + m), np.arange(n + m + 1)).astype(np.int32)
        self.entry_rows, self.entry_cols = self.indices, np.repeat(np.arange(n + m), np.diff(self.indptr))
        self.diagonal = self.slots[-(n + m):]
        self.signs = np.concatenate([np.ones(n), -np.ones(m)])
        self.solver, self.current = None, None

    def analyse(self, P: sp.csr_array, A: sp.csr_array) -> None:
        """Order and analyse the pattern now (QDLDL's AMD ordering and symbolic factorization, at the
        compilation), so that the first :meth:`factor` only refactors numerically."""
        import qdldl

        self.solver = qdldl.Solver(self._regularized(self._upper(self._upper_values(P, A, np.ones(self.m)))), upper=True)

    def _upper(self, data: np.ndarray) -> sp.csc_array:
        """The upper triangle with stored entries ``data`` in the pattern."""
        return sp.csc_array((data, self.indices, self.indptr), shape=(self.size, self.size))

    def _regularized(self, upper: sp.csc_array) -> sp.csc_array:
        """upper + diag(delta I, -delta I): the quasi-definite matrix QDLDL factors."""
        regularized = upper.copy()
        regularized.data[self.diagonal] += QUASIDEFINITE_DELTA * self.signs
        return regularized

    def _upper_values(self, P: sp.csr_array, A: sp.csr_array, a: np.ndarray) -> np.ndarray:
        """The stored entries of K(a)'s upper triangle, in the pattern's order."""
        values = np.concatenate([P.data[self.P_upper], A.data * a[self.A_rows], np.zeros(self.n), a - 1.0])
        return np.bincount(self.slots, weights=values, minlength=self.indices.size)

    def factor(self, P: sp.csr_array, A: sp.csr_array, active_rows: np.ndarray) -> _Factor | None:
        """The factorization of K_S for the QP's rows ``active_rows`` (equalities first), or None where the
        refinement does not converge (K_S near singular) or P and A do not have the pattern analysed."""
        import qdldl

        n, size = self.n, self.size
        if P.nnz != self.P_upper.size or A.nnz != self.A_rows.size:
            return None
        a = np.zeros(self.m)
        a[active_rows] = 1.0
        data = self._upper_values(P, A, a)
        magnitude = np.zeros(size)
        np.maximum.at(magnitude, self.entry_rows, np.abs(data))
        np.maximum.at(magnitude, self.entry_cols, np.abs(data))
        d = 1.0 / np.sqrt(np.maximum(magnitude, 1e-300))
        upper, scaled = self._upper(data), self._upper(data * d[self.entry_rows] * d[self.entry_cols])
        regularized = self._regularized(scaled)
        key = object()

        def ldl_solve(rhs: np.ndarray) -> np.ndarray:
            if self.current is not key:  # another factorization's numbers are loaded: refactor
                if self.solver is None:
                    self.solver = qdldl.Solver(regularized, upper=True)
                else:
                    self.solver.update(regularized, upper=True)
                self.current = key
            return self.solver.solve(rhs)

        refined, rcond = _refined_solver(ldl_solve, _symmetric_product(scaled, scaled.data[self.diagonal]), size)
        if refined is None:
            return None
        rows = np.asarray(active_rows)

        def full(v: np.ndarray) -> np.ndarray:
            out = np.zeros(size)
            out[:n], out[n + rows] = v[:n], v[n:]
            return out

        def solve(rhs: np.ndarray) -> np.ndarray:
            x = d * refined(d * full(rhs))
            return np.concatenate([x[:n], x[n + rows]])

        product = _symmetric_product(upper, upper.data[self.diagonal])

        def matvec(v: np.ndarray) -> np.ndarray:
            y = product(full(v))
            return np.concatenate([y[:n], y[n + rows]])

        return _Factor(solve, rcond, matvec, n + rows.size, "sparse LDL^T (QDLDL, pattern analysed once, refined)")


def _symmetric_product(upper: sp.csc_array, diagonal: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """x -> K x for the symmetric K whose upper triangle is ``upper`` and whose diagonal is ``diagonal``
    (K = U + U^T - diag; the transpose view and the diagonal are formed once, not at every product)."""
    lower = upper.T
    return lambda x: upper @ x + lower @ x - diagonal * x


def _refined_solver(ldl_solve: Callable[[np.ndarray], np.ndarray], matvec: Callable[[np.ndarray], np.ndarray],
                    size: int) -> tuple[Callable[[np.ndarray], np.ndarray] | None, float]:
    r"""Iterative refinement x += M^{-1} (r - K x) of solves with M = K + diag(delta I, -delta I) (``ldl_solve``)
    on K (``matvec``). The error contracts by rho ~ delta ||K^{-1}|| per step, so a test solve from a random
    right-hand side gives both the check and the conditioning: (None, 0) where it does not reach REFINE_TOL
    in REFINE_STEPS (K near singular); else the refined solve (raising GeneralPathNeeded should a later
    right-hand side not converge) and rcond ~ delta / (rho ||K||_1), the observed rate read as ||K^{-1}||."""
    def refine(rhs: np.ndarray) -> tuple[np.ndarray, list[float]]:
        x, residuals = ldl_solve(rhs), []
        for _ in range(REFINE_STEPS + 1):
            residual = rhs - matvec(x)
            residuals.append(_largest(residual))
            if residuals[-1] <= REFINE_TOL * max(_largest(rhs), 1e-300) or len(residuals) > REFINE_STEPS:
                break
            x = x + ldl_solve(residual)
        return x, residuals

    test = np.random.default_rng(0).standard_normal(size)
    _, residuals = refine(test)
    if residuals[-1] > REFINE_TOL * _largest(test):
        return None, 0.0
    rate = max([after / before for before, after in zip(residuals, residuals[1:]) if before > 0], default=0.0)
    norm = max(float(np.abs(matvec(np.ones(size))).max()), 1.0)  # ||K||_inf >= this; = ||K||_1 for K >= 0
    rcond = min(1.0, QUASIDEFINITE_DELTA / rate if rate > 0 else 1.0) / norm

    def solve(rhs: np.ndarray) -> np.ndarray:
        x, residuals = refine(rhs)
        if residuals[-1] > REFINE_TOL * 10 * max(_largest(rhs), 1e-300):
            raise GeneralPathNeeded("the refined LDL^T solve of the active-set KKT matrix did not converge")
        return x

    return solve, rcond


def _csr_coordinates(M: sp.csr_array) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the stored entries of a CSR matrix, in ``M.data``'s order."""
    return np.repeat(np.arange(M.shape[0]), np.diff(M.indptr)), M.indices


def _sparse_lu(K: sp.csc_array) -> _Factor:
    """K (equilibrated) by SuperLU's sparse LU; rcond: the ratio of the smallest to the largest |U_ii|."""
    try:
        lu = spla.splu(K, permc_spec="MMD_AT_PLUS_A")
    except RuntimeError:  # exactly singular
        raise GeneralPathNeeded("the active-set KKT matrix is singular") from None
    diag = np.abs(lu.U.diagonal())
    rcond = float(diag.min() / diag.max()) if diag.size else 1.0
    return _Factor(lu.solve, rcond, K.__matmul__, K.shape[0], "sparse LU (SuperLU)")


def _range_space_factor(L: np.ndarray, W: np.ndarray, P: np.ndarray, A_S: np.ndarray, rows: np.ndarray) -> _Factor:
    r"""K_S by its range-space (Schur complement) form, for P = L L^T positive definite and W = L^{-1} A^T:

        G omega = W_S^T u - r_2,   u = L^{-1} r_1,   z = L^{-T} (u - W_S omega),   G = W_S^T W_S = A_S P^{-1} A_S^T,

    solves K_S [z; omega] = [r_1; r_2]. G (k x k) is factored by Cholesky after a Jacobi scaling; K_S is
    nonsingular exactly when G is (LICQ), and G's reciprocal condition number is the check."""
    W_S = W[:, rows]
    G = W_S.T @ W_S
    d = 1.0 / np.sqrt(np.maximum(np.diag(G), 1e-300))
    scaled = d[:, None] * G * d[None, :]
    with _blas_threads(G.shape[0]):
        C, info = la.lapack.dpotrf(scaled, lower=1)
    if info != 0:
        raise GeneralPathNeeded("the active constraints are dependent (LICQ fails)")
    rcond, _ = la.lapack.dpocon(C, np.abs(scaled).sum(axis=0).max(), uplo="L")
    n = L.shape[0]

    def solve(rhs: np.ndarray) -> np.ndarray:
        u = la.lapack.dtrtrs(L, rhs[:n], lower=1)[0]
        omega = d * la.lapack.dpotrs(C, d * (W_S.T @ u - rhs[n:]), lower=1)[0]
        z = la.lapack.dtrtrs(L, u - W_S @ omega, lower=1, trans=1)[0]
        return np.concatenate([z, omega])

    def matvec(v: np.ndarray) -> np.ndarray:
        return np.concatenate([P @ v[:n] + A_S.T @ v[n:], A_S @ v[:n]])

    return _Factor(solve, float(rcond), matvec, n + rows.size, "range space (Cholesky of P and of A_S P^-1 A_S^T)")


@dataclass
class QPPoint:
    """A solution of the compiled QP at one parameter value, with the factorization of its K_S.

    ``z`` and ``lam`` are in the QP's variables and rows; ``y`` stacks the
    BilevelProblem's variables (C order), ``mu`` and ``nu`` its inequality and
    equality multipliers as :mod:`cbo.kkt` orders them. ``active`` marks the
    active inequality rows of the QP; ``how`` is "active set reused" (the
    previous call's active set was optimal: no solver call) or the solver's name.
    """

    z: np.ndarray
    lam: np.ndarray
    active: np.ndarray
    factor: _Factor
    how: str
    status: str
    kkt_residual: float
    timings: dict[str, float] = field(default_factory=dict)
    y: np.ndarray | None = None
    mu: np.ndarray | None = None
    nu: np.ndarray | None = None
    adjoint_residual: float | None = None
    weak: np.ndarray | None = None
    lifted: "_LiftedGraph | None" = None


class QPProgram:
    r"""The inner problem of a BilevelProblem as a parametric QP, compiled once (see the module docstring).

    Build it with :func:`compile_qp`, which returns None (and why) where the
    problem is not a DPP QP. ``solve(x)`` returns a :class:`QPPoint`,
    ``vjp(point, dF_dy)`` the gradient in the parameters.
    """

    def __init__(self, problem, form: DPPForm, data: dict, chain):
        self.problem, self.lifted = problem, form.lifted
        pp = data["param_prob"]
        self.n = n = pp.x.size
        self.m = m = data["A"].shape[0]
        self.n_eq = pp.cone_dims.zero
        self._theta_slices = _parameter_slices(form.problem, pp, chain)
        self._listed = {p.id: i for i, p in enumerate(problem.parameters)}
        # The data maps. Tensor rows are Fortran-ordered entries: P's of the n x n matrix, A's of [A b] (m x n+1).
        columns = pp.total_param_size + 1
        P_tensor = sp.coo_array(pp.P) if pp.P is not None else sp.coo_array((n * n, columns))
        rows, self._P = _entry_map(P_tensor, 0, n * n, columns)
        self._P_pos = (rows % n, rows // n)
        self._q = _entry_map(sp.coo_array(pp.q), 0, n, columns, keep_all=True)[1]
        A_tensor = sp.coo_array(pp.A)
        rows, self._A = _entry_map(A_tensor, 0, m * n, columns)
        self._A_pos = (rows % m, rows // m)
        self._b = _entry_map(A_tensor, m * n, m * n + m, columns, keep_all=True)[1]
        self._constant_matrices = self._P.value is not None and self._A.value is not None
        self.dense = _factor_densely(n + m, self._P_pos[0].size + 2 * self._A_pos[0].size)
        self.default_solver = _default_solver(n + m, self.dense, self._constant_matrices)
        self._P_const = self._assemble(self._P.value, self._P_pos, (n, n)) if self._P.value is not None else None
        self._A_const = self._assemble(self._A.value, self._A_pos, (m, n)) if self._A.value is not None else None
        self.y_index = _variable_index(problem.all_variables, pp, chain)
        rows_of = _constraint_rows(pp, chain)
        rows = lambda blocks: np.concatenate([rows_of[form.constraint_ids[b.constraint.id]] for b in blocks]  # noqa: E731
                                             or [np.zeros(0, int)])
        self.mu_index, self.nu_index = rows(problem.inequalities), rows(problem.equalities)
        # The problem's stacked inequality entry of each inequality row of the QP (-1: a row cvxpy added).
        self.row_entry = np.full(self.m - self.n_eq, -1)
        self.row_entry[self.mu_index - self.n_eq] = np.arange(self.mu_index.size)
        self._rows_are_entries = np.array_equal(self.row_entry, np.arange(self.row_entry.size))
        # Warm-start state, per batch item: the last active set and, while P and A are constant, its factorization.
        self._last_active: dict[int, np.ndarray] = {}
        self._try_kept_set: dict[int, bool] = {}  # per item: whether to try the last active set first (solve)
        self._factor_cache: dict[bytes, _Factor] = {}
        # The equilibration of constant P and A is part of the compilation (:meth:`_scales`).
        self._scales_cache = equilibration(self._P_const, self._A_const) if self._constant_matrices else None
        self._range_space: tuple[np.ndarray, np.ndarray] | bool | None = None
        # Sparse programs: K_S's pattern, ordered and analysed here where P and A are constant (else at the first
        # factorization), so that a first call factors numerically only.
        self._pattern: _PatternLDL | None = None
        if not self.dense and self._constant_matrices:
            self._pattern = _PatternLDL(self._P_const, self._A_const)
            self._pattern.analyse(self._P_const, self._A_const)
        self._solver_state: dict = {}
        self.batch_constants: dict = {}  # per device: the tensors of cbo.qp_batch's batched path

    # ------------------------------------------------------------ data

    def theta(self, x: Sequence[np.ndarray]) -> tuple[np.ndarray, "_LiftedGraph | None"]:
        """The parameter vector: listed parameters from ``x``, lifted ones (:mod:`cbo.dpp`) evaluated at ``x``
        (with their torch graph, for :meth:`vjp`), the others from their ``.value``; then a 1."""
        graph = _LiftedGraph.at(self.problem.parameters, self.lifted, x) if self.lifted else None
        theta = np.empty(self._theta_slices[-1][1] + 1)
        for param, start, size in self._theta_slices[:-1]:
            index = self._listed.get(param.id)
            value = x[index] if index is not None else graph.values[param.id] if graph and param.id in graph.values \
                else param.value
            if value is None:
                raise ValueError(f"Parameter {param.name()} of the inner problem has no value. Set "
                                 f"{param.name()}.value, or list it in `parameters`.")
            theta[start:start + size] = np.asarray(value, dtype=float).ravel(order="F")
        theta[-1] = 1.0
        return theta, graph

    def _assemble(self, values: np.ndarray, positions: tuple, shape: tuple):
        """The matrix with ``values`` at ``positions``: dense, or sparse (CSR) for sparse programs."""
        if self.dense:
            matrix = np.zeros(shape)
            np.add.at(matrix, positions, values)
            return matrix
        return sp.csr_array((values, positions), shape=shape)

    def data(self, theta: np.ndarray):
        """(P, q, A, b) at theta."""
        P = self._P_const if self._P_const is not None else self._assemble(self._P(theta), self._P_pos, (self.n, self.n))
        A = self._A_const if self._A_const is not None else self._assemble(self._A(theta), self._A_pos, (self.m, self.n))
        return P, self._q(theta), A, self._b(theta)

    # ------------------------------------------------------------ solve

    def solve(self, x: Sequence[np.ndarray], item: int = 0, solver: str | None = None,
              solver_options: dict | None = None, active_tol: float = 1e-6, warm_start: bool = True,
              where: str = "") -> QPPoint:
        """Solve at parameter values ``x`` (numpy, shaped like the parameters); ``item`` keys the warm start
        (a batch item), ``where`` prefixes warnings ("batch item 3: ").

        The item's previous active set is tried first (one solve with its kept factorization) unless that
        try has just failed: x then moves by more than keeps active sets (independent inputs, an outer
        loop's first steps), and the QP solver runs directly; the try resumes once the solver's active set
        is again the kept one.

        Weakly active rows (zero multiplier on a tight constraint: no derivative) are kept inactive, as
        :func:`cbo.kkt.active_set` does, with a :class:`DegenerateKKTWarning`. Raises InnerSolveError
        (infeasible, unbounded, solver failure) and GeneralPathNeeded (a point the fast path cannot
        certify: K_S singular, a sign the polish contradicts).
        """
        start = time.perf_counter()
        theta, graph = self.theta(x)
        P, q, A, b = self.data(theta)
        point = None
        last = self._last_active.get(item) if warm_start else None
        if last is not None and self._try_kept_set.get(item, True):
            point = self._try_active_set(P, q, A, b, last, active_tol, self._scales(P, A, fresh=False))
        solved = time.perf_counter()
        if point is None:
            name = (solver or self.default_solver).upper()
            # Solvers keep their set-up (DAQP's model and working set, Clarabel's factorization structure) while
            # P and A are constant: one state for all items of a batch (items start from each other's answers).
            state = self._solver_state if self._constant_matrices and warm_start else None
            z, lam, status = solve_qp(name, P, q, A, b, self.n_eq, solver_options, state)
            if status != cp.OPTIMAL and solver is None and name != FALLBACK_SOLVER:
                # The fast default solver stopped short (badly scaled data, ...): the robust one decides.
                name = FALLBACK_SOLVER
                z, lam, status = solve_qp(name, P, q, A, b, self.n_eq)  # no state: a fresh set-up, with presolve
            check_status(status, name)
            solved = time.perf_counter()
            point = self._solved(P, q, A, b, z, lam, name, status, active_tol, self._scales(P, A, fresh=True), where)
        if point.how != "active set reused":  # the try pays next time if this solve kept the active set
            self._try_kept_set[item] = last is None or np.array_equal(point.active, last)
        self._last_active[item] = point.active
        point.lifted = graph
        point.y = point.z[self.y_index]
        point.mu, point.nu = point.lam[self.mu_index], point.lam[self.nu_index]
        # A reused active set is tried, polished and checked in one solve: all of it counts as polish.
        point.timings = {"inner_solve": solved - start if point.how != "active set reused" else 0.0,
                         "polish": time.perf_counter() - (solved if point.how != "active set reused" else start)}
        return point

    def _range_space_basis(self, P, A) -> tuple[np.ndarray, np.ndarray] | None:
        """(L, W = L^{-1} A^T) with P = L L^T, computed once, for the range-space factorization of K_S
        (:func:`_range_space_factor`): for dense programs of at least RANGE_SPACE_MIN variables whose P
        and A are constant and P positive definite. None otherwise (then K_S is factored whole)."""
        if self._range_space is None:
            self._range_space = False
            if self.dense and self._constant_matrices and self.n >= RANGE_SPACE_MIN:
                with _blas_threads(self.n):
                    L, info = la.lapack.dpotrf(P, lower=1)
                if info == 0:
                    L = np.asfortranarray(np.tril(L))  # LAPACK's layout: dtrtrs solves without a copy
                    self._range_space = (L, la.solve_triangular(L, A.T, lower=True, check_finite=False))
        return self._range_space or None

    def _scales(self, P, A, fresh: bool) -> tuple[np.ndarray, np.ndarray]:
        """The equilibration of K at (P, A), for the thresholds of :func:`classify_rows`: computed once while P
        and A are constant; else at every solver call (``fresh``), and reused when a previous active set is
        tried (thresholds need the scales' orders of magnitude, not their last digits)."""
        if self._scales_cache is None or (fresh and not self._constant_matrices):
            self._scales_cache = equilibration(P, A)
        return self._scales_cache

    def entries(self, rows: np.ndarray) -> np.ndarray:
        """The problem's stacked inequality entries of the QP's inequality rows ``rows`` (rows cvxpy added
        left out), in increasing order."""
        if self._rows_are_entries:  # no row added by cvxpy, none reordered: the rows are the entries
            return np.sort(rows)
        entries = self.row_entry[rows]
        return np.sort(entries[entries >= 0])

    def _describe_rows(self, rows: np.ndarray) -> str:
        """Names of inequality rows of the QP: the problem's constraint entries, or rows cvxpy added."""
        entries = self.entries(rows)
        internal = rows.size - entries.size
        parts = [self.problem.describe_entries(entries)] if entries.size else []
        if internal:
            parts.append(f"{internal} row(s) cvxpy added in canonicalizing the problem")
        return "; ".join(parts)

    def _kkt_factor(self, P, A, active) -> _Factor:
        """The factorization of K_S for the active rows ``active`` (kept while P and A are constant)."""
        key = active.tobytes()
        if self._constant_matrices and key in self._factor_cache:
            return self._factor_cache[key]
        rows = np.concatenate([np.arange(self.n_eq), self.n_eq + np.flatnonzero(active)])
        A_S = A[rows]
        basis = self._range_space_basis(P, A)
        if basis is not None:
            factor = _range_space_factor(*basis, P, A_S, rows)
        elif self.dense:
            k = A_S.shape[0]
            K = np.zeros((self.n + k, self.n + k))
            K[: self.n, : self.n], K[self.n:, : self.n], K[: self.n, self.n:] = P, A_S, A_S.T
            factor = _factor(K)
        else:
            if self._pattern is None:
                self._pattern = _PatternLDL(P, A)
            factor = (self._pattern.factor(P, A, rows)  # None where K_S is near singular: SuperLU decides
                      or _factor(sp.block_array([[P, A_S.T], [A_S, None]], format="csc")))
        factor.rows = rows
        if factor.rcond < SINGULAR_RCOND:
            raise GeneralPathNeeded(f"the active-set KKT matrix is singular (rcond {factor.rcond:.1e})")
        if self._constant_matrices:
            if len(self._factor_cache) > 64:
                self._factor_cache.clear()
            self._factor_cache[key] = factor
        return factor

    def _polished(self, P, q, A, b, active, how, status, scales) -> tuple[QPPoint, np.ndarray, np.ndarray]:
        """The exact solution of the KKT system on ``active``, and its inequality rows' multipliers and slacks
        in the units of :func:`normalized_complementarity` (a sign violation is below -SIGN_TOL there)."""
        factor = self._kkt_factor(P, A, active)
        rows = factor.rows
        solution = factor.solve(np.concatenate([-q, -b[rows]]))
        z = solution[: self.n]
        lam = np.zeros(self.m)
        lam[rows] = -solution[self.n:]
        rows_at_z = A @ z + b
        residual = max(_largest(P @ z + q - A.T @ lam), _largest(rows_at_z[rows]))  # stationarity, active rows
        force, slack = normalized_complementarity(z, lam, q, rows_at_z, self.n_eq, scales)
        return QPPoint(z, lam, active, factor, how, status, residual), force, slack

    def _solved(self, P, q, A, b, z, lam, how, status, tol, scales, where) -> QPPoint:
        """The solver's answer polished on its active set: weakly active rows kept inactive (with a warning);
        where the polish contradicts a sign, up to 3 corrections of the active set (a primal-dual active-set
        step: infeasible rows join, rows with negative multipliers leave)."""
        active, weak = classify_rows(z, lam, q, A, b, self.n_eq, scales, tol)
        for _ in range(4):
            point, force, slack = self._polished(P, q, A, b, active, how, status, scales)
            negative, infeasible = force < -SIGN_TOL, slack < -SIGN_TOL
            if not (negative.any() or infeasible.any()):
                break
            active = (active | infeasible) & ~negative
        else:
            raise GeneralPathNeeded("the polish on the solver's active set keeps contradicting a sign")
        point.weak = weak & ~point.active
        if point.weak.any():
            warn_weakly_active(where, self._describe_rows(np.flatnonzero(point.weak)))
        return point

    def _try_active_set(self, P, q, A, b, active, tol, scales) -> QPPoint | None:
        """The previous call's active set, if it is optimal at this x with a margin (else None): every
        active multiplier and every inactive slack above the weak-activity threshold."""
        try:
            point, force, slack = self._polished(P, q, A, b, active, "active set reused", cp.OPTIMAL, scales)
        except GeneralPathNeeded:
            return None
        if (force < -SIGN_TOL).any() or (slack < -SIGN_TOL).any() or weakly_active(force, slack, tol).any():
            return None
        return point

    def forget_warm_starts(self) -> None:
        """Drop the kept active sets and factorizations: the next :meth:`solve` calls the QP solver."""
        self._last_active.clear()
        self._try_kept_set.clear()
        self._factor_cache.clear()
        self._solver_state.clear()

    # ------------------------------------------------------------ derivative

    def vjp(self, point: QPPoint, dF_dw: np.ndarray) -> list[np.ndarray]:
        """dF/dx for each listed parameter (shaped like it) from dF/dw, w = (y, mu, nu) stacked like
        ``point.y``, ``point.mu``, ``point.nu`` (or dF/dy alone). K_S v = (dF/dz, dF/dlam_S): an inactive
        row's multiplier stays zero nearby, so its cotangent drops out. Sets ``point.adjoint_residual``,
        the adjoint solve's relative residual ||K_S v - rhs|| / ||rhs||."""
        rows = point.factor.rows
        rhs = np.zeros(point.factor.size)
        n_y = point.y.size
        rhs[self.y_index] = dF_dw[:n_y]
        if self.problem.uses_multipliers and dF_dw.size > n_y:  # a multiplier is an output
            dF_dlam = np.zeros(self.m)
            dF_dlam[np.concatenate([self.mu_index, self.nu_index])] = dF_dw[n_y:]
            rhs[self.n:] = -dF_dlam[rows]  # K_S's unknowns are (z, -lam_S) (see _polished)
        v = point.factor.solve(rhs)
        norm = math.sqrt(rhs @ rhs)
        residual = point.factor.matvec(v) - rhs
        point.adjoint_residual = math.sqrt(residual @ residual) / norm if norm else 0.0
        v_z, v_omega = v[: self.n], v[self.n:]
        d_theta = self._q.transpose(-v_z)
        d_b = np.zeros(self.m)
        d_b[rows] = -v_omega
        d_theta += self._b.transpose(d_b)
        if self._A.value is None:  # A moves with theta (a constant map's cotangent is the dropped last entry)
            i, j = self._A_pos
            v_rows = np.zeros(self.m)
            v_rows[rows] = v_omega
            d_theta += self._A.transpose(point.lam[i] * v_z[j] - v_rows[i] * point.z[j])
        if self._P.value is None:
            i, j = self._P_pos
            d_theta += self._P.transpose(-v_z[i] * point.z[j])
        return self._split(d_theta, point.lifted)

    def _split(self, d_theta: np.ndarray, graph: "_LiftedGraph | None") -> list[np.ndarray]:
        """dF/dtheta as dF/dx per listed parameter; lifted parameters by the chain rule through their graph."""
        grads = [np.zeros(p.shape) for p in self.problem.parameters]
        lifted = {}
        for param, start, size in self._theta_slices[:-1]:
            index = self._listed.get(param.id)
            if index is not None:
                grads[index] = grads[index] + d_theta[start:start + size].reshape(param.shape, order="F")
            elif graph is not None and param.id in graph.values:
                lifted[param.id] = d_theta[start:start + size].reshape(param.shape, order="F")
        if lifted:
            for index, g in enumerate(graph.vjp(lifted)):
                grads[index] = grads[index] + g
        return grads


@dataclass
class _LiftedGraph:
    """The lifted parameters' values theta_k = e_k(x) at one x, with the torch graph from x."""

    x: list[torch.Tensor]
    tensors: dict[int, torch.Tensor]
    values: dict[int, np.ndarray]

    @classmethod
    def at(cls, parameters, lifted, x) -> "_LiftedGraph":
        xs = [torch.as_tensor(np.asarray(v, dtype=float)).requires_grad_(True) for v in x]
        env = Env({p.id: t for p, t in zip(parameters, xs)})
        with torch.enable_grad():
            tensors = {k.parameter.id: k.function(env).reshape(k.parameter.shape) for k in lifted}
        return cls(xs, tensors, {i: t.detach().numpy() for i, t in tensors.items()})

    def vjp(self, cotangents: dict[int, np.ndarray]) -> list[np.ndarray]:
        """(de/dx)^T dF/dtheta for each x."""
        ids = list(cotangents)
        with torch.enable_grad():
            grads = torch.autograd.grad([self.tensors[i] for i in ids], self.x,
                                        [torch.as_tensor(cotangents[i]) for i in ids], allow_unused=True,
                                        retain_graph=True)
        return [np.zeros(t.shape) if g is None else g.numpy() for t, g in zip(self.x, grads)]


# ---------------------------------------------------------------- compile

def compile_qp(problem) -> tuple[QPProgram | None, str]:
    """The problem's :class:`QPProgram`, or (None, why not): the fast path needs a DPP problem whose
    cone program is a QP (affine constraints, a convex quadratic or linear objective)."""
    inner = problem.inner
    if problem.smooth_error is not None:
        return None, "not on the smooth route"
    if not inner.objective.expr.is_quadratic() and not inner.objective.expr.is_affine():
        return None, "the objective is not quadratic"
    form = dpp_form(inner)
    if form is None:
        return None, "not DPP, even with its parameter expressions as parameters of their own"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data, chain, _ = form.problem.get_problem_data(cp.CLARABEL)
    except Exception as err:  # noqa: BLE001 - any canonicalization failure: the general path handles it
        return None, f"cvxpy could not compile it for a QP solver ({err})"
    dims = data["param_prob"].cone_dims
    if dims.soc or dims.psd or dims.exp or dims.p3d or getattr(dims, "pnd", None):
        return None, "its cone program has cones other than zero and nonnegative"
    if data.get("lower_bounds") is not None or data.get("upper_bounds") is not None:
        return None, "variable bounds"
    try:
        return QPProgram(problem, form, data, chain), "QP" + (" with lifted parameter expressions" if form.lifted else "")
    except KeyError as err:
        return None, f"a variable or constraint is not in cvxpy's QP ({err})"


def _parameter_slices(inner: cp.Problem, pp, chain) -> list[tuple]:
    """[(parameter of ``inner``, start, size)] in theta's order, then (None, total size, 1) for the constant."""
    original = {p.id: p for p in inner.parameters()}
    original.update({ids[0]: original[o] for o, ids in chain.compose_param_id_map().items() if o in original})
    slices = [(original[param_id], start, pp.param_id_to_size[param_id])
              for param_id, start in sorted(pp.param_id_to_col.items(), key=lambda item: item[1]) if param_id != -1]
    return slices + [(None, pp.total_param_size, 1)]


def _fortran_to_c(shape) -> np.ndarray:
    """Positions in a Fortran-flattened array of the entries in C order."""
    return np.arange(int(np.prod(shape, dtype=int))).reshape(shape, order="F").ravel()


def _variable_index(variables, pp, chain) -> np.ndarray:
    """z[index] stacks ``variables`` in C order."""
    final = {original: ids[0] for original, ids in chain.compose_var_id_map().items()}
    return np.concatenate([pp.var_id_to_col[final.get(v.id, v.id)] + _fortran_to_c(v.shape) for v in variables]
                          or [np.zeros(0, int)])


def _constraint_rows(pp, chain) -> dict[int, np.ndarray]:
    """Rows of each (original) constraint in the QP, its entries in C order."""
    final = chain.compose_constr_id_map()
    rows, start = {}, 0
    for kind in (cp.constraints.Zero, cp.constraints.NonNeg):
        for constraint in pp.constr_map.get(kind, []):
            rows[constraint.id] = start + _fortran_to_c(constraint.shape)
            start += constraint.size
    return {original: rows[final_id] for original, final_id in final.items() if final_id in rows} | rows


def equilibration(P, A, rounds: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Ruiz scales (d_z, d_rows) of K = [[P, A^T], [A, 0]] over all rows of A: D K D has rows of max-norm ~1,
    so that the scales of the variables, of the rows and of the objective drop out."""
    n, m = P.shape[0], A.shape[0]
    K = sp.csr_array(sp.block_array([[sp.csr_array(P), sp.csr_array(A).T], [sp.csr_array(A), None]]))
    K.sum_duplicates()
    magnitudes, columns = np.abs(K.data), K.indices
    starts = K.indptr[:-1]
    filled = np.diff(K.indptr) > 0
    d = np.ones(n + m)
    for _ in range(rounds):
        row_max = np.zeros(n + m)
        row_max[filled] = np.maximum.reduceat(magnitudes * d[columns], starts[filled]) * d[filled]
        d = np.where(row_max > 0, d / np.sqrt(np.where(row_max > 0, row_max, 1.0)), d)
    return d[:n], d[n:]


def normalized_complementarity(z: np.ndarray, lam: np.ndarray, q, rows_at_z: np.ndarray, n_eq: int, scales
                               ) -> tuple[np.ndarray, np.ndarray]:
    r"""The inequality rows' multipliers and slacks (signed), in the units of the equilibrated KKT matrix.

    With ``scales`` = (d_z, d_rows) of :func:`equilibration`, the slack s = A z + b of row i (``rows_at_z``,
    all rows) becomes s~_i = d_i s_i, relative to the size of the equilibrated point max(|z / d_z|, |s~|),
    and the multiplier mu~_i = lam_i / d_i, relative to max(|d_z q|, |mu~|): the scales of the variables,
    of the rows and of the objective drop out.
    """
    d_z, d_rows = scales
    d = d_rows[n_eq:]
    slack = d * rows_at_z[n_eq:]
    force = lam[n_eq:] / d
    slack /= max(_largest(z / d_z), _largest(slack), TINY)
    force /= max(_largest(d_z * q), _largest(force), TINY)
    return force, slack


def _largest(v: np.ndarray) -> float:
    """max |v_i| (0 for an empty v)."""
    return float(np.abs(v).max(initial=0.0))


def classify_rows(z: np.ndarray, lam: np.ndarray, q, A, b, n_eq: int, scales, tol: float) -> tuple[np.ndarray, np.ndarray]:
    r"""(active, weakly active) inequality rows at (z, lam), as :func:`cbo.kkt.active_set` reads them.

    Complementarity says lam_i s_i = 0; which of the two is *relatively* larger (in the units of
    :func:`normalized_complementarity`) tells an active row from an inactive one. A row is *weakly active*
    where both are (nearly) zero (:func:`weakly_active`: no derivative there), *active* where
    mu~ > |s~| and mu~ > tol.
    """
    force, slack = normalized_complementarity(z, lam, q, A @ z + b, n_eq, scales)
    weak = weakly_active(force, slack, tol)
    return (force > np.abs(slack)) & (force > tol) & ~weak, weak


def weakly_active(force: np.ndarray, slack: np.ndarray, tol: float) -> np.ndarray:
    """Rows whose (normalized) multiplier and slack are both below tol_w = sqrt(tol) / 10: strict
    complementarity fails there (the tolerance of :func:`cbo.kkt.active_set`)."""
    tol_w = np.sqrt(tol) / 10
    return (force <= tol_w) & (np.abs(slack) <= tol_w)


