"""problems.qp_families: the closed-form optimum is right, and cbo.minimize reaches it.

References, none of which calls cbo:

* the designed x* (the point the data were built around) against
  :func:`closed_form_optimum`, which recomputes it from the data alone;
* cvxpy's inner solution at x*: the designed rows active with multipliers
  bounded away from 0, the others strictly inactive, y* and mu* as the closed form says;
* the analytic gradient H x + g0 on the designed region, and central finite
  differences of F through cvxpy elsewhere (each y* made exact by one KKT solve
  on the active set cvxpy finds).

Tolerance of the driver test: ||x - x*||_inf <= 1e-5 (absolute; |x*_i| is O(1)).
"""
from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import cbo
from problems import qp_families as qp

MEMBERS = [*qp.SMALL_FAMILY, qp.SMALL_BOUNDED]
IDS = [f"{'+'.join(m['enters'])}-bounds{m.get('outer_bounds', 0)}-seed{m['seed']}" for m in MEMBERS]
SOLVER_OPTIONS = {"solver": "CLARABEL", "tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12}


@pytest.fixture(scope="module", params=MEMBERS, ids=IDS)
def member(request):
    data = qp.make_qp(**request.param)
    return data, qp.build_from(data)


def cvxpy_solution(data: qp.QPData, x: np.ndarray):
    """y*, inequality and equality multipliers at x from a plain cvxpy solve."""
    inner, xp, y = qp.inner_problem(data)
    xp.value = x
    inner.solve(**SOLVER_OPTIONS)
    assert inner.status == cp.OPTIMAL, inner.status
    duals = {type(c).__name__: c.dual_value for c in inner.constraints}
    return y.value, duals.get("Inequality", np.zeros(0)), duals.get("Equality", np.zeros(0))


def exact_F(data: qp.QPData, x: np.ndarray) -> float:
    """F(x) with y* from cvxpy made exact by the equality-constrained KKT solve on cvxpy's active set."""
    y, mu, _ = cvxpy_solution(data, x)
    active = np.flatnonzero(mu > 1e-7)
    A_act = data.A[active]
    k, p = active.size, data.C.shape[0]
    K = np.block([[data.Q, A_act.T, data.C.T], [A_act, np.zeros((k, k + p))], [data.C, np.zeros((p, k + p))]])
    rhs = np.concatenate([data.c + data.B @ x, data.b[active] + data.E[active] @ x, data.d + data.D @ x])
    y_exact = np.linalg.solve(K, rhs)[: data.n]
    assert np.abs(y_exact - y).max() < 1e-6
    return 0.5 * np.sum((y_exact - data.y_target) ** 2) + 0.5 * data.reg * np.sum((x - data.x_ref) ** 2)


def test_closed_form_recovers_the_designed_optimum(member):
    data, instance = member
    ref = instance.reference
    np.testing.assert_allclose(ref["x_star"], data.x_design, atol=1e-10)
    assert ref["certificate_margin"] > 0
    assert np.all(ref["mu_active"] > 0.5)
    # outer KKT: zero gradient on free coordinates, the right sign on the bounds
    grad = ref["outer_grad"]
    free = np.setdiff1d(np.arange(data.n_x), np.concatenate([data.at_lower, data.at_upper]))
    assert np.abs(grad[free]).max() < 1e-10
    assert np.all(grad[data.at_lower] > 0) and np.all(grad[data.at_upper] < 0)


def test_cvxpy_at_x_star_has_the_designed_active_set(member):
    data, instance = member
    ref = instance.reference
    y, mu, nu = cvxpy_solution(data, ref["x_star"])
    np.testing.assert_allclose(y, ref["y_star"], atol=1e-7)
    np.testing.assert_allclose(mu[data.active], ref["mu_active"], atol=1e-6)
    np.testing.assert_allclose(nu, ref["nu"], atol=1e-6)
    slack = data.b + data.E @ ref["x_star"] - data.A @ y
    assert np.all(slack[data.inactive] > 0.1) and np.abs(mu[data.inactive]).max(initial=0) < 1e-8
    assert set(np.flatnonzero(mu > 1e-6)) == set(data.active)


def test_hypergrad_matches_analytic_gradient_and_finite_differences(member):
    data, instance = member
    ref, rng = instance.reference, np.random.default_rng(0)
    # near x*, inside the designed region: dF/dx = H x + g0 exactly
    x_near = ref["x_star"] + 0.01 * rng.standard_normal(data.n_x)
    w_c, W = qp.affine_solution_map(data)
    Y, y_c = W[: data.n], w_c[: data.n]
    analytic = Y.T @ (y_c + Y @ x_near - data.y_target) + data.reg * (x_near - data.x_ref)
    g = cbo.hypergrad(instance.problem, torch.as_tensor(x_near))
    np.testing.assert_allclose(g.numpy(), analytic, rtol=1e-9, atol=1e-11)
    # at the start x0 = 0 (another active set in general): central differences through cvxpy
    x0 = instance.x0.numpy()
    direction = rng.standard_normal(data.n_x)
    h = 1e-5
    fd = (exact_F(data, x0 + h * direction) - exact_F(data, x0 - h * direction)) / (2 * h)
    g0 = cbo.hypergrad(instance.problem, instance.x0).numpy()
    assert abs(g0 @ direction - fd) <= 1e-8 * max(1.0, abs(fd))


def test_minimize_reaches_the_closed_form_optimum(member):
    data, instance = member
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cbo.DegenerateKKTWarning)  # weakly active rows on the way
        result = instance.minimize(progress=False)
    assert result.converged, result.message
    assert instance.evaluate(result.x)["distance_inf"] <= 1e-5
    assert abs(result.fun - instance.reference["F_star"]) <= 1e-8


def test_minimize_names_the_step_and_x_where_the_inner_problem_is_infeasible():
    """More inequalities than unknowns, x in their right-hand side: at x = (0, 100) no y is feasible."""
    data = qp.make_qp(n=3, n_x=2, n_active=1, n_inactive=4, n_eq=1, enters=("ineq_rhs",), seed=0)
    instance = qp.build_from(data)
    with pytest.raises(cbo.InnerSolveError, match=r"(?s)step 0.*100"):
        cbo.minimize(instance.problem, torch.tensor([0.0, 100.0], dtype=torch.float64), progress=False)


def test_build_sizes_and_bad_input():
    small = qp.build("small")
    assert small.problem.parameters[0].shape == (5,) and small.reference["certificate_margin"] > 0
    with pytest.raises(ValueError, match="size"):
        qp.build("medium")
    with pytest.raises(ValueError, match="enters"):
        qp.make_qp(enters=("objective",))
    with pytest.raises(ValueError, match="LICQ"):
        qp.make_qp(n=4, n_active=3, n_eq=2)
    with pytest.raises(ValueError, match="certificate"):
        qp.make_qp(target_offset=50.0)
