r"""cbo.ArgminLayer against cvxpylayers' CvxpyLayer on the same batched sparse QPs.

Inner problem, for n variables, m = n/2 inequalities and p = n/10 equalities:

    y*(q, r) = argmin_y  0.5 y^T P y + q^T y   s.t.  G y <= h + r,  C y == d

with P = M^T M + I (M = scipy.sparse.random(n, n, density=10/n)) and G, C
sparse with 10 nonzeros per row. h and d are built around a point y0 at which
a random half of the inequalities is tight: q0 = -(P y0 + G_S^T mu0 + C^T nu0)
makes y0 optimal at (q0, r = 0), and the batch is q_b = q0 + 0.1 randn,
r_b = 0.1 randn, so that roughly half of the inequalities stay active.

Loss for the backward pass: (y * W).sum() with a fixed random W of shape (B, n).

Per repetition, cvxpylayers (default backend: diffcp + SCS), cbo with its
default solver (Clarabel) and cbo with tight OSQP run one after the other in
this process (interleaved); each phase is timed with time.perf_counter(). The
first repetition is a warm-up (cbo's worker pool starts, cvxpy canonicalizes)
and is excluded; the tables show medians of the rest.

The reference gradient does not use cbo: each item is solved by cvxpy
(Clarabel, tight tolerances), the active set is read from the multipliers and
the active-set KKT system K [u; lam] = [W_b; 0], K = [[P, A^T], [A, 0]],
A = [G_S; C], is solved densely in numpy: dL/dq_b = -u, dL/dr_b = lam on S, 0
elsewhere. It is checked against central finite differences at the smallest size.

Run:  python benchmarks/vs_cvxpylayers.py [--sizes 100 300 1000] [--batch 8] [--repeats R]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cvxpy as cp
import numpy as np
import scipy.sparse as sp
import torch
from cvxpylayers.torch import CvxpyLayer
from tqdm import tqdm

import cbo

NONZEROS_PER_ROW = 10
ACTIVE_FRACTION = 0.5
PERTURBATION = 0.1            # scale of the random q and r around (q0, 0)
ACTIVE_TOL = 1e-6             # mu_i > ACTIVE_TOL * max(1, max mu): active (reference)
FD_STEP = 1e-5
REFERENCE_SOLVER_OPTIONS = {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10}
OSQP_OPTIONS = {"eps_abs": 1e-9, "eps_rel": 1e-9, "polish": True, "max_iter": 100_000}
CBO_PHASES = ("inner_solve", "polish", "kkt_checks", "adjoint_solve")
PROFILE_LINES = 25
OUTPUT = Path(__file__).resolve().parent / "output" / "vs_cvxpylayers.md"

# Targets of the issue, checked at the largest size.
TARGET_SPEEDUP = 3.0          # cvxpylayers fwd+bwd / cbo fwd+bwd
TARGET_BWD_OVER_FWD = 0.10    # cbo backward / cbo forward
TARGET_GRAD_ERROR = 1e-6      # cbo gradient vs dense KKT reference


# ---------------------------------------------------------------- problem data

@dataclass
class QPData:
    """One sparse QP and its batch of parameter values (q, r) and loss weights W."""

    P: sp.csc_matrix
    G: sp.csr_matrix
    h: np.ndarray
    C: sp.csr_matrix
    d: np.ndarray
    q: np.ndarray          # (B, n)
    r: np.ndarray          # (B, m)
    W: np.ndarray          # (B, n)

    @property
    def n(self) -> int:
        return self.P.shape[0]

    @property
    def m(self) -> int:
        return self.G.shape[0]

    @property
    def batch(self) -> int:
        return self.q.shape[0]


def sparse_rows(rows: int, cols: int, rng: np.random.Generator) -> sp.csr_matrix:
    """A rows x cols matrix with NONZEROS_PER_ROW standard normal entries in every row (no empty rows)."""
    k = min(NONZEROS_PER_ROW, cols)
    indices = np.concatenate([np.sort(rng.choice(cols, size=k, replace=False)) for _ in range(rows)])
    indptr = np.arange(rows + 1) * k
    return sp.csr_matrix((rng.standard_normal(rows * k), indices, indptr), shape=(rows, cols))


def make_qp(n: int, batch: int, rng: np.random.Generator) -> QPData:
    """Sparse QP with a random half of the inequalities tight at (q0, r = 0), and its batch."""
    m, p = n // 2, n // 10
    M = sp.random(n, n, density=NONZEROS_PER_ROW / n, random_state=rng, data_rvs=rng.standard_normal)
    P = (M.T @ M + sp.eye(n)).tocsc()
    return qp_around_optimum(P, sparse_rows(m, n, rng), sparse_rows(p, n, rng), batch, rng)


def qp_around_optimum(P, G, C, batch: int, rng: np.random.Generator) -> QPData:
    """The QP with matrices P, G, C whose optimum at (q0, r = 0) is a random y0 with a random half of the
    inequalities tight (multipliers U(0.5, 1.5)), the others with slack U(0.5, 1.5); and its batch."""
    n, m, p = P.shape[0], G.shape[0], C.shape[0]
    y0 = rng.standard_normal(n)
    active = rng.choice(m, size=int(round(ACTIVE_FRACTION * m)), replace=False)
    mu0 = np.zeros(m)
    mu0[active] = rng.uniform(0.5, 1.5, active.size)
    slack = rng.uniform(0.5, 1.5, m)
    slack[active] = 0.0
    q0 = -(P @ y0 + G.T @ mu0 + C.T @ rng.standard_normal(p))
    return QPData(
        P=P, G=G, h=G @ y0 + slack, C=C, d=C @ y0,
        q=q0 + PERTURBATION * rng.standard_normal((batch, n)),
        r=PERTURBATION * rng.standard_normal((batch, m)),
        W=rng.standard_normal((batch, n)),
    )


@dataclass
class InnerQP:
    """The QP in cvxpy (DPP in q and r)."""

    problem: cp.Problem
    y: cp.Variable
    q: cp.Parameter
    r: cp.Parameter
    inequality: cp.Constraint
    equality: cp.Constraint


def build_inner(data: QPData) -> InnerQP:
    """A fresh cvxpy problem for ``data``: each method gets its own instance."""
    y = cp.Variable(data.n, name="y")
    q = cp.Parameter(data.n, name="q")
    r = cp.Parameter(data.m, name="r")
    inequality = data.G @ y <= data.h + r
    equality = data.C @ y == data.d
    objective = cp.Minimize(0.5 * cp.quad_form(y, cp.psd_wrap(data.P)) + q @ y)
    return InnerQP(cp.Problem(objective, [inequality, equality]), y, q, r, inequality, equality)


# ---------------------------------------------------------------- independent reference

@dataclass
class Reference:
    """Reference gradients dL/dq (B, n), dL/dr (B, m), the active sets and their checks.

    ``margins[b]``: min(mu_S, -slack off S) at the exact KKT point of item b's
    active set S; > 0 certifies S (P is positive definite, so that point is the
    unique optimum). ``reclassified[b]``: rows with mu above the threshold that
    are inactive because their slack outweighs mu (see :func:`reference_active_set`).
    """

    grad_q: np.ndarray
    grad_r: np.ndarray
    actives: list[np.ndarray]
    margins: list[float]
    reclassified: list[int]

    @property
    def flat(self) -> np.ndarray:
        return np.concatenate([self.grad_q.ravel(), self.grad_r.ravel()])


def solve_reference(inner: InnerQP, q: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """y* and the inequality multipliers by Clarabel with tight tolerances."""
    inner.q.value, inner.r.value = q, r
    inner.problem.solve(solver=cp.CLARABEL, **REFERENCE_SOLVER_OPTIONS)
    if inner.problem.status != cp.OPTIMAL:
        raise RuntimeError(f"reference solve: status {inner.problem.status}")
    return np.asarray(inner.y.value, dtype=float), np.asarray(inner.inequality.dual_value, dtype=float)


def reference_active_set(data: QPData, b: int, y: np.ndarray, mu: np.ndarray) -> tuple[np.ndarray, int]:
    """Active rows of item b: mu_i > ACTIVE_TOL * max(1, max mu), and mu_i > -slack_i.

    The second test lets the complementary pair decide: an interior-point solver
    may return mu_i ~ 1e-6 on a row with slack -1e-3 (complementarity ~1e-9 is
    within its gap tolerance when the objective is large); such a row is
    inactive. Returns the active rows and how many rows the second test removed.
    """
    slack = data.G @ y - data.h - data.r[b]
    by_mu = mu > ACTIVE_TOL * max(1.0, mu.max())
    active = by_mu & (mu > -slack)
    return np.flatnonzero(active), int((by_mu & ~active).sum())


def active_set_solve(data: QPData, b: int, active: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    r"""Dense solves with the active-set KKT matrix K = [[P, A^T], [A, 0]], A = [G_S; C], of item b.

    Gradient of L = W_b . y*: the KKT residual R = (P y + q + A^T (mu_S, nu),
    G_S y - h_S - r_S, C y - d) has dR/dq = (I, 0, 0) and dR/dr = (0, -I_S, 0);
    with K [u; lam] = [W_b; 0], dL/dq = -u and dL/dr_S = lam_S.
    Certificate: the KKT point K [y; mu_S; nu] = [-q; h_S + r_S; d] of S.
    Returns dL/dq, dL/dr and the certificate margin min(mu_S, -slack off S).
    """
    A = sp.vstack([data.G[active], data.C]).toarray()
    n_dual = A.shape[0]
    K = np.block([[data.P.toarray(), A.T], [A, np.zeros((n_dual, n_dual))]])
    rhs = np.column_stack([
        np.concatenate([data.W[b], np.zeros(n_dual)]),
        np.concatenate([-data.q[b], data.h[active] + data.r[b][active], data.d]),
    ])
    solution = np.linalg.solve(K, rhs)
    grad_r = np.zeros(data.m)
    grad_r[active] = solution[data.n: data.n + active.size, 0]
    y, mu_active = solution[: data.n, 1], solution[data.n: data.n + active.size, 1]
    inactive = np.setdiff1d(np.arange(data.m), active)
    slack = (data.G @ y - data.h - data.r[b])[inactive]
    margin = min(mu_active.min(initial=np.inf), (-slack).min(initial=np.inf))
    return -solution[: data.n, 0], grad_r, float(margin)


def reference_gradient(data: QPData, inner: InnerQP) -> Reference:
    """Reference gradients of the whole batch."""
    grads_q, grads_r, actives, margins, reclassified = [], [], [], [], []
    for b in range(data.batch):
        active, removed = reference_active_set(data, b, *solve_reference(inner, data.q[b], data.r[b]))
        grad_q, grad_r, margin = active_set_solve(data, b, active)
        for values, value in zip((grads_q, grads_r, actives, margins, reclassified),
                                 (grad_q, grad_r, active, margin, removed)):
            values.append(value)
    return Reference(np.stack(grads_q), np.stack(grads_r), actives, margins, reclassified)


def finite_difference_check(data: QPData, inner: InnerQP, reference: Reference) -> list[str]:
    """Central differences of W_0 . y*(q_0, r_0) through cvxpy on q_0[0], an active and an inactive r_0 entry."""
    def loss(q, r):
        return float(data.W[0] @ solve_reference(inner, q, r)[0])

    def bump(vector, index, delta):
        moved = vector.copy()
        moved[index] += delta
        return moved

    active = reference.actives[0]
    inactive = np.setdiff1d(np.arange(data.m), active)
    coordinates = [("q", 0, reference.grad_q[0, 0])]
    coordinates += [("r", int(active[0]), reference.grad_r[0, active[0]])] if active.size else []
    coordinates += [("r", int(inactive[0]), reference.grad_r[0, inactive[0]])] if inactive.size else []
    lines = [f"finite-difference check of the reference (n={data.n}, item 0, central, step {FD_STEP:g}):"]
    for name, index, ref in coordinates:
        q, r = data.q[0], data.r[0]
        if name == "q":
            fd = (loss(bump(q, index, FD_STEP), r) - loss(bump(q, index, -FD_STEP), r)) / (2 * FD_STEP)
        else:
            fd = (loss(q, bump(r, index, FD_STEP)) - loss(q, bump(r, index, -FD_STEP))) / (2 * FD_STEP)
        status = "active" if name == "r" and index in set(active.tolist()) else ("inactive" if name == "r" else "")
        lines.append(f"  d/d{name}[{index}] {status:8s} reference {ref: .10e}   finite difference {fd: .10e}   "
                     f"diff {abs(ref - fd):.1e}")
    return lines


def relative_error(grad_q: np.ndarray, grad_r: np.ndarray, reference: Reference) -> float:
    """||g - g_ref|| / ||g_ref|| over both parameters and the batch."""
    flat = np.concatenate([grad_q.ravel(), grad_r.ravel()])
    return float(np.linalg.norm(flat - reference.flat) / np.linalg.norm(reference.flat))


# ---------------------------------------------------------------- the layers

@dataclass
class Method:
    """A layer under test: ``call(q, r)`` returns (y, LayerInfo or None)."""

    name: str
    call: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, object]]
    close: Callable[[], None] = lambda: None


def cvxpylayers_method(data: QPData) -> Method:
    """cvxpylayers' CvxpyLayer with its default backend and solver (no solver_args)."""
    inner = build_inner(data)
    layer = CvxpyLayer(inner.problem, parameters=[inner.q, inner.r], variables=[inner.y])
    backend = layer.ctx.solver if isinstance(layer.ctx.solver, str) else type(layer.ctx.solver).__name__
    return Method(f"cvxpylayers ({backend}, default)", lambda q, r: (layer(q, r)[0], None))


def cbo_method(data: QPData, name: str, **options) -> Method:
    """cbo.ArgminLayer with default method ("cg") and the given solver options."""
    inner = build_inner(data)
    layer = cbo.ArgminLayer(inner.problem, [inner.q, inner.r], [inner.y], **options)

    def call(q, r):
        (y,), info = layer(q, r, return_info=True)
        return y, info

    return Method(name, call, layer.close)


def make_methods(data: QPData) -> list[Method]:
    """The layers compared, in the order they run within a repetition."""
    return [
        cvxpylayers_method(data),
        cbo_method(data, "cbo (Clarabel)"),
        cbo_method(data, "cbo (OSQP)", solver="OSQP", solver_options=OSQP_OPTIONS),
    ]


# ---------------------------------------------------------------- CPU used by other processes

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def busy_ticks() -> int:
    """Busy CPU ticks of the whole machine (all cores), from /proc/stat."""
    fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return user + nice + system + irq + softirq + steal


def own_ticks() -> int:
    """CPU ticks (user + system) of this process and its live descendants (e.g. cbo's worker pool)."""
    parents, ticks = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
        parents[int(entry)], ticks[int(entry)] = int(fields[1]), int(fields[11]) + int(fields[12])
    ours, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in ours]
        ours.update(children)
        frontier += children
    return sum(ticks.get(pid, 0) for pid in ours)


class ForeignLoad:
    """Cores used by other processes (busy machine ticks minus ours) while the ``with`` block ran.

    On a small shared machine other jobs slow every method down (torch's
    OpenMP threads suffer most); this says how busy the machine was.
    """

    def __enter__(self):
        self.start = (time.perf_counter(), busy_ticks(), own_ticks())
        return self

    def __exit__(self, *exc):
        wall, busy, own = time.perf_counter(), busy_ticks(), own_ticks()
        self.cores = ((busy - self.start[1]) - (own - self.start[2])) / CLOCK_TICKS / (wall - self.start[0])
        return False


# ---------------------------------------------------------------- timing

@dataclass
class Sample:
    """One forward + backward of one method."""

    forward: float
    backward: float
    grad_q: np.ndarray
    grad_r: np.ndarray
    info: object
    warnings: list[str]


def run_once(method: Method, data: QPData) -> Sample:
    """Forward and backward of ``method`` on the batch, each phase timed with perf_counter."""
    q = torch.tensor(data.q, dtype=torch.float64, requires_grad=True)
    r = torch.tensor(data.r, dtype=torch.float64, requires_grad=True)
    W = torch.as_tensor(data.W)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        y, info = method.call(q, r)
        forward = time.perf_counter() - start
        start = time.perf_counter()
        (y * W).sum().backward()
        backward = time.perf_counter() - start
    names = sorted({w.category.__name__ for w in caught if not issubclass(w.category, DeprecationWarning)})
    return Sample(forward, backward, q.grad.numpy().copy(), r.grad.numpy().copy(), info, names)


@dataclass
class Result:
    """Median timings of one method at one size, and its accuracy (last repetition)."""

    n: int
    method: str
    forward: float
    backward: float
    rel_error: float
    phases: dict[str, float] = field(default_factory=dict)
    cg_iterations: list[int] = field(default_factory=list)
    adjoint_residual: float = float("nan")
    active_mismatch: int | None = None
    kkt_residual: float = float("nan")
    note: str = ""

    @property
    def total(self) -> float:
        return self.forward + self.backward


def summarize(n: int, name: str, samples: list[Sample], reference: Reference) -> Result:
    """Medians over the timed repetitions; errors and diagnostics from the last one."""
    last = samples[-1]
    result = Result(n, name, statistics.median(s.forward for s in samples),
                    statistics.median(s.backward for s in samples),
                    relative_error(last.grad_q, last.grad_r, reference))
    result.note = ", ".join(sorted({w for s in samples for w in s.warnings}))
    info = last.info
    if info is not None:
        result.phases = {phase: statistics.median(s.info.timings[phase] for s in samples) for phase in CBO_PHASES}
        result.cg_iterations = sorted({s.info.linear_solve.iterations for s in samples})
        result.adjoint_residual = max(float(s.info.linear_solve.residual) for s in samples)
        result.active_mismatch = sum(len(set(a.active.tolist()) ^ set(ref.tolist()))
                                     for a, ref in zip(info.active_sets, reference.actives))
        result.kkt_residual = max(info.kkt_residual)
    return result


def benchmark_size(data: QPData, reference: Reference, repeats: int,
                   progress: tqdm) -> tuple[list[Result], list[float]]:
    """Interleaved repetitions of all methods (one warm-up excluded).

    Returns one Result per method and the cores used by other processes during each timed repetition.
    """
    methods = make_methods(data)
    samples: dict[str, list[Sample]] = {m.name: [] for m in methods}
    foreign: list[float] = []
    try:
        for rep in range(repeats + 1):
            with ForeignLoad() as load:
                for method in methods:
                    progress.set_postfix_str(f"n={data.n} rep {rep}/{repeats} {method.name}")
                    sample = run_once(method, data)
                    if rep > 0:
                        samples[method.name].append(sample)
            if rep > 0:
                foreign.append(load.cores)
            progress.update()
    finally:
        for method in methods:
            method.close()
    return [summarize(data.n, m.name, samples[m.name], reference) for m in methods], foreign


# ---------------------------------------------------------------- profile

# (label, file name ending, function name): where cbo's time goes; nested entries are indented.
PROFILE_CATEGORIES = [
    ("forward: wait for the worker pool (inner solves in workers)", "_base.py", "wait"),
    ("forward: cvxpy Problem.solve (in this process)", "problem.py", "_solve"),
    ("  cvxpy get_problem_data (DPP parameter map)", "problem.py", "get_problem_data"),
    ("  solver call (cvxpy solve_via_data)", "solving_chain.py", "solve_via_data"),
    ("  cvxpy unpack_results (primal/dual values)", "problem.py", "unpack_results"),
    ("forward: kkt_at_solutions (active set + polish)", "kkt.py", "kkt_at_solutions"),
    ("  active_set classification", "kkt.py", "active_set"),
    ("  polish (Newton on the KKT system)", "kkt.py", "polish"),
    ("forward: licq_check (kkt_checks)", "kkt.py", "licq_check"),
    ("backward: adjoint_solve", "linsolve.py", "adjoint_solve"),
    ("all: KKTOperator.__init__ (graph of R)", "kkt.py", "__init__"),
    ("all: constraint_jacobian (J)", "kkt.py", "constraint_jacobian"),
    ("all: NullSpaceSystem.__init__ (J + Gram Cholesky)", "linsolve.py", "__init__"),
    ("all: projected CG iterations (linsolve.cg)", "linsolve.py", "cg"),
    ("  CG: hess (K products)", "linsolve.py", "hess"),
    ("  CG: project (Gram solves)", "linsolve.py", "project"),
]


def profile_categories(stats: pstats.Stats) -> list[str]:
    """Cumulative seconds and calls of the functions in PROFILE_CATEGORIES."""
    lines = [f"{'where':60s} {'cum [s]':>8s} {'calls':>6s}"]
    for label, file_end, name in PROFILE_CATEGORIES:
        matches = [(ct, nc) for (file, _, func), (_, nc, _, ct, _) in stats.stats.items()
                   if file.endswith(file_end) and func == name]
        if matches:
            lines.append(f"{label:60s} {sum(m[0] for m in matches):8.3f} {sum(m[1] for m in matches):6d}")
    return lines


def profile_cbo(data: QPData, **layer_options) -> str:
    """cProfile of one cbo forward + backward (after a warm-up call), top PROFILE_LINES by cumulative time."""
    method = cbo_method(data, "profiled", **layer_options)
    try:
        run_once(method, data)
        profiler = cProfile.Profile()
        with ForeignLoad() as load:
            profiler.enable()
            sample = run_once(method, data)
            profiler.disable()
    finally:
        method.close()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    categories = profile_categories(stats)
    stats.strip_dirs().sort_stats("cumulative").print_stats(PROFILE_LINES)
    timings = ", ".join(f"{k} {v:.3f}s" for k, v in sample.info.timings.items())
    header = (f"forward {sample.forward:.3f}s, backward {sample.backward:.3f}s (under the profiler); "
              f"info.timings: {timings}; CPU used by other processes: {load.cores:.2f} cores")
    return "\n".join([header, "", *categories, "", stream.getvalue().strip()])


# ---------------------------------------------------------------- output

def seconds(value: float) -> str:
    """A duration for the tables."""
    return f"{value:.4f}" if np.isfinite(value) else "-"


def ratio(a: float, b: float) -> str:
    """a / b for the tables."""
    return f"{a / b:.2f}" if b > 0 else "-"


MAIN_COLUMNS = ["n", "method", "fwd [s]", "bwd [s]", "fwd+bwd [s]", "cvxpylayers/x fwd", "cvxpylayers/x bwd",
                "cvxpylayers/x total", "bwd/fwd", "grad rel. err", "note"]
PHASE_COLUMNS = ["n", "method", *(f"{p} [s]" for p in CBO_PHASES), "CG iters", "adjoint residual",
                 "active-set diff vs ref", "KKT residual (max)"]


def main_rows(results: list[Result]) -> list[list[str]]:
    """Rows of the timing/accuracy table; ratios against the cvxpylayers row of the same size."""
    baseline = results[0]
    return [[str(r.n), r.method, seconds(r.forward), seconds(r.backward), seconds(r.total),
             ratio(baseline.forward, r.forward), ratio(baseline.backward, r.backward),
             ratio(baseline.total, r.total), ratio(r.backward, r.forward), f"{r.rel_error:.2e}", r.note]
            for r in results]


def phase_rows(results: list[Result]) -> list[list[str]]:
    """Rows of cbo's own phase breakdown (info.timings medians)."""
    return [[str(r.n), r.method, *(seconds(r.phases[p]) for p in CBO_PHASES),
             ",".join(map(str, r.cg_iterations)), f"{r.adjoint_residual:.1e}", str(r.active_mismatch),
             f"{r.kkt_residual:.1e}"]
            for r in results if r.phases]


def plain_table(columns: list[str], rows: list[list[str]]) -> str:
    """Aligned plain-text table: text columns left-aligned, numbers right-aligned."""
    widths = [max(len(r[i]) for r in [columns, *rows]) for i in range(len(columns))]
    left = {"method", "note"}

    def line(cells):
        return "  ".join(c.ljust(w) if name in left else c.rjust(w)
                         for c, w, name in zip(cells, widths, columns)).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, rows)])


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    """GitHub-flavoured Markdown table."""
    align = ["---" if name in ("method", "note") else "--:" for name in columns]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [columns, align, *rows])


def target_lines(results: list[Result]) -> list[str]:
    """The issue's targets, checked on the largest size's results."""
    baseline, *cbo_results = results
    lines = []
    for r in cbo_results:
        checks = [
            (f"fwd+bwd speedup {baseline.total / r.total:.2f}x", baseline.total / r.total >= TARGET_SPEEDUP,
             f">= {TARGET_SPEEDUP:g}x"),
            (f"bwd/fwd {r.backward / r.forward:.3f}", r.backward / r.forward <= TARGET_BWD_OVER_FWD,
             f"<= {TARGET_BWD_OVER_FWD:g}"),
            (f"grad rel. err {r.rel_error:.1e}", r.rel_error <= TARGET_GRAD_ERROR, f"<= {TARGET_GRAD_ERROR:g}"),
        ]
        lines.append(f"n={r.n} {r.method}: " + "; ".join(f"{text} ({'PASS' if ok else 'FAIL'}, target {goal})"
                                                            for text, ok, goal in checks))
    return lines


def code_version() -> str:
    """The repository's commit, and whether cbo/ had uncommitted changes when the benchmark started."""
    root = Path(__file__).resolve().parent.parent

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True).stdout.strip()

    imported = Path(cbo.__file__).resolve().parent
    if imported != root / "cbo":
        return f"imported from {imported} (not this checkout; checkout at commit {git('rev-parse', '--short', 'HEAD')})"
    dirty = git("status", "--porcelain", "--", "cbo")
    return f"commit {git('rev-parse', '--short', 'HEAD') or '?'}" + (" (cbo/ modified)" if dirty else "")


def describe_data(data: QPData, reference: Reference) -> str:
    """One line on the problem: active fractions of the reference solutions."""
    fractions = [a.size / data.m for a in reference.actives]
    certified = sum(margin > 0 for margin in reference.margins)
    return (f"n={data.n}: m={data.m} inequalities, p={data.C.shape[0]} equalities, nnz(P)={data.P.nnz}, "
            f"active fraction per item {min(fractions):.0%}..{max(fractions):.0%}; reference active sets "
            f"certified for {certified}/{data.batch} items (smallest margin {min(reference.margins):.1e}); "
            f"rows with mu above threshold but inactive by slack: {sum(reference.reclassified)}")


def write_markdown(path: Path, args, notes: list[str], main: list[list[str]], phases: list[list[str]],
                   targets: list[str], profiles: dict[str, str], runtime: float) -> None:
    """Tables, checks and profiles as Markdown."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = [
        "# cbo.ArgminLayer vs cvxpylayers on batched sparse QPs", "",
        f"sizes {args.sizes}, batch {args.batch}, seed {args.seed}; one warm-up repetition excluded, then the "
        f"median of {args.repeats or '5 (3 at n >= 1000)'} interleaved repetitions; torch threads "
        f"{torch.get_num_threads()}; total runtime {runtime:.1f} s.", "",
        "cvxpylayers/x: the cvxpylayers time divided by the row's time (> 1: the row is faster). "
        "grad rel. err: ||g - g_ref|| / ||g_ref|| over (dL/dq, dL/dr) and the batch; g_ref from an "
        "independent Clarabel solve and a dense numpy KKT solve.", "",
        "## Checks", "", "```", *notes, "```", "",
        "## Timings and accuracy", "", markdown_table(MAIN_COLUMNS, main), "",
        "## cbo phases (info.timings, medians)", "", markdown_table(PHASE_COLUMNS, phases), "",
        "## Targets (largest size)", "", *[f"- {t}" for t in targets], "",
    ]
    for title, profile in profiles.items():
        text += [f"## Profile: {title}", "", "```", profile, "```", ""]
    path.write_text("\n".join(text))


# ---------------------------------------------------------------- main

def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000], help="numbers of variables n")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repetitions per size (default: 5, or 3 for n >= 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch.set_num_threads in this process (default: torch's default)")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="Markdown file to write")
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile runs at the largest size")
    return parser.parse_args()


def repeats_for(n: int, args) -> int:
    """Timed repetitions at size n."""
    return args.repeats or (3 if n >= 1000 else 5)


def main():
    args = parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    start = time.perf_counter()
    notes: list[str] = [f"cbo {code_version()}, torch {torch.__version__}, {torch.get_num_threads()} torch threads"]
    main_table: list[list[str]] = []
    phases: list[list[str]] = []
    targets: list[str] = []
    profiles: dict[str, str] = {}
    progress = tqdm(total=sum(repeats_for(n, args) + 1 for n in args.sizes), desc="repetitions", unit="rep")
    for n in args.sizes:
        data = make_qp(n, args.batch, np.random.default_rng([args.seed, n]))
        progress.set_postfix_str(f"n={n}: reference")
        reference_inner = build_inner(data)
        reference = reference_gradient(data, reference_inner)
        notes.append(describe_data(data, reference))
        tqdm.write(notes[-1])
        if n == min(args.sizes):
            fd_lines = finite_difference_check(data, reference_inner, reference)
            notes += fd_lines
            tqdm.write("\n".join(fd_lines))
        results, foreign = benchmark_size(data, reference, repeats_for(n, args), progress)
        notes.append(f"n={n}: CPU used by other processes during the timed repetitions: "
                     + ", ".join(f"{c:.2f}" for c in foreign) + f" cores (of {os.cpu_count()})")
        tqdm.write(notes[-1])
        main_table += main_rows(results)
        phases += phase_rows(results)
        tqdm.write("\n" + plain_table(MAIN_COLUMNS, main_rows(results)))
        tqdm.write("\n" + plain_table(PHASE_COLUMNS, phase_rows(results)) + "\n")
        if n == max(args.sizes):
            targets = target_lines(results)
            if not args.no_profile:
                profiles = {
                    f"cbo (Clarabel), n={n}, default worker pool (parent process)": profile_cbo(data),
                    f"cbo (Clarabel), n={n}, n_workers=1 (solves in this process)": profile_cbo(data, n_workers=1),
                }
    progress.close()
    runtime = time.perf_counter() - start
    print("\n== Timings and accuracy ==\n" + plain_table(MAIN_COLUMNS, main_table))
    print("\n== cbo phases (info.timings, medians) ==\n" + plain_table(PHASE_COLUMNS, phases))
    print("\n== Targets ==\n" + "\n".join(targets))
    for title, profile in profiles.items():
        print(f"\n== Profile: {title} ==\n{profile}")
    print(f"\ntotal runtime {runtime:.1f} s")
    write_markdown(args.output, args, notes, main_table, phases, targets, profiles, runtime)
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
