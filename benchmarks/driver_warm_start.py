"""What warm starts save in cbo.minimize: the same outer run with warm_start=True and False.

Warm starts reuse, at outer step k, the inner solver's state (OSQP and SCS start
from the previous solution and keep their factorization; Clarabel cannot
warm-start) and the previous adjoint solution as the CG starting point.
Both runs take the same iterates (checked); the table compares their phases.

    python benchmarks/driver_warm_start.py [--n 300] [--steps 40]
"""
import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import cbo
from problems.figures import save_figures

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from builders import random_qp  # noqa: E402

SOLVERS = {
    "OSQP": {"eps_abs": 1e-9, "eps_rel": 1e-9, "max_iter": 200000},
    "SCS": {"eps_abs": 1e-9, "eps_rel": 1e-9, "max_iters": 200000},
    "CLARABEL": None,
}


def run(n, steps, solver, warm):
    case = random_qp(n, seed=3)
    cbo.forget_warm_starts(case.problem)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = cbo.minimize(case.problem, [torch.tensor(v) for v in case.x], optimizer="adam", lr=1e-2,
                              steps=steps, warm_start=warm, solver=solver, solver_options=SOLVERS[solver],
                              progress=False)
    h = result.history
    return {"total": time.perf_counter() - start, "inner": h.total_time("inner_solve"),
            "polish": h.total_time("polish"), "adjoint": h.total_time("adjoint_solve"),
            "adjoint_its": sum(h.adjoint_iterations), "f": np.array(h.f)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    print(f"random QP n = {args.n}, {args.steps} Adam steps, method cg; times in seconds over the run\n")
    print("| inner solver | warm start | inner solve | polish | adjoint solve | CG iterations | total | "
          "cold/warm inner | cold/warm adjoint its | cold/warm total | max |F diff| |")
    print("| --- | --- | --: | --: | --: | --: | --: | --: | --: | --: | --: |")
    figures, diffs = {"n": str(args.n), "steps": str(args.steps)}, []
    for solver in SOLVERS:
        cold, warm = run(args.n, args.steps, solver, False), run(args.n, args.steps, solver, True)
        diff = float(np.max(np.abs(cold["f"] - warm["f"])))
        diffs.append(diff)
        saved = 1 - warm["adjoint_its"] / cold["adjoint_its"]
        figures.update({f"{solver.lower()}.inner_speedup": f"{cold['inner'] / warm['inner']:.1f}×",
                        f"{solver.lower()}.fewer_iterations": f"{100 * saved:.0f}"})
        for label, r in (("no", cold), ("yes", warm)):
            ratios = (f"{cold['inner'] / warm['inner']:.2f} | {cold['adjoint_its'] / warm['adjoint_its']:.2f} | "
                      f"{cold['total'] / warm['total']:.2f} | {diff:.1e}") if r is warm else " | | | "
            print(f"| {solver} | {label} | {r['inner']:.3f} | {r['polish']:.3f} | {r['adjoint']:.3f} | "
                  f"{r['adjoint_its']} | {r['total']:.3f} | {ratios} |")
    figures["F_diff_max"] = f"{max(diffs):.1e}"
    varies = [key for key in figures if key.endswith("speedup")] + ["F_diff_max"]
    print(f"figures quoted by the documentation (docs/driver.md): {save_figures(__file__, figures, varies)}")


if __name__ == "__main__":
    main()
