r"""Hypergradient accuracy on nonsmooth and conic inner problems: cbo against cvxpylayers.

Problem classes (tests/conic_cases.py): lasso (norm1), L1-regularised logistic
regression (cvxpylayers issue #85), soft-margin SVM with a cp.pos hinge loss,
an SOCP with cp.SOC, an SDP with a symmetric matrix parameter (X >> 0,
tr X = 1), a maximum-entropy problem with cp.ExpCone, and a projection onto
a cp.PowCone3D. The lasso, the logistic regression and the SVM take the
smooth route after the epigraph reformulation; the table also gives cbo's
error on the conic route, forced with route="conic". Outer objective
F = 1/2 ||y - y_target||^2.

For a random direction d, each method's directional derivative <dF/dx, d> is
compared with two central finite-difference references:

* "FD (cvxpy)": (F(x + h d) - F(x - h d)) / 2h, h = 1e-4, y* from cvxpy alone
  (Clarabel, tolerances 1e-12): limited by the solver's accuracy divided by h;
* "FD (polished)": h = 1e-5, y* the Newton-polished cone-program solution
  (KKT residual ~1e-15), so that its error is O(h^2).

cvxpylayers 1.2 runs on the DPP version of each problem (the SVM's
``C * sum(pos(...))`` with X a parameter is not DPP; its epigraph
reformulation, which cbo builds, is) with Clarabel at tolerances 1e-10.

Run:  python benchmarks/conic_accuracy.py
"""
from __future__ import annotations

import importlib.metadata
import sys
import warnings
from pathlib import Path

import torch
from cvxpylayers.torch import CvxpyLayer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import cbo  # noqa: E402
from conic_cases import (ALL_CASES, directional, finite_difference_cvxpy, finite_difference_polished,  # noqa: E402
                         symmetric_direction)
from problems.figures import save_figures, slug  # noqa: E402

CVXPYLAYERS_ARGS = dict(solve_method="Clarabel", tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
OUTPUT = Path(__file__).resolve().parent / "output" / "conic_accuracy.md"


def cvxpylayers_directional(case, direction) -> float:
    """<dF/dx, d> with y* and its derivative from cvxpylayers on the (DPP) inner problem."""
    inner = case.problem.reformulation.original
    inner = inner if inner.is_dpp() else case.problem.inner
    layer = CvxpyLayer(inner, parameters=case.problem.parameters, variables=case.problem.variables)
    xs = [t.clone().requires_grad_(True) for t in case.x_tensors]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (y,) = layer(*xs, solver_args=CVXPYLAYERS_ARGS)
    grads = torch.autograd.grad(case.problem.outer(*xs, y), xs)
    return directional(list(grads), direction)


def relative(value: float, reference: float) -> float:
    return abs(value - reference) / max(abs(reference), 1e-12)


def quoted_figures(errors: dict[str, dict[str, float | None]]) -> dict[str, str]:
    """The figures docs/conic.md and README quote (problems/figures.py): per problem the relative errors against
    FD (polished) of cbo, cbo on the conic route and cvxpylayers ("failed" where it raised), their extremes, and
    cvxpylayers' version."""
    figures = {f"{slug(case)}.{method}": "failed" if error is None else f"{error:.1e}"
               for case, row in errors.items() for method, error in row.items()}
    ours = [row[m] for row in errors.values() for m in ("cbo", "conic")]
    theirs = [row["cvxpylayers"] for row in errors.values() if row["cvxpylayers"] is not None]
    figures["cbo_max"] = f"{max(ours):.1e}"
    figures["cvxpylayers_version"] = importlib.metadata.version("cvxpylayers")
    if theirs:
        figures["cvxpylayers_min"], figures["cvxpylayers_max"] = f"{min(theirs):.1e}", f"{max(theirs):.1e}"
    return figures


def main() -> None:
    torch.set_num_threads(1)
    rows = ["| problem | cbo route | FD (polished) | FD (cvxpy) vs polished | cbo vs FD (polished) | cbo vs FD (cvxpy) "
            "| cbo, conic route forced, vs FD (polished) | cvxpylayers vs FD (polished) | cvxpylayers vs FD (cvxpy) |",
            "|---|---|---|---|---|---|---|---|---|"]
    errors: dict[str, dict[str, float | None]] = {}
    for build in ALL_CASES:
        case = build()
        direction = symmetric_direction(case.problem)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", cbo.CboWarning)
            grad, info = cbo.hypergrad(case.problem, case.x_tensors, return_info=True)
            conic = directional(cbo.hypergrad(case.problem, case.x_tensors, route="conic"), direction)
        ours = directional(grad, direction)
        polished = finite_difference_polished(case, direction)
        plain = finite_difference_cvxpy(case, direction)
        errors[case.name] = {"cbo": relative(ours, polished), "conic": relative(conic, polished), "cvxpylayers": None}
        try:
            theirs = cvxpylayers_directional(case, direction)
            theirs_errors = f"{relative(theirs, polished):.1e} | {relative(theirs, plain):.1e}"
            errors[case.name]["cvxpylayers"] = relative(theirs, polished)
        except Exception as err:  # report, do not stop the table
            theirs_errors = f"failed ({type(err).__name__}: {str(err)[:60]}) | failed"
        route = "conic" if info.route.startswith("conic") else \
            "smooth + epigraph" if "epigraph" in info.route else "smooth"
        rows.append(f"| {case.name} | {route} | {polished:.10g} | {relative(plain, polished):.1e} | "
                    f"{relative(ours, polished):.1e} | {relative(ours, plain):.1e} | {relative(conic, polished):.1e} | "
                    f"{theirs_errors} |")
    table = "\n".join(rows)
    print(table)
    OUTPUT.parent.mkdir(exist_ok=True)
    OUTPUT.write_text(table + "\n")
    figures = quoted_figures(errors)
    # all vary (round-off); no arguments: accuracy.py --nonsmooth-and-conic calls this main too
    print(f"figures quoted by the documentation: {save_figures(__file__, figures, figures, arguments=[])}")


if __name__ == "__main__":
    main()
