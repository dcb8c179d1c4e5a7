"""Test problems with independent numpy references.

Each :class:`Case` carries a cbo.BilevelProblem and, separately, hand-written
numpy versions of the inner gradient and the constraints. The references never
call cbo or torch:

* :func:`dense_kkt_hypergrad`: solve the inner problem with cvxpy, Newton-polish
  the KKT point in numpy, assemble K and dR/dx by central differences of the
  numpy KKT residual, and solve K v = (dF/dy, 0) densely.
* :func:`finite_difference`: central differences of F(x, y*(x)) along a
  direction, each y* from cvxpy (polished in numpy for nonlinear problems).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import cvxpy as cp
import numpy as np
import torch

import cbo

SOLVER_OPTIONS = {"solver": "CLARABEL", "tol_gap_abs": 1e-11, "tol_gap_rel": 1e-11, "tol_feas": 1e-11}


@dataclass
class Case:
    """A bilevel test problem: min_x F = 1/2 ||y - y_target||^2 + 0.1 ||x||^2.

    ``grad_g(y, xs)``, ``ineq(y, xs)`` (p <= 0, stacked in constraint order),
    ``ineq_jac``, ``eq(y, xs)`` (q = 0) and ``eq_jac`` are numpy functions of the
    flat y and the list of parameter values.
    """

    name: str
    problem: cbo.BilevelProblem
    x: list[np.ndarray]
    y_target: np.ndarray
    grad_g: Callable
    ineq: Callable
    ineq_jac: Callable
    eq: Callable
    eq_jac: Callable
    data: dict | None = None

    @property
    def x_tensors(self) -> list[torch.Tensor]:
        return [torch.tensor(v, dtype=torch.float64) for v in self.x]


def outer_torch(y_target: np.ndarray, n_params: int):
    """F(x..., y) = 1/2 ||y - y_target||^2 + 0.1 sum ||x_i||^2 as a torch callable."""
    target = torch.as_tensor(y_target)

    def outer(*args):
        xs, y = args[:n_params], args[n_params]
        return 0.5 * ((y - target.to(y)) ** 2).sum() + 0.1 * sum((x ** 2).sum() for x in xs)

    return outer


def outer_numpy(case: Case, xs, y) -> float:
    return 0.5 * np.sum((y - case.y_target) ** 2) + 0.1 * sum(np.sum(x ** 2) for x in xs)


# ---------------------------------------------------------------- reference solutions

def cvxpy_kkt_point(case: Case, xs, accept_inaccurate: bool = False):
    """y*, mu, nu from a cvxpy solve (no cbo), multipliers in cvxpy's convention.

    ``accept_inaccurate`` also takes Clarabel's "optimal_inaccurate", which at these
    tolerances it reports on exponential-cone problems solved to ~1e-9 (polish after).
    """
    for p, v in zip(case.problem.parameters, xs):
        p.value = v
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Solution may be inaccurate.*")
        case.problem.inner.solve(**SOLVER_OPTIONS)
    accepted = (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) if accept_inaccurate else (cp.OPTIMAL,)
    assert case.problem.inner.status in accepted, case.problem.inner.status
    y = np.concatenate([np.ravel(v.value) for v in case.problem.all_variables])
    ineq = [c for c in case.problem.inner.constraints if not isinstance(c, cp.constraints.Equality)]
    eq = [c for c in case.problem.inner.constraints if isinstance(c, cp.constraints.Equality)]
    stack = lambda cs: np.concatenate([np.ravel(c.dual_value) for c in cs]) if cs else np.zeros(0)  # noqa: E731
    return y, stack(ineq), stack(eq)


def kkt_residual(case: Case, w, xs, active) -> np.ndarray:
    """R(w, x) = (grad g + J_A^T mu_A + J_eq^T nu, p_A, q) in numpy."""
    n, n_a = _n_y(case), active.size
    y, mu_a, nu = w[:n], w[n: n + n_a], w[n + n_a:]
    stationarity = case.grad_g(y, xs) + case.ineq_jac(y, xs)[active].T @ mu_a + case.eq_jac(y, xs).T @ nu
    return np.concatenate([stationarity, case.ineq(y, xs)[active], case.eq(y, xs)])


def _n_y(case: Case) -> int:
    return case.problem.n_y


def central_jacobian(f: Callable[[np.ndarray], np.ndarray], z: np.ndarray, h: float = 1e-5) -> np.ndarray:
    """d f / d z by central differences, one column per entry of z."""
    columns = []
    for i in range(z.size):
        e = np.zeros_like(z)
        e[i] = h
        columns.append((f(z + e) - f(z - e)) / (2 * h))
    return np.stack(columns, axis=1)


def polished_kkt_point(case: Case, xs, steps: int = 4, accept_inaccurate: bool = False):
    """cvxpy's KKT point, then Newton steps in numpy on the active-set KKT system."""
    y, mu, nu = cvxpy_kkt_point(case, xs, accept_inaccurate)
    active = np.flatnonzero(mu > 1e-6 * max(1.0, np.abs(mu).max(initial=0.0)))
    w = np.concatenate([y, mu[active], nu])
    for _ in range(steps):
        K = central_jacobian(lambda z: kkt_residual(case, z, xs, active), w)
        w = w - np.linalg.solve(K, kkt_residual(case, w, xs, active))
    return w, active


def dense_kkt_hypergrad(case: Case) -> list[np.ndarray]:
    """dF/dx = d_x F - (dR/dx)^T K^{-1} (d_y F, 0), everything dense in numpy."""
    xs = [np.asarray(v, dtype=float) for v in case.x]
    w, active = polished_kkt_point(case, xs)
    n = _n_y(case)
    K = central_jacobian(lambda z: kkt_residual(case, z, xs, active), w)
    flat_x = np.concatenate([v.ravel() for v in xs])
    unflatten = _unflattener(xs)
    R_x = central_jacobian(lambda fx: kkt_residual(case, w, unflatten(fx), active), flat_x)
    rhs = np.concatenate([w[:n] - case.y_target, np.zeros(w.size - n)])
    v = np.linalg.solve(K, rhs)
    grad = 0.2 * flat_x - R_x.T @ v
    return [g.reshape(x.shape) for g, x in zip(np.split(grad, np.cumsum([x.size for x in xs])[:-1]), xs)]


def finite_difference(case: Case, direction: list[np.ndarray], h: float = 1e-4, polish: bool = True) -> float:
    """(F(x + h d) - F(x - h d)) / 2h with y* from cvxpy (Newton-polished in numpy if ``polish``)."""

    def F(sign):
        xs = [x + sign * h * d for x, d in zip(case.x, direction)]
        if polish:
            w, _ = polished_kkt_point(case, xs)
            y = w[: _n_y(case)]
        else:
            y = cvxpy_kkt_point(case, xs)[0]
        return outer_numpy(case, xs, y)

    return (F(1) - F(-1)) / (2 * h)


def _unflattener(xs):
    sizes = np.cumsum([x.size for x in xs])[:-1]
    return lambda flat: [part.reshape(x.shape) for part, x in zip(np.split(flat, sizes), xs)]


def relative_error(got, reference) -> float:
    got = np.concatenate([np.ravel(np.asarray(g)) for g in got])
    reference = np.concatenate([np.ravel(r) for r in reference])
    return float(np.linalg.norm(got - reference) / max(np.linalg.norm(reference), 1e-12))


# ---------------------------------------------------------------- problem builders

def _linear_constraints(G_fn, h_fn, C, d):
    """Numpy callables for G(x) y <= h(x) and C y == d."""
    return dict(
        ineq=lambda y, xs: G_fn(xs) @ y - h_fn(xs),
        ineq_jac=lambda y, xs: G_fn(xs),
        eq=lambda y, xs: C @ y - d,
        eq_jac=lambda y, xs: C,
    )


def random_qp(n: int, seed: int = 0) -> Case:
    """min 1/2 y^T P y + (q + x)^T y  s.t.  G y <= h + B r,  C y == d.

    Parameters: x (linear term) and r (inequality right-hand side). About half
    of the n/2 inequalities are active; n/10 (at least 1) equalities.
    """
    rng = np.random.default_rng(seed)
    m, p, k = max(2, n // 2), max(1, n // 10), 3
    M = rng.standard_normal((n, n))
    P = M.T @ M / n + 0.5 * np.eye(n)
    G, B, C = rng.standard_normal((m, n)), rng.standard_normal((m, k)), rng.standard_normal((p, n))
    # Build the optimum first: y0 with multipliers mu0 (1..2 on about half the
    # rows, whose constraints pass through y0; 0 elsewhere, with slack) and nu0.
    y0, nu0 = rng.standard_normal(n), rng.standard_normal(p)
    x0, r0 = 0.3 * rng.standard_normal(n), 0.3 * rng.standard_normal(k)
    mu0 = np.where(rng.random(m) < 0.5, 1.0 + rng.random(m), 0.0)
    h = G @ y0 + np.where(mu0 > 0, 0.0, 1.0 + rng.random(m)) - B @ r0
    d = C @ y0
    q = -(P @ y0 + x0 + G.T @ mu0 + C.T @ nu0)  # stationarity at (y0, mu0, nu0)
    x, r, y = cp.Parameter(n), cp.Parameter(k), cp.Variable(n)
    inner = cp.Problem(cp.Minimize(0.5 * cp.quad_form(y, P) + (q + x) @ y), [G @ y <= h + B @ r, C @ y == d])
    y_target = rng.standard_normal(n)
    problem = cbo.BilevelProblem(inner, [x, r], [y], outer=outer_torch(y_target, 2))
    return Case(
        f"qp_n{n}", problem, [x0, r0], y_target,
        grad_g=lambda y, xs: P @ y + q + xs[0],
        **_linear_constraints(lambda xs: G, lambda xs: h + B @ xs[1], C, d),
    )


def qp_matrix_parameter(n: int = 12, seed: int = 1) -> Case:
    """min 1/2 ||y - c||^2  s.t.  Gp y <= h,  sum(y) == 1, with the constraint matrix Gp a parameter."""
    rng = np.random.default_rng(seed)
    m = n // 2
    c = 2 * rng.standard_normal(n)
    G0 = rng.standard_normal((m, n))
    h = G0 @ c - np.where(np.arange(m) % 2 == 0, 1.0, -1.0)  # even rows cut off c: active
    C, d = np.ones((1, n)), np.ones(1)
    Gp, y = cp.Parameter((m, n)), cp.Variable(n)
    inner = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - c)), [Gp @ y <= h, C @ y == d])
    y_target = rng.standard_normal(n)
    problem = cbo.BilevelProblem(inner, [Gp], [y], outer=outer_torch(y_target, 1))
    return Case(
        "qp_matrix_param", problem, [G0], y_target,
        grad_g=lambda y, xs: y - c,
        **_linear_constraints(lambda xs: xs[0], lambda xs: h, C, d),
    )


def logistic_regression(n: int = 8, samples: int = 40, seed: int = 2) -> Case:
    """min sum logistic(-b * (A y)) + rho/2 ||y||^2 + x^T y  s.t.  y <= u,  sum(y) == s."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((samples, n))
    b = np.sign(A @ rng.standard_normal(n) + 0.5 * rng.standard_normal(samples))
    rho, s = 0.1, 0.5
    u = np.full(n, 0.3)
    x, y = cp.Parameter(n), cp.Variable(n)
    loss = cp.sum(cp.logistic(-cp.multiply(b, A @ y))) + rho / 2 * cp.sum_squares(y) + x @ y
    inner = cp.Problem(cp.Minimize(loss), [y <= u, cp.sum(y) == s])
    x0 = 0.5 * rng.standard_normal(n)
    y_target = rng.standard_normal(n)
    problem = cbo.BilevelProblem(inner, [x], [y], outer=outer_torch(y_target, 1))

    def grad_g(yv, xs):
        z = -b * (A @ yv)
        return A.T @ (-b / (1 + np.exp(-z))) + rho * yv + xs[0]

    return Case(
        "logistic", problem, [x0], y_target, grad_g=grad_g,
        **_linear_constraints(lambda xs: np.eye(n), lambda xs: u, np.ones((1, n)), np.array([s])),
    )


def norm_ball(n: int = 6, seed: int = 3) -> Case:
    """min 1/2 ||y - c - x||^2  s.t.  ||y||_2 <= r: y* = r (c + x) / ||c + x|| when ||c + x|| > r."""
    rng = np.random.default_rng(seed)
    c = 2 * rng.standard_normal(n)
    x, r, y = cp.Parameter(n), cp.Parameter(), cp.Variable(n)
    inner = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - c - x)), [cp.norm(y, 2) <= r])
    y_target = rng.standard_normal(n)
    problem = cbo.BilevelProblem(inner, [x, r], [y], outer=outer_torch(y_target, 2))
    none = np.zeros((0, n))
    return Case(
        "norm_ball", problem, [0.3 * rng.standard_normal(n), np.array(1.0)], y_target,
        grad_g=lambda yv, xs: yv - c - xs[0],
        ineq=lambda yv, xs: np.array([np.linalg.norm(yv) - xs[1]]),
        ineq_jac=lambda yv, xs: (yv / np.linalg.norm(yv))[None, :],
        eq=lambda yv, xs: np.zeros(0),
        eq_jac=lambda yv, xs: none,
        data={"c": c},
    )


def non_dpp(n: int = 8, seed: int = 4) -> Case:
    """min sum exp(x_i) y_i^2 - c^T y  s.t.  y >= 0,  sum(y) == s  (not DPP: exp(x) multiplies a nonlinear term)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal(n) + 0.5
    s = 1.0
    x, y = cp.Parameter(n), cp.Variable(n)
    inner = cp.Problem(cp.Minimize(cp.sum(cp.multiply(cp.exp(x), cp.square(y))) - c @ y), [y >= 0, cp.sum(y) == s])
    assert not inner.is_dpp()
    y_target = rng.random(n) / n
    problem = cbo.BilevelProblem(inner, [x], [y], outer=outer_torch(y_target, 1))
    return Case(
        "non_dpp", problem, [0.5 * rng.standard_normal(n)], y_target,
        grad_g=lambda yv, xs: 2 * np.exp(xs[0]) * yv - c,
        **_linear_constraints(lambda xs: -np.eye(n), lambda xs: np.zeros(n), np.ones((1, n)), np.array([s])),
    )

