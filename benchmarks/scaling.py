"""Hypergradient error of every implicit method on badly scaled QPs (the cases of tests/test_scaling.py).

Each case is a unit-scale QP rescaled by a change of units; the reference is the unit-scale
hypergradient from a dense numpy KKT solve at the designed optimum, divided by the parameter scale
(see tests/test_scaling.py). Prints relative errors, or why a method failed.

    python benchmarks/scaling.py
"""
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_scaling import IMPLICIT_METHODS, M, N, P_EQ, problem_scaled_with_x, scaled_qp  # noqa: E402
from builders import relative_error  # noqa: E402

import cbo  # noqa: E402


def cases():
    for s in (1e-6, 1e-3, 1e3, 1e6):
        yield f"objective x{s:g}, rows x{1 / s:g}, x ~ {s:g}", scaled_qp(objective=s, rows=1 / s, parameter=s)
    for s in (1e-6, 1e6):
        for placement in ("linear", "rhs"):
            yield f"x ~ {s:g} in the {placement} term", scaled_qp(parameter=s, placement=placement)
    for s in (1e-6, 1e-5, 1e6):
        yield f"all data ~ {s:g}", problem_scaled_with_x(s)
    rng = np.random.default_rng(0)
    yield ("variables 1e-3..1e3, rows 1e-4..1e4",
           scaled_qp(rows=10.0 ** rng.uniform(-4, 4, M + P_EQ), variables=10.0 ** rng.uniform(-3, 3, N)))


def error(case, method) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            grad = cbo.hypergrad(case.problem, torch.as_tensor(case.x0), method=method, warm_start=False)
        except cbo.CboError as err:
            return f"failed ({type(err).__name__})"
    flagged = " (warned)" if any(issubclass(w.category, cbo.CboWarning) for w in caught) else ""
    return f"{relative_error([grad.numpy()], [case.reference]):.1e}{flagged}"


def main():
    torch.set_num_threads(1)
    print("| case | " + " | ".join(IMPLICIT_METHODS) + " |")
    print("| --- |" + " --: |" * len(IMPLICIT_METHODS))
    for name, case in cases():
        print(f"| {name} | " + " | ".join(error(case, m) for m in IMPLICIT_METHODS) + " |", flush=True)


if __name__ == "__main__":
    main()
