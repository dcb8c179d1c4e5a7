r"""Cost and agreement of the conic route's adjoint: reduced KKT system vs the full residual map.

The conic route (cbo/conic.py, cbo/cone_kkt.py) differentiates cvxpy's cone program
min c^T z s.t. A z + s = b, s in K (n variables z, m cone rows). Two adjoints are timed
at one polished solution per problem:

* peer: the full residual-map Jacobian J = [[0, A^T D], [A, D - I]] (size n + m,
  D = dPi_{K^*}(y - s) from ``cbo.cones.projection_jacobian``), J^T w = (dF/dz, 0)
  solved densely with ``np.linalg.solve``, then ``program._parameter_gradients``: the
  formula of ``residual_map_gradients`` in tests/test_cone_kkt.py (Busseti et al. 2019);
* ``program.vjp`` with method "direct", "cg" and "minres": the KKT system reduced to the
  active part of each cone, size n + p (p active pieces), with its equilibration,
  degeneracy checks and parameter maps (everything the call does). The active pieces
  themselves are found in ``program.solve`` and are not part of this time; the second
  table gives their cost ("active_pieces").

Both start from the same ``ConicPoint`` and a random outer gradient dF/dy (seed 0), and
end with one gradient array per parameter. Times are medians of ``--repeats`` calls
(time.perf_counter) after one untimed call, single-threaded (torch.set_num_threads(1);
run with OMP_NUM_THREADS=1 so that numpy's BLAS is single-threaded too). "x" is
peer time / method time (> 1: faster than the peer); "direct + pieces" adds the time of
``cbo.cone_kkt.active_pieces`` to that of method "direct", for the cost of the whole
reduced route against the peer's. "rel. diff" is max_k ||g_k - g_k^peer||_inf /
||g_k^peer||_inf over the parameters k; a parameter whose peer gradient is zero (at most
1e-12 of the largest, e.g. the SVM's C when n + 1 support vectors sit on the margin and
fix w) is measured against the largest parameter gradient instead, and named in "notes".

The second table splits the peer and method "direct" into phases (medians of the same
number of calls): the peer's D and J, its LU solve, the parameter maps; the reduced
route's active pieces (paid in ``solve``), building K (H = A^T C A, J = -G A,
equilibration), the solve, the degeneracy checks (LICQ, Lanczos on the reduced
Hessian), and the parameter maps. Its last columns time the forward pass,
``program.solve`` (Clarabel and the Newton polish), with the polish's steps on the
reduced system (the default) and with its steps on the full residual map only (the
reduced step disabled), and their ratio.

Problems (tests/conic_cases.py, outer F = 1/2 ||y - y_target||^2): lasso (n features,
2n samples, lam = 3: at the builder's lam = 1.5 a coefficient for n >= 100 is within
cbo's strict-complementarity tolerance, 1e-4 of the largest entry of (s, y), of zero;
at n = 400 one is at every lam tried, hence the DegenerateKKTWarning), L1-regularised logistic
regression, soft-margin SVM, an SOCP with cp.SOC, an SDP (min tr(CX) + 0.1 ||X||_F^2,
X >> 0, tr X = 1, C a symmetric k x k parameter) and maximum entropy with cp.ExpCone.
The smooth-route problems (lasso, logistic, SVM) are forced onto the conic route with
``cbo.compiled.compiled(problem).conic``.

Run:  python benchmarks/conic_adjoint.py [--quick] [--repeats 5]
Writes benchmarks/output/conic_adjoint.md (the command that made it in its last line).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import cbo  # noqa: E402
from cbo.cone_kkt import ConeKKT, active_pieces  # noqa: E402
from cbo.cones import projection_jacobian  # noqa: E402
from cbo.conic import _TIGHT_TOL, ConicPoint, ConicProgram  # noqa: E402
from cbo.linsolve import adjoint_solve  # noqa: E402
from conic_cases import NonsmoothCase, entropy, l1_logistic, lasso, sdp, socp, svm  # noqa: E402
from problems.figures import save_figures, slug  # noqa: E402

METHODS = ("direct", "cg", "minres")
OUTPUT = ROOT / "benchmarks" / "output"


@dataclass
class Case:
    name: str
    build: Callable[[], NonsmoothCase]
    quick: bool = False


@dataclass
class Result:
    case: str
    n: int
    m: int
    p: int
    pieces: str
    peer: float
    times: dict[str, float] = field(default_factory=dict)
    iterations: dict[str, int] = field(default_factory=dict)
    differences: dict[str, float] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _lasso(n: int) -> NonsmoothCase:
    case = lasso(n, 2 * n)
    case.x[1] = np.array(3.0)
    return case


def cases() -> list[Case]:
    return [
        *(Case(f"lasso n={n}", lambda n=n: _lasso(n), quick=n == 50) for n in (50, 100, 200, 400)),
        *(Case(f"l1_logistic n={n}, {s} samples", lambda n=n, s=s: l1_logistic(n, s), quick=n == 10)
          for n, s in ((10, 50), (20, 100), (40, 200))),
        *(Case(f"svm n={n}, {s} samples", lambda n=n, s=s: svm(n, s), quick=n == 10)
          for n, s in ((10, 100), (20, 200))),
        *(Case(f"socp n={n}", lambda n=n: socp(n), quick=n == 50) for n in (50, 200, 500, 1000)),
        *(Case(f"sdp {k}x{k}", lambda k=k: sdp(k), quick=k == 10) for k in (10, 20, 30, 40)),
        *(Case(f"entropy n={n}", lambda n=n: entropy(n), quick=n == 50) for n in (50, 200, 500)),
    ]


# ---------------------------------------------------------------- the peer: full residual map

def residual_map_jacobian(program: ConicProgram, point: ConicPoint) -> np.ndarray:
    """J = [[0, A^T D], [A, D - I]], dense, D = dPi_{K^*}(y - s)."""
    A = point.A.toarray()
    m, n = A.shape
    D = projection_jacobian(point.y - point.s, point.y, program.blocks)
    return np.block([[np.zeros((n, n)), A.T @ D], [A, D - np.eye(m)]])


def residual_map_adjoint(J: np.ndarray, dz: np.ndarray) -> np.ndarray:
    """w with J^T w = (dz, 0)."""
    return np.linalg.solve(J.T, np.concatenate([dz, np.zeros(J.shape[0] - dz.size)]))


def peer_gradients(program: ConicProgram, point: ConicPoint, grad_y: list[np.ndarray]) -> list[np.ndarray]:
    """The peer end to end (as ``residual_map_gradients`` in tests/test_cone_kkt.py)."""
    w = residual_map_adjoint(residual_map_jacobian(program, point), program._variable_adjoint(grad_y))
    return program._parameter_gradients(point, w)


# ---------------------------------------------------------------- measuring

def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gradient_scales(peer: list[np.ndarray]) -> list[float]:
    """||g_k^peer||_inf per parameter, the largest in place of those at most 1e-12 of it (zero gradients)."""
    scales = [float(np.abs(g).max(initial=0.0)) for g in peer]
    largest = max(max(scales), 1e-300)
    return [s if s > 1e-12 * largest else largest for s in scales]


def relative_difference(got: list[np.ndarray], peer: list[np.ndarray]) -> float:
    """max over parameters of ||got - peer||_inf / scale (:func:`gradient_scales`)."""
    return max(float(np.abs(a - b).max(initial=0.0)) / s for a, b, s in zip(got, peer, gradient_scales(peer)))


def describe_pieces(sizes: dict[str, int]) -> str:
    return ", ".join(f"{kind} {count}" for kind, count in sizes.items() if count)


def phases(program: ConicProgram, point: ConicPoint, grad_y: list[np.ndarray], repeats: int) -> dict[str, float]:
    """Median times of the peer's and of method "direct"'s phases (the steps of ``ConicProgram.vjp``)."""
    dz = program._variable_adjoint(grad_y)
    J = residual_map_jacobian(program, point)
    w = residual_map_adjoint(J, dz)
    like = torch.zeros((), dtype=torch.float64)
    tol = _TIGHT_TOL * max(1.0, float(np.abs(np.concatenate([point.y, point.s])).max()))
    build = lambda: ConeKKT([point.A], [point.pieces], [point.z], like)  # noqa: E731
    op = build()
    rhs = torch.cat([torch.as_tensor(dz)[None], torch.zeros(1, op.n_dual, dtype=torch.float64)], -1)
    v, info = adjoint_solve(op, rhs, "direct")
    adjoint = v[0].numpy()
    return {
        "peer: D, J": median_time(lambda: residual_map_jacobian(program, point), repeats),
        "peer: LU": median_time(lambda: residual_map_adjoint(J, dz), repeats),
        "peer: parameter maps": median_time(lambda: program._parameter_gradients(point, w), repeats),
        "active_pieces (in solve)": median_time(lambda: active_pieces(program.blocks, point.y, point.s, tol), repeats),
        "direct: build K": median_time(build, repeats),
        "direct: solve": median_time(lambda: adjoint_solve(op, rhs, "direct"), repeats),
        "direct: checks": median_time(lambda: program._degenerate_items(op, info, False), repeats),
        "direct: parameter maps": median_time(
            lambda: program._parameter_gradients(point, op.data_adjoint(adjoint, 0)), repeats),
    }


def solve_times(program: ConicProgram, x: list[np.ndarray], repeats: int) -> dict[str, float]:
    """Median times of ``program.solve(x)``: polished on the reduced system, and on the residual map only."""
    def unavailable(*args):
        raise np.linalg.LinAlgError("disabled by the benchmark")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cbo.CboWarning)
        reduced = median_time(lambda: program.solve(x), repeats)
        original = ConicProgram._reduced_step
        ConicProgram._reduced_step = unavailable
        try:
            full = median_time(lambda: program.solve(x), repeats)
        finally:
            ConicProgram._reduced_step = original
    return {"solve: reduced polish": reduced, "solve: residual-map polish": full}


def measure(case: Case, repeats: int) -> Result:
    built = case.build()
    program = cbo.compiled.compiled(built.problem).conic
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", cbo.CboWarning)
        point = program.solve(built.x)
    rng = np.random.default_rng(0)
    grad_y = [rng.standard_normal(v.size) for v in built.problem.all_variables]
    peer = peer_gradients(program, point, grad_y)
    n, m = program.size
    zero = [k for k, g in enumerate(peer) if np.abs(g).max(initial=0.0) <= 1e-12 * max(gradient_scales(peer))]
    result = Result(case.name, n, m, point.pieces.mu.size, describe_pieces(point.pieces.sizes),
                    median_time(lambda: peer_gradients(program, point, grad_y), repeats))
    with warnings.catch_warnings(record=True) as vjp_caught:
        warnings.simplefilter("always", cbo.CboWarning)
        for method in METHODS:
            (grads,), info = program.vjp([point], [grad_y], method)
            result.iterations[method] = info.iterations
            result.differences[method] = relative_difference(grads, peer)
            if info.extra.get("minimum_norm_items"):
                result.notes.append(f"{method}: minimum-norm adjoint")
            result.times[method] = median_time(lambda: program.vjp([point], [grad_y], method), repeats)
    result.notes += sorted({type(w.message).__name__ for w in caught + vjp_caught})
    result.notes += [f"peer dF/dx_{k} = 0 (x_{k} of shape {built.problem.parameters[k].shape})" for k in zero]
    result.phases = phases(program, point, grad_y, repeats) | solve_times(program, built.x, repeats)
    return result


# ---------------------------------------------------------------- report

def ms(seconds: float) -> str:
    return f"{1e3 * seconds:.3g}"


def tables(results: list[Result]) -> str:
    head = ("| problem | n | m | n+m | n+p | active pieces | peer [ms] | "
            + " | ".join(f"{m} [ms] (x)" for m in METHODS) + " | direct + pieces [ms] (x) | cg it | minres it | "
            + " | ".join(f"rel. diff {m}" for m in METHODS) + " | notes |")
    rows = [head, "|---|--:|--:|--:|--:|---|--:|" + "--:|" * (2 * len(METHODS) + 3) + "---|"]
    for r in results:
        whole = r.times["direct"] + r.phases["active_pieces (in solve)"]
        rows.append(
            f"| {r.case} | {r.n} | {r.m} | {r.n + r.m} | {r.n + r.p} | {r.pieces} | {ms(r.peer)} | "
            + " | ".join(f"{ms(r.times[m])} ({r.peer / r.times[m]:.2f}x)" for m in METHODS)
            + f" | {ms(whole)} ({r.peer / whole:.2f}x) | {r.iterations['cg']} | {r.iterations['minres']} | "
            + " | ".join(f"{r.differences[m]:.1e}" for m in METHODS) + f" | {'; '.join(r.notes) or '-'} |")
    names = list(results[0].phases)
    rows += ["", "Phases [ms]:", "", "| problem | " + " | ".join(names) + " | solve: x |",
             "|---|" + "--:|" * (len(names) + 1)]
    rows += [f"| {r.case} | " + " | ".join(ms(r.phases[k]) for k in names)
             + f" | {r.phases['solve: residual-map polish'] / r.phases['solve: reduced polish']:.2f}x |"
             for r in results]
    return "\n".join(rows)


def quoted_figures(results: list[Result]) -> tuple[dict[str, str], list[str]]:
    """The figures docs/conic.md quotes (problems/figures.py) and those that vary from run to run: per problem
    n + m, the times (ms) and speed-ups of the peer and each method, the iterations, the differences from the
    peer and the forward solve's speed-up; over the problems their ranges."""
    figures: dict[str, str] = {}
    for r in results:
        key = slug(r.case)
        solve_x = r.phases["solve: residual-map polish"] / r.phases["solve: reduced polish"]
        figures.update({f"{key}.size": str(r.n + r.m), f"{key}.peer_ms": ms(r.peer), f"{key}.solve_x": f"{solve_x:.2f}×"})
        for method in METHODS:
            figures.update({f"{key}.{method}_ms": ms(r.times[method]),
                            f"{key}.{method}_x": f"{r.peer / r.times[method]:.2f}×",
                            f"{key}.{method}_diff": f"{r.differences[method]:.1e}"})
        figures.update({f"{key}.cg_it": str(r.iterations["cg"]), f"{key}.minres_it": str(r.iterations["minres"])})
    speedups = {m: [r.peer / r.times[m] for r in results] for m in METHODS}
    solves = [r.phases["solve: residual-map polish"] / r.phases["solve: reduced polish"] for r in results]
    ranges = {**{f"{m}_x": speedups[m] for m in METHODS}, "solve_x": solves,
              "cg_it": [r.iterations["cg"] for r in results], "minres_it": [r.iterations["minres"] for r in results]}
    for name, values in ranges.items():
        unit = "" if name.endswith("_it") else "×"
        spec = "d" if name.endswith("_it") else ".2f"  # as the table's "x" columns
        figures[f"all.{name}_min"], figures[f"all.{name}_max"] = (f"{min(values):{spec}}{unit}",
                                                                  f"{max(values):{spec}}{unit}")
    figures["all.diff_max"] = f"{max(max(r.differences.values()) for r in results):.0e}"
    figures["all.direct_diff_max"] = f"{max(r.differences['direct'] for r in results):.0e}"
    steady = {key for key in figures if key.endswith((".size", "_it", "_it_min", "_it_max"))}
    return figures, sorted(set(figures) - steady)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smallest size of each problem only")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    results, failures = [], {}
    for case in cases():
        if args.quick and not case.quick:
            continue
        try:
            results.append(measure(case, args.repeats))
        except Exception as err:  # noqa: BLE001 - a problem that fails is a result: listed under the tables
            failures[case.name] = f"{type(err).__name__}: {err}"
        print(f"{case.name}: {'failed' if case.name in failures else 'done'} ({time.perf_counter() - start:.0f} s)",
              file=sys.stderr, flush=True)
    table = tables(results) + "".join(f"\n\nFailed: {name}: {why}" for name, why in failures.items())
    footer = (f"\n\n`python benchmarks/conic_adjoint.py{' --quick' if args.quick else ''} --repeats {args.repeats}`: "
              f"{len(results)} problems, {len(failures)} failed, torch {torch.__version__}, numpy {np.__version__}, "
              f"total {time.perf_counter() - start:.0f} s.")
    print(table + footer)
    OUTPUT.mkdir(exist_ok=True)
    (OUTPUT / "conic_adjoint.md").write_text(table + footer + "\n")
    if args.quick:
        print("figures not saved for the documentation, which quotes a full run (without --quick)")
    else:
        figures, varies = quoted_figures(results)
        figures.update({"all.problems": str(len(results) + len(failures)), "all.failed": str(len(failures))})
        print(f"figures quoted by the documentation: {save_figures(__file__, figures, varies)}")


if __name__ == "__main__":
    main()
