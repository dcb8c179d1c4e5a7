"""problems.graph_learning: planted-partition data, the inner solution, the hypergradient, and the driver.

References independent of cbo: scikit-learn's ``roc_auc_score`` for the
ranking AUC of the edge weights; the inner problem's gradient, constraints and
validation loss written out in numpy, whose KKT conditions the cvxpy solution
must satisfy; the closed-form edge hypergradient with a dense numpy adjoint;
and central finite differences of F along a direction, with (Y*, W*, b*) from
cvxpy Newton-polished in numpy by tests/builders.py.
"""
from functools import cache

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
from sklearn.metrics import roc_auc_score  # noqa: E402

import cbo  # noqa: E402
from problems import graph_learning as gl  # noqa: E402

from builders import Case, central_jacobian, cvxpy_kkt_point, kkt_residual, polished_kkt_point  # noqa: E402


@cache
def _instance():
    return gl.build("small", seed=0)


@cache
def _solved():
    instance = _instance()
    return instance.minimize(progress=False)


# ---------------------------------------------------------------- numpy reference of the inner problem

class _NumpyInner:
    r"""g(Y, W, b; e) = ||Y_T - O_T||^2 + alpha ||R||^2 + rho ||W||^2 + gamma sum_k e_k ||Y_i - Y_j||^2,
    R = Y - X W - 1 b^T, with Y >= 0 (as -Y <= 0) and Y 1 = 1; y stacks the variables as cvxpy lists them."""

    def __init__(self, instance):
        graph, problem = instance.data["graph"], instance.problem
        self.graph, self.problem = graph, problem
        self.X, self.onehot = graph.features, graph.onehot
        self.D = gl.incidence(graph.pairs, graph.n_nodes).toarray()
        self.gamma = gl.SMOOTHING * graph.n_nodes / (2 * graph.n_edges)
        self.mask = np.zeros((graph.n_nodes, 1))
        self.mask[graph.train] = 1.0
        self.sizes = [v.size for v in problem.all_variables]
        self.names = [v.name() for v in problem.all_variables]
        self.shapes = [v.shape for v in problem.all_variables]

    def split(self, y):
        parts = np.split(y, np.cumsum(self.sizes)[:-1])
        return {name: p.reshape(shape) for name, p, shape in zip(self.names, parts, self.shapes)}

    def stack(self, parts: dict) -> np.ndarray:
        return np.concatenate([np.ravel(parts[name]) for name in self.names])

    def grad(self, y, xs):
        v, e = self.split(y), xs[0]
        Y, W, b = v["Y"], v["W"], v["b"]
        R = Y - self.X @ W - b[None, :]
        laplacian = self.D.T @ (e[:, None] * self.D)
        return self.stack({
            "Y": 2 * self.mask * (Y - self.onehot) + 2 * gl.ALPHA * R + 2 * self.gamma * laplacian @ Y,
            "W": -2 * gl.ALPHA * self.X.T @ R + 2 * gl.RIDGE * W,
            "b": -2 * gl.ALPHA * R.sum(axis=0),
        })

    def _on_Y(self, matrix):
        """A constraint Jacobian acting on Y only, zero on W and b."""
        blocks = {name: np.zeros((matrix.shape[0], size)) for name, size in zip(self.names, self.sizes)}
        blocks["Y"] = matrix
        return np.hstack([blocks[name] for name in self.names])

    def case(self, e) -> Case:
        n, C = self.graph.n_nodes, self.graph.n_classes
        row_sums = np.kron(np.eye(n), np.ones((1, C)))  # Y is raveled row by row
        return Case(
            "graph_learning", self.problem, [np.asarray(e, dtype=float)], np.zeros(self.problem.n_y),
            grad_g=self.grad,
            ineq=lambda y, xs: -self.split(y)["Y"].ravel(),
            ineq_jac=lambda y, xs: self._on_Y(-np.eye(n * C)),
            eq=lambda y, xs: self.split(y)["Y"].sum(axis=1) - 1.0,
            eq_jac=lambda y, xs: self._on_Y(row_sums),
        )

    def validation_loss(self, y) -> float:
        Y, val = self.split(y)["Y"], self.graph.val
        return float(((Y[val] - self.onehot[val]) ** 2).sum(axis=1).mean())


# ---------------------------------------------------------------- data and metrics

def test_planted_partition_marks_within_edges_and_splits_every_class():
    graph = _instance().data["graph"]
    labels, pairs = graph.labels, graph.pairs
    assert np.all(pairs[:, 0] < pairs[:, 1]) and len(np.unique(pairs, axis=0)) == graph.n_edges
    np.testing.assert_array_equal(graph.within, labels[pairs[:, 0]] == labels[pairs[:, 1]])
    np.testing.assert_array_equal(np.sort(np.r_[graph.train, graph.val, graph.test]), np.arange(graph.n_nodes))
    n_per_class = gl.SIZES["small"]["n_per_class"]
    for nodes, fraction in [(graph.train, gl.TRAIN_FRACTION), (graph.val, gl.VAL_FRACTION)]:
        np.testing.assert_array_equal(np.bincount(labels[nodes]), round(fraction * n_per_class))
    # About half of the candidates are wrong (between communities): the start e = 0.5 carries no structure.
    assert 0.35 < graph.within.mean() < 0.65


def test_incidence_matrix_gives_edge_differences():
    graph = _instance().data["graph"]
    Y = np.random.default_rng(0).standard_normal((graph.n_nodes, 3))
    np.testing.assert_allclose(gl.incidence(graph.pairs, graph.n_nodes) @ Y,
                               Y[graph.pairs[:, 0]] - Y[graph.pairs[:, 1]])


def test_edge_auc_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(1)
    within = rng.random(200) < 0.4
    for weights in [rng.random(200), np.round(rng.random(200), 1), np.where(within, 1.0, 0.0), np.full(200, 0.5)]:
        assert gl.edge_auc(weights, within) == pytest.approx(roc_auc_score(within, weights), abs=1e-12)
    with pytest.raises(ValueError, match="both within- and between"):
        gl.edge_auc(np.ones(3), np.ones(3, dtype=bool))


def test_precision_at_k_counts_within_edges_among_the_heaviest():
    within = np.array([True, True, False, False, False])  # k = 2
    assert gl.precision_at_k(np.array([0.9, 0.1, 0.8, 0.2, 0.3]), within) == 0.5
    assert gl.precision_at_k(np.array([0.9, 0.85, 0.8, 0.2, 0.3]), within) == 1.0
    # Ties at the k-th weight: the mean over random tie-breaks (20000 of them, standard error ~0.002).
    rng = np.random.default_rng(2)
    within = rng.random(12) < 0.5
    weights = rng.integers(0, 3, 12).astype(float)
    k = within.sum()
    orders = [np.lexsort((rng.permutation(12), -weights)) for _ in range(20000)]
    expected = np.mean([within[order[:k]].mean() for order in orders])
    assert gl.precision_at_k(weights, within) == pytest.approx(expected, abs=0.01)
    assert gl.precision_at_k(np.full(12, 0.5), within) == pytest.approx(within.mean())


# ---------------------------------------------------------------- inner solution and reference

@pytest.mark.parametrize("graph_name", ["initial", "planted"])
def test_inner_solution_satisfies_the_numpy_kkt_conditions(graph_name):
    """cvxpy's (Y, W, b, mu, nu) at the initial and the planted weights make the numpy KKT residual vanish,
    and the reference's validation loss is the numpy one."""
    instance = _instance()
    graph, inner = instance.data["graph"], _NumpyInner(instance)
    e = np.full(graph.n_edges, gl.INITIAL_WEIGHT) if graph_name == "initial" else graph.planted_weights
    case = inner.case(e)
    y, mu, nu = cvxpy_kkt_point(case, [e])
    active = np.flatnonzero(mu > 1e-6 * max(1.0, mu.max()))
    residual = kkt_residual(case, np.concatenate([y, mu[active], nu]), [e], active)
    assert np.abs(residual).max() < 1e-6
    assert np.all(mu >= -1e-9) and np.all(y[: graph.n_nodes * graph.n_classes] >= -1e-9)
    assert instance.reference[graph_name]["val_loss"] == pytest.approx(inner.validation_loss(y), abs=1e-7)


def test_references_order_the_graphs():
    """The planted graph is the best of the fixed graphs on validation loss and test accuracy [seed 0: val loss
    0.37 planted, 0.61 initial, 0.52 no graph; test accuracy 0.96 planted, 0.52 initial, 0.59 no graph];
    constant weights rank at chance."""
    ref = _instance().reference
    assert ref["planted"]["val_loss"] < min(ref["initial"]["val_loss"], ref["no_graph"]["val_loss"])
    assert ref["planted"]["test_accuracy"] > max(ref["initial"]["test_accuracy"], ref["no_graph"]["test_accuracy"])
    assert ref["planted"]["auc"] == 1.0 and ref["planted"]["precision_at_k"] == 1.0
    base_rate = _instance().data["graph"].within.mean()
    for name in ("initial", "no_graph"):
        assert ref[name]["auc"] == 0.5 and ref[name]["precision_at_k"] == pytest.approx(base_rate)


# ---------------------------------------------------------------- hypergradient

@pytest.mark.parametrize("graph_name", ["initial", "planted"])
def test_hypergrad_matches_finite_differences(graph_name):
    """At e = 0.5 (only the simplex equalities active) and at the planted weights (also a score at Y_ic = 0:
    an active inequality), along a random direction on the edges with e > 0 (the parameter is nonneg): the cg
    and direct adjoints against central differences of the numpy-polished cvxpy solution."""
    instance = _instance()
    graph = instance.data["graph"]
    e = np.full(graph.n_edges, gl.INITIAL_WEIGHT) if graph_name == "initial" else graph.planted_weights
    grads = {}
    for method in ("cg", "direct"):
        grad, info = cbo.hypergrad(instance.problem, torch.as_tensor(e), method=method, return_info=True)
        grads[method] = grad.numpy()
    assert info.active_set.weakly_active.numel() == 0
    assert len(info.active_set.active) == (0 if graph_name == "initial" else 1)

    inner = _NumpyInner(instance)
    case = inner.case(e)
    direction = np.random.default_rng(3).standard_normal(e.size) * (e > 0)  # e +- h d stays >= 0

    def F(t):
        w, _ = polished_kkt_point(case, [e + t[0] * direction], steps=1)  # a QP: one Newton step is exact
        return np.array([inner.validation_loss(w[: instance.problem.n_y])])

    fd = central_jacobian(F, np.zeros(1), h=1e-4)[0, 0]
    for method, grad in grads.items():
        assert abs(grad @ direction - fd) < 1e-7 * max(1.0, abs(fd)), (method, grad @ direction, fd)


def test_hypergrad_is_the_edge_formula_with_a_dense_numpy_adjoint():
    """dF/de_k = -2 gamma (Y_i - Y_j)^T (v_i - v_j) for edge k = (i, j), v the Y-block of the adjoint
    K v = (d_y F, 0) with K assembled densely in numpy (central differences of the numpy KKT residual)."""
    instance = _instance()
    graph, inner = instance.data["graph"], _NumpyInner(instance)
    e = graph.planted_weights
    case = inner.case(e)
    w, active = polished_kkt_point(case, [e], steps=1)
    K = central_jacobian(lambda z: kkt_residual(case, z, [e], active), w)
    n_y = instance.problem.n_y
    Y = inner.split(w[:n_y])["Y"]
    dF_dY = np.zeros_like(Y)
    dF_dY[graph.val] = 2 * (Y[graph.val] - graph.onehot[graph.val]) / len(graph.val)
    zeros = {name: np.zeros(shape) for name, shape in zip(inner.names, inner.shapes)}
    v = np.linalg.solve(K, np.r_[inner.stack({**zeros, "Y": dF_dY}), np.zeros(w.size - n_y)])
    v_Y = inner.split(v[:n_y])["Y"]
    formula = -2 * inner.gamma * ((inner.D @ Y) * (inner.D @ v_Y)).sum(axis=1)
    grad = cbo.hypergrad(instance.problem, torch.as_tensor(e), method="cg").numpy()
    assert np.abs(grad - formula).max() < 1e-8 * np.abs(formula).max()


# ---------------------------------------------------------------- the driver

def test_driver_lowers_the_validation_loss_within_the_budget():
    """Projected gradient from e = 0.5: F drops by at least 40 % [seed 0: 0.61 -> 0.345 in 20 steps, the planted
    graph's is 0.37], e stays in the box with the initial total weight, and evaluate(e) agrees with the driver's
    F."""
    instance, result = _instance(), _solved()
    initial = instance.reference["initial"]["val_loss"]
    assert result.history.f[0] == pytest.approx(initial, rel=1e-6)
    assert result.fun < 0.6 * initial
    e = result.x.numpy()
    assert e.min() >= -1e-8 and e.max() <= 1 + 1e-8
    assert e.sum() == pytest.approx(gl.INITIAL_WEIGHT * e.size, abs=1e-6)
    assert instance.evaluate(result.x)["val_loss"] == pytest.approx(result.fun, rel=1e-5)


def test_learned_edges_recover_the_planted_partition():
    """Within-community edges outweigh between-community ones: AUC >= 0.7 [seed 0: 0.76; seeds 0-9 gave
    0.76-0.96]. A random ranking of these 91 within and 107 between edges has AUC 0.5 +- 0.041 (the
    Mann-Whitney standard deviation sqrt((n_w + n_b + 1) / (12 n_w n_b))), so 0.7 is about 5 standard deviations
    above chance. The test accuracy rises above the initial graph's [0.52 -> 0.63; planted 0.96]."""
    instance, result = _instance(), _solved()
    graph = instance.data["graph"]
    learned = instance.evaluate(result.x)
    n_w, n_b = graph.within.sum(), (~graph.within).sum()
    chance_std = np.sqrt((n_w + n_b + 1) / (12 * n_w * n_b))
    assert 0.7 > 0.5 + 4 * chance_std
    assert learned["auc"] >= 0.7
    assert learned["auc"] == pytest.approx(roc_auc_score(graph.within, result.x.numpy()), abs=1e-12)
    assert learned["mean_within"] > learned["mean_between"] + 0.1
    assert learned["test_accuracy"] > instance.reference["initial"]["test_accuracy"]
