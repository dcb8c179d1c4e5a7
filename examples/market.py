"""Capacity planning against clearing prices: an outer objective that is a multiplier.

Inner problem (cvxpy): the market's economic dispatch over 24 hours, six
generators with quadratic costs, capacity limits and a demand balance
``d == cp.sum(g, axis=0)`` whose multiplier is the hourly clearing price
(problems/market.py). Outer problem: a buyers' cooperative adds capacity x >= 0
to three generators to cut its bill at those prices, paying kappa per MW,

    min_{x >= 0}  sum_t d_t price_t(x) + kappa . x.

The prices enter F as ``balance.dual_variables[0]``, listed among the
BilevelProblem's variables, and cbo differentiates them from the same KKT solve
as the dispatch. The script checks dF/dx against central finite differences of
cvxpy's own dual values, runs cbo.minimize (default optimizer), prints the
bill before and after, and saves examples/output/market.png (hourly prices and
dispatch before and after) and docs/img/market.png (a small copy).
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import cbo  # noqa: E402
from problems.figures import save_figures  # noqa: E402
from problems import market  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "examples" / "output"


def check_gradient(instance, x: np.ndarray, h: float = 1e-4) -> float:
    """Largest relative difference between cbo's dF/dx and central differences of F through cvxpy."""
    m = instance.data["market"]
    grad = cbo.hypergrad(instance.problem, torch.as_tensor(x)).numpy()
    reference = np.array([(market.outer_value(m, x + h * e) - market.outer_value(m, x - h * e)) / (2 * h)
                          for e in np.eye(x.size)])
    return float(np.abs(grad - reference).max() / np.abs(reference).max())


def plot(instance, before: dict, after: dict, added: np.ndarray, history, path: Path, dpi: int = 120) -> None:
    m = instance.data["market"]
    hours = np.arange(m.demand.size)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].step(hours, before["prices"], where="mid", label="before")
    axes[0].step(hours, after["prices"], where="mid", label="after adding capacity")
    axes[0].set(xlabel="hour", ylabel="clearing price (multiplier of the balance)", title="Hourly prices")
    axes[0].legend()
    bottom = np.zeros(m.demand.size)
    for k, row in enumerate(after["dispatch"]):
        axes[1].bar(hours, row, bottom=bottom, label=f"gen {k}" + (" (+)" if m.extendable[k] else ""))
        bottom += row
    axes[1].set(xlabel="hour", ylabel="MW", title="Dispatch after (+: extendable)")
    axes[1].legend(fontsize=7, ncol=2)
    axes[2].plot(history.f, marker=".")
    axes[2].set(xlabel="outer step", ylabel="bill + investment", title="F during cbo.minimize")
    fig.suptitle(f"Capacity added: {np.round(added, 1)} MW")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    instance = market.build("large")
    x0 = instance.x0.numpy()
    gradient_error = check_gradient(instance, x0 + 5.0)
    print(f"dF/dx vs central differences of cvxpy's dual values: max relative difference {gradient_error:.1e}")
    result = instance.minimize(progress=True)
    added = result.x.numpy()
    before, after = instance.evaluate(x0), instance.evaluate(added)
    F_after = after["bill"] + after["investment"]
    print(result)
    print(f"capacity added: {np.round(added, 1)} MW; bill {before['bill']:.0f} -> {after['bill']:.0f}, "
          f"investment {after['investment']:.0f}; F {before['bill']:.0f} -> {F_after:.0f}; peak price "
          f"{before['prices'].max():.1f} -> {after['prices'].max():.1f}")
    plot(instance, before, after, added, result.history, OUTPUT / "market.png")
    plot(instance, before, after, added, result.history, ROOT / "docs" / "img" / "market.png", dpi=60)
    print(f"saved {OUTPUT / 'market.png'}")
    figures = {"gradient_error": f"{gradient_error:.0e}", "F_before": f"{before['bill']:.0f}",
               "F_after": f"{F_after:.0f}", "bill_after": f"{after['bill']:.0f}",
               "investment": f"{after['investment']:.0f}", "steps": str(result.n_steps),
               "peak_before": f"{before['prices'].max():.1f}", "peak_after": f"{after['prices'].max():.1f}",
               **{f"added_{k}": f"{a:.1f}" for k, a in enumerate(added)}}
    print(f"figures quoted by the documentation: {save_figures(__file__, figures, ('gradient_error',))}")


if __name__ == "__main__":
    main()
