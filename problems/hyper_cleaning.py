r"""Data hyper-cleaning: learn per-sample weights that switch off mislabelled training points.

A fraction of the training labels of scikit-learn's breast-cancer data set is
flipped. The outer variables are per-sample weights w in [0, 1]; the inner
problem is weighted, L2-regularized logistic regression on the corrupted
training set (labels b_i in {-1, +1}, rows a_i with a constant 1 appended),

    theta*(w) = argmin_theta  sum_i w_i log(1 + exp(-b_i a_i^T theta)) + lam/2 ||theta||^2,

and the outer objective is the mean logistic loss on a clean validation set,

    F(w, theta) = 1/m sum_j log(1 + exp(-b_j^val (a_j^val)^T theta)),     0 <= w <= 1.

Weights of mislabelled points should go to 0. A point is *flagged* as flipped
when its learned weight is below 1/2; :func:`detection_f1` scores the flags
against the true flips. Baselines (test accuracy): uniform weights on the
corrupted data, and the oracle weights w_i = 1[label i not flipped].

scikit-learn is needed for the data (``pip install -e ".[problems]"``).
"""
from __future__ import annotations

from typing import Any

import cvxpy as cp
import numpy as np
import torch

import cbo

from . import Instance, logistic_loss

__all__ = ["build", "load_split", "fit_weighted_logistic", "detection_f1", "accuracy", "logistic_loss", "SIZES",
           "FLAG_THRESHOLD"]

FLAG_THRESHOLD = 0.5  # a training point is flagged as mislabelled when its weight is below this

# n_train / n_val points drawn from the 569 of the data set; the rest is the test set.
SIZES: dict[str, dict[str, Any]] = {
    "small": dict(n_train=60, n_val=60, flip=0.35, lam=1.0,
                  settings=dict(steps=25, method="cg")),
    "large": dict(n_train=300, n_val=150, flip=0.35, lam=1.0,
                  settings=dict(steps=100, method="cg")),
}


def load_split(n_train: int, n_val: int, flip: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Breast-cancer data, split into train / validation / test, with ``flip`` of the training labels flipped.

    Features are standardized with the training set's mean and standard
    deviation, then a constant column 1 is appended (the intercept). Labels
    are in {-1, +1}. Exactly ``round(flip * n_train)`` training labels are
    flipped, chosen at random; validation and test labels are clean.

    Returns a dict with ``A_train, b_train`` (corrupted labels), ``b_train_clean``,
    ``flipped`` (bool mask), ``A_val, b_val, A_test, b_test``.
    """
    from sklearn.datasets import load_breast_cancer

    X, target = load_breast_cancer(return_X_y=True)
    if n_train + n_val >= len(target):
        raise ValueError(f"n_train + n_val = {n_train + n_val} leaves no test points: the data set has "
                         f"{len(target)} samples. Lower n_train or n_val.")
    if not 0.0 <= flip < 0.5:
        raise ValueError(f"flip={flip} must be in [0, 0.5): at 0.5 or more the labels carry no signal.")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(target))
    parts = np.split(order, [n_train, n_train + n_val])
    mean, std = X[parts[0]].mean(axis=0), X[parts[0]].std(axis=0)
    features = lambda idx: np.hstack([(X[idx] - mean) / std, np.ones((idx.size, 1))])  # noqa: E731
    labels = lambda idx: 2.0 * target[idx] - 1.0  # noqa: E731
    flipped = np.zeros(n_train, dtype=bool)
    flipped[rng.choice(n_train, int(round(flip * n_train)), replace=False)] = True
    b_clean = labels(parts[0])
    return dict(
        A_train=features(parts[0]), b_train=np.where(flipped, -b_clean, b_clean), b_train_clean=b_clean,
        flipped=flipped, A_val=features(parts[1]), b_val=labels(parts[1]),
        A_test=features(parts[2]), b_test=labels(parts[2]),
    )


def fit_weighted_logistic(A: np.ndarray, b: np.ndarray, w: np.ndarray, lam: float) -> np.ndarray:
    """argmin_theta sum_i w_i log(1 + exp(-b_i a_i^T theta)) + lam/2 ||theta||^2, by scikit-learn.

    scikit-learn's objective 1/2 ||theta||^2 + C sum_i w_i loss_i is the same
    problem divided by lam, with C = 1/lam (no separate intercept: the
    constant column of A is one, penalized like the others).
    """
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=1.0 / lam, fit_intercept=False, solver="newton-cholesky", tol=1e-12, max_iter=1000)
    model.fit(A, b, sample_weight=np.asarray(w, dtype=float))
    return model.coef_.ravel()


def accuracy(A: np.ndarray, b: np.ndarray, theta: np.ndarray) -> float:
    """Fraction of rows with sign(a^T theta) == b."""
    return float(np.mean(np.where(A @ theta >= 0, 1.0, -1.0) == b))


def detection_f1(w: np.ndarray, flipped: np.ndarray, threshold: float = FLAG_THRESHOLD) -> dict[str, float]:
    """Precision, recall and F1 of flagging w_i < ``threshold`` as "label i is flipped"."""
    flagged = np.asarray(w) < threshold
    tp = float(np.sum(flagged & flipped))
    precision = tp / max(int(flagged.sum()), 1)
    recall = tp / max(int(flipped.sum()), 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return dict(precision=precision, recall=recall, f1=f1, n_flagged=int(flagged.sum()))


def build(size: str = "small", seed: int = 0) -> Instance:
    """The hyper-cleaning task: ``size`` "small" (60 training points, the test) or "large" (300, the example).

    ``reference`` holds the baselines: the metrics of ``evaluate`` at uniform
    weights (``corrupted``) and at the oracle weights 1[not flipped]
    (``oracle``), and two trivial detectors at flip rate r: flagging points at
    random with rate r has expected F1 = r (``f1_random``); flagging every
    point has F1 = 2r / (1 + r) (``f1_flag_all``).
    ``evaluate(w)`` gives precision, recall and F1 of the flags w < 1/2 and the
    validation loss, validation and test accuracy of the classifier fitted
    with weights w (clipped to [0, 1]).
    """
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}; choose one of {sorted(SIZES)}.")
    config = SIZES[size]
    lam = config["lam"]
    data = load_split(config["n_train"], config["n_val"], config["flip"], seed)
    n, d = data["A_train"].shape

    # nonneg=True makes w @ logistic(...) convex for cvxpy (DCP), and DPP: compiled once, re-solved per w.
    w = cp.Parameter(n, nonneg=True, name="w")
    theta = cp.Variable(d, name="theta")
    margins = cp.multiply(data["b_train"], data["A_train"] @ theta)
    inner = cp.Problem(cp.Minimize(w @ cp.logistic(-margins) + lam / 2 * cp.sum_squares(theta)))
    A_val = torch.as_tensor(data["A_val"])
    b_val = torch.as_tensor(data["b_val"])

    def outer(w_t: torch.Tensor, theta_t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(-b_val * (A_val @ theta_t)).mean()

    problem = cbo.BilevelProblem(inner, parameters=[w], variables=[theta], outer=outer)

    def evaluate(weights: torch.Tensor | np.ndarray) -> dict[str, float]:
        weights = np.clip(np.asarray(torch.as_tensor(weights).detach(), dtype=float), 0.0, 1.0)
        fitted = fit_weighted_logistic(data["A_train"], data["b_train"], weights, lam)
        return dict(
            **detection_f1(weights, data["flipped"]),
            val_loss=logistic_loss(data["A_val"], data["b_val"], fitted),
            val_accuracy=accuracy(data["A_val"], data["b_val"], fitted),
            test_accuracy=accuracy(data["A_test"], data["b_test"], fitted),
        )

    uniform, oracle = np.ones(n), (~data["flipped"]).astype(float)
    rate = float(data["flipped"].mean())
    reference = dict(corrupted=evaluate(uniform), oracle=evaluate(oracle),
                     f1_random=rate, f1_flag_all=2 * rate / (1 + rate))
    return Instance(
        problem=problem,
        x0=torch.ones(n, dtype=torch.float64),
        outer_constraints=[w >= 0, w <= 1],
        settings=dict(config["settings"]),
        reference=reference,
        evaluate=evaluate,
        data=dict(data, lam=lam),
    )
