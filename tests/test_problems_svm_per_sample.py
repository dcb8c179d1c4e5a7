"""problems.svm_per_sample: the LIBSVM parser, the split, and hypergradients of the LV-HBA per-sample SVM.

References independent of cbo: a re-implementation of the LV-HBA scripts'
parser and shuffle, and central finite differences of F(c, y*(c)) with the
inner problem solved by cvxpy (Clarabel at tight tolerances) and F in numpy.
"""
import warnings

import numpy as np
import pytest
import torch

import cbo
from problems import svm_per_sample as sps

from builders import SOLVER_OPTIONS, relative_error

pytestmark = pytest.mark.filterwarnings("ignore:You are solving a parameterized problem that is not DPP")


@pytest.fixture(scope="module")
def small():
    return sps.build("small", seed=1)


@pytest.fixture(scope="module")
def small_dpp():
    return sps.build("small", seed=1, dpp=True)


def _their_rows(dataset):
    """The LV-HBA scripts' parser, verbatim in logic: positional fields, '' -> 0, rows [x..., y]."""
    n_features = sps.DATASETS[dataset]["n_features"]
    rows = []
    with open(sps.DATA_DIR / sps.DATASETS[dataset]["file"], encoding="utf-8") as f:
        for line in f.readlines():
            fields = list(line.replace("\n", "").split(" "))
            x = [float(fields[i].split(":")[1]) if fields[i] != "" else 0 for i in range(1, n_features + 1)]
            rows.append(x + [float(fields[0])])
    return np.array(rows)


def _F_numpy(instance, c):
    """F(c, y*(c)) with y* from cvxpy and their loss_upper written in numpy."""
    w, b = sps.inner_solution(instance.problem, c, **SOLVER_OPTIONS)
    assert instance.problem.inner.status == "optimal"
    data = instance.data
    margin = data["y_val"] * (data["Z_val"] @ w + b) / np.linalg.norm(w)
    s = 2.0 / (1.0 + np.exp(5.0 * margin)) - 1.0
    return float(np.sum(np.where(s > 0, s, 0.01 * s)))


# ---------------------------------------------------------------- data

@pytest.mark.parametrize("dataset, shape, counts", [("diabetes", (768, 8), (268, 500)),
                                                    ("fourclass", (862, 2), (555, 307))])
def test_parser_reads_the_libsvm_files(dataset, shape, counts):
    Z, y = sps.load(dataset)
    assert Z.shape == shape and y.shape == (shape[0],)
    assert set(np.unique(y)) == {-1.0, 1.0}
    assert (np.sum(y == -1), np.sum(y == 1)) == counts
    assert Z.min() >= -1 and Z.max() <= 1 and Z.min() == -1 and Z.max() == 1  # LIBSVM's [-1, 1] scaling


def test_their_positional_parser_differs_only_on_the_seven_sparse_fourclass_lines():
    Z, _ = sps.load("fourclass")
    Z_theirs, _ = sps.load("fourclass", reference_parser=True)
    np.testing.assert_array_equal(Z_theirs, _their_rows("fourclass")[:, :-1])
    differ = np.any(Z != Z_theirs, axis=1)
    assert differ.sum() == 7
    np.testing.assert_array_equal(Z[differ, 0], 0.0)  # "+1 2:0.54386": feature 1 omitted, i.e. 0 ...
    np.testing.assert_array_equal(Z_theirs[differ], np.column_stack([Z[differ, 1], np.zeros(7)]))  # ... theirs
    np.testing.assert_array_equal(sps.load("diabetes")[0], _their_rows("diabetes")[:, :-1])  # dense: same


@pytest.mark.parametrize("dataset", ["diabetes", "fourclass"])
def test_split_is_theirs(dataset):
    seed = 3
    data_array = _their_rows(dataset)
    np.random.seed(seed)
    np.random.shuffle(data_array)
    data = sps.split(*sps.load(dataset, reference_parser=True), seed=seed)
    np.testing.assert_array_equal(data["Z_train"], data_array[:500, :-1])
    np.testing.assert_array_equal(data["y_val"], data_array[500:650, -1])
    np.testing.assert_array_equal(data["Z_test"], data_array[650:, :-1])
    small = sps.split(*sps.load(dataset), seed=seed, n_train=60, n_val=30)
    assert small["Z_train"].shape[0] == 60 and small["y_val"].shape == (30,)
    assert small["Z_test"].shape[0] == len(data_array) - 650


def test_build_sizes_and_x0():
    large = sps.build("large", dataset="fourclass")  # no solve beyond one inner solve for the reference
    assert large.x0.shape == (500,) and len(large.data["y_val"]) == 150 and len(large.data["y_test"]) == 212
    assert torch.all((large.x0 >= -6) & (large.x0 <= -5))
    at_x0 = large.reference["at_x0"]
    assert at_x0["val_loss"] == pytest.approx(10 * at_x0["F"] / 150)


# ---------------------------------------------------------------- hypergradients

@pytest.mark.parametrize("point", ["c0 + 4", "uniform(-1, 3)"])
def test_hypergradient_matches_finite_differences(small, point):
    c0 = small.x0.numpy()
    x = c0 + 4 if point == "c0 + 4" else np.random.default_rng(1).uniform(-1, 3, c0.size)
    grad, info = cbo.hypergrad(small.problem, torch.as_tensor(x), return_info=True)
    assert 0 < info.active_set.active.numel() <= c0.size
    v = np.random.default_rng(0).standard_normal(c0.size)
    v /= np.linalg.norm(v)
    h = 1e-3
    fd = (_F_numpy(small, x + h * v) - _F_numpy(small, x - h * v)) / (2 * h)
    assert abs(fd) > 1e-2  # a non-trivial check
    assert abs(grad.numpy() @ v - fd) <= 1e-5 * abs(fd)


def test_dpp_variant_gives_the_same_solution_and_chain_rule_gradient(small, small_dpp):
    assert not small.problem.inner.is_dpp() and small_dpp.problem.inner.is_dpp()
    np.testing.assert_allclose(small_dpp.x0.numpy(), np.exp(small.x0.numpy()))
    c = np.random.default_rng(1).uniform(-1, 3, small.x0.numel())
    w, b = sps.inner_solution(small.problem, c, **SOLVER_OPTIONS)
    w_dpp, b_dpp = sps.inner_solution(small_dpp.problem, np.exp(c), **SOLVER_OPTIONS)
    assert relative_error([w_dpp, b_dpp], [w, b]) < 1e-8
    grad_c = cbo.hypergrad(small.problem, torch.as_tensor(c)).numpy()
    for method in (None, "cg"):  # the inner-QP fast path and the generic route
        grad_C = cbo.hypergrad(small_dpp.problem, torch.as_tensor(np.exp(c)), method=method).numpy()
        assert relative_error([np.exp(c) * grad_C], [grad_c]) < 1e-8
    metrics, metrics_dpp = small.evaluate(c), small_dpp.evaluate(np.exp(c))
    assert metrics["F"] == pytest.approx(metrics_dpp["F"], rel=1e-8)
    assert metrics["test_accuracy"] == metrics_dpp["test_accuracy"]


def test_at_c0_the_validation_loss_is_saturated(small):
    """At c0 ~ U(-6, -5) the exact inner solution has tiny w and |b| / ||w|| large: every point gets sign(b),
    F is flat (hypergradient ~1e-7), which is why ``settings`` lowers the driver's tolerance."""
    grad = cbo.hypergrad(small.problem, small.x0)
    assert float(grad.norm()) < 1e-5 and small.settings["tol"] < 1e-8
    w, b = sps.inner_solution(small.problem, small.x0)
    test = small.data
    assert np.all(np.sign(test["Z_test"] @ w + b) == np.sign(b))


def test_driver_lowers_the_validation_loss(small):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cbo.DegenerateKKTWarning)
        result = small.minimize(steps=8, progress=False)
    assert min(result.history.f) < small.reference["at_x0"]["F"] - 1.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="Unknown size"):
        sps.build("huge")
    with pytest.raises(ValueError, match="Unknown dataset"):
        sps.load("iris")
    with pytest.raises(ValueError, match="must be in"):
        sps.split(np.zeros((700, 2)), np.ones(700), n_train=600)
