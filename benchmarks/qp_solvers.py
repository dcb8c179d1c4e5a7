r"""Which QP solver, called directly, and which factorization of the active-set KKT matrix should cbo's fast path use?

What it measures
----------------
Two problem classes, each the standard QP

    min_z 1/2 z'Pz + q'z   s.t.  A_eq z = b_eq  (p = max(1, n/10) rows),  A_in z <= b_in  (m = n/2 rows)

built directly in numpy/scipy around a known solution y0 (no cvxpy): a random half S of the
inequality rows is tight at y0 with multipliers mu0 ~ U(0.5, 1.5), the other rows have slack
~ U(0.5, 1.5), and q = -(P y0 + A_in[S]' mu0[S] + A_eq' nu0) makes y0 the unique optimum with
strictly complementary multipliers. The reference active set is therefore S (exactly, no solver).

* dense:  P = M'M/n + I with M gaussian (n x n); A_eq, A_in gaussian.
* banded: P = M'M + I with M upper triangular with 3 bands; A_eq, A_in with 10 gaussian nonzeros per
  row in a window of 20 columns that slides along the variables: local coupling (time-indexed or
  discretized models), whose KKT factors stay sparse (~50 nonzeros per row at n = 20000). The
  fast path's sparse factorization is chosen on this class: QDLDL's LDL' of the regularized
  quasi-definite matrix, refined, took 1.7 / 16 / 67 ms against SuperLU's 4.3 / 43 / 254 ms at
  n = 1000 / 5000 / 20000 (factor + 2 solves; 2-core Xeon, busy: load ~7).
* sparse: P = M'M + I with M = scipy.sparse.random(n, n, density=10/n); A_eq, A_in with 10 gaussian
  nonzeros per row. M'M has ~100 nonzeros per row on a random pattern, which fills in almost
  completely in any sparse LDL'/LU (random graphs have no small separators): from n = 1000 on,
  qdldl's L (AMD) holds 45% and SuperLU's L + U 67-82% of the dense factor's entries, so dense
  LAPACK beats every sparse factorization. That is why the sparse class stops at the sizes below.

Solvers (each given its data in its native format; tolerances tight, ~1e-9):
daqp (daqp.Model; dense), proxsuite proxqp dense and sparse, piqp DenseSolver and SparseSolver (the
dense ones for n <= --dense-max-n, default 1000), osqp (polishing on, eps 1e-9), clarabel
(its own Python API, tolerances 1e-10) and HiGHS's QP solver (highspy). Per solver and size:

* setup: constructing the solver object with the data (factorization/preconditioning that the
  solver's update API later reuses); reported separately, median over repeats.
* cold: the first solve() after setup, from no initial guess.
* warm: what an outer loop does: the solver was set up and solved at q + dq (dq ~ 1e-2 N(0, I)),
  then update(q) + warm start from that solution + solve(). Interior-point solvers (piqp,
  clarabel) and HiGHS's active-set QP have no primal-dual warm start: their "warm" is update(q)
  + solve(), i.e. only the setup (symbolic factorization, scaling) is reused. daqp's Model keeps
  its working set between solves (hot start), proxsuite and osqp take (x, y, z) explicitly.
* KKT res: max of |Pz + q + A_eq'nu + A_in'mu|_inf, |A_eq z - b_eq|_inf, max(A_in z - b_in, 0),
  max(-mu, 0) and max|mu_i (b_in - A_in z)_i| for the returned (z, nu, mu), each solver's
  multipliers mapped to this sign convention (nu free, mu >= 0); cold / warm.
* active set: rows with mu_i > 1e-6 max(mu), compared with S; "ok" or the number of wrong rows.

Factorizations of the active-set KKT matrix K_A = [[P, A_A'], [A_A, 0]], A_A = [A_eq; A_in[S]]:
time of factor + two solves (two random right-hand sides, as the forward polish and the adjoint
solve need), relative residual max_k |K_A x_k - b_k|_2 / |b_k|_2, nonzeros of the factor and the
peak resident memory added by the factorization (VmHWM after - VmRSS before, with the high-water
mark reset through /proc/self/clear_refs; tracemalloc would miss SuperLU's and qdldl's C-level
allocations). Methods: scipy.linalg.lu_factor/lu_solve and LAPACK dsytrf/dsytrs (the dense
Bunch-Kaufman LDL') for n <= DENSE_KKT_MAX_N, scipy.linalg.ldl (+ triangular solves) and
scipy.sparse.linalg.factorized for n <= 1000 (factorized is splu(A).solve when scikit-umfpack is
absent, as here), splu with COLAMD (its default) and with MMD_AT_PLUS_A (the symmetric ordering),
and qdldl on the quasi-definite [[P + d I, A_A'], [A_A, -d I]] (upper triangle, CSC) followed by
two steps of iterative refinement on the true K_A, for d = 1e-12 and d = 1e-8 (AMD orders the
sparse constraint rows first, so with d = 1e-12 their pivots are -1e-12 and the refinement
converges slowly; d = 1e-8 is accurate after one step).

Timing: time.perf_counter around the call, garbage collector off, BLAS/OpenMP limited to
--threads (default 1: the numbers are single-core work, and stay comparable when the machine is
shared; two OpenBLAS threads on a busy 2-core machine gave 10-100x outliers); median over
--repeats, fewer repeats where a cell already used REPEAT_BUDGET_S (the "reps" column). A solver
whose cold setup + solve exceeds --max-seconds is not run at larger sizes of that class.

Run (defaults: about 2 minutes on 2 cores):

    python benchmarks/qp_solvers.py [--dense-sizes 10 30 100 300] [--sizes 100 300 1000 5000]
                                    [--max-solver-n 1000] [--dense-max-n 1000] [--repeats 5]
                                    [--max-seconds 20] [--threads 1]

--sizes are the sparse sizes; sizes above --max-solver-n only get the KKT factorizations (an
interior-point solve at n = 5000 needs ~11 factorizations of ~20 s each here). n = 20000 is out
of reach of the sparse factorizations on this class (see the module's first paragraph): measured
at n = 10000 (--sizes 10000 --max-solver-n 0 --repeats 1, ~12 min): qdldl 200 s / 0.64 GB,
splu 256 s / 1.4 GB, dense LAPACK LDL' 22 s / 1.4 GB; times ~n^3 and memory ~n^2 give, at
n = 20000, ~27 and ~34 min for qdldl and splu and ~3 min / 5.6 GB for the dense LDL'.
The tables are printed and written to benchmarks/output/qp_solvers.md.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import time
import warnings
from ctypes import c_int
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.linalg as la
import scipy.sparse as sp
import scipy.sparse.linalg as sla
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from problems.figures import save_figures, slug

OUTPUT = Path(__file__).resolve().parent / "output" / "qp_solvers.md"
NONZEROS_PER_ROW = 10
WARM_PERTURBATION = 1e-2      # dq ~ WARM_PERTURBATION * N(0, I) for the warm start's previous solve
ACTIVE_TOL = 1e-6             # mu_i > ACTIVE_TOL * max(mu): active
EPS = 1e-9                    # tolerance for osqp, piqp, proxsuite, HiGHS
CLARABEL_EPS = 1e-10
DENSE_MAX_N = 1000            # dense solvers (daqp, proxqp dense, piqp dense) up to this n
DENSE_KKT_MAX_N = 10000       # dense LU / LAPACK LDL' of K_A up to this n
SMALL_KKT_MAX_N = 1000        # scipy.linalg.ldl and factorized up to this n
COLAMD_MAX_N = 2000           # splu with its default COLAMD ordering up to this n
QDLDL_REGS = (1e-12, 1e-8)   # quasi-definite regularization +-delta of qdldl's matrix (refined on the true K_A)
REFINEMENT_STEPS = 2
PEAK_MIN_N = 1000            # peak memory shown from this n on (below it, it is allocator noise)
REPEAT_BUDGET_S = 2.0         # stop repeating once a cell has used this much time (>= 1 repeat)
INF = 1e30


# ---------------------------------------------------------------- problems

@dataclass
class QP:
    """min 1/2 z'Pz + q'z s.t. A_eq z = b_eq, A_in z <= b_in, optimal at y0 with active rows S."""

    kind: str
    P: np.ndarray | sp.csc_matrix
    q: np.ndarray
    A_eq: np.ndarray | sp.csr_matrix
    b_eq: np.ndarray
    A_in: np.ndarray | sp.csr_matrix
    b_in: np.ndarray
    y0: np.ndarray
    S: np.ndarray
    q_near: np.ndarray        # q + dq: the previous outer iterate for the warm start
    cache: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.q.size

    @property
    def p(self) -> int:
        return self.b_eq.size

    @property
    def m(self) -> int:
        return self.b_in.size

    def dense(self, name: str) -> np.ndarray:
        """P, A_eq, A_in, A = [A_eq; A_in] as C-contiguous dense arrays (cached)."""
        key = "dense " + name
        if key not in self.cache:
            M = self.A() if name == "A" else getattr(self, name)
            self.cache[key] = np.ascontiguousarray(M.toarray() if sp.issparse(M) else M)
        return self.cache[key]

    def csc(self, name: str) -> sp.csc_matrix:
        """P, P_upper, A_eq, A_in, A as CSC matrices (cached)."""
        key = "csc " + name
        if key not in self.cache:
            if name == "P_upper":
                M = sp.triu(sp.csc_matrix(self.P), format="csc")
            else:
                M = sp.csc_matrix(self.A() if name == "A" else getattr(self, name))
            self.cache[key] = M
        return self.cache[key]

    def A(self):
        if sp.issparse(self.A_in):
            return sp.vstack([self.A_eq, self.A_in]).tocsc()
        return np.vstack([self.A_eq, self.A_in])


def sparse_rows(rows: int, cols: int, rng: np.random.Generator) -> sp.csr_matrix:
    """rows x cols, NONZEROS_PER_ROW standard normal entries in every row."""
    k = min(NONZEROS_PER_ROW, cols)
    indices = np.concatenate([np.sort(rng.choice(cols, size=k, replace=False)) for _ in range(rows)])
    return sp.csr_matrix((rng.standard_normal(rows * k), indices, np.arange(rows + 1) * k), shape=(rows, cols))


def local_rows(rows: int, cols: int, rng: np.random.Generator, width: int = 20) -> sp.csr_matrix:
    """rows x cols, NONZEROS_PER_ROW standard normal entries per row in a window of ``width`` columns that
    slides along the variables (local coupling, as in a discretized or time-indexed model)."""
    starts = np.linspace(0, cols - width, rows).astype(int)
    indices = np.concatenate([s + np.sort(rng.choice(width, NONZEROS_PER_ROW, replace=False)) for s in starts])
    return sp.csr_matrix((rng.standard_normal(rows * NONZEROS_PER_ROW), indices,
                          np.arange(rows + 1) * NONZEROS_PER_ROW), shape=(rows, cols))


def make_qp(kind: str, n: int, seed: int = 0) -> QP:
    rng = np.random.default_rng(seed)
    m, p = n // 2, max(1, n // 10)
    if kind == "dense":
        M = rng.standard_normal((n, n))
        P = M.T @ M / n + np.eye(n)
        A_in, A_eq = rng.standard_normal((m, n)), rng.standard_normal((p, n))
    elif kind == "banded":
        M = sp.diags([rng.standard_normal(n - k) for k in range(3)], offsets=[0, 1, 2])
        P = (M.T @ M + sp.eye(n)).tocsc()
        A_in, A_eq = local_rows(m, n, rng), local_rows(p, n, rng)
    else:
        M = sp.random(n, n, density=NONZEROS_PER_ROW / n, random_state=rng, data_rvs=rng.standard_normal)
        P = (M.T @ M + sp.eye(n)).tocsc()
        A_in, A_eq = sparse_rows(m, n, rng), sparse_rows(p, n, rng)
    y0 = rng.standard_normal(n)
    S = np.sort(rng.choice(m, size=m // 2, replace=False))
    mu0 = np.zeros(m)
    mu0[S] = rng.uniform(0.5, 1.5, S.size)
    slack = rng.uniform(0.5, 1.5, m)
    slack[S] = 0.0
    q = -(P @ y0 + A_in.T @ mu0 + A_eq.T @ rng.standard_normal(p))
    return QP(kind, P, q, A_eq, A_eq @ y0, A_in, A_in @ y0 + slack, y0, S,
              q + WARM_PERTURBATION * rng.standard_normal(n))


@dataclass
class Solution:
    z: np.ndarray
    nu: np.ndarray            # equality multipliers: P z + q + A_eq' nu + A_in' mu = 0
    mu: np.ndarray            # inequality multipliers, >= 0
    iters: int
    ok: bool
    status: str


def kkt_residual(qp: QP, s: Solution) -> float:
    slack = qp.b_in - qp.A_in @ s.z
    return float(max(np.abs(qp.P @ s.z + qp.q + qp.A_eq.T @ s.nu + qp.A_in.T @ s.mu).max(),
                     np.abs(qp.A_eq @ s.z - qp.b_eq).max(), max(0.0, -slack.min()), max(0.0, -s.mu.min()),
                     np.abs(s.mu * slack).max()))


def active_set_errors(qp: QP, s: Solution) -> int:
    """Number of rows whose activity (mu_i > ACTIVE_TOL max mu) differs from the reference S."""
    active = s.mu > ACTIVE_TOL * max(s.mu.max(), 0.0)
    reference = np.zeros(qp.m, dtype=bool)
    reference[qp.S] = True
    return int((active != reference).sum())


# ---------------------------------------------------------------- solvers
# Each backend: setup(qp, q) -> handle; solve(handle) -> Solution (cold, right after setup);
# warm(handle, qp, q, previous) -> Solution (update q, warm start from previous, solve).

class Backend:
    name = ""
    dense = False             # needs dense data (limited to n <= --dense-max-n)
    warm_note = ""

    def available(self) -> bool:
        return True

    def setup(self, qp: QP, q: np.ndarray):
        raise NotImplementedError

    def solve(self, handle, qp: QP) -> Solution:
        raise NotImplementedError

    def warm(self, handle, qp: QP, q: np.ndarray, previous: Solution) -> Solution:
        raise NotImplementedError


class Daqp(Backend):
    """daqp.Model: blower <= A z <= bupper, sense 5 = equality; H z + f + A' lam = 0, lam >= 0 at an
    active upper bound (<= 0 at a lower one). The workspace keeps its working set between solves."""

    name, dense = "daqp", True

    def setup(self, qp, q):
        import daqp
        upper = np.concatenate([qp.b_eq, qp.b_in])
        lower = np.concatenate([qp.b_eq, np.full(qp.m, -INF)])
        sense = np.zeros(qp.p + qp.m, dtype=c_int)
        sense[:qp.p] = 5
        model = daqp.Model()
        model.setup(qp.dense("P"), q, qp.dense("A"), upper, lower, sense)
        return model

    def _result(self, qp, out):
        z, _, exitflag, info = out
        lam = np.asarray(info["lam"])
        return Solution(np.asarray(z), lam[:qp.p], lam[qp.p:], int(info["iterations"]), exitflag == 1,
                        f"exitflag {exitflag}")

    def solve(self, model, qp):
        return self._result(qp, model.solve())

    def warm(self, model, qp, q, previous):
        model.update(f=q)         # hot start: the previous working set is kept
        return self._result(qp, model.solve())


class ProxQP(Backend):
    """proxsuite.proxqp.{dense,sparse}.QP(n, n_eq, n_in).init(H, g, A, b, C, l, u); results x, y (eq), z (in)
    with H x + g + A'y + C'z = 0, z >= 0 at an active upper bound."""

    def __init__(self, variant: str):
        self.variant = variant
        self.name = f"proxqp {variant}"
        self.dense = variant == "dense"

    def setup(self, qp, q):
        import proxsuite
        module = getattr(proxsuite.proxqp, self.variant)
        solver = module.QP(qp.n, qp.p, qp.m)
        solver.settings.eps_abs = EPS
        solver.settings.eps_rel = 0.0
        solver.settings.max_iter = 100_000
        solver.settings.verbose = False
        data = qp.dense if self.dense else qp.csc
        solver.init(data("P"), q, data("A_eq"), qp.b_eq, data("A_in"), np.full(qp.m, -1e20), qp.b_in)
        return solver

    def _result(self, solver):
        import proxsuite
        r = solver.results
        return Solution(r.x.copy(), r.y.copy(), r.z.copy(), int(r.info.iter),
                        r.info.status == proxsuite.proxqp.PROXQP_SOLVED, str(r.info.status).split(".")[-1])

    def solve(self, solver, qp):
        solver.solve()
        return self._result(solver)

    def warm(self, solver, qp, q, previous):
        import proxsuite
        solver.update(g=q)
        solver.settings.initial_guess = proxsuite.proxqp.InitialGuess.WARM_START
        solver.solve(previous.z, previous.nu, previous.mu)
        return self._result(solver)


class Piqp(Backend):
    """piqp.{Dense,Sparse}Solver().setup(P, c, A, b, G, h_l, h_u); result x, y, z_l, z_u with
    P x + c + A'y + G'(z_u - z_l) = 0. No warm start (interior point): update(c=q) + solve()."""

    warm_note = "update+solve"

    def __init__(self, variant: str):
        self.variant = variant
        self.name = f"piqp {variant}"
        self.dense = variant == "dense"

    def setup(self, qp, q):
        import piqp
        solver = piqp.DenseSolver() if self.dense else piqp.SparseSolver()
        solver.settings.eps_abs = EPS
        solver.settings.eps_rel = EPS
        solver.settings.verbose = False
        data = (lambda k: np.asfortranarray(qp.dense(k))) if self.dense else qp.csc
        solver.setup(data("P"), q, data("A_eq"), qp.b_eq, data("A_in"), None, qp.b_in)
        return solver

    def solve(self, solver, qp):
        import piqp
        status = solver.solve()
        r = solver.result
        return Solution(np.array(r.x), np.array(r.y), np.array(r.z_u) - np.array(r.z_l), int(r.info.iter),
                        status == piqp.PIQP_SOLVED, str(status).split(".")[-1])

    def warm(self, solver, qp, q, previous):
        solver.update(c=q)
        return self.solve(solver, qp)


class Osqp(Backend):
    """osqp.OSQP().setup(P_upper, q, A, l, u, **settings); res.x, res.y with P x + q + A'y = 0,
    y >= 0 at an active upper bound; update(q=...), warm_start(x=..., y=...)."""

    name = "osqp"

    def setup(self, qp, q):
        import osqp
        solver = osqp.OSQP()
        lower = np.concatenate([qp.b_eq, np.full(qp.m, -np.inf)])
        upper = np.concatenate([qp.b_eq, qp.b_in])
        solver.setup(qp.csc("P_upper"), q, qp.csc("A"), lower, upper, eps_abs=EPS, eps_rel=EPS,
                     polishing=True, max_iter=200_000, verbose=False)
        return solver

    def solve(self, solver, qp):
        res = solver.solve()
        y = np.asarray(res.y)
        return Solution(np.asarray(res.x).copy(), y[:qp.p].copy(), y[qp.p:].copy(), int(res.info.iter),
                        res.info.status == "solved" and res.info.status_polish == 1,
                        f"{res.info.status}, polish {res.info.status_polish}")

    def warm(self, solver, qp, q, previous):
        solver.update(q=q)
        solver.warm_start(x=previous.z, y=np.concatenate([previous.nu, previous.mu]))
        return self.solve(solver, qp)


class Clarabel(Backend):
    """clarabel.DefaultSolver(P_upper, q, A, b, [ZeroConeT(p), NonnegativeConeT(m)], settings):
    A z + s = b, s in K; solution.x, solution.z with P x + q + A'z = 0, z >= 0 on the nonnegative
    cone. No warm start: update(q=q) + solve()."""

    name, warm_note = "clarabel", "update+solve"

    def setup(self, qp, q):
        import clarabel
        settings = clarabel.DefaultSettings()
        settings.verbose = False
        for key in ("tol_gap_abs", "tol_gap_rel", "tol_feas", "tol_ktratio"):
            setattr(settings, key, CLARABEL_EPS)
        settings.max_iter = 200
        cones = [clarabel.ZeroConeT(qp.p), clarabel.NonnegativeConeT(qp.m)]
        return clarabel.DefaultSolver(qp.csc("P_upper"), q, qp.csc("A"), np.concatenate([qp.b_eq, qp.b_in]),
                                      cones, settings)

    def solve(self, solver, qp):
        sol = solver.solve()
        z = np.asarray(sol.z)
        return Solution(np.asarray(sol.x), z[:qp.p], z[qp.p:], int(sol.iterations), str(sol.status) == "Solved",
                        str(sol.status))

    def warm(self, solver, qp, q, previous):
        solver.update(q=q)
        return self.solve(solver, qp)


class Highs(Backend):
    """highspy.Highs with a HighsModel (lp_ + hessian_, lower triangle); getSolution().col_value,
    row_dual with P x + q - A' row_dual = 0 (row_dual <= 0 at an active upper bound): mu = -row_dual.
    No primal-dual warm start: changeColsCost + run() (qp_allow_hot_start on)."""

    name, warm_note = "highs", "update+solve"

    def available(self):
        try:
            import highspy  # noqa: F401
        except ImportError:
            return False
        return True

    def setup(self, qp, q):
        import highspy
        h = highspy.Highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("kkt_tolerance", EPS)
        h.setOptionValue("qp_allow_hot_start", True)
        A, Pl = qp.csc("A"), sp.tril(qp.csc("P"), format="csc")
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = qp.n, qp.p + qp.m
        lp.col_cost_ = q
        lp.col_lower_, lp.col_upper_ = np.full(qp.n, -highspy.kHighsInf), np.full(qp.n, highspy.kHighsInf)
        lp.row_lower_ = np.concatenate([qp.b_eq, np.full(qp.m, -highspy.kHighsInf)])
        lp.row_upper_ = np.concatenate([qp.b_eq, qp.b_in])
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = qp.n, qp.p + qp.m
        lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = A.indptr, A.indices, A.data
        hessian = highspy.HighsHessian()
        hessian.dim_, hessian.format_ = qp.n, highspy.HessianFormat.kTriangular
        hessian.start_, hessian.index_, hessian.value_ = Pl.indptr, Pl.indices, Pl.data
        model = highspy.HighsModel()
        model.lp_, model.hessian_ = lp, hessian
        h.passModel(model)
        return h

    def solve(self, h, qp):
        import highspy
        h.run()
        sol = h.getSolution()
        y = -np.asarray(sol.row_dual)
        status = h.getModelStatus()
        return Solution(np.asarray(sol.col_value), y[:qp.p], y[qp.p:], int(h.getInfo().qp_iteration_count),
                        status == highspy.HighsModelStatus.kOptimal, str(status).split(".")[-1])

    def warm(self, h, qp, q, previous):
        h.changeColsCost(qp.n, np.arange(qp.n, dtype=np.int32), q)
        return self.solve(h, qp)


BACKENDS: list[Backend] = [Daqp(), ProxQP("dense"), ProxQP("sparse"), Piqp("dense"), Piqp("sparse"), Osqp(),
                           Clarabel(), Highs()]


def timed(fn: Callable, *args):
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        out = fn(*args)
        return out, time.perf_counter() - start
    finally:
        gc.enable()


@dataclass
class SolverRow:
    kind: str
    n: int
    solver: str
    note: str = ""
    reps: int = 0
    setup: list = field(default_factory=list)
    cold: list = field(default_factory=list)
    warm: list = field(default_factory=list)
    iters: tuple = ("", "")
    kkt: tuple = (np.nan, np.nan)
    active: tuple = ("", "")


def describe(qp: QP, s: Solution) -> tuple[float, str]:
    if not s.ok:
        return kkt_residual(qp, s), f"FAIL ({s.status})"
    wrong = active_set_errors(qp, s)
    return kkt_residual(qp, s), "ok" if wrong == 0 else f"{wrong} wrong"


def run_solver(backend: Backend, qp: QP, repeats: int) -> SolverRow:
    row = SolverRow(qp.kind, qp.n, backend.name)
    spent, cold_sol, warm_sol = 0.0, None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(repeats):
            handle, t_setup = timed(backend.setup, qp, qp.q)
            cold_sol, t_cold = timed(backend.solve, handle, qp)
            del handle
            near = backend.setup(qp, qp.q_near)
            previous = backend.solve(near, qp)
            warm_sol, t_warm = timed(backend.warm, near, qp, qp.q, previous)
            del near
            row.setup.append(t_setup), row.cold.append(t_cold), row.warm.append(t_warm)
            row.reps += 1
            spent += t_setup + t_cold + t_warm
            if spent > REPEAT_BUDGET_S:
                break
    kc, ac = describe(qp, cold_sol)
    kw, aw = describe(qp, warm_sol)
    row.iters, row.kkt, row.active, row.note = (cold_sol.iters, warm_sol.iters), (kc, kw), (ac, aw), backend.warm_note
    return row


# ---------------------------------------------------------------- KKT factorizations

def rss_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Return freed heap memory to the OS (so that new allocations show in the RSS) and reset VmHWM."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class KKTSystem:
    K: sp.csc_matrix          # true K_A
    Kd: np.ndarray | None     # dense K_A (n <= DENSE_KKT_MAX_N)
    K_upper_reg: dict         # delta -> upper triangle (CSC) of [[P + delta I, A_A'], [A_A, -delta I]]
    rhs: np.ndarray           # (N, 2)
    n: int


def kkt_system(qp: QP, rng: np.random.Generator) -> KKTSystem:
    A_A = sp.vstack([sp.csr_matrix(qp.A_eq), sp.csr_matrix(qp.A_in)[qp.S]])
    P = sp.csc_matrix(qp.P)
    K = sp.bmat([[P, A_A.T], [A_A, None]], format="csc")
    upper = {delta: sp.triu(sp.bmat([[P + delta * sp.eye(qp.n), A_A.T], [A_A, -delta * sp.eye(A_A.shape[0])]]),
                            format="csc") for delta in QDLDL_REGS}
    Kd = K.toarray() if qp.n <= DENSE_KKT_MAX_N else None
    return KKTSystem(K, Kd, upper, rng.standard_normal((K.shape[0], 2)), qp.n)


def f_dense_lu(s: KKTSystem):
    lu = la.lu_factor(s.Kd, check_finite=False)
    return [la.lu_solve(lu, s.rhs[:, k], check_finite=False) for k in range(2)], lambda: (s.Kd.size, s.Kd.size)


def f_lapack_ldl(s: KKTSystem):
    lwork = int(la.lapack.dsytrf_lwork(s.Kd.shape[0], lower=1)[0])    # the default lwork = n is unblocked
    ldu, ipiv, info = la.lapack.dsytrf(s.Kd, lower=1, lwork=lwork)
    if info != 0:
        raise np.linalg.LinAlgError(f"dsytrf info {info}")
    out = [la.lapack.dsytrs(ldu, ipiv, s.rhs[:, k], lower=1)[0] for k in range(2)]
    return out, lambda: (s.Kd.size // 2, s.Kd.size // 2)


def f_scipy_ldl(s: KKTSystem):
    lu, d, perm = la.ldl(s.Kd, lower=True, check_finite=False)
    L = lu[perm]                                   # unit lower triangular
    band = np.zeros((3, d.shape[0]))               # d is block diagonal (1x1, 2x2): tridiagonal
    band[0, 1:], band[1], band[2, :-1] = np.diag(d, 1), np.diag(d), np.diag(d, -1)
    out = []
    for k in range(2):
        w = la.solve_triangular(L, s.rhs[perm, k], lower=True, unit_diagonal=True, check_finite=False)
        v = la.solve_banded((1, 1), band, w, check_finite=False)
        x = np.empty_like(v)
        x[perm] = la.solve_triangular(L.T, v, lower=False, unit_diagonal=True, check_finite=False)
        out.append(x)
    return out, lambda: (s.Kd.size // 2, s.Kd.size // 2)


def f_splu(spec: str):
    def run(s: KKTSystem):
        lu = sla.splu(s.K, permc_spec=spec)
        return [lu.solve(s.rhs[:, k]) for k in range(2)], lambda: (lu.L.nnz + lu.U.nnz, s.K.shape[0] ** 2)
    return run


def f_factorized(s: KKTSystem):
    solve = sla.factorized(s.K)
    return [solve(s.rhs[:, k]) for k in range(2)], None


def f_qdldl(reg: float):
    def run(s: KKTSystem):
        import qdldl
        solver = qdldl.Solver(s.K_upper_reg[reg], upper=True)
        out = []
        for k in range(2):
            b = s.rhs[:, k]
            x = solver.solve(b)
            for _ in range(REFINEMENT_STEPS):
                x = x + solver.solve(b - s.K @ x)
            out.append(x)
        return out, lambda: (solver.factors()[0].nnz + s.K.shape[0], s.K.shape[0] * (s.K.shape[0] + 1) // 2)
    return run


FACTORIZATIONS: list[tuple[str, Callable, Callable[[int], bool]]] = [
    ("dense LU (lu_factor)", f_dense_lu, lambda n: n <= DENSE_KKT_MAX_N),
    ("dense LDL (LAPACK dsytrf)", f_lapack_ldl, lambda n: n <= DENSE_KKT_MAX_N),
    ("dense LDL (scipy.linalg.ldl)", f_scipy_ldl, lambda n: n <= SMALL_KKT_MAX_N),
    ("splu COLAMD", f_splu("COLAMD"), lambda n: n <= COLAMD_MAX_N),
    ("splu MMD_AT_PLUS_A", f_splu("MMD_AT_PLUS_A"), lambda n: True),
    ("factorized (= splu COLAMD)", f_factorized, lambda n: n <= SMALL_KKT_MAX_N),
    (f"qdldl, reg {QDLDL_REGS[0]:.0e}, + 2 refinement steps", f_qdldl(QDLDL_REGS[0]), lambda n: True),
    (f"qdldl, reg {QDLDL_REGS[1]:.0e}, + 2 refinement steps", f_qdldl(QDLDL_REGS[1]), lambda n: True),
]


@dataclass
class FactorRow:
    kind: str
    n: int
    size: int
    method: str
    times: list = field(default_factory=list)
    residual: float = np.nan
    fill: tuple | None = None  # nonzeros of the factors (L + U, or L with its diagonal), and of dense factors
    peak_mib: float | None = None


def run_factorization(name: str, fn: Callable, system: KKTSystem, kind: str, repeats: int) -> FactorRow:
    row = FactorRow(kind, system.n, system.K.shape[0], name)
    spent = 0.0
    for rep in range(repeats):
        before = rss_kib("VmRSS") if rep == 0 and reset_peak() else None
        (xs, fill), t = timed(fn, system)
        if before is not None:
            row.peak_mib = (rss_kib("VmHWM") - before) / 1024
        row.times.append(t)
        spent += t
        if spent > REPEAT_BUDGET_S:
            break
    row.residual = max(np.linalg.norm(system.K @ x - system.rhs[:, k]) / np.linalg.norm(system.rhs[:, k])
                       for k, x in enumerate(xs))
    row.fill = None if fill is None else fill()
    return row


# ---------------------------------------------------------------- report

def ms(values: list) -> str:
    if not values:
        return "-"
    v = 1e3 * statistics.median(values)
    return f"{v:.3g}" if v < 1000 else f"{v:.0f}"


def solver_table(rows: list) -> str:
    lines = ["| class | n | solver | reps | setup ms | cold ms | warm ms | iters cold/warm | KKT res cold | "
             "KKT res warm | active set cold/warm |",
             "| --- | --: | --- | --: | --: | --: | --: | --: | --: | --: | --- |"]
    for r in rows:
        if isinstance(r, str):
            lines.append(r)
            continue
        warm = ms(r.warm) + (f" ({r.note})" if r.note else "")
        lines.append(f"| {r.kind} | {r.n} | {r.solver} | {r.reps} | {ms(r.setup)} | {ms(r.cold)} | {warm} | "
                     f"{r.iters[0]}/{r.iters[1]} | {r.kkt[0]:.1e} | {r.kkt[1]:.1e} | {r.active[0]} / {r.active[1]} |")
    return "\n".join(lines)


def factor_table(rows: list) -> str:
    lines = ["| class | n | dim K_A | method | reps | factor + 2 solves ms | rel. residual | factor nnz (of dense) | "
             "peak MiB |", "| --- | --: | --: | --- | --: | --: | --: | --: | --: |"]
    for r in rows:
        if isinstance(r, str):
            lines.append(r)
            continue
        fill = "-" if r.fill is None else f"{r.fill[0] / 1e6:.3g}M ({r.fill[0] / r.fill[1]:.0%})"
        peak = "-" if r.peak_mib is None or r.n < PEAK_MIN_N else f"{r.peak_mib:.0f}"
        lines.append(f"| {r.kind} | {r.n} | {r.size} | {r.method} | {len(r.times)} | {ms(r.times)} | "
                     f"{r.residual:.1e} | {fill} | {peak} |")
    return "\n".join(lines)


def quoted_figures(solver_rows: list, factor_rows: list) -> tuple[dict[str, str], list[str]]:
    """The figures docs/speed.md quotes (problems/figures.py) and those that vary from run to run (the times):
    per solver row "solver.<class>_n<n>.<solver>.{setup,cold,warm}" in ms, per factorization row
    "factor.<class>_n<n>.<method>.{ms,fill}"."""
    figures, varies = {}, []
    for r in solver_rows:
        if not isinstance(r, str):
            key = f"solver.{r.kind}_n{r.n}.{slug(r.solver)}"
            times = {"setup": ms(r.setup), "cold": ms(r.cold), "warm": ms(r.warm)}
            figures.update({f"{key}.{name}": value for name, value in times.items()})
            varies += [f"{key}.{name}" for name in times]
    for r in factor_rows:
        if not isinstance(r, str):
            key = f"factor.{r.kind}_n{r.n}.{slug(r.method.replace(', + 2 refinement steps', ''))}"
            figures[f"{key}.ms"] = ms(r.times)
            figures[f"{key}.fill"] = "n/a" if r.fill is None else f"{r.fill[0] / r.fill[1]:.0%}"
            varies.append(f"{key}.ms")
    return {key: "n/a" if value == "-" else value for key, value in figures.items()}, varies


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dense-sizes", type=int, nargs="*", default=[10, 30, 100, 300])
    parser.add_argument("--sizes", type=int, nargs="*", default=[100, 300, 1000, 5000],
                        help="sizes of the sparse class (above --max-solver-n: KKT factorizations only)")
    parser.add_argument("--banded-sizes", type=int, nargs="*", default=[1000, 5000, 20000],
                        help="sizes of the banded class (local coupling: sparse factors; the fast path's "
                             "sparse factorization is chosen on it)")
    parser.add_argument("--max-solver-n", type=int, default=1000)
    parser.add_argument("--dense-max-n", type=int, default=DENSE_MAX_N,
                        help="largest n for the dense solvers (daqp, proxqp dense, piqp dense)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=20.0,
                        help="skip a solver at larger sizes once its cold setup + solve took longer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS/OpenMP threads (threadpoolctl); 1 keeps the times comparable on a shared machine")
    args = parser.parse_args()
    with threadpool_limits(limits=args.threads):
        run(args)


def run(args):

    cases = ([("dense", n) for n in args.dense_sizes] + [("sparse", n) for n in args.sizes]
             + [("banded", n) for n in args.banded_sizes])
    tasks = []
    for kind, n in cases:
        if n <= args.max_solver_n:
            tasks += [("solver", kind, n, b) for b in BACKENDS
                      if b.available() and (not b.dense or n <= args.dense_max_n)]
        tasks += [("factor", kind, n, f) for f in FACTORIZATIONS if f[2](n)]

    load_before = os.getloadavg()[0]
    solver_rows, factor_rows, too_slow = [], [], {}
    problems: dict = {}
    started = time.perf_counter()
    with tqdm(tasks, desc="qp_solvers", unit="case") as bar:
        for what, kind, n, item in bar:
            if (kind, n) not in problems:
                problems.clear()
                qp = make_qp(kind, n, args.seed)
                problems[(kind, n)] = (qp, None)
            qp, system = problems[(kind, n)]
            bar.set_postfix_str(f"{kind} n={n} {item.name if what == 'solver' else item[0]}")
            if what == "solver":
                if (kind, item.name) in too_slow:
                    solver_rows.append(f"| {kind} | {n} | {item.name} | 0 | not run: cold setup + solve took "
                                       f"{too_slow[(kind, item.name)]} |  |  |  |  |  |  |")
                    continue
                try:
                    row = run_solver(item, qp, args.repeats)
                except Exception as err:  # noqa: BLE001 - a failing solver is a result
                    solver_rows.append(f"| {kind} | {n} | {item.name} | 0 | error: {type(err).__name__}: "
                                       f"{str(err)[:80]} |  |  |  |  |  |  |")
                    continue
                solver_rows.append(row)
                worst = max(s + c for s, c in zip(row.setup, row.cold))
                if worst > args.max_seconds:
                    too_slow[(kind, item.name)] = f"{worst:.0f} s at n = {n}"
            else:
                if system is None:
                    system = kkt_system(qp, np.random.default_rng(args.seed + 1))
                    problems[(kind, n)] = (qp, system)
                name, fn, _ = item
                try:
                    factor_rows.append(run_factorization(name, fn, system, kind, args.repeats))
                except Exception as err:  # noqa: BLE001
                    factor_rows.append(f"| {kind} | {n} | {system.K.shape[0]} | {name} | 0 | error: "
                                       f"{type(err).__name__} |  |  |  |")

    header = (f"# QP solvers and KKT factorizations for cbo's fast path\n\n"
              f"`python benchmarks/qp_solvers.py --dense-sizes {' '.join(map(str, args.dense_sizes))} --sizes "
              f"{' '.join(map(str, args.sizes))} --max-solver-n {args.max_solver_n} --dense-max-n {args.dense_max_n}"
              f" --repeats {args.repeats}"
              f" --threads {args.threads}` on {os.cpu_count()} CPUs (load average before the run "
              f"{load_before:.1f}); {time.perf_counter() - started:.0f} s. Times are medians in ms; "
              f"warm = update(q) + warm start from the solution at q + 1e-2 N(0, I) + solve (\"update+solve\": "
              f"no warm start, the setup is reused). KKT res: max KKT violation of the returned (z, nu, mu); "
              f"active set vs the constructed one (mu > 1e-6 max mu).\n")
    text = (header + "\n## Solvers\n\n" + solver_table(solver_rows) + "\n\n## Active-set KKT factorization "
            "(factor + 2 solves)\n\n" + factor_table(factor_rows) + "\n")
    print(text)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"written to {OUTPUT}")
    print(f"figures quoted by the documentation: {save_figures(__file__, *quoted_figures(solver_rows, factor_rows))}")


if __name__ == "__main__":
    main()
