"""Bilevel test problems with nonsmooth atoms and cone constraints, shared by the conic and
reformulation tests and benchmarks/conic_accuracy.py.

Each builder returns a :class:`NonsmoothCase`: the cbo problem (outer F = 1/2 ||y - target||^2,
y the first variable), the point x, and, where one exists, the same problem written another way
(``twin``: smooth atoms instead of cones, or cones instead of atoms) whose hypergradient is
derived independently.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import cvxpy as cp
import numpy as np
import torch

import cbo

CVXPY_OPTIONS = {"solver": "CLARABEL", "tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12}


@dataclass
class NonsmoothCase:
    name: str
    problem: cbo.BilevelProblem
    x: list[np.ndarray]
    twin: cbo.BilevelProblem | None = None
    data: dict | None = None

    @property
    def x_tensors(self) -> list[torch.Tensor]:
        return [torch.tensor(v, dtype=torch.float64) for v in self.x]


def _outer(target: np.ndarray, n_params: int):
    t = torch.as_tensor(target)
    return lambda *args: 0.5 * ((args[n_params] - t) ** 2).sum()


def _pair(name, build, params, x, target):
    """The case from ``build(variant)`` -> (inner, y) for variants "main" and "twin" (None: no twin)."""
    problems = {}
    for variant in ("main", "twin"):
        built = build(variant)
        problems[variant] = None if built is None else \
            cbo.BilevelProblem(built[0], params, [built[1]], outer=_outer(target, len(params)))
    return NonsmoothCase(name, problems["main"], x, problems["twin"])


def lasso(n: int = 5, samples: int = 12, seed: int = 0) -> NonsmoothCase:
    """min 1/2 ||A y - b||^2 + lam ||y||_1 over y; x = (b, lam). Twin: the same with cp.abs summed."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((samples, n))
    y_true = np.where(np.arange(n) % 2 == 0, rng.standard_normal(n) * 2, 0.0)
    b0 = A @ y_true + 0.1 * rng.standard_normal(samples)
    b, lam = cp.Parameter(samples), cp.Parameter(nonneg=True)

    def build(variant):
        y = cp.Variable(n)
        penalty = cp.norm1(y) if variant == "main" else cp.sum(cp.abs(y))
        return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(A @ y - b) + lam * penalty)), y

    case = _pair("lasso", build, [b, lam], [b0, np.array(1.5)], rng.standard_normal(n))
    case.data = {"A": A}
    return case


def l1_logistic(n: int = 4, samples: int = 20, seed: int = 1) -> NonsmoothCase:
    """L1-regularised logistic regression (cvxpylayers issue #85); x = (data matrix X, lam)."""
    rng = np.random.default_rng(seed)
    X0 = rng.standard_normal((samples, n))
    labels = np.sign(X0 @ np.array([1.5, -1.0, 0.0, 0.0][:n] + [0.0] * max(0, n - 4)) + 0.3 * rng.standard_normal(samples))
    X, lam = cp.Parameter((samples, n)), cp.Parameter(nonneg=True)

    def build(variant):
        w = cp.Variable(n)
        loss = cp.sum(cp.logistic(-cp.multiply(labels, X @ w))) / samples
        penalty = cp.norm1(w) if variant == "main" else cp.sum(cp.maximum(w, -w))
        return cp.Problem(cp.Minimize(loss + lam * penalty + 0.01 * cp.sum_squares(w))), w

    return _pair("l1_logistic", build, [X, lam], [X0, np.array(0.05)], rng.standard_normal(n))


def svm(n: int = 3, samples: int = 16, seed: int = 2) -> NonsmoothCase:
    """Soft-margin SVM, hinge loss by cp.pos; x = (data matrix X, C). Twin: hinge by cp.maximum."""
    rng = np.random.default_rng(seed)
    X0 = rng.standard_normal((samples, n))
    labels = np.sign(X0[:, 0] - 0.5 * X0[:, 1] + 0.8 * rng.standard_normal(samples))
    X, C = cp.Parameter((samples, n)), cp.Parameter(nonneg=True)

    def build(variant):
        w, b = cp.Variable(n), cp.Variable()
        margin = 1 - cp.multiply(labels, X @ w + b)
        hinge = cp.pos(margin) if variant == "main" else cp.maximum(margin, 0)
        return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(w) + C * cp.sum(hinge))), w

    return _pair("svm", build, [X, C], [X0, np.array(1.0)], rng.standard_normal(n))


def socp(n: int = 4, seed: int = 3) -> NonsmoothCase:
    """min a^T y + t + 1/2 ||y||^2  s.t.  cp.SOC(t, y), t <= r; twin: cp.norm(y, 2) <= t (smooth)."""
    rng = np.random.default_rng(seed)
    a, r = cp.Parameter(n), cp.Parameter()

    def build(variant):
        y, t = cp.Variable(n), cp.Variable()
        cone = cp.SOC(t, y) if variant == "main" else cp.norm(y, 2) <= t
        return cp.Problem(cp.Minimize(a @ y + t + 0.5 * cp.sum_squares(y)), [cone, t <= r]), y

    return _pair("socp", build, [a, r], [3 * rng.standard_normal(n), np.array(0.7)], rng.standard_normal(n))


def sdp(k: int = 3, seed: int = 4) -> NonsmoothCase:
    """min tr(C X) + 0.1 ||X||_F^2  s.t.  X >> 0, tr X == 1, C a symmetric matrix parameter (no twin)."""
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((k, k))
    C = cp.Parameter((k, k), symmetric=True)

    def build(variant):
        if variant == "twin":
            return None
        X = cp.Variable((k, k), symmetric=True)
        return cp.Problem(cp.Minimize(cp.trace(C @ X) + 0.1 * cp.sum_squares(X)), [X >> 0, cp.trace(X) == 1]), X

    return _pair("sdp", build, [C], [M + M.T], rng.standard_normal((k, k)))


def entropy(n: int = 4, seed: int = 5) -> NonsmoothCase:
    """max entropy + b^T y over the simplex with cp.ExpCone; twin: cp.entr (smooth)."""
    rng = np.random.default_rng(seed)
    b = cp.Parameter(n)

    def build(variant):
        y = cp.Variable(n)
        if variant == "main":
            t = cp.Variable(n)
            return cp.Problem(cp.Maximize(cp.sum(t) + b @ y), [cp.ExpCone(t, y, np.ones(n)), cp.sum(y) == 1]), y
        return cp.Problem(cp.Maximize(cp.sum(cp.entr(y)) + b @ y), [cp.sum(y) == 1]), y

    return _pair("entropy", build, [b], [rng.standard_normal(n)], rng.random(n) / n)


def power_cone(seed: int = 6) -> NonsmoothCase:
    """min 1/2 ||y - a||^2  s.t.  cp.PowCone3D(y_1 + r, y_2, y_3, 0.3), binding with y_3 > 0; twin: the same
    bound y_3 <= (y_1 + r)^0.3 y_2^0.7 by cp.geo_mean, which cvxpy writes with second-order cones."""
    rng = np.random.default_rng(seed)
    a, r = cp.Parameter(3), cp.Parameter()

    def build(variant):
        y = cp.Variable(3)
        cone = cp.PowCone3D(y[0] + r, y[1], y[2], 0.3) if variant == "main" else \
            y[2] <= cp.geo_mean(cp.hstack([y[0] + r, y[1]]), [3, 7])
        return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - a)), [cone]), y

    x = [np.array([0.5, 0.4, 2.0]) + 0.1 * rng.standard_normal(3), np.array(0.2)]
    return _pair("power_cone", build, [a, r], x, rng.standard_normal(3))


ALL_CASES = [lasso, l1_logistic, svm, socp, sdp, entropy, power_cone]


# ---------------------------------------------------------------- references

def geo_mean(active: bool) -> NonsmoothCase:
    """min ||y||^2 - a^T y  s.t.  geo_mean(y) >= 0.1, x = a; the constraint binds iff ``active``.
    cvxpy's cone program has a hypograph variable that is not unique when the constraint is slack."""
    a, y = cp.Parameter(3), cp.Variable(3)
    inner = cp.Problem(cp.Minimize(cp.sum_squares(y) - a @ y), [cp.geo_mean(y) >= 0.1])
    x = np.array([0.1, 0.12, 0.08]) if active else np.array([1.0, 1.2, 0.8])
    problem = cbo.BilevelProblem(inner, [a], [y], outer=_outer(np.array([0.2, 0.5, 0.1]), 1))
    return NonsmoothCase(f"geo_mean_{'active' if active else 'slack'}", problem, [x])


def cvxpy_solution(problem: cbo.BilevelProblem, xs) -> np.ndarray:
    """The first user variable at x, from cvxpy alone (tight Clarabel tolerances)."""
    for p, v in zip(problem.parameters, xs):
        p.value = v
    with warnings.catch_warnings():  # cvxpy's notices on non-DPP and inaccurate solves: the tests measure
        warnings.simplefilter("ignore", UserWarning)
        problem.reformulation.original.solve(**CVXPY_OPTIONS)
    return np.asarray(problem.variables[0].value, dtype=float)


def outer_value(case: NonsmoothCase, xs, y) -> float:
    return float(case.problem.outer(*[torch.as_tensor(v) for v in xs], torch.as_tensor(y)))


def symmetric_direction(problem: cbo.BilevelProblem, seed: int = 7) -> list[np.ndarray]:
    """A random direction in x, symmetric for symmetric matrix parameters."""
    rng = np.random.default_rng(seed)
    direction = []
    for p in problem.parameters:
        d = rng.standard_normal(p.shape)
        direction.append((d + d.T) / 2 if p.attributes.get("symmetric") else d)
    return direction


def finite_difference_cvxpy(case: NonsmoothCase, direction, h: float = 1e-4) -> float:
    """(F(x + h d) - F(x - h d)) / 2h with y* from cvxpy (no cbo)."""
    def F(sign):
        xs = [x + sign * h * d for x, d in zip(case.x, direction)]
        return outer_value(case, xs, cvxpy_solution(case.problem, xs))
    return (F(1) - F(-1)) / (2 * h)


def finite_difference_polished(case: NonsmoothCase, direction, h: float = 1e-5) -> float:
    """The same with y* from cbo's polished cone-program solution (accurate to ~1e-14, checked
    against cvxpy's in the tests), so that the quotient's error is O(h^2)."""
    program = cbo.compiled.compiled(case.problem).conic
    index = [v.id for v in case.problem.all_variables].index(case.problem.inner_variables[0].id)

    def F(sign):
        xs = [x + sign * h * d for x, d in zip(case.x, direction)]
        y = program.variable_values(program.solve(xs))[index].reshape(case.problem.variables[0].shape)
        return outer_value(case, xs, y)
    return (F(1) - F(-1)) / (2 * h)


def directional(grad, direction) -> float:
    grad = grad if isinstance(grad, (list, tuple)) else [grad]
    return float(sum(np.sum(g.numpy() * d) for g, d in zip(grad, direction)))
