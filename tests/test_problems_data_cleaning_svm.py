"""problems.data_cleaning_svm: the breast-cancer data, their label corruption, hypergradients and the driver.

References independent of cbo: a re-implementation of the GAM / LV-HBA
scripts' loading, shuffle and corruption loop (global numpy generator),
scikit-learn's ROC AUC for ``flip_auc``, and central finite differences of
F(c, y*(c)) with the inner problem solved by cvxpy and F in numpy.
"""
import warnings

import numpy as np
import pytest
import torch

import cbo
from problems import data_cleaning_svm as dc
from problems import svm_per_sample as sps

from builders import SOLVER_OPTIONS

pytestmark = pytest.mark.filterwarnings("ignore:You are solving a parameterized problem that is not DPP")


@pytest.fixture(scope="module")
def small():
    return dc.build("small", seed=1)


def _their_split(seed, corruption=0.4):
    """Their data_array, shuffle and flip loop (labels 2 / 4 read as -1 / +1), with the global generator."""
    rows = []
    with open(sps.DATA_DIR / sps.DATASETS["breast-cancer"]["file"], encoding="utf-8") as f:
        for line in f.readlines():
            fields = list(line.replace("\n", "").split(" "))
            x = [float(fields[i].split(":")[1]) if i < len(fields) and fields[i] != "" else 0 for i in range(1, 11)]
            rows.append(x + [{2.0: -1.0, 4.0: 1.0}[float(fields[0])]])
    data_array = np.array(rows)
    np.random.seed(seed)
    np.random.shuffle(data_array)
    y_train = data_array[:500, -1].copy()
    for i in range(500):
        y_train[i] *= np.random.choice([-1, 1], p=[corruption, 1 - corruption])
    return data_array, y_train


def test_breast_cancer_file():
    Z, y = sps.load("breast-cancer")
    assert Z.shape == (683, 10)
    assert (np.sum(y == -1), np.sum(y == 1)) == (444, 239)  # LIBSVM's breast-cancer: 444 benign (2), 239 malignant (4)
    assert Z.min() == -1 and Z.max() == 1


@pytest.mark.parametrize("seed", [1, 3])
def test_corruption_is_theirs(seed):
    data_array, y_train = _their_split(seed)
    data = sps.split(*sps.load("breast-cancer"), seed=seed, corruption=0.4)
    np.testing.assert_array_equal(data["Z_train"], data_array[:500, :-1])
    np.testing.assert_array_equal(data["y_train"], y_train)
    np.testing.assert_array_equal(data["y_train_clean"], data_array[:500, -1])
    np.testing.assert_array_equal(data["flipped"], y_train != data_array[:500, -1])
    np.testing.assert_array_equal(data["y_test"], data_array[650:, -1])
    assert 0.3 < data["flipped"].mean() < 0.5
    small = sps.split(*sps.load("breast-cancer"), seed=seed, n_train=60, corruption=0.4)
    np.testing.assert_array_equal(small["y_train"], y_train[:60])


def test_flip_auc_is_the_roc_auc():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    flipped = rng.random(50) < 0.4
    c = np.round(rng.standard_normal(50) - flipped, 1)  # rounded: ties occur
    assert dc.flip_auc(c, flipped) == pytest.approx(metrics.roc_auc_score(flipped, -c), abs=1e-12)
    with pytest.raises(ValueError, match="both flipped and clean"):
        dc.flip_auc(c, np.zeros(50, dtype=bool))


def _F_numpy(instance, c):
    w, b = sps.inner_solution(instance.problem, c, **SOLVER_OPTIONS)
    data = instance.data
    margin = data["y_val"] * (data["Z_val"] @ w + b) / np.linalg.norm(w)
    s = 2.0 / (1.0 + np.exp(5.0 * margin)) - 1.0
    return float(np.sum(np.where(s > 0, s, 0.01 * s)))


def test_hypergradient_matches_finite_differences(small):
    c = np.random.default_rng(2).uniform(-1, 3, small.x0.numel())
    grad = cbo.hypergrad(small.problem, torch.as_tensor(c)).numpy()
    v = np.random.default_rng(0).standard_normal(c.size)
    v /= np.linalg.norm(v)
    h = 1e-3
    fd = (_F_numpy(small, c + h * v) - _F_numpy(small, c - h * v)) / (2 * h)
    assert abs(fd) > 1e-3
    assert grad @ v == pytest.approx(fd, rel=1e-5)


def test_driver_cleans(small):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cbo.DegenerateKKTWarning)
        result = small.minimize(steps=15, progress=False)
    at_x0, metrics = small.reference["at_x0"], small.evaluate(result.x)
    assert metrics["F"] < at_x0["F"] - 5.0
    assert metrics["flip_auc"] > at_x0["flip_auc"] + 0.2  # flipped points get the smaller weights
