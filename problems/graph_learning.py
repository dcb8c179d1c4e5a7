r"""Graph structure learning in the spirit of LDS-GNN, with a convex, constrained inner problem.

LDS-GNN (Franceschi et al., 2019) learns the edges of the graph a GCN runs on
by minimizing the validation loss of the GCN trained on that graph. Here the
GCN is replaced by a convex graph-regularized model, so that the inner
problem is solved exactly by cvxpy and differentiated through its KKT
conditions. The outer variables are weights e in [0, 1] on a set of
candidate edges (i, j):

    min_e  F(e) = 1/|V| sum_{i in V} ||Y*_i(e) - o_i||^2                    (validation Brier score)
    s.t.   0 <= e <= 1,  sum(e) = e_total                                   (outer constraints)

    (Y*, W*, b*)(e) = argmin_{Y, W, b}  sum_{i in T} ||Y_i - o_i||^2          (fit the training labels)
                                       + alpha ||Y - X W - 1 b^T||^2         (tie the scores to a linear model)
                                       + rho ||W||^2
                                       + gamma sum_{(i,j)} e_ij ||Y_i - Y_j||^2   (graph smoothing)
                      s.t.  Y >= 0,  Y 1 = 1                                (class scores on the simplex)

with o_i the one-hot label of node i, T and V the training and validation
nodes, X the node features, and Y in R^{n x C} the class scores of all nodes
(transductive, like a GCN's output). The graph term is
sum_k e_k ||D_k Y||^2 with D the edge-node incidence matrix, written
``e @ cp.sum(cp.square(D @ Y), axis=1)``: convex for e >= 0 and DPP, so cvxpy
compiles it once. The linear model X W + b is shared by all nodes (as a GCN's
weights are), so every edge, not only those next to a validation node, moves
the validation predictions. The hypergradient of an edge k = (i, j) is

    dF/de_k = -(d_e R)^T v = -2 gamma (Y*_i - Y*_j)^T (v_i - v_j),

with v_i the rows of the Y-block of the adjoint K v = (d_y F, 0) (K the KKT
matrix of the active set: the simplex equalities and the scores at Y_ic = 0):
an edge loses weight when pulling its two ends together moves the validation
scores the wrong way.

The budget sum(e) = e_total (the initial total weight) makes the outer loop
move weight from edge to edge instead of only deleting edges: without it,
the loop deletes about two thirds of the edges and drives F on the few
validation nodes well below the planted graph's value (overfitting them),
and the ranking AUC of the learned weights on the large instance drops from
0.89-0.90 to 0.77-0.81 (seeds 0-2, 100 steps).

Data: a planted partition. C communities of equal size; the candidate edges
are a random superset of the planted structure, each pair of nodes kept with
probability p_in inside a community and p_out across (so about half of the
candidates are wrong); node features carry the class in two dimensions
(class means on a circle, unit noise) and are drowned in nuisance dimensions
of larger variance. The planted graph keeps the within-community candidates
(e = 1) and drops the others (e = 0). Starting from e = 0.5 everywhere, the
learned weights should rank within-community edges above between-community
ones (ranking AUC) and move the test accuracy toward the planted graph's.
"""
from __future__ import annotations

from dataclasses import dataclass

import cvxpy as cp
import numpy as np
import scipy.sparse as sp
import torch

import cbo

from . import Instance

__all__ = ["SIZES", "PlantedGraph", "planted_partition", "incidence", "smoothing_problem", "edge_auc",
           "precision_at_k", "graph_metrics", "build"]

SIZES = {
    "small": dict(n_per_class=15, steps=20),
    "large": dict(n_per_class=30, steps=100),
}
N_CLASSES = 3
P_IN, P_OUT = 0.3, 0.15  # candidate-edge probabilities within and across communities
N_FEATURES = 10
SEPARATION = 2.0  # radius of the circle of class means in the two informative feature dimensions
NUISANCE = 3.0  # standard deviation of the other feature dimensions
TRAIN_FRACTION, VAL_FRACTION = 0.1, 0.3  # labelled nodes per class; the rest are test nodes
ALPHA, RIDGE = 1.0, 1.0  # weights of the linear-model tie and of its ridge penalty
SMOOTHING = 1.0  # gamma times the mean candidate degree
INITIAL_WEIGHT = 0.5


@dataclass(frozen=True)
class PlantedGraph:
    """A planted-partition graph with node features and a train/validation/test split.

    ``pairs`` (m x 2, i < j) are the candidate edges, ``within`` marks those
    inside a community (the planted structure); ``train``, ``val``, ``test``
    are node indices, stratified by class.
    """

    labels: np.ndarray
    features: np.ndarray
    pairs: np.ndarray
    within: np.ndarray
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    n_classes: int

    @property
    def n_nodes(self) -> int:
        return len(self.labels)

    @property
    def n_edges(self) -> int:
        return len(self.pairs)

    @property
    def onehot(self) -> np.ndarray:
        return np.eye(self.n_classes)[self.labels]

    @property
    def planted_weights(self) -> np.ndarray:
        """e = 1 on the within-community candidates, 0 on the others."""
        return self.within.astype(float)


def planted_partition(n_per_class: int, n_classes: int = N_CLASSES, p_in: float = P_IN, p_out: float = P_OUT,
                      n_features: int = N_FEATURES, separation: float = SEPARATION, nuisance: float = NUISANCE,
                      seed: int = 0) -> PlantedGraph:
    """Sample a :class:`PlantedGraph`: ``n_classes`` communities of ``n_per_class`` nodes.

    Each node pair is a candidate edge with probability ``p_in`` (same
    community) or ``p_out`` (different ones). Features: the class mean
    ``separation * (cos, sin)(2 pi c / C)`` plus unit noise in the first two
    dimensions, ``nuisance``-scaled noise in the other ``n_features - 2``;
    centred. Per class, ``TRAIN_FRACTION`` of the nodes are training nodes,
    ``VAL_FRACTION`` validation nodes, the rest test nodes.
    """
    if n_per_class < 5 or n_classes < 2:
        raise ValueError(f"Need n_per_class >= 5 and n_classes >= 2 (got {n_per_class}, {n_classes}): "
                         "every class needs training, validation and test nodes.")
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    n = len(labels)
    angles = 2 * np.pi * np.arange(n_classes) / n_classes
    means = np.zeros((n_classes, n_features))
    means[:, 0], means[:, 1] = separation * np.cos(angles), separation * np.sin(angles)
    scales = np.r_[np.ones(2), np.full(n_features - 2, nuisance)]
    features = means[labels] + rng.standard_normal((n, n_features)) * scales
    features -= features.mean(axis=0)

    i, j = np.triu_indices(n, k=1)
    same = labels[i] == labels[j]
    keep = rng.random(len(i)) < np.where(same, p_in, p_out)
    pairs, within = np.c_[i[keep], j[keep]], same[keep]

    n_train = max(1, round(TRAIN_FRACTION * n_per_class))
    n_val = max(1, round(VAL_FRACTION * n_per_class))
    splits = [rng.permutation(np.flatnonzero(labels == c)) for c in range(n_classes)]
    train = np.concatenate([s[:n_train] for s in splits])
    val = np.concatenate([s[n_train:n_train + n_val] for s in splits])
    test = np.concatenate([s[n_train + n_val:] for s in splits])
    return PlantedGraph(labels, features, pairs, within, train, val, test, n_classes)


def incidence(pairs: np.ndarray, n_nodes: int) -> sp.csr_matrix:
    """The m x n edge-node incidence matrix D: row k is e_i - e_j for edge k = (i, j), so (D Y)_k = Y_i - Y_j."""
    m = len(pairs)
    rows = np.r_[np.arange(m), np.arange(m)]
    values = np.r_[np.ones(m), -np.ones(m)]
    return sp.csr_matrix((values, (rows, np.r_[pairs[:, 0], pairs[:, 1]])), shape=(m, n_nodes))


def smoothing_problem(graph: PlantedGraph, alpha: float = ALPHA, ridge: float = RIDGE, smoothing: float = SMOOTHING
                      ) -> tuple[cp.Problem, cp.Parameter, tuple[cp.Variable, cp.Variable, cp.Variable]]:
    r"""The inner problem of the module docstring, for the training labels of ``graph``.

    gamma = ``smoothing`` / (mean candidate degree 2m/n), so that the graph
    term has the same weight whatever the density of the candidates.

    Returns ``(problem, e, (Y, W, b))``: the cvxpy problem, the edge-weight
    parameter (nonneg, which makes the graph term DCP) and the variables.
    """
    n, C, d = graph.n_nodes, graph.n_classes, graph.features.shape[1]
    gamma = smoothing * n / (2 * graph.n_edges)
    e = cp.Parameter(graph.n_edges, nonneg=True, name="e")
    Y, W, b = cp.Variable((n, C), name="Y"), cp.Variable((d, C), name="W"), cp.Variable(C, name="b")
    model = graph.features @ W + np.ones((n, 1)) @ cp.reshape(b, (1, C), order="C")
    train = graph.train
    objective = (cp.sum_squares(Y[train] - graph.onehot[train])
                 + alpha * cp.sum_squares(Y - model)
                 + ridge * cp.sum_squares(W)
                 + gamma * (e @ cp.sum(cp.square(incidence(graph.pairs, n) @ Y), axis=1)))
    problem = cp.Problem(cp.Minimize(objective), [Y >= 0, cp.sum(Y, axis=1) == 1])
    return problem, e, (Y, W, b)


def edge_auc(weights: np.ndarray, within: np.ndarray) -> float:
    """P(w_within > w_between) + 1/2 P(tie) over all within/between pairs (Mann-Whitney U / (n_w n_b)).

    1 when every within-community edge outweighs every between-community edge,
    1/2 for a constant (or random) ranking.
    """
    weights, within = np.asarray(weights, dtype=float), np.asarray(within, dtype=bool)
    if within.all() or not within.any():
        raise ValueError("The AUC needs both within- and between-community edges.")
    w_in, w_out = np.sort(weights[within]), np.sort(weights[~within])
    below = np.searchsorted(w_out, w_in, side="left")
    not_above = np.searchsorted(w_out, w_in, side="right")
    return float((below + 0.5 * (not_above - below)).sum() / (len(w_in) * len(w_out)))


def precision_at_k(weights: np.ndarray, within: np.ndarray) -> float:
    """Share of within-community edges among the k heaviest edges, k = the number of within-community edges.

    Edges tied with the k-th heaviest (the learned weights sit at the bounds 0
    and 1 in bulk) count with the expected share of a random tie-break: if r
    of the k places go to the t tied edges, of which s are within-community
    ones, they contribute r s / t. Constant weights give the base rate
    mean(within).
    """
    weights, within = np.asarray(weights, dtype=float), np.asarray(within, dtype=bool)
    k = int(within.sum())
    threshold = np.sort(weights)[::-1][k - 1]
    above, tied = weights > threshold, weights == threshold
    places_left = k - int(above.sum())
    return float((within[above].sum() + places_left * within[tied].mean()) / k)


def graph_metrics(Y: np.ndarray, weights: np.ndarray, graph: PlantedGraph) -> dict[str, float]:
    """Validation Brier score, test accuracy of argmax Y, and the recovery of the planted edges by ``weights``."""
    onehot = graph.onehot
    predicted = Y.argmax(axis=1)
    return {
        "val_loss": float(((Y[graph.val] - onehot[graph.val]) ** 2).sum(axis=1).mean()),
        "test_accuracy": float((predicted[graph.test] == graph.labels[graph.test]).mean()),
        "auc": edge_auc(weights, graph.within),
        "precision_at_k": precision_at_k(weights, graph.within),
        "mean_within": float(weights[graph.within].mean()),
        "mean_between": float(weights[~graph.within].mean()),
    }


def build(size: str = "small", seed: int = 0) -> Instance:
    """Edge weights of a planted-partition graph learned from validation labels.

    ``reference`` holds :func:`graph_metrics` of three fixed graphs:
    ``"no_graph"`` (e = 0), ``"initial"`` (e = 0.5, the starting point) and
    ``"planted"`` (e = 1 within communities, 0 across). ``evaluate(e)``
    re-solves the inner problem with cvxpy and returns the same metrics.
    ``data`` holds the :class:`PlantedGraph` (``"graph"``) and ``solve(e) ->
    Y*`` (cvxpy). ``settings``: the default optimizer (SPG on this set) from
    e = 0.5 under the outer constraints 0 <= e <= 1, sum(e) = 0.5 m.
    """
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}: use one of {sorted(SIZES)}.")
    graph = planted_partition(SIZES[size]["n_per_class"], seed=seed)
    inner, e, (Y, W, b) = smoothing_problem(graph)
    val = torch.as_tensor(graph.val)
    target = torch.as_tensor(graph.onehot[graph.val])

    def validation_loss(e_tensor, Y_tensor, W_tensor, b_tensor) -> torch.Tensor:
        return ((Y_tensor[val] - target) ** 2).sum(dim=1).mean()

    problem = cbo.BilevelProblem(inner, parameters=[e], variables=[Y, W, b], outer=validation_loss)
    check, e_check, (Y_check, _, _) = smoothing_problem(graph)  # a copy, so that evaluating never touches e

    def solve(weights) -> np.ndarray:
        """Y*(e) from a separate copy of the inner problem (cvxpy, Clarabel)."""
        e_check.value = np.clip(np.asarray(torch.as_tensor(weights, dtype=torch.float64), dtype=float), 0.0, None)
        check.solve(solver="CLARABEL")
        if check.status != cp.OPTIMAL:
            raise cbo.InnerSolveError(f"The graph-smoothing problem ended with status {check.status!r}.")
        return Y_check.value

    def evaluate(weights) -> dict[str, float]:
        weights = np.asarray(torch.as_tensor(weights, dtype=torch.float64), dtype=float)
        return graph_metrics(solve(weights), weights, graph)

    m = graph.n_edges
    fixed = {"no_graph": np.zeros(m), "initial": np.full(m, INITIAL_WEIGHT), "planted": graph.planted_weights}
    reference = {name: evaluate(weights) for name, weights in fixed.items()}
    return Instance(
        problem=problem,
        x0=torch.full((m,), INITIAL_WEIGHT, dtype=torch.float64),
        outer_constraints=[e >= 0, e <= 1, cp.sum(e) == INITIAL_WEIGHT * m],
        settings=dict(method="cg", steps=SIZES[size]["steps"]),
        reference=reference,
        evaluate=evaluate,
        data={"graph": graph, "solve": solve},
    )
