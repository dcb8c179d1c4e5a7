"""Hyperparameter learning with constraints: per-feature ridge penalties and the C of a soft-margin SVM.

Runs problems.hyperparams at size "large" (see that module for the equations):

* ridge: 50 features, 5 relevant, box-constrained coefficients, one penalty
  lam_j = exp(x_j) per feature, tuned on validation MSE; against a grid over a
  shared lam and a random search over per-feature lam, each with as many inner
  solves as the driver.
* SVM: C = exp(s) of a squared-hinge and of a hinge (L1) soft-margin SVM
  written with epigraph hinge constraints, tuned on the validation squared
  hinge loss; against a grid over log C with as many inner solves.

Prints a summary table and saves, under examples/output/:
hyperparams.png (learned penalties vs relevance, validation loss vs inner
solves, validation loss vs C with the driver's path), and
hyperparams_history_ridge.png / hyperparams_history_svm.png (cbo.plot_history).
Run from the repository root: python examples/hyperparams.py (about 30 s on 2 cores).
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import cbo  # noqa: E402
from problems.figures import save_figures, table  # noqa: E402
from problems import hyperparams as hp  # noqa: E402

OUTPUT = Path(__file__).parent / "output"
DOCS_IMG = Path(__file__).parent.parent / "docs" / "img"
CURVE_POINTS = 150  # resolution of the drawn validation-loss curves (display only, not a baseline)
SMALL_C = 1e-3  # second start of the hinge SVM, on the sloped part of its validation curve


def run(instance, label: str, x0: torch.Tensor | None = None):
    """cbo.minimize with the instance's settings (from ``x0`` if given); DegenerateKKTWarnings are counted."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", cbo.DegenerateKKTWarning)
        result = instance.minimize(x0, progress=True)
    degenerate = sum(issubclass(w.category, cbo.DegenerateKKTWarning) for w in caught)
    print(f"{label}: {result.message}; {time.perf_counter() - start:.1f} s; "
          f"{degenerate} degenerate-KKT warning(s) (weakly active constraints)")
    return result


def rows_for(task: str, instance, results: dict) -> list[tuple]:
    """Table rows: task, method, metrics (validation / test loss, test accuracy), inner solves."""
    rows = [(task if i == 0 else "", name, instance.evaluate(result.x), len(result.history))
            for i, (name, result) in enumerate(results.items())]
    baselines = [("grid", "grid search (shared lam)" if "random" in instance.reference else "grid search (log C)")]
    if "random" in instance.reference:
        baselines.append(("random", "random search (per-feature lam)"))
    for key, name in baselines:
        rows.append(("", name, instance.evaluate(torch.as_tensor(instance.reference[key]["best_x"])),
                     instance.reference["budget"]))
    return rows


def print_table(rows: list[tuple]) -> None:
    print(f"\n{'task':<22}{'method':<34}{'val loss':>10}{'test loss':>11}{'test acc':>10}{'inner solves':>14}")
    for task, method, metrics, solves in rows:
        accuracy = f"{metrics['test_accuracy']:.3f}" if "test_accuracy" in metrics else "-"
        print(f"{task:<22}{method:<34}{metrics['val_loss']:>10.5f}{metrics['test_loss']:>11.4f}{accuracy:>10}"
              f"{solves:>14}")


def figures(rows: list[tuple]) -> dict[str, str]:
    """The table's figures by "task method" (a row without a task continues the one above), and how many
    times cbo's validation loss on the ridge task beats the grid's and the random search's."""
    quoted, task = {}, ""
    for row_task, method, metrics, solves in rows:
        task = row_task or task
        row = {f"{task} {method}": {**metrics, "inner_solves": solves}}
        quoted.update(table(row, dict(val_loss=".5f", test_loss=".4f", inner_solves="d")))
        quoted.update(table(row, dict(test_accuracy=".3f")) if "test_accuracy" in metrics else {})
    ridge = {method: metrics["val_loss"] for _, method, metrics, _ in rows[:4]}
    return {**quoted, "gain_grid": f"{ridge['grid search (shared lam)'] / ridge['cbo.minimize']:.1f}x",
            "gain_random": f"{ridge['random search (per-feature lam)'] / ridge['cbo.minimize']:.1f}x"}


def plot_penalties(ax, instance, result) -> None:
    """Learned lam_j (log scale) per feature, features sorted by |theta_true|, with the grid's shared lam."""
    data = instance.data
    order = np.argsort(-np.abs(data["theta_true"]), kind="stable")
    lam = np.exp(result.x.numpy()[order])
    colors = np.where(data["relevant"][order], "C3", "C0")
    ax.bar(np.arange(lam.size), lam, color=colors, bottom=np.exp(hp.LOG_LAM_BOUNDS[0]))
    shared = ax.axhline(np.exp(instance.reference["grid"]["best_x"][0]), color="k", ls="--", lw=1)
    ax.set(yscale="log", ylim=np.exp(hp.LOG_LAM_BOUNDS), xlabel="feature (sorted by |theta_true|)",
           ylabel="learned penalty lam_j", title="ridge: learned per-feature penalties")
    ax.legend([Patch(color="C3"), Patch(color="C0"), shared],
              ["relevant feature", "irrelevant feature", "grid search's shared lam"], loc="lower right",
              fontsize="small")


def plot_budget(ax, instance, result) -> None:
    """Validation loss against inner solves: the driver's iterates, the baselines' running best."""
    solves = np.arange(1, len(result.history) + 1)
    ax.plot(solves, result.history.f, color="C2", label="cbo.minimize (iterate)")
    for key, name, color in (("grid", "grid, shared lam (running best)", "k"),
                             ("random", "random search (running best)", "C1")):
        values = instance.reference[key]["val_loss"]
        ax.plot(np.arange(1, values.size + 1), np.minimum.accumulate(values), color=color, ls="--", label=name)
    ax.axhline(instance.reference["noise_floor"], color="gray", lw=0.8, label="noise floor (theta_true)")
    ax.set(yscale="log", xlabel="inner solves", ylabel="validation MSE", title="ridge: same budget of inner solves")
    ax.legend(fontsize="small")


def plot_C_path(ax, svm_runs) -> None:
    """Validation loss against C (fine curve, the budget's grid points) with each driver path."""
    path_colors = iter(("k", "C3", "C1"))
    for (name, instance, results), color in zip(svm_runs, ("C2", "C4")):
        s_fine = np.linspace(*hp.LOG_C_BOUNDS, CURVE_POINTS)
        curve = hp.validation_losses(instance.problem, [np.asarray(s) for s in s_fine])
        ax.plot(np.exp(s_fine), curve, color=color, lw=1, label=f"{name} SVM")
        grid = instance.reference["grid"]
        ax.plot(np.exp(grid["t"]), grid["val_loss"], "o", ms=3, mfc="none", color=color,
                label=f"{name}: grid ({grid['t'].size} points)")
        for start, result in results.items():
            path = np.exp(np.array([float(x[0]) for x in result.history.x]))
            path_color = next(path_colors)
            stuck = ", stopped: dF/ds = 0" if result.converged else ""
            ax.plot(path, result.history.f, "-x", ms=4, lw=0.8, color=path_color,
                    label=f"{name}: cbo {start} ({len(path)} solves{stuck})")
            ax.plot(path[-1], result.history.f[-1], "*", ms=14, color=path_color, mec="k")
    ax.set(xscale="log", yscale="log", xlabel="C", ylabel="validation squared hinge loss",
           title="SVM: validation loss vs C (star: cbo's final C)")
    bottom, top = ax.get_ylim()
    ax.set_ylim(bottom, top * (top / bottom) ** 0.6)  # head room for the legend
    ax.legend(fontsize="x-small", loc="upper left")


def main() -> None:
    torch.set_num_threads(1)
    OUTPUT.mkdir(exist_ok=True)
    began = time.perf_counter()

    ridge = hp.build("ridge", "large")
    ridge_result = run(ridge, "ridge")
    # The hinge SVM also runs from a small C: from C = 1 it starts on a flat piece of its staircase.
    svm_runs = []
    for name, loss, starts in (("squared hinge", "squared_hinge", (None,)), ("hinge", "hinge", (None, SMALL_C))):
        instance = hp.build("svm", "large", loss=loss)
        results = {}
        for start in starts:
            x0 = instance.x0 if start is None else torch.tensor(np.log(start), dtype=torch.float64)
            label = f"from C = {np.exp(float(x0)):.3g}"
            results[label] = run(instance, f"svm ({name}, {label})", x0)
        svm_runs.append((name, instance, results))

    d = ridge.data["theta_true"].size
    rows = rows_for(f"ridge ({d} features)", ridge, {"cbo.minimize": ridge_result})
    rows.append(("", "theta_true (noise floor)",
                 dict(val_loss=ridge.reference["noise_floor"],
                      test_loss=float(np.mean((ridge.data["A_test"] @ ridge.data["theta_true"]
                                               - ridge.data["b_test"]) ** 2))), 0))
    for name, instance, results in svm_runs:
        rows += rows_for(f"SVM C ({name})", instance, {f"cbo.minimize {k}": r for k, r in results.items()})
        for start, result in results.items():
            print(f"SVM ({name}), cbo {start}: final C = {np.exp(float(result.x)):.3g}, best iterate's F = "
                  f"{min(result.history.f):.4f}; grid's best C = "
                  f"{np.exp(float(instance.reference['grid']['best_x'])):.3g}")
    print_table(rows)
    print(f"figures quoted by the documentation: {save_figures(__file__, figures(rows))}")

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    plot_penalties(axes[0], ridge, ridge_result)
    plot_budget(axes[1], ridge, ridge_result)
    plot_C_path(axes[2], svm_runs)
    fig.tight_layout()
    fig.savefig(OUTPUT / "hyperparams.png", dpi=110)
    DOCS_IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(DOCS_IMG / "hyperparams.png", dpi=90)
    cbo.plot_history(ridge_result.history, OUTPUT / "hyperparams_history_ridge.png",
                     title="per-feature ridge penalties (50 features)")
    cbo.plot_history(next(iter(svm_runs[0][2].values())).history, OUTPUT / "hyperparams_history_svm.png",
                     title="squared-hinge SVM, s = log C")
    print(f"\nplots saved under {OUTPUT}/ (hyperparams*.png); total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
