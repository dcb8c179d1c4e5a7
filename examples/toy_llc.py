r"""LV-HBA's toy problem with a coupled constraint: a lower level whose solution is not unique, and the remedy.

x in R^100, y = (y1, y2), e the vector of ones (problems/toy_llc.py; Yao et al., ICLR 2024):

    min_x  1/2 ||x - y2*||^2 + 1/2 ||y1* - e||^2
    y*(x) in argmin_y 1/2 ||y1||^2 - x^T y1 + e^T y2 + eps/2 ||y||^2   s.t.  e^T x + e^T y1 + e^T y2 = 0,

with the published solution x* = -0.3 e, y* = (0.7 e, -0.4 e) at eps = 0. At eps = 0 every y2 with the
right sum solves the lower level: the script shows the warning cbo gives there (which variable is free,
what to add). Then cbo.minimize runs from LV-HBA's start x0 = -20 e for several Tikhonov weights eps and
prints the distance to the published x* and to the closed-form optimum of the regularized problem.
Saves examples/output/toy_llc.png and docs/img/toy_llc.png.
"""
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import cbo  # noqa: E402
from problems.figures import save_figures  # noqa: E402
from problems import toy_llc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "examples" / "output"
DOCS_IMAGE = ROOT / "docs" / "img" / "toy_llc.png"
EPS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-6)


def singular_warning(size: str = "large") -> str:
    """The DegenerateKKTWarning cbo gives on the unregularized toy problem (eps = 0) at LV-HBA's start."""
    instance = toy_llc.build(size, eps=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cbo.hypergrad(instance.problem, instance.x0)
    (message,) = [str(w.message) for w in caught if issubclass(w.category, cbo.DegenerateKKTWarning)]
    return message


def run(eps: float, size: str = "large") -> dict:
    """cbo.minimize (its defaults, the task's tol) from x0 = -20 e with the Tikhonov weight eps."""
    instance = toy_llc.build(size, eps=eps)
    start = time.perf_counter()
    result = cbo.minimize(instance.problem, instance.x0, tol=instance.settings["tol"], progress=False)
    seconds = time.perf_counter() - start
    t = toy_llc.solution(eps)["t"]
    return dict(instance.evaluate(result.x), eps=eps, seconds=seconds, evaluations=len(result.history.f),
                to_closed_form=float(np.abs(result.x.numpy() - t).max()), history=result.history.f,
                F_star=instance.reference["F_star"])


def plot(rows: list[dict], path: Path) -> Path:
    """Final ||x - x*|| / ||x*|| against eps (with the closed form), and the best F so far over the evaluations."""
    fig, (ax_eps, ax_f) = plt.subplots(1, 2, figsize=(10, 3.8))
    eps = [r["eps"] for r in rows]
    ax_eps.loglog(eps, [r["x_error"] for r in rows], "o", label="cbo.minimize")
    ax_eps.loglog(eps, [abs(toy_llc.solution(e)["t"] - toy_llc.X_STAR) / abs(toy_llc.X_STAR) for e in eps], "k--",
                  lw=1, label="closed form |t(eps) + 0.3| / 0.3")
    ax_eps.set(xlabel="Tikhonov weight eps", ylabel="‖x − x*‖ / ‖x*‖", title="distance to the published x*")
    for r in rows:
        best = np.minimum.accumulate(r["history"])  # the line search's rejected trial points left out
        ax_f.semilogy(best - r["F_star"], marker=".", label=f"eps = {r['eps']:g}")
    ax_f.set(xlabel="evaluation", ylabel="best F − F* so far", title="cbo.minimize from x0 = −20 e")
    for ax in (ax_eps, ax_f):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    fig.savefig(DOCS_IMAGE, dpi=90)
    plt.close(fig)
    return path


def main() -> None:
    print("eps = 0:", singular_warning())
    rows = [run(eps) for eps in EPS]
    print(f"\n{'eps':>8}{'x error':>11}{'to closed form':>16}{'F - F*':>11}{'evaluations':>13}{'seconds':>9}")
    for r in rows:
        print(f"{r['eps']:>8g}{r['x_error']:>11.2e}{r['to_closed_form']:>16.1e}{r['F'] - r['F_star']:>11.2e}"
              f"{r['evaluations']:>13d}{r['seconds']:>9.3f}")
    figures = {f"x_error_eps_{r['eps']:.0e}".replace("-", "_"): f"{r['x_error']:.2e}" for r in rows}
    print(f"figures quoted by the documentation: {save_figures(__file__, figures)}")
    print(f"plots saved to {plot(rows, OUTPUT / 'toy_llc.png')} and {DOCS_IMAGE}")


if __name__ == "__main__":
    main()
