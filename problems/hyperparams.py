r"""Hyperparameter learning with constraints: per-feature ridge penalties and a soft-margin SVM.

Both tasks tune hyperparameters on a validation set with :func:`cbo.minimize`
and are compared with a grid search (and, for ridge, a random search) that
makes as many inner solves as the driver makes hypergradient evaluations.

**Ridge** (``task="ridge"``): box-constrained regression with one penalty per
feature, on synthetic data where a few features are relevant and the rest are
noise. With lam = exp(x) elementwise,

.. math::

    \theta^*(x) = \operatorname*{argmin}_{\theta} \tfrac1m \lVert A\theta - b\rVert^2
    + \textstyle\sum_j e^{x_j} \theta_j^2
    \quad \text{s.t.} \quad -c \le \theta \le c,

    \min_{x} \; F(x) = \tfrac{1}{m_v} \lVert A_v \theta^*(x) - b_v\rVert^2
    \quad \text{s.t.} \quad \log\lambda_{\min} \le x \le \log\lambda_{\max}.

The box |theta_j| <= c is prior knowledge: the true coefficients satisfy it
and about half of the relevant ones sit on it, so the inner bound is active
for some features (their penalty then has no effect: zero hypergradient).
The penalties are learned in log-space (x = log lam): relevant features want
lam near lam_min and noise features near lam_max, six decades apart, and a
fixed-size Adam step in lam itself either crawls at the top or overshoots at
the bottom. Measured on the large task (80 Adam steps from lam = 0.1): F =
0.2345 in log lam (lr 0.3) against 0.2466, 0.2511, 0.4276 in lam (lr 0.3, 1,
3); on the small task (10 features) both reach 0.242. ``exp(x)`` makes the
inner problem non-DPP (cvxpy re-canonicalizes it at each solve; cbo
differentiates the original expression, so that is fine; a solve still takes
~3 ms at d = 10).

**SVM** (``task="svm"``): linear soft-margin SVM written with epigraph hinge
constraints, with C = exp(s) and the objective divided by C (same argmin,
multipliers in [0, 1] whatever C):

.. math::

    \text{hinge:} \quad \min_{w,b,\xi} \tfrac{e^{-s}}{2}\lVert w\rVert^2 + \textstyle\sum_i \xi_i
    + \tfrac{\epsilon}{2}(b^2 + \lVert\xi\rVert^2)
    \quad \text{s.t.} \quad y_i(a_i^\top w + b) \ge 1 - \xi_i,\; \xi \ge 0,

    \text{squared hinge:} \quad \min_{w,b,\xi} \tfrac{e^{-s}}{2}\lVert w\rVert^2
    + \tfrac12 \textstyle\sum_i \xi_i^2
    \quad \text{s.t.} \quad y_i(a_i^\top w + b) \ge 1 - \xi_i,

    \min_{s} \; F(s) = \tfrac{1}{m_v} \textstyle\sum_j \max(0, 1 - y_j(a_j^\top w^* + b^*))^2
    \quad \text{s.t.} \quad \log C_{\min} \le s \le \log C_{\max}.

Multiplied by C these are 1/2 ||w||^2 + C sum xi (+ eps C/2 (b^2 + ||xi||^2))
and 1/2 ||w||^2 + C/2 sum xi^2. The outer variable is s = log C: the
validation loss changes on the scale of decades of C, so steps in s are
well-conditioned where steps in C are not.

* The hinge SVM (the classical L1 form) is not strongly convex in (b, xi).
  With balanced classes (as here) and small C every point violates the
  margin, all multipliers equal 1, their optimality condition in b,
  sum_i mu_i y_i = 0, holds for every b in an interval, and b is not unique:
  cbo refuses to differentiate there (ConvergenceError, "the inner solution
  may not be unique"). ``SVM_EPS`` = 1e-3 adds eps/2 (b^2 + ||xi||^2), which
  makes the solution unique and changes it by O(eps).
  Even so the hinge SVM is a poor target for gradients. Its solution path is
  piecewise linear (Hastie et al., 2004), and once d + 1 points sit exactly on
  the margin (n + d + 1 active rows for n + d + 1 unknowns), (w, b) is pinned
  by them and does not move with C at all: F is a staircase in C with zero
  hypergradient on the treads (cbo returns exactly 0 there, the true
  derivative), and the driver stops on the first tread it meets.
* The squared-hinge SVM (``loss="squared_hinge"``, the default) has a C^1
  loss: no point stays on the margin, y*(s) is piecewise smooth without flat
  pieces, and the same hinge constraints (xi free: xi >= 0 would hold anyway
  and only adds doubly-active rows) need no regularizing term: on the null
  space of the active rows A (dxi_i = -y_i (a_i^T dw + db) for i in A) the
  Hessian's quadratic form is
  e^{-s} ||dw||^2 + sum_{i in A} (a_i^T dw + db)^2 + sum_{i not in A} dxi_i^2,
  positive definite as soon as one row is active.

**Baselines**: :func:`grid_search` on log lam (shared by all features) or
log C, :func:`random_search` on per-feature log lam drawn uniformly in the box,
both with ``reference["budget"]`` = steps + 1 inner solves, the driver's count
of hypergradient evaluations. For the one-dimensional C such a grid is
already close to optimal, and the driver ties it: its best iterate matches the
grid's best, and its final constant-step Adam iterate oscillates about the
minimizer (large task, seeds 0-5: final validation loss at most 0.004 above
the grid's best of ~0.8; small task: up to 0.03). With 50 per-feature
penalties the grid and the random search are far behind.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import cvxpy as cp
import numpy as np
import torch

import cbo
from cbo.inner import solve_inner

from . import Instance

__all__ = ["build", "build_ridge", "build_svm", "regression_data", "classification_data", "validation_losses",
           "grid_search", "random_search", "inner_solution", "TASKS", "SIZES", "LOG_LAM_BOUNDS",
           "LOG_C_BOUNDS", "SVM_EPS", "SVM_LOSSES"]

TASKS = ("ridge", "svm")
SVM_LOSSES = ("squared_hinge", "hinge")
LOG_LAM_BOUNDS = (math.log(1e-4), math.log(1e2))
LOG_C_BOUNDS = (math.log(1e-4), math.log(1e2))
SVM_EPS = 1e-3  # strongly convex term eps/2 (b^2 + ||xi||^2) of the hinge SVM

SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "ridge": {
        "small": dict(n_features=10, n_relevant=3, n_train=30, n_val=200, n_test=2000, noise=0.5, bound=1.0,
                      x0=math.log(1e-1), settings=dict(optimizer="adam", lr=0.3, steps=30)),
        "large": dict(n_features=50, n_relevant=5, n_train=60, n_val=200, n_test=5000, noise=0.5, bound=1.0,
                      x0=math.log(1e-1), settings=dict(optimizer="adam", lr=0.3, steps=80)),
    },
    "svm": {
        "small": dict(n_features=20, n_informative=3, n_train=40, n_val=40, n_test=2000, shift=0.5, flip=0.15,
                      x0=0.0, settings=dict(optimizer="adam", lr=0.3, steps=20)),
        "large": dict(n_features=20, n_informative=3, n_train=150, n_val=150, n_test=5000, shift=0.5, flip=0.15,
                      x0=0.0, settings=dict(optimizer="adam", lr=0.3, steps=40)),
    },
}


# ---------------------------------------------------------------- data

def regression_data(n_features: int, n_relevant: int, n_train: int, n_val: int, n_test: int, noise: float,
                    bound: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic sparse regression b = A theta_true + noise * N(0, 1), rows of A standard normal.

    ``n_relevant`` features, at random positions, have |theta_true_j| =
    bound * min(1, t_j) with t evenly spaced from 1.5 down to 0.5 and random
    signs; the others are 0. So |theta_true| <= bound holds, with equality for
    about half of the relevant features: the box is active in the fit.
    Returns ``A_*, b_*`` for train / val / test, ``theta_true`` and the
    boolean mask ``relevant``.
    """
    if not 0 < n_relevant <= n_features:
        raise ValueError(f"n_relevant={n_relevant} must be in [1, n_features={n_features}].")
    rng = np.random.default_rng(seed)
    relevant = np.zeros(n_features, dtype=bool)
    relevant[rng.choice(n_features, n_relevant, replace=False)] = True
    theta = np.zeros(n_features)
    magnitude = np.minimum(1.0, np.linspace(1.5, 0.5, n_relevant))
    theta[relevant] = bound * magnitude * rng.choice([-1.0, 1.0], n_relevant)
    data: dict[str, np.ndarray] = dict(theta_true=theta, relevant=relevant)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        A = rng.standard_normal((n, n_features))
        data[f"A_{split}"], data[f"b_{split}"] = A, A @ theta + noise * rng.standard_normal(n)
    return data


def classification_data(n_features: int, n_informative: int, n_train: int, n_val: int, n_test: int,
                        shift: float, flip: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Two balanced Gaussian classes y in {-1, +1}: a ~ N(shift * y * 1_informative, I), with label noise.

    Each split has n/2 points per class; the first ``n_informative`` features
    carry the class, the rest are noise. Then ``round(flip * n / 2)`` labels of
    each class are flipped, so the observed labels stay balanced (label noise
    is part of the distribution: every split gets it). Returns ``A_*, y_*``
    for train / val / test.
    """
    if not 0.0 <= flip < 0.5:
        raise ValueError(f"flip={flip} must be in [0, 0.5): at 0.5 or more the labels carry no signal.")
    sizes = (("train", n_train), ("val", n_val), ("test", n_test))
    if any(n % 2 for _, n in sizes):
        raise ValueError(f"Split sizes must be even (balanced classes), got {dict(sizes)}.")
    rng = np.random.default_rng(seed)
    data: dict[str, np.ndarray] = {}
    for split, n in sizes:
        y = rng.permutation(np.repeat([-1.0, 1.0], n // 2))
        A = rng.standard_normal((n, n_features))
        A[:, :n_informative] += shift * y[:, None]
        flipped = np.concatenate([rng.choice(np.flatnonzero(y == c), int(round(flip * n / 2)), replace=False)
                                  for c in (-1.0, 1.0)])
        y[flipped] *= -1
        data[f"A_{split}"], data[f"y_{split}"] = A, y
    return data


# ---------------------------------------------------------------- tasks

def build(task: str = "ridge", size: str = "small", seed: int = 0, **options: Any) -> Instance:
    """``build_ridge(size, seed)`` or ``build_svm(size, seed, **options)``."""
    builders = {"ridge": build_ridge, "svm": build_svm}
    if task not in builders:
        raise ValueError(f"Unknown task {task!r}; choose one of {list(TASKS)}.")
    return builders[task](size=size, seed=seed, **options)


def build_ridge(size: str = "small", seed: int = 0) -> Instance:
    """Per-feature ridge penalties lam = exp(x) with a box on theta (see the module docstring).

    ``reference``: ``budget`` (inner solves), ``grid`` (shared log lam on
    ``budget`` points in the box), ``random`` (``budget`` per-feature draws),
    ``noise_floor`` (the validation MSE of theta_true). ``evaluate(x)``: val
    and test MSE, theta*(x). ``data``: the splits, ``theta_true``, ``relevant``,
    ``bounds``.
    """
    config = _config("ridge", size)
    data = regression_data(config["n_features"], config["n_relevant"], config["n_train"], config["n_val"],
                           config["n_test"], config["noise"], config["bound"], seed)
    m, d = data["A_train"].shape
    bound = config["bound"]

    log_lam = cp.Parameter(d, name="log_lam")
    theta = cp.Variable(d, name="theta")
    fit = cp.sum_squares(data["A_train"] @ theta - data["b_train"]) / m
    penalty = cp.sum(cp.multiply(cp.exp(log_lam), cp.square(theta)))
    inner = cp.Problem(cp.Minimize(fit + penalty), [theta <= bound, theta >= -bound])
    A_val, b_val = torch.as_tensor(data["A_val"]), torch.as_tensor(data["b_val"])

    def outer(log_lam_t: torch.Tensor, theta_t: torch.Tensor) -> torch.Tensor:
        return ((A_val @ theta_t - b_val) ** 2).mean()

    problem = cbo.BilevelProblem(inner, parameters=[log_lam], variables=[theta], outer=outer)
    lo, hi = LOG_LAM_BOUNDS

    def evaluate(x) -> dict[str, Any]:
        (theta_x,) = inner_solution(problem, x)
        return dict(val_loss=_mse(data["A_val"], data["b_val"], theta_x),
                    test_loss=_mse(data["A_test"], data["b_test"], theta_x), theta=theta_x)

    data.update(bounds=(lo, hi), bound=bound)
    return _instance(problem, np.full(d, config["x0"]), [log_lam >= lo, log_lam <= hi], config, evaluate, data,
                     noise_floor=_mse(data["A_val"], data["b_val"], data["theta_true"]),
                     random=lambda budget: random_search(problem, (lo, hi), budget, seed=seed))


def build_svm(size: str = "small", seed: int = 0, loss: str = "squared_hinge", eps: float = SVM_EPS) -> Instance:
    """Soft-margin SVM with epigraph hinge constraints, tuned in s = log C (see the module docstring).

    ``loss``: "squared_hinge" (default; smooth path) or "hinge" (the L1 SVM,
    with the term eps/2 (b^2 + ||xi||^2); ``eps`` = 0 drops it, to see why it
    is there). ``reference``:
    ``budget`` and ``grid`` (log C on ``budget`` points). ``evaluate(s)``:
    validation and test squared-hinge loss, test accuracy, (w, b).
    """
    if loss not in SVM_LOSSES:
        raise ValueError(f"Unknown loss {loss!r}; choose one of {list(SVM_LOSSES)}.")
    if eps < 0:
        raise ValueError(f"eps={eps} must be >= 0 (it weighs a strongly convex term).")
    config = _config("svm", size)
    data = classification_data(config["n_features"], config["n_informative"], config["n_train"], config["n_val"],
                               config["n_test"], config["shift"], config["flip"], seed)
    n, d = data["A_train"].shape

    log_C = cp.Parameter(name="log_C")
    w, b, xi = cp.Variable(d, name="w"), cp.Variable(name="b"), cp.Variable(n, name="xi")
    hinge = cp.multiply(data["y_train"], data["A_train"] @ w + b) >= 1 - xi
    regularizer = cp.exp(-log_C) / 2 * cp.sum_squares(w)
    if loss == "hinge":
        objective = regularizer + cp.sum(xi) + eps / 2 * (cp.square(b) + cp.sum_squares(xi))
        constraints = [hinge, xi >= 0]
    else:
        objective = regularizer + cp.sum_squares(xi) / 2
        constraints = [hinge]
    inner = cp.Problem(cp.Minimize(objective), constraints)
    A_val, y_val = torch.as_tensor(data["A_val"]), torch.as_tensor(data["y_val"])

    def outer(log_C_t: torch.Tensor, w_t: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
        return torch.clamp(1 - y_val * (A_val @ w_t + b_t), min=0).square().mean()

    problem = cbo.BilevelProblem(inner, parameters=[log_C], variables=[w, b], outer=outer)
    lo, hi = LOG_C_BOUNDS

    def evaluate(s) -> dict[str, Any]:
        w_s, b_s = inner_solution(problem, s)
        scores = {split: data[f"A_{split}"] @ w_s + b_s for split in ("val", "test")}
        return dict(val_loss=_squared_hinge(data["y_val"], scores["val"]),
                    test_loss=_squared_hinge(data["y_test"], scores["test"]),
                    test_accuracy=float(np.mean(np.where(scores["test"] >= 0, 1.0, -1.0) == data["y_test"])),
                    C=float(np.exp(np.asarray(s, dtype=float))), w=w_s, b=b_s)

    data.update(bounds=(lo, hi), loss=loss)
    return _instance(problem, np.asarray(config["x0"], dtype=float), [log_C >= lo, log_C <= hi], config, evaluate,
                     data)


def _config(task: str, size: str) -> dict[str, Any]:
    if size not in SIZES[task]:
        raise ValueError(f"Unknown size {size!r}; choose one of {sorted(SIZES[task])}.")
    return SIZES[task][size]


def _instance(problem, x0, constraints, config, evaluate, data, random=None, **reference) -> Instance:
    """The Instance, with the baselines run at the driver's budget of steps + 1 inner solves."""
    settings = dict(config["settings"])
    budget = settings["steps"] + 1
    reference.update(budget=budget, grid=grid_search(problem, data["bounds"], budget))
    if random is not None:
        reference["random"] = random(budget)
    return Instance(problem=problem, x0=torch.as_tensor(x0, dtype=torch.float64), outer_constraints=constraints,
                    settings=settings, reference=reference, evaluate=evaluate, data=data)


# ---------------------------------------------------------------- baselines

def inner_solution(problem: cbo.BilevelProblem, x) -> list[np.ndarray]:
    """The inner solution at parameter value ``x`` (one parameter), one array per ``problem.variables``, by cvxpy."""
    solution = solve_inner(problem, [np.asarray(torch.as_tensor(x).detach(), dtype=float)])
    by_id = {v.id: t.numpy() for v, t in zip(problem.all_variables, problem.split_y(torch.as_tensor(solution.y)))}
    return [by_id[v.id] for v in problem.variables]


def validation_losses(problem: cbo.BilevelProblem, points: Sequence[np.ndarray]) -> np.ndarray:
    """F(x, y*(x)) at each point (one inner solve each), with the problem's own ``outer``."""
    values = []
    for x in points:
        x_t = torch.as_tensor(np.asarray(x, dtype=float))
        y = solve_inner(problem, [x_t.numpy()]).y
        values.append(float(problem.outer_value([x_t], torch.as_tensor(y))))
    return np.asarray(values)


def grid_search(problem: cbo.BilevelProblem, bounds: tuple[float, float], n_points: int) -> dict[str, Any]:
    """F on ``n_points`` evenly spaced values t in [lo, hi], with x = t in every entry of the parameter.

    Returns ``t`` (the grid), ``val_loss`` (F there), ``best_x`` and ``best_val_loss``.
    """
    shape = problem.parameters[0].shape
    t = np.linspace(*bounds, n_points)
    return _search_result([np.full(shape, v) for v in t], problem, t=t)


def random_search(problem: cbo.BilevelProblem, bounds: tuple[float, float], n_points: int,
                  seed: int = 0) -> dict[str, Any]:
    """F at ``n_points`` x with entries drawn independently, uniformly in [lo, hi].

    Returns ``x`` (the draws), ``val_loss``, ``best_x`` and ``best_val_loss``.
    """
    rng = np.random.default_rng(seed + 10_000)
    shape = problem.parameters[0].shape
    return _search_result([rng.uniform(*bounds, size=shape) for _ in range(n_points)], problem)


def _search_result(points: list[np.ndarray], problem: cbo.BilevelProblem, **extra) -> dict[str, Any]:
    values = validation_losses(problem, points)
    best = int(np.argmin(values))
    return dict(extra, x=np.stack(points), val_loss=values, best_x=points[best], best_val_loss=float(values[best]))


def _mse(A: np.ndarray, b: np.ndarray, theta: np.ndarray) -> float:
    return float(np.mean((A @ theta - b) ** 2))


def _squared_hinge(y: np.ndarray, scores: np.ndarray) -> float:
    return float(np.mean(np.maximum(0.0, 1.0 - y * scores) ** 2))
