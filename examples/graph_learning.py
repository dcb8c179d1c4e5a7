r"""Graph structure learning (LDS-GNN in convex form): edge weights learned from validation labels.

A planted partition of 90 nodes in 3 communities; the candidate graph keeps
each pair of nodes with probability 0.3 inside a community and 0.15 across,
so about half of its ~800 edges are wrong. Node features carry the class
weakly (two informative dimensions among ten). Each candidate edge gets a
weight e_ij in [0, 1]; the inner problem smooths class scores Y (rows on the
simplex) over the weighted graph, tied to a linear model of the features,

    (Y*, W*, b*)(e) = argmin  sum_{i in train} ||Y_i - o_i||^2 + alpha ||Y - X W - 1 b^T||^2 + rho ||W||^2
                              + gamma sum_{(i,j)} e_ij ||Y_i - Y_j||^2     s.t.  Y >= 0,  Y 1 = 1,

and the outer problem minimizes the validation Brier score,

    min_e  F(e) = 1/|V| sum_{i in V} ||Y*_i(e) - o_i||^2   s.t.  0 <= e <= 1,  sum(e) = 0.5 m.

cbo.minimize runs projected gradient descent on e from e = 0.5 (the
projection onto the box with the budget is solved by cvxpy). The script prints
the validation loss, the test accuracy and the recovery of the planted edges
(ranking AUC, precision at k) for: no graph, the initial candidate graph, the
learned graph, and the planted graph (within-community candidates only); and
saves examples/output/graph_learning.png (graphs drawn with edge darkness = weight,
adjacency matrices, weight histograms, AUC per step),
examples/output/graph_learning_history.png (cbo.plot_history) and a copy of the
main plot in docs/img/graph_learning.png.
"""
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402

import cbo  # noqa: E402
from problems.figures import save_figures, table  # noqa: E402
from problems import graph_learning as gl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "examples" / "output"
DOCS_IMAGE = ROOT / "docs" / "img" / "graph_learning.png"
COMMUNITY_COLOURS = np.array(["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"])
ROLES = [("train", "s", 70), ("val", "^", 55), ("test", "o", 25)]  # node split, marker, size
COLUMNS = [("val_loss", "val loss"), ("test_accuracy", "test acc"), ("auc", "edge AUC"),
           ("precision_at_k", "prec@k"), ("mean_within", "mean e within"), ("mean_between", "mean e between")]


def run(size: str = "large", seed: int = 0):
    """Build the instance and run cbo.minimize with its recommended settings; also return the wall time."""
    instance = gl.build(size, seed)
    graph = instance.data["graph"]
    print(f"{graph.n_nodes} nodes in {graph.n_classes} communities, {graph.n_edges} candidate edges "
          f"({graph.within.mean():.0%} within communities); {len(graph.train)} training, {len(graph.val)} "
          f"validation, {len(graph.test)} test nodes; settings {instance.settings}")
    start = time.perf_counter()
    result = instance.minimize(progress=True)
    return instance, result, time.perf_counter() - start


def print_table(rows: dict[str, dict]) -> None:
    header = f"{'graph':<28}" + "".join(f"{title:>16}" for _, title in COLUMNS)
    print("\n" + header + "\n" + "-" * len(header))
    for name, values in rows.items():
        print(f"{name:<28}" + "".join(f"{values[key]:>16.3f}" for key, _ in COLUMNS))


def spring_layout(pairs: np.ndarray, weights: np.ndarray, n: int, steps: int = 300, seed: int = 0) -> np.ndarray:
    """Fruchterman-Reingold positions: edges pull with force w d^2 / k, all node pairs push with k^2 / d,
    k = 1 / sqrt(n); the displacement per step is capped by a temperature that cools linearly."""
    rng = np.random.default_rng(seed)
    pos = rng.random((n, 2))
    k = 1.0 / np.sqrt(n)
    for step in range(steps):
        delta = pos[:, None, :] - pos[None, :, :]
        distance = np.maximum(np.linalg.norm(delta, axis=-1), 1e-3)
        force = (delta * (k ** 2 / distance ** 2)[..., None]).sum(axis=1)  # repulsion
        edge_delta = pos[pairs[:, 0]] - pos[pairs[:, 1]]
        pull = edge_delta * (weights * np.linalg.norm(edge_delta, axis=1) / k)[:, None]
        np.add.at(force, pairs[:, 0], -pull)
        np.add.at(force, pairs[:, 1], pull)
        length = np.maximum(np.linalg.norm(force, axis=1, keepdims=True), 1e-12)
        temperature = 0.1 * (1 - step / steps) + 1e-3
        pos += force / length * np.minimum(length, temperature)
    return pos


def draw_graph(ax, graph: gl.PlantedGraph, weights: np.ndarray, pos: np.ndarray, title: str) -> None:
    """Edges in grey with opacity = weight; nodes coloured by community, marker by split."""
    order = np.argsort(weights)  # heavy edges on top
    segments = pos[graph.pairs[order]]
    colours = np.zeros((len(order), 4))
    colours[:, 3] = 0.85 * weights[order]
    ax.add_collection(LineCollection(segments, colors=colours, linewidths=0.8))
    for role, marker, size in ROLES:
        nodes = getattr(graph, role)
        ax.scatter(*pos[nodes].T, c=COMMUNITY_COLOURS[graph.labels[nodes]], marker=marker, s=size,
                   edgecolors="k", linewidths=0.5, zorder=3, label=f"{role} nodes")
    ax.set(title=title, xticks=[], yticks=[], aspect="equal")


def draw_adjacency(ax, graph: gl.PlantedGraph, weights: np.ndarray, title: str) -> None:
    """The weighted adjacency matrix, nodes sorted by community (blocks = communities)."""
    order = np.argsort(graph.labels, kind="stable")
    rank = np.empty(graph.n_nodes, dtype=int)
    rank[order] = np.arange(graph.n_nodes)
    A = np.zeros((graph.n_nodes, graph.n_nodes))
    i, j = rank[graph.pairs[:, 0]], rank[graph.pairs[:, 1]]
    A[i, j] = A[j, i] = weights
    image = ax.imshow(A, cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    for boundary in np.cumsum(np.bincount(graph.labels))[:-1]:
        ax.axhline(boundary - 0.5, color="tab:red", lw=0.8)
        ax.axvline(boundary - 0.5, color="tab:red", lw=0.8)
    ax.set(title=title, xlabel="node (sorted by community)", ylabel="node")
    return image


def plot(instance, result, rows: dict[str, dict], path: Path) -> Path:
    graph = instance.data["graph"]
    learned = result.x.numpy()
    initial = instance.x0.numpy()
    pos = spring_layout(graph.pairs, learned, graph.n_nodes)
    fig, axes = plt.subplots(2, 3, figsize=(17, 10.5))
    draw_graph(axes[0, 0], graph, initial, pos, "initial candidate graph (e = 0.5)")
    draw_graph(axes[0, 1], graph, learned, pos,
               f"learned graph (edge AUC {rows['learned (cbo)']['auc']:.2f})")
    axes[0, 1].legend(loc="lower right", fontsize="small")
    for ax in axes[0, :2]:
        ax.set_xlabel("colour: community; layout: spring layout of the learned graph")

    bins = np.linspace(0, 1, 21)
    ax = axes[0, 2]
    ax.hist([learned[graph.within], learned[~graph.within]], bins=bins, color=["tab:green", "tab:red"],
            label=[f"within communities ({graph.within.sum()})", f"between communities ({(~graph.within).sum()})"])
    ax.set(xlabel="learned weight e_ij", ylabel="edges", title="learned weights (all start at 0.5)")
    ax.legend()

    draw_adjacency(axes[1, 0], graph, initial, "adjacency before (candidates at 0.5)")
    image = draw_adjacency(axes[1, 1], graph, learned, "adjacency after")
    fig.colorbar(image, ax=axes[1, 1], fraction=0.046, label="e_ij")

    ax = axes[1, 2]
    auc = [gl.edge_auc(x[0].numpy(), graph.within) for x in result.history.x]
    ax.plot(auc, color="tab:green", label="edge AUC (within vs between)")
    ax.plot(np.asarray(result.history.f) / result.history.f[0], color="tab:blue",
            label="validation loss F / F(e = 0.5)")
    ax.axhline(rows["planted graph"]["val_loss"] / result.history.f[0], color="tab:blue", ls="--",
               label="planted graph's F / F(e = 0.5)")
    ax.axhline(0.5, color="tab:gray", ls=":", label="chance AUC")
    ax.set(xlabel="outer step", ylim=(0, 1.02), title="recovery and objective per step")
    ax.legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    OUTPUT.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    fig.savefig(DOCS_IMAGE, dpi=70)
    plt.close(fig)
    return path


def main() -> None:
    torch.set_num_threads(1)
    instance, result, seconds = run()
    rows = {
        "no graph (e = 0)": instance.reference["no_graph"],
        "initial graph (e = 0.5)": instance.reference["initial"],
        "learned (cbo)": instance.evaluate(result.x),
        "planted graph": instance.reference["planted"],
    }
    print(f"\n{result.message}; {result.n_steps} steps in {seconds:.1f} s "
          f"(inner solves {result.history.total_time('inner_solve'):.1f} s, adjoint solves "
          f"{result.history.total_time('adjoint_solve'):.1f} s, projections {result.history.total_time('projection'):.1f} s)")
    print_table(rows)
    quoted = table(rows, {key: ".3f" for key, _ in COLUMNS})
    print(f"figures quoted by the documentation: {save_figures(__file__, quoted)}")
    path = plot(instance, result, rows, OUTPUT / "graph_learning.png")
    cbo.plot_history(result.history, OUTPUT / "graph_learning_history.png",
                     title="graph structure learning: outer loop")
    print(f"\nSaved {path}, {OUTPUT / 'graph_learning_history.png'} and {DOCS_IMAGE}")


if __name__ == "__main__":
    main()
