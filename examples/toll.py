"""Toll setting: a leader prices the links of a road network, the traffic answers with its equilibrium.

Followers (cvxpy inner problem): the user equilibrium under tolls x,

    f*(x) = argmin_f sum_e a_e f_e + b_e/2 f_e^2 + x_e f_e   s.t.  N f = s,  0 <= f <= cap,

Leader: tolls 0 <= x <= x_max (outer constraints) that minimize the total
travel time sum_e (a_e + b_e f_e) f_e on a 5 x 5 grid with Braess-like
diagonal shortcuts (56 links, problems.toll.grid_network), tolling

* every link (first best): the best reachable is the system optimum, which
  Pigouvian (marginal-cost) tolls x_e = b_e f_e^SO attain;
* only the 16 shortcuts (second best): Pigouvian tolls on the shortcuts are
  a heuristic, and learned tolls can beat them.

The script first checks the small instance (three parallel links, revenue
objective) against its closed-form optimum, then runs cbo.minimize from no
tolls and from the Pigouvian tolls, prints a summary, and saves

* examples/output/toll.png: the network's flows and tolls without tolls,
  with Pigouvian tolls and with learned tolls, and the total travel time
  against the iterations;
* examples/output/toll_history.png: cbo.plot_history of the second-best run;
* docs/img/toll.png: a small copy of the first.
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
from matplotlib.collections import LineCollection  # noqa: E402

import cbo  # noqa: E402
from problems.figures import save_figures, table  # noqa: E402
from problems import toll  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "examples" / "output"


def minimize(instance, x0: np.ndarray):
    """cbo.minimize on the instance from x0, with its recommended settings; also returns the seconds taken."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        # Links without flow through nodes without flow make the active constraints dependent
        # (LICQ fails); cbo warns and solves the adjoint system in the least-squares sense.
        warnings.simplefilter("ignore", cbo.DegenerateKKTWarning)
        result = instance.minimize(torch.as_tensor(x0), progress=True)
    return result, time.perf_counter() - start


def check_small() -> dict[str, str]:
    """The small instance: closed form, global grid search and cbo.minimize agree. Returns the figures that
    the documentation quotes."""
    instance = toll.build("small")
    net, ref = instance.data["network"], instance.reference
    grid = toll.parallel_grid_optimum(net)
    result, seconds = minimize(instance, instance.x0.numpy())
    print("\nSmall network (3 parallel links, revenue): tolls on links 1 and 2, link 3 free; link 1 saturated")
    print(f"{'':<22} {'x_1':>8} {'x_2':>8} {'revenue':>10}")
    answers = [("closed form", ref["x_star"], ref["revenue"]), ("grid search", grid["x_star"], grid["revenue"]),
               ("cbo.minimize (sgd)", result.x.numpy(), -result.fun)]
    for name, x, rev in answers:
        print(f"{name:<22} {x[0]:>8.5f} {x[1]:>8.5f} {rev:>10.6f}")
    distance = f"{np.abs(result.x.numpy() - ref['x_star']).max():.1e}".replace("e-0", "e-")
    print(f"cbo.minimize: {result.n_steps} steps, {seconds:.1f} s, ||x - x*||_inf = {distance}")
    return {"small.revenue": f"{ref['revenue']:.6f}", "small.steps": str(result.n_steps), "small.distance": distance}


def draw_network(ax, net: toll.Network, flows: np.ndarray, link_tolls: np.ndarray, title: str, vmax: float,
                 fmax: float):
    """Links as segments: width proportional to the flow (fmax: widest), colour the toll (grey: no toll)."""
    segments = net.positions[net.links]
    width = 0.4 + 7.0 * flows / fmax
    colours = plt.cm.plasma(np.clip(link_tolls / vmax, 0, 1) * 0.9)
    colours[link_tolls <= 1e-6] = (0.6, 0.6, 0.6, 1.0)
    used = flows > 1e-6
    ax.add_collection(LineCollection(segments[~used], colors="lightgray", linewidths=0.8, linestyles=":"))
    ax.add_collection(LineCollection(segments[used], colors=colours[used], linewidths=width[used], capstyle="round"))
    ax.scatter(*net.positions.T, s=12, color="black", zorder=3)
    origin, destination = np.argmax(net.supply), np.argmin(net.supply)
    for node, text in [(origin, "O"), (destination, "D")]:
        ax.annotate(text, net.positions[node], xytext=(-12, 6), textcoords="offset points", fontweight="bold")
    ax.set_title(title, fontsize="medium")
    ax.set_aspect("equal")
    ax.margins(0.08)
    ax.axis("off")


def plot(setting, runs, path: Path, dpi: int = 120) -> Path:
    """Three network drawings (no tolls, Pigou, learned) and the total travel time against the steps."""
    net, ref = setting["network"], setting["reference"]
    S = net.toll_matrix()
    learned = runs["learned from Pigou"]
    panels = [("no tolls", np.zeros(net.tolled.size), setting["flows_no_toll"]),
              ("Pigouvian tolls", setting["pigou"], setting["flows_pigou"]),
              ("learned tolls (cbo.minimize)", learned["x"], learned["flows"])]
    vmax = max(float(np.max(S @ x)) for _, x, _ in panels)
    fmax = max(float(np.max(flows)) for _, _, flows in panels)
    fig = plt.figure(figsize=(14, 4.4))
    grid = fig.add_gridspec(1, 4, width_ratios=[1, 1, 1, 1.35], wspace=0.3)
    for k, (name, x, flows) in enumerate(panels):
        ax = fig.add_subplot(grid[0, k])
        draw_network(ax, net, flows, S @ x, f"{name}\ntotal time {toll.total_cost(net, flows):.2f}", vmax, fmax)
    mappable = plt.cm.ScalarMappable(cmap="plasma", norm=plt.Normalize(0, vmax / 0.9))
    fig.colorbar(mappable, ax=fig.axes, location="bottom", shrink=0.35, pad=0.02, label="toll (grey: none)")
    ax = fig.add_subplot(grid[0, 3])
    optimum = ref["system_optimum_cost"]
    for name, run in runs.items():
        ax.semilogy(np.array(run["result"].history.f) - optimum, label=name)
    ax.axhline(ref["no_toll_cost"] - optimum, color="gray", ls=":", label="no tolls")
    ax.axhline(setting["pigou_cost"] - optimum, color="C3", ls="--", label="Pigouvian tolls")
    ax.set(xlabel="outer step", ylabel="total time - system optimum", title="Excess travel time")
    ax.legend(fontsize="small", loc="lower right", bbox_to_anchor=(1.0, 0.08))
    ax.grid(alpha=0.3)
    fig.suptitle("Tolls on the 16 diagonal shortcuts of a 5 x 5 grid (line width: flow, colour: toll)")
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def study(tolled: str, starts: dict[str, str]) -> tuple[dict, dict]:
    """Build the grid instance with ``tolled`` links, the baselines, and the learned tolls from each start."""
    instance = toll.build("large", tolled=tolled)
    net = instance.data["network"]
    pigou = toll.pigouvian_tolls(net)
    flows_pigou = instance.evaluate(pigou)["flows"]
    setting = dict(instance.data, reference=instance.reference, pigou=pigou, flows_pigou=flows_pigou,
                   pigou_cost=toll.total_cost(net, flows_pigou))
    runs = {}
    for name, start in starts.items():
        print(f"\n{'every link' if tolled == 'all' else 'only the shortcuts'} tollable, {name}")
        x0 = np.zeros(net.tolled.size) if start == "zero" else pigou
        result, seconds = minimize(instance, x0)
        x = result.x.numpy()
        runs[name] = dict(result=result, seconds=seconds, x=x, **instance.evaluate(x))
    return setting, runs


def summary(rows: list[tuple]) -> None:
    header = (f"{'tollable':<10} {'tolls':<20} {'total time':>11} {'UE-SO gap closed':>17} {'revenue':>9} "
              f"{'steps':>6} {'time (s)':>9}")
    print("\n" + header + "\n" + "-" * len(header))
    for tolled, name, cost, closed, rev, steps, seconds in rows:
        rev = "-" if rev is None else f"{rev:.2f}"
        print(f"{tolled:<10} {name:<20} {cost:>11.3f} {closed:>17.1%} {rev:>9} {steps:>6} {seconds:>9}")
    print("UE-SO gap closed: (no-toll time - time) / (no-toll time - system-optimum time); "
          "the system optimum is a flow, not a toll vector")


def gap_closed(reference: dict, cost: float) -> float:
    """(no-toll time - cost) / (no-toll time - system-optimum time)."""
    return (reference["no_toll_cost"] - cost) / (reference["no_toll_cost"] - reference["system_optimum_cost"])


def main() -> None:
    torch.set_num_threads(1)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    quoted = check_small()
    rows = []
    studies = {"all": {"learned from 0": "zero"},
               "shortcuts": {"learned from 0": "zero", "learned from Pigou": "pigou"}}
    for tolled, starts in studies.items():
        setting, runs = study(tolled, starts)
        net, ref = setting["network"], setting["reference"]
        rows.append((tolled, "none", ref["no_toll_cost"], 0.0, 0.0, "", ""))
        rows.append((tolled, "Pigouvian", setting["pigou_cost"], gap_closed(ref, setting["pigou_cost"]),
                     toll.revenue(net, setting["pigou"], setting["flows_pigou"]), "", ""))
        for name, run in runs.items():
            rows.append((tolled, name, run["total_cost"], gap_closed(ref, run["total_cost"]), run["revenue"],
                         run["result"].n_steps, f"{run['seconds']:.1f}"))
        rows.append((tolled, "system optimum", ref["system_optimum_cost"], 1.0, None, "", ""))
    summary(rows)
    quoted.update(table({f"{tolled} {name}": dict(cost=cost, closed=closed) for tolled, name, cost, closed, *_ in rows},
                        dict(cost=".3f", closed=".1%")))
    quoted.update(table({f"{tolled} {name}": dict(revenue=rev) for tolled, name, _, _, rev, *_ in rows if rev is not None},
                        dict(revenue=".2f")))
    print(f"figures quoted by the documentation: {save_figures(__file__, quoted, ('small.distance',))}")
    # the plots show the second-best study (only the shortcuts tollable), the last one run
    print(f"\nplots: {plot(setting, runs, OUTPUT / 'toll.png')}")
    history_path = OUTPUT / "toll_history.png"
    plt.close(cbo.plot_history(runs["learned from Pigou"]["result"].history, path=str(history_path),
                               title="toll setting, shortcuts tollable, learned from Pigouvian tolls"))
    print(f"       {history_path}")
    plot(setting, runs, ROOT / "docs" / "img" / "toll.png", dpi=90)


if __name__ == "__main__":
    main()
