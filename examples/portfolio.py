r"""Decision-focused portfolio hyperparameters on cbo's conic route: return corrections and a risk budget.

Runs problems.portfolio at size "large" (see that module for the equations):
30 assets with factor-model returns, a long-only mean-variance model with the
risk budget ||L^T w|| <= sigma written as cp.SOC (so cbo differentiates
cvxpy's cone program), and the outer variables x = (delta, sigma): one
correction per estimated mean and the budget, tuned on the investor's
validation utility mean - gamma/2 var. Against a sigma grid (delta = 0) and a
random search over (delta, sigma), each with as many inner solves as the
driver, and against equal weights, the plain Markowitz portfolio on the
training estimates and the (unknowable) oracle Markowitz portfolio.

Prints a summary table and saves, under examples/output/: portfolio.png (the
weights, F against inner solves, mean against volatility on the test period
with the sigma sweeps of the plain and the learned model, the learned
corrections against the true estimation errors) and portfolio_history.png
(cbo.plot_history); a copy of portfolio.png goes to docs/img/.
Run from the repository root: python examples/portfolio.py (about 10 s on 2 cores).
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import cbo  # noqa: E402
from problems.figures import save_figures  # noqa: E402
from problems import portfolio as pf  # noqa: E402

OUTPUT = Path(__file__).parent / "output"
DOCS_IMG = Path(__file__).parent.parent / "docs" / "img"
SWEEP_POINTS = 25  # sigma values of the drawn risk-budget sweeps (display only, not a baseline)


def run(instance) -> cbo.MinimizeResult:
    """cbo.minimize with the instance's settings; DegenerateKKTWarnings (weakly active w_i >= 0) are counted."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", cbo.DegenerateKKTWarning)
        result = instance.minimize(progress=True)
    degenerate = sum(issubclass(w.category, cbo.DegenerateKKTWarning) for w in caught)
    print(f"cbo.minimize: {result.message}; {time.perf_counter() - start:.1f} s; "
          f"{degenerate} degenerate-KKT warning(s) (an asset's w_i >= 0 weakly active)")
    return result


def portfolios(instance, result) -> list[tuple[str, np.ndarray, int | str]]:
    """(name, weights, inner solves) of the driver's answer, the baselines and the reference portfolios."""
    reference, budget = instance.reference, instance.reference["budget"]
    weights = lambda x: instance.evaluate(x)["w"]  # noqa: E731
    return [
        ("cbo.minimize (delta, sigma)", weights(result.x), len(result.history)),
        ("grid search (sigma, delta = 0)", weights(reference["grid"]["best_x"]), budget),
        ("random search (delta, sigma)", weights(reference["random"]["best_x"]), budget),
        ("start x0 (delta = 0, sigma0)", reference["start"], 1),
        ("plain Markowitz (training)", reference["markowitz"], "-"),
        ("equal weights 1/n", reference["equal"], "-"),
        ("oracle Markowitz (true mu, Sigma)", reference["oracle"], "-"),
    ]


def print_table(instance, rows) -> None:
    """Validation and test utility (mean - gamma/2 var, % per period), test mean and volatility, holdings."""
    print(f"\n{'portfolio':<36}{'val util':>9}{'test util':>10}{'test mean':>10}{'test vol':>9}{'held':>6}"
          f"{'inner solves':>14}")
    for name, w, solves in rows:
        m = pf.portfolio_metrics(instance.data, w, instance.data["gamma"])
        print(f"{name:<36}{m['val_utility']:>9.4f}{m['test_utility']:>10.4f}{m['test_mean']:>10.3f}"
              f"{m['test_vol']:>9.2f}{m['holdings']:>6}{solves!s:>14}")


def sweep(instance, delta: np.ndarray) -> np.ndarray:
    """(test volatility, test mean) of w*(delta, sigma) for sigma across its box."""
    points = []
    for sigma in np.linspace(*instance.data["bounds"], SWEEP_POINTS):
        returns = instance.data["R_test"] @ pf.inner_weights(instance.problem, delta, sigma)
        points.append((returns.std(), returns.mean()))
    return np.array(points)


def plot_weights(ax, instance, result, rows) -> None:
    """The start's, the learned and the oracle's weights per asset, assets sorted by true mean."""
    order = np.argsort(-instance.data["mu"])
    named = {name.split(" (")[0]: w for name, w, _ in rows}
    width = 0.28
    for k, (label, key, color) in enumerate((("start x0", "start x0", "C7"), ("learned (cbo)", "cbo.minimize", "C2"),
                                             ("oracle", "oracle Markowitz", "C3"))):
        ax.bar(np.arange(order.size) + (k - 1) * width, named[key][order], width, color=color, label=label)
    ax.set(xlabel="asset (sorted by true mean return)", ylabel="weight",
           title="long-only weights: start, learned, oracle")
    ax.legend(fontsize="small")


def plot_budget(ax, instance, result) -> None:
    """F against inner solves: the driver's iterates, the baselines' running best."""
    solves = np.arange(1, len(result.history) + 1)
    ax.plot(solves, result.history.f, color="C2", label="cbo.minimize (iterate)")
    for key, name, color in (("grid", "grid over sigma, delta = 0 (running best)", "k"),
                             ("random", "random (delta, sigma) (running best)", "C1")):
        values = instance.reference[key]["F"]
        ax.plot(np.arange(1, values.size + 1), np.minimum.accumulate(values), color=color, ls="--", label=name)
    ax.set(xlabel="inner solves", ylabel="F = -validation utility + tau/2 ||delta||^2",
           title="same budget of inner solves")
    ax.legend(fontsize="small")


def plot_frontier(ax, instance, result, rows) -> None:
    """Test mean against test volatility: the sigma sweeps of the plain and the learned model, each portfolio,
    and the investor's indifference curves mean - gamma/2 vol^2 = const through the learned and the oracle one."""
    for delta, label, color in ((np.zeros_like(instance.data["mu_hat"]), "sigma sweep, delta = 0", "k"),
                                (result.x[0].numpy(), "sigma sweep, learned delta", "C2")):
        curve = sweep(instance, delta)
        ax.plot(curve[:, 0], curve[:, 1], color=color, lw=1, ls=":", label=label)
    markers = iter("o*sDv^P")
    for name, w, _ in rows:
        returns = instance.data["R_test"] @ w
        ax.plot(returns.std(), returns.mean(), next(markers), ms=9, mec="k", label=name.split(" (")[0])
    ax.autoscale_view()
    ax.autoscale(False)  # the indifference curves span the axes as they are
    volatility = np.linspace(*ax.get_xlim(), 50)
    for k, (name, w, _) in enumerate((rows[0], rows[-1])):
        utility = pf.portfolio_metrics(instance.data, w, instance.data["gamma"])["test_utility"]
        ax.plot(volatility, utility + instance.data["gamma"] / 2 * volatility ** 2, color="gray", lw=0.7,
                ls="-", label="indifference curves (utility of cbo, oracle)" if k == 0 else None)
    ax.set(xlabel="test volatility (% per period)", ylabel="test mean return (% per period)",
           title="test period: mean vs volatility")
    ax.legend(fontsize="x-small", loc="upper right", ncol=2)


def corrections(instance, result) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Learned delta, true estimation errors mu - mu_hat, the assets whose delta moved, and the correlation
    of delta with the errors over those."""
    delta = result.x[0].numpy()
    error = instance.data["mu"] - instance.data["mu_hat"]
    moved = np.abs(delta) > 1e-3
    return delta, error, moved, float(np.corrcoef(error[moved], delta[moved])[0, 1])


def figures(instance, result, rows) -> dict[str, str]:
    """The figures the documentation quotes: the table's metrics per portfolio, F of cbo and the baselines,
    the learned budget and the corrections' fit."""
    keys = ("cbo", "grid", "random", "start", "markowitz", "equal", "oracle")
    quoted = {}
    for key, (_, w, solves) in zip(keys, rows):
        m = pf.portfolio_metrics(instance.data, w, instance.data["gamma"])
        quoted.update({f"{key}.val_utility": f"{m['val_utility']:.4f}", f"{key}.test_utility": f"{m['test_utility']:.4f}",
                       f"{key}.test_mean": f"{m['test_mean']:.3f}", f"{key}.test_vol": f"{m['test_vol']:.2f}",
                       f"{key}.holdings": str(m["holdings"]), f"{key}.inner_solves": str(solves)})
    risk = np.linalg.norm(instance.data["L"].T @ instance.evaluate(result.x)["w"]) - float(result.x[1])
    _, _, moved, correlation = corrections(instance, result)
    return {**quoted, "F": f"{result.fun:.4f}", "F_grid": f"{instance.reference['grid']['best_F']:.4f}",
            "F_random": f"{instance.reference['random']['best_F']:.4f}", "sigma0": f"{float(instance.x0[1]):.2f}",
            "sigma": f"{float(result.x[1]):.2f}", "budget_gap": f"{risk:.1e}", "moved": str(int(moved.sum())),
            "correlation": f"{correlation:.2f}"}


def plot_corrections(ax, instance, result) -> None:
    """Learned delta_i against the true estimation error mu_i - mu_hat_i (assets whose delta moved)."""
    delta, error, moved, correlation = corrections(instance, result)
    ax.axhline(0, color="gray", lw=0.5)
    ax.axvline(0, color="gray", lw=0.5)
    ax.plot(error[~moved], delta[~moved], "o", color="C7", mfc="none",
            label="never held: zero hypergradient, delta_i stays 0")
    ax.plot(error[moved], delta[moved], "o", color="C2", label=f"moved ({moved.sum()} assets)")
    ax.set(xlabel="true estimation error mu_i - mu_hat_i", ylabel="learned correction delta_i",
           title=f"corrections vs estimation errors (corr {correlation:.2f})")
    ax.legend(fontsize="small")


def main() -> None:
    torch.set_num_threads(1)
    OUTPUT.mkdir(exist_ok=True)
    began = time.perf_counter()

    instance = pf.build("large")
    data = instance.data
    print(f"{data['mu_hat'].size} assets, {len(data['R_train'])} / {len(data['R_val'])} / {len(data['R_test'])} "
          f"train / validation / test periods; route: {instance.problem.route_reason[:70]}...")
    result = run(instance)
    delta, sigma = result.x[0].numpy(), float(result.x[1])
    risk = np.linalg.norm(data["L"].T @ instance.evaluate(result.x)["w"])
    soc = next(c for c in result.info.cones if c.label.startswith("SOC constraint 0"))
    print(f"sigma: {float(instance.x0[1]):.3f} -> {sigma:.3f} in [{data['bounds'][0]:.3f}, {data['bounds'][1]:.3f}]; "
          f"risk budget tight: {soc.tight} ({soc.detail}; ||L^T w*|| - sigma = {risk - sigma:.1e}); "
          f"||delta||_inf = {np.abs(delta).max():.3f}")
    print(f"F: cbo {result.fun:.4f} (best iterate {min(result.history.f):.4f}), grid "
          f"{instance.reference['grid']['best_F']:.4f}, random {instance.reference['random']['best_F']:.4f}")

    rows = portfolios(instance, result)
    print_table(instance, rows)
    print(f"figures quoted by the documentation: {save_figures(__file__, figures(instance, result, rows), ('budget_gap',))}")

    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    plot_weights(axes[0, 0], instance, result, rows)
    plot_budget(axes[0, 1], instance, result)
    plot_frontier(axes[1, 0], instance, result, rows)
    plot_corrections(axes[1, 1], instance, result)
    fig.tight_layout()
    fig.savefig(OUTPUT / "portfolio.png", dpi=110)
    DOCS_IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(DOCS_IMG / "portfolio.png", dpi=80)
    cbo.plot_history(result.history, OUTPUT / "portfolio_history.png",
                     title="portfolio: return corrections and risk budget (conic route)")
    print(f"\nplots saved under {OUTPUT}/ (portfolio*.png); total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
