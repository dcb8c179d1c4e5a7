r"""Data hyper-cleaning: find the mislabelled training points of a real data set by bilevel optimization.

35 % of the training labels of scikit-learn's breast-cancer data (300 training
points, 30 standardized features and an intercept) are flipped. Each training
point gets a weight w_i in [0, 1] (the outer variables); the inner problem fits
weighted, L2-regularized logistic regression,

    theta*(w) = argmin_theta  sum_i w_i log(1 + exp(-b_i a_i^T theta)) + lam/2 ||theta||^2,

and the outer problem minimizes the logistic loss of theta*(w) on 150 clean
validation points, over the box 0 <= w <= 1:

    min_{0 <= w <= 1}  F(w) = 1/m sum_j log(1 + exp(-b_j^val (a_j^val)^T theta*(w))).

cbo.minimize runs projected Adam on w with hypergradients from the inner KKT
conditions. Points whose learned weight is below 1/2 are flagged as
mislabelled. The script prints the F1 score of that detection and the test
accuracy of training on the corrupted data (w = 1), with the learned weights,
and on the clean points only (the oracle w_i = 1[label i not flipped]), and
saves plots to examples/output/ (hyper_cleaning.png, hyper_cleaning_history.png)
and a copy of the main one to docs/img/hyper_cleaning.png.

Needs scikit-learn: pip install -e ".[problems]".
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
from problems import hyper_cleaning  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "examples" / "output"
DOCS_IMAGE = ROOT / "docs" / "img" / "hyper_cleaning.png"


def run(size: str = "large", seed: int = 0):
    """Build the task and run cbo.minimize with its recommended settings; also return its wall time."""
    instance = hyper_cleaning.build(size, seed)
    start = time.perf_counter()
    result = instance.minimize(progress=True)
    return instance, result, time.perf_counter() - start


def summary(instance, result) -> dict[str, dict]:
    """Metrics of the three weightings: uniform (corrupted), learned by cbo, oracle."""
    return {
        "corrupted (w = 1)": instance.reference["corrupted"],
        "cbo hyper-cleaned": instance.evaluate(result.x),
        "oracle (w = 1[clean])": instance.reference["oracle"],
    }


def print_summary(instance, result, rows: dict[str, dict], seconds: float) -> None:
    data = instance.data
    n, d = data["A_train"].shape
    print(f"\nbreast cancer: {n} training points ({int(data['flipped'].sum())} labels flipped), "
          f"{data['b_val'].size} validation, {data['b_test'].size} test, {d} features incl. intercept")
    print(f"{'weights':<24}{'val loss':>9}{'val acc':>9}{'test acc':>9}{'flagged':>9}{'precision':>10}"
          f"{'recall':>8}{'F1':>7}")
    for name, m in rows.items():
        print(f"{name:<24}{m['val_loss']:>9.4f}{m['val_accuracy']:>9.3f}{m['test_accuracy']:>9.3f}"
              f"{m['n_flagged']:>9d}{m['precision']:>10.3f}{m['recall']:>8.3f}{m['f1']:>7.3f}")
    ref = instance.reference
    print(f"flags: w_i < {hyper_cleaning.FLAG_THRESHOLD}; trivial detectors at flip rate r: random flags "
          f"F1 = r = {ref['f1_random']:.3f}, flag everything F1 = 2r/(1+r) = {ref['f1_flag_all']:.3f}")
    h = result.history
    phases = ["inner_solve", "polish", "kkt_checks", "adjoint_solve", "projection"]
    print(f"{result.n_steps} Adam steps in {seconds:.1f} s ({result.message}); seconds per phase: "
          + ", ".join(f"{p} {h.total_time(p):.1f}" for p in phases))


def plot(instance, result, rows: dict[str, dict], path: Path) -> Path:
    """Validation loss per step, learned weights split by clean / flipped, test accuracies.

    Saved as ``path`` and, smaller, as docs/img/hyper_cleaning.png.
    """
    data = instance.data
    w, flipped = result.x.numpy(), data["flipped"]
    fig, (ax_f, ax_w, ax_acc) = plt.subplots(1, 3, figsize=(14, 4.2))

    ax_f.semilogy(result.history.f, color="C0", label="cbo hyper-cleaning")
    for (name, m), color in zip(rows.items(), ["C3", None, "C2"]):
        if color is not None:
            ax_f.axhline(m["val_loss"], color=color, ls="--", lw=1, label=name)
    ax_f.set(title="validation loss F(w)", xlabel="Adam step", ylabel="F")
    ax_f.grid(True, which="both", alpha=0.3)
    ax_f.legend()

    bins = np.linspace(0, 1, 21)
    ax_w.hist([w[~flipped], w[flipped]], bins=bins, stacked=True, color=["C2", "C3"],
              label=[f"clean label ({int((~flipped).sum())})", f"flipped label ({int(flipped.sum())})"])
    ax_w.axvline(hyper_cleaning.FLAG_THRESHOLD, color="k", ls=":", lw=1, label="flag threshold")
    ax_w.set(title=f"learned weights (F1 = {rows['cbo hyper-cleaned']['f1']:.2f})", xlabel="w_i",
             ylabel="training points")
    ax_w.legend(loc="upper center")

    names = ["corrupted\n(w = 1)", "cbo\nhyper-cleaned", "oracle\n(clean points)"]
    accuracies = [m["test_accuracy"] for m in rows.values()]
    bars = ax_acc.bar(names, accuracies, color=["C3", "C0", "C2"])
    ax_acc.bar_label(bars, fmt="%.3f")
    ax_acc.set(title=f"test accuracy ({data['b_test'].size} points)", ylim=(0.5, 1.03), ylabel="accuracy")

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    DOCS_IMAGE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(DOCS_IMAGE, dpi=90)
    plt.close(fig)
    return path


def main() -> None:
    torch.set_num_threads(1)
    instance, result, seconds = run()
    rows = summary(instance, result)
    print_summary(instance, result, rows, seconds)
    caught = round(rows["cbo hyper-cleaned"]["recall"] * int(instance.data["flipped"].sum()))
    quoted = {**table(rows, dict(val_loss=".4f", test_accuracy=".3f", n_flagged="d")),
              **table({name: rows[name] for name in ("cbo hyper-cleaned", "oracle (w = 1[clean])")},
                      dict(precision=".3f", recall=".3f", f1=".3f")),
              "caught": str(caught), "clean_flagged": str(rows["cbo hyper-cleaned"]["n_flagged"] - caught)}
    print(f"figures quoted by the documentation: {save_figures(__file__, quoted)}")
    history_path = OUTPUT / "hyper_cleaning_history.png"
    plt.close(cbo.plot_history(result.history, history_path, title="hyper-cleaning: cbo.minimize"))
    print(f"plots saved to {plot(instance, result, rows, OUTPUT / 'hyper_cleaning.png')}, {history_path} "
          f"and {DOCS_IMAGE}")


if __name__ == "__main__":
    main()
