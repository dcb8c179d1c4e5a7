r"""Accuracy and timing of every adjoint method of ``cbo.hypergrad`` on random dense QPs.

Inner problem, for n variables, m = n/2 inequalities, p = n/10 equalities and
k = 10 right-hand-side parameters:

    y*(x, r) = argmin_y  0.5 y^T P y + (q + x)^T y   s.t.  G y <= h + B r,  C y == d

with P = M^T M / n + 0.1 I. The data are built around a known KKT point
(y0, mu0, nu0) at (x0, r0) whose active set is a random 40% of the inequalities,
with strict complementarity (mu0 and the inactive slacks bounded away from 0).

Outer objective: F = ||y - y_target||^2 + 0.1 ||x||^2 + 0.1 ||r||^2.

The reference hypergradient does not use cbo: the inner problem is solved with
cvxpy (Clarabel, tight tolerances), the multipliers are read from
``constraint.dual_value``, and the active-set KKT system is solved densely in
numpy. It is checked against central finite differences through cvxpy on the
smallest size. A second, "exact" reference does the same numpy KKT solve at the
designed KKT point, free of the solver error of cvxpy's y*.

Then, with --nonsmooth-and-conic (or alone: benchmarks/conic_accuracy.py), the
problem classes of the conic route and the epigraph reformulation (lasso,
L1-logistic, SVM, SOCP, SDP, entropy): cbo and cvxpylayers against finite
differences.

Run:  python benchmarks/accuracy.py [--sizes 100 500 1000] [--seed 0] [--nonsmooth-and-conic]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cvxpy as cp
import numpy as np
import torch
from tqdm import tqdm

import cbo
from problems.figures import save_figures

N_RHS_PARAMETERS = 10
ACTIVE_FRACTION = 0.4
REGULARIZATION = 0.1          # weight of ||x||^2 and ||r||^2 in F
ACTIVE_TOL = 1e-6             # mu_i > ACTIVE_TOL * max(1, max mu): active
ADJOINT_TOL = 1e-10
ADJOINT_MAXITER = 200_000
TIMED_REPEATS = 3
REFERENCE_SOLVER_OPTIONS = {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10,
                            "tol_ktratio": 1e-8, "max_iter": 200}
OUTPUT = Path(__file__).resolve().parent / "output" / "accuracy.md"


# ---------------------------------------------------------------- problem data

@dataclass
class QPData:
    """Data of one random QP and the point (x0, r0) where the hypergradient is taken."""

    P: np.ndarray
    q: np.ndarray
    G: np.ndarray
    h: np.ndarray
    B: np.ndarray
    C: np.ndarray
    d: np.ndarray
    x0: np.ndarray
    r0: np.ndarray
    y_target: np.ndarray
    y_design: np.ndarray
    active_design: np.ndarray

    @property
    def n(self) -> int:
        return self.P.shape[0]


def make_qp(n: int, rng: np.random.Generator) -> QPData:
    """Random strongly convex QP whose solution at (x0, r0) is a chosen KKT point.

    Picks y0, an active subset S of the inequalities, mu0 > 0 on S and nu0, then
    sets q so that stationarity holds, h so that exactly S is tight, d = C y0.
    """
    m, p, k = n // 2, n // 10, N_RHS_PARAMETERS
    M = rng.standard_normal((n, n))
    P = M.T @ M / n + 0.1 * np.eye(n)
    P = (P + P.T) / 2
    G, C, B = rng.standard_normal((m, n)), rng.standard_normal((p, n)), rng.standard_normal((m, k))
    x0, r0 = rng.standard_normal(n), rng.standard_normal(k)
    y0 = rng.standard_normal(n)
    active = np.sort(rng.choice(m, size=int(round(ACTIVE_FRACTION * m)), replace=False))
    mu0 = np.zeros(m)
    mu0[active] = rng.uniform(0.5, 1.5, active.size)
    nu0 = rng.standard_normal(p)
    slack = rng.uniform(0.5, 1.5, m)
    slack[active] = 0.0
    return QPData(
        P=P, q=-(P @ y0 + x0 + G.T @ mu0 + C.T @ nu0), G=G, h=G @ y0 - B @ r0 + slack, B=B, C=C, d=C @ y0,
        x0=x0, r0=r0, y_target=y0 + rng.standard_normal(n), y_design=y0, active_design=active,
    )


@dataclass
class InnerQP:
    """The inner problem in cvxpy, with x and r as parameters."""

    problem: cp.Problem
    y: cp.Variable
    x: cp.Parameter
    r: cp.Parameter
    inequality: cp.Constraint
    equality: cp.Constraint


def build_inner(data: QPData) -> InnerQP:
    """A fresh cvxpy problem (DPP in x and r) for ``data``."""
    y = cp.Variable(data.n, name="y")
    x = cp.Parameter(data.n, name="x")
    r = cp.Parameter(N_RHS_PARAMETERS, name="r")
    inequality = data.G @ y <= data.h + data.B @ r
    equality = data.C @ y == data.d
    objective = cp.Minimize(0.5 * cp.quad_form(y, data.P) + (data.q + x) @ y)
    return InnerQP(cp.Problem(objective, [inequality, equality]), y, x, r, inequality, equality)


def outer_objective(data: QPData):
    """F(x, r, y) in torch, as ``cbo.BilevelProblem`` wants it."""
    y_target = torch.as_tensor(data.y_target)

    def F(x, r, y):
        return ((y - y_target) ** 2).sum() + REGULARIZATION * ((x ** 2).sum() + (r ** 2).sum())

    return F


def outer_value(data: QPData, x: np.ndarray, r: np.ndarray, y: np.ndarray) -> float:
    """F(x, r, y) in numpy."""
    return float(np.sum((y - data.y_target) ** 2) + REGULARIZATION * (x @ x + r @ r))


# ---------------------------------------------------------------- independent reference

@dataclass
class Reference:
    """Reference hypergradient and what it was computed from."""

    grad_x: np.ndarray
    grad_r: np.ndarray
    y: np.ndarray
    active: np.ndarray

    @property
    def flat(self) -> np.ndarray:
        return np.concatenate([self.grad_x, self.grad_r])


def solve_reference_inner(inner: InnerQP, x: np.ndarray, r: np.ndarray) -> np.ndarray:
    """y*(x, r) by Clarabel with tight tolerances."""
    inner.x.value, inner.r.value = x, r
    inner.problem.solve(solver=cp.CLARABEL, **REFERENCE_SOLVER_OPTIONS)
    if inner.problem.status != cp.OPTIMAL:
        raise RuntimeError(f"reference inner solve: status {inner.problem.status}")
    return np.asarray(inner.y.value, dtype=float)


def reference_hypergradient(data: QPData, inner: InnerQP) -> Reference:
    """The reference: y* and the active set from cvxpy, then :func:`kkt_hypergradient`."""
    y = solve_reference_inner(inner, data.x0, data.r0)
    mu = np.asarray(inner.inequality.dual_value, dtype=float)
    active = np.flatnonzero(mu > ACTIVE_TOL * max(1.0, mu.max()))
    return kkt_hypergradient(data, y, active)


def kkt_hypergradient(data: QPData, y: np.ndarray, active: np.ndarray) -> Reference:
    r"""dF/d(x, r) at (x0, r0) from a dense solve of the active-set KKT system.

    With A = [G_S; C] (S: active rows), K [u; lam] = [dF/dy; 0]. The KKT residual
    R = (P y + q + x + A^T (mu_S, nu), G_S y - h_S - B_S r, C y - d) has
    dR/dx = (I, 0, 0) and dR/dr = (0, -B_S, 0), so

        dF/dx = 0.2 x - u,   dF/dr = 0.2 r + B_S^T lam_S.
    """
    A = np.vstack([data.G[active], data.C])
    n_dual = A.shape[0]
    K = np.block([[data.P, A.T], [A, np.zeros((n_dual, n_dual))]])
    rhs = np.concatenate([2 * (y - data.y_target), np.zeros(n_dual)])
    solution = np.linalg.solve(K, rhs)
    u, lam_active = solution[: data.n], solution[data.n: data.n + active.size]
    grad_x = 2 * REGULARIZATION * data.x0 - u
    grad_r = 2 * REGULARIZATION * data.r0 + data.B[active].T @ lam_active
    return Reference(grad_x, grad_r, y, active)


def finite_difference_check(data: QPData, inner: InnerQP, reference: Reference, n_coords: int = 3,
                            step: float = 1e-3) -> list[tuple[str, float, float]]:
    """Central differences of F(x, r, y*(x, r)) through cvxpy on a few coordinates of x and r.

    F is quadratic in (x, r) while the active set does not change, so central
    differences are exact up to the solver's accuracy; ``step`` is small enough
    to keep the active set (mu and slacks are >= 0.5 at the design point).
    Returns (coordinate, reference, finite difference) triples.
    """
    def F(x, r):
        return outer_value(data, x, r, solve_reference_inner(inner, x, r))

    def bump(vector, index, delta):
        moved = vector.copy()
        moved[index] += delta
        return moved

    rows = []
    for i in range(n_coords):
        fd_x = (F(bump(data.x0, i, step), data.r0) - F(bump(data.x0, i, -step), data.r0)) / (2 * step)
        fd_r = (F(data.x0, bump(data.r0, i, step)) - F(data.x0, bump(data.r0, i, -step))) / (2 * step)
        rows += [(f"x[{i}]", reference.grad_x[i], fd_x), (f"r[{i}]", reference.grad_r[i], fd_r)]
    return rows


# ---------------------------------------------------------------- cbo runs

@dataclass
class MethodResult:
    """One table row."""

    n: int
    method: str
    rel_error: float = float("nan")
    exact_error: float = float("nan")
    iterations: int | None = None
    residual: float = float("nan")
    timings: dict = field(default_factory=dict)
    note: str = ""

    @property
    def backward_over_inner(self) -> float:
        backward = sum(self.timings.get(phase, float("nan")) for phase in ("polish", "kkt_checks", "adjoint_solve"))
        return backward / self.timings["inner_solve"] if self.timings else float("nan")


def call_hypergrad(problem: cbo.BilevelProblem, data: QPData, method: str):
    """One cbo.hypergrad call at (x0, r0); returns (flat gradient, info, warning names)."""
    x = [torch.as_tensor(data.x0), torch.as_tensor(data.r0)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grads, info = cbo.hypergrad(problem, x, method=method, tol=ADJOINT_TOL, maxiter=ADJOINT_MAXITER,
                                    warm_start=False, return_info=True)
    names = sorted({w.category.__name__ for w in caught if issubclass(w.category, cbo.CboWarning)})
    return torch.cat(grads).numpy(), info, names


def relative_error(grad: np.ndarray, reference: Reference) -> float:
    """||g - g_ref|| / ||g_ref|| over both parameters."""
    return float(np.linalg.norm(grad - reference.flat) / np.linalg.norm(reference.flat))


def run_method(problem: cbo.BilevelProblem, data: QPData, reference: Reference, exact: Reference,
               method: str) -> MethodResult:
    """Warm-up call, then TIMED_REPEATS timed calls; per-phase median timings.

    Errors against ``reference`` (cvxpy + numpy) and ``exact`` (numpy at the designed KKT point).
    """
    result = MethodResult(data.n, method)
    try:
        call_hypergrad(problem, data, method)
        calls = [call_hypergrad(problem, data, method) for _ in range(TIMED_REPEATS)]
    except cbo.ConvergenceError as err:
        result.note = "ConvergenceError (not converged within maxiter)" if err.info else f"ConvergenceError: {err}"
        if err.info is not None:
            result.iterations, result.residual = err.info.iterations, err.info.residual
        return result
    grad, info, warning_names = calls[-1]
    result.rel_error, result.exact_error = relative_error(grad, reference), relative_error(grad, exact)
    result.iterations, result.residual = info.linear_solve.iterations, info.linear_solve.residual
    result.timings = {phase: statistics.median(call[1].timings[phase] for call in calls)
                      for phase in info.timings}
    result.note = "; ".join(warning_names + active_set_mismatch(info, reference))
    return result


def active_set_mismatch(info, reference: Reference) -> list[str]:
    """A note if cbo's active set differs from the reference's."""
    cbo_active = set(info.active_set.active.tolist())
    ref_active = set(reference.active.tolist())
    if cbo_active == ref_active:
        return []
    return [f"active set differs from reference ({len(cbo_active ^ ref_active)} rows)"]


def make_bilevel(data: QPData) -> cbo.BilevelProblem:
    """cbo's problem, on its own cvxpy instance (not shared with the reference)."""
    inner = build_inner(data)
    return cbo.BilevelProblem(inner.problem, parameters=[inner.x, inner.r], variables=[inner.y],
                              outer=outer_objective(data))


# ---------------------------------------------------------------- output

COLUMNS = ["n", "method", "rel. error", "vs exact", "iters", "residual", "inner [s]", "polish [s]", "adjoint [s]",
           "backward/inner", "total [s]", "note"]


def format_row(result: MethodResult) -> list[str]:
    """Table cells of one result."""
    t = result.timings

    def seconds(phase):
        return f"{t[phase]:.4f}" if phase in t else "-"

    return [
        str(result.n), result.method,
        *(f"{e:.2e}" if np.isfinite(e) else "-" for e in (result.rel_error, result.exact_error)),
        "-" if result.iterations is None else str(result.iterations),
        f"{result.residual:.2e}" if np.isfinite(result.residual) else "-",
        seconds("inner_solve"), seconds("polish"), seconds("adjoint_solve"),
        f"{result.backward_over_inner:.3f}" if t else "-",
        seconds("total"),
        result.note or "",
    ]


def plain_table(rows: list[list[str]]) -> str:
    """Aligned plain-text table: text columns left-aligned, numbers right-aligned."""
    widths = [max(len(r[i]) for r in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    left = {"method", "note"}

    def line(cells):
        return "  ".join(c.ljust(w) if name in left else c.rjust(w)
                         for c, w, name in zip(cells, widths, COLUMNS)).rstrip()

    return "\n".join([line(COLUMNS), line(["-" * w for w in widths]), *map(line, rows)])


def markdown_table(rows: list[list[str]]) -> str:
    """GitHub-flavoured Markdown table."""
    align = ["---" if name in ("method", "note") else "--:" for name in COLUMNS]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [COLUMNS, align, *rows])


def write_markdown(path: Path, args, checks: list[str], fd_lines: list[str], rows: list[list[str]],
                   runtime: float) -> None:
    """The table and the reference checks, as Markdown."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = [
        "# cbo.hypergrad accuracy and timings on random dense QPs", "",
        f"sizes {args.sizes}, seed {args.seed}, adjoint tol {ADJOINT_TOL:g}, maxiter {ADJOINT_MAXITER}, "
        f"median of {TIMED_REPEATS} calls after one warm-up, warm_start=False, "
        f"torch threads {torch.get_num_threads()}, total runtime {runtime:.1f} s.", "",
        "rel. error: ||g - g_ref|| / ||g_ref|| over (dF/dx, dF/dr); g_ref from an independent "
        "cvxpy (Clarabel) solve and a dense numpy KKT solve. vs exact: the same, with the numpy KKT "
        "solve at the designed (exact) solution and active set instead of cvxpy's. "
        "backward = polish + kkt_checks + adjoint_solve; total: the whole hypergrad call.",
        "", "## Reference checks", "", *[f"- {c}" for c in checks], "", "```", *fd_lines, "```", "",
        "## Results", "",
        markdown_table(rows), "",
    ]
    path.write_text("\n".join(text))


def quoted_figures(results: list[MethodResult]) -> tuple[dict[str, str], list[str]]:
    """The figures README quotes (problems/figures.py), and those that vary from run to run: per size and
    method the error against the exact hypergradient, the iterations and backward / inner solve time; and the
    largest error of all."""
    figures, varies = {}, []
    for r in results:
        key = f"n{r.n}.{r.method}"
        figures[f"{key}.iterations"] = "n/a" if r.iterations is None else str(r.iterations)
        figures[f"{key}.vs_exact"] = f"{r.exact_error:.1e}" if np.isfinite(r.exact_error) else "n/a"
        figures[f"{key}.backward_over_inner"] = (f"{r.backward_over_inner:.2f}×" if np.isfinite(r.backward_over_inner)
                                                 else "n/a")
        varies += [f"{key}.vs_exact", f"{key}.backward_over_inner"]
    errors = [r.exact_error for r in results]
    figures["vs_exact_max"] = f"{max(errors):.1e}" if np.isfinite(errors).all() else "n/a"  # n/a: a method failed
    return figures, varies + ["vs_exact_max"]


# ---------------------------------------------------------------- main

def describe_reference(data: QPData, reference: Reference, exact: Reference) -> str:
    """One line on the reference: active set and distance of y* to the designed solution."""
    m = data.G.shape[0]
    same = np.array_equal(reference.active, data.active_design)
    y_error = np.linalg.norm(reference.y - data.y_design) / np.linalg.norm(data.y_design)
    return (f"n={data.n}: {reference.active.size}/{m} inequalities active "
            f"({100 * reference.active.size / m:.0f}%, {'equal to' if same else 'DIFFERENT from'} the designed set), "
            f"{data.C.shape[0]} equalities; reference ||y - y_design||/||y_design|| = {y_error:.1e}, "
            f"reference vs exact hypergradient: {relative_error(reference.flat, exact):.1e}")


def describe_fd_check(rows: list[tuple[str, float, float]]) -> list[str]:
    """Lines of the finite-difference check."""
    worst = max(abs(ref - fd) / max(abs(ref), 1e-12) for _, ref, fd in rows)
    lines = [f"finite-difference check (central, through cvxpy), worst relative difference {worst:.1e}:"]
    lines += [f"  {name:6s} reference {ref: .10e}   finite difference {fd: .10e}" for name, ref, fd in rows]
    return lines


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 1000], help="numbers of variables n")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nonsmooth-and-conic", action="store_true",
                        help="also run benchmarks/conic_accuracy.py's problem classes")
    return parser.parse_args()


def main():
    args = parse_args()
    start = time.perf_counter()
    rows: list[list[str]] = []
    results: list[MethodResult] = []
    checks: list[str] = []
    fd_lines: list[str] = []
    progress = tqdm(total=len(args.sizes) * len(cbo.ADJOINT_METHODS), desc="hypergrad runs", unit="run")
    for n in args.sizes:
        data = make_qp(n, np.random.default_rng([args.seed, n]))
        progress.set_postfix_str(f"n={n}: reference")
        reference_inner = build_inner(data)
        reference = reference_hypergradient(data, reference_inner)
        exact = kkt_hypergradient(data, data.y_design, data.active_design)
        checks.append(describe_reference(data, reference, exact))
        tqdm.write(checks[-1])
        if n == min(args.sizes):
            fd_lines = describe_fd_check(finite_difference_check(data, reference_inner, reference))
            tqdm.write("\n".join(fd_lines))
        problem = make_bilevel(data)
        for method in cbo.ADJOINT_METHODS:
            progress.set_postfix_str(f"n={n}: {method}")
            results.append(run_method(problem, data, reference, exact, method))
            rows.append(format_row(results[-1]))
            progress.update()
    progress.close()
    runtime = time.perf_counter() - start
    print()
    print(plain_table(rows))
    write_markdown(OUTPUT, args, checks, fd_lines, rows, runtime)
    print(f"\nTotal runtime {runtime:.1f} s. Markdown table written to {OUTPUT}.")
    print(f"figures quoted by the documentation: {save_figures(__file__, *quoted_figures(results))}")
    if args.nonsmooth_and_conic:
        import conic_accuracy  # benchmarks/ is on sys.path when this script runs

        print("\nNonsmooth and conic problem classes:")
        conic_accuracy.main()


if __name__ == "__main__":
    main()
