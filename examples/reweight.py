r"""Learning to reweight training samples, with the weights on the simplex.

Each of the n = 300 training points of a two-class Gaussian-blob problem gets a
weight w_i; the weights live on the simplex (w >= 0, sum(w) = 1: the outer
constraints, enforced by cbo.minimize's projection). The inner problem fits
weighted, L2-regularized logistic regression,

    theta*(w) = argmin_theta  sum_i w_i log(1 + exp(-s_i x_i^T theta)) + lam/2 ||theta||^2,

which is the ordinary fit at the uniform weights w = 1/n, and the outer problem
minimizes the log-loss of theta*(w) on 40 clean, class-balanced validation points:

    min_{w in simplex}  F(w) = 1/m sum_j log(1 + exp(-s_j^val (x_j^val)^T theta*(w))).

Two variants:

* imbalance: 95 % of the training points are of class -1; baselines are uniform
  weights and inverse-class-frequency weights w_i = 1 / (2 n_{class(i)});
* noisy: 35 % of the training labels are flipped (25 % of class -1, 45 % of
  class +1); baseline is uniform weights.

cbo.minimize runs projected gradient descent on w from the uniform weights. The
script prints a table of validation loss, test loss, test accuracy (the test
set is balanced, so this is also the balanced accuracy) and test recall of
class +1 for every weighting, and saves plots to examples/output/
(reweight.png; reweight_history_<variant>.png from cbo.plot_history) and a copy
of the main one to docs/img/reweight.png.
"""
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import cbo  # noqa: E402
from problems.figures import save_figures, table  # noqa: E402
from problems import reweight  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "examples" / "output"
DOCS_IMAGE = ROOT / "docs" / "img" / "reweight.png"
BASELINE_NAMES = {"uniform": "uniform", "inverse_frequency": "inverse class frequency"}
LEARNED = "learned (cbo)"
LINE_STYLES = {"uniform": ":", "inverse class frequency": "--", LEARNED: "-"}
COLOURS = {"uniform": "tab:gray", "inverse class frequency": "tab:purple", LEARNED: "tab:green"}
TITLES = {"imbalance": "imbalance (95/5)", "noisy": "noisy (35 % flipped)"}
COLUMNS = [("val_loss", "val loss"), ("test_loss", "test loss"), ("test_accuracy", "test acc"),
           ("test_recall_pos", "recall +1"), ("minority_weight", "weight on +1"),
           ("flipped_weight", "weight on flipped")]


def run(variant: str, size: str = "large", seed: int = 0):
    """Build the variant and run cbo.minimize with its recommended settings; also return the wall time."""
    instance = reweight.build(size, seed, variant)
    print(f"\n{variant}: n = {instance.data['dataset'].n_train} training points, settings {instance.settings}")
    start = time.perf_counter()
    result = instance.minimize(progress=True)
    return instance, result, time.perf_counter() - start


def weightings(instance, result) -> dict[str, dict]:
    """Metrics of each baseline and of the learned weights, by display name."""
    rows = {BASELINE_NAMES[kind]: values for kind, values in instance.reference.items()}
    rows[LEARNED] = instance.evaluate(result.x)
    return rows


def print_table(all_rows: dict[str, dict[str, dict]]) -> None:
    header = f"{'variant':<10} {'weights':<24}" + "".join(f"{title:>18}" for _, title in COLUMNS)
    print("\n" + header + "\n" + "-" * len(header))
    for variant, rows in all_rows.items():
        for name, values in rows.items():
            cells = ["-" if key == "flipped_weight" and variant == "imbalance" else f"{values[key]:.4f}"
                     for key, _ in COLUMNS]
            print(f"{variant:<10} {name:<24}" + "".join(f"{cell:>18}" for cell in cells))


def groups(data: reweight.Dataset, variant: str) -> list[tuple[str, np.ndarray, str]]:
    """(label, mask, colour) of the training points shown in the plots."""
    if variant == "imbalance":
        return [("class -1 (majority)", data.clean_train < 0, "tab:blue"),
                ("class +1 (minority)", data.clean_train > 0, "tab:orange")]
    clean = ~data.flipped
    return [("clean, class -1", clean & (data.clean_train < 0), "tab:blue"),
            ("clean, class +1", clean & (data.clean_train > 0), "tab:orange"),
            ("flipped label", data.flipped, "tab:red")]


def plot_objective(ax, result, rows: dict[str, dict]) -> None:
    ax.plot(result.history.f, color=COLOURS[LEARNED], label=LEARNED)
    for name, values in rows.items():
        if name != LEARNED:
            ax.axhline(values["val_loss"], color=COLOURS[name], ls="--", label=name)
    ax.set(xlabel="outer step", ylabel="validation log-loss F(w)", title="outer objective")
    ax.legend(fontsize="small")


def plot_weights(ax, w: np.ndarray, data: reweight.Dataset, variant: str) -> None:
    """n w_i per training point, grouped, sorted by weight within each group (1 = uniform)."""
    start = 0
    for label, mask, colour in groups(data, variant):
        values = np.sort(len(w) * w[mask])[::-1]
        ax.bar(np.arange(start, start + len(values)), values, width=1.0, color=colour,
               label=f"{label}: {w[mask].sum():.0%} of the mass")
        start += len(values)
    ax.axhline(1.0, color="k", lw=0.8, ls=":", label="uniform (n w_i = 1)")
    ax.set(xlabel="training point (grouped, sorted by weight)", ylabel="n w_i", title="learned weights")
    ax.legend(fontsize="small")


def plot_points(ax, instance, w: np.ndarray, variant: str) -> None:
    """Training points with area proportional to w_i, and the decision boundary of each weighting."""
    data = instance.data["dataset"]
    for label, mask, colour in groups(data, variant):
        ax.scatter(data.X_train[mask, 0], data.X_train[mask, 1], s=4 + 1500 * w[mask], color=colour,
                   alpha=0.6, edgecolor="none", label=label)
    lines = [(name, reweight.baseline_weights(data.s_train, kind)) for kind, name in BASELINE_NAMES.items()
             if kind in instance.reference] + [(LEARNED, w)]
    xs = np.linspace(*ax.get_xlim(), 2)
    ylim = ax.get_ylim()
    for name, weights in lines:
        theta = instance.data["fit"](weights)
        ax.plot(xs, -(theta[0] * xs + theta[2]) / theta[1], color="k", ls=LINE_STYLES[name], label=f"boundary: {name}")
    ax.set(ylim=ylim, xlabel="x1", ylabel="x2", title="training points (area ~ w_i)")
    ax.legend(fontsize="x-small", loc="lower right")


def plot_metrics(ax, rows: dict[str, dict]) -> None:
    keys = [("test_accuracy", "test accuracy"), ("test_recall_pos", "test recall +1"), ("val_loss", "val loss")]
    width = 0.8 / len(rows)
    for i, (name, values) in enumerate(rows.items()):
        heights = [values[key] for key, _ in keys]
        bars = ax.bar(np.arange(len(keys)) + (i - (len(rows) - 1) / 2) * width, heights, width, label=name,
                      color=COLOURS[name])
        ax.bar_label(bars, fmt="%.2f", fontsize="x-small")
    ax.set_xticks(np.arange(len(keys)), [title for _, title in keys])
    ax.set(ylim=(0, 1.1), title="test metrics vs baselines")
    ax.legend(fontsize="small", loc="upper right")


def plot(runs: dict, all_rows: dict, path: Path) -> Path:
    fig, axes = plt.subplots(len(runs), 4, figsize=(21, 5 * len(runs)))
    for row, (variant, (instance, result, _)) in zip(axes, runs.items()):
        w = result.x.numpy()
        plot_objective(row[0], result, all_rows[variant])
        plot_weights(row[1], w, instance.data["dataset"], variant)
        plot_points(row[2], instance, w, variant)
        plot_metrics(row[3], all_rows[variant])
        for ax in row:
            ax.set_title(f"{TITLES[variant]}: {ax.get_title()}", fontweight="bold")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.savefig(DOCS_IMAGE, dpi=75)
    plt.close(fig)
    return path


def main() -> None:
    torch.set_num_threads(1)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    runs = {variant: run(variant) for variant in reweight.VARIANTS}
    all_rows = {variant: weightings(instance, result) for variant, (instance, result, _) in runs.items()}
    print_table(all_rows)
    formats = dict(val_loss=".4f", test_loss=".4f", test_accuracy=".4f", test_recall_pos=".4f",
                   minority_weight=".0%", flipped_weight=".0%")
    quoted = table({f"{variant} {name}": values for variant, rows in all_rows.items() for name, values in rows.items()},
                   formats)
    print(f"figures quoted by the documentation: {save_figures(__file__, quoted)}")
    for variant, (instance, result, seconds) in runs.items():
        print(f"{variant}: {result.n_steps} steps in {seconds:.1f} s ({result.message}); "
              f"F {result.history.f[0]:.4f} -> {result.fun:.4f}; "
              f"{int(np.sum(result.x.numpy() > 1e-6))} of {result.x.numel()} weights above 1e-6")
        cbo.plot_history(result.history, OUTPUT / f"reweight_history_{variant}.png",
                         title=f"reweighting on the simplex ({variant})")
    print(f"plots saved to {plot(runs, all_rows, OUTPUT / 'reweight.png')}, "
          f"{OUTPUT / 'reweight_history_<variant>.png'} and {DOCS_IMAGE}")


if __name__ == "__main__":
    main()
