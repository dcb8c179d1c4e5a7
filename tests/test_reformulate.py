"""Epigraph reformulation of piecewise-linear atoms (cbo.reformulate): same optimum, labelled
constraints, hypergradients on lasso, L1-logistic regression and a hinge-loss SVM."""
from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch

import cbo
from cbo.reformulate import epigraph_reformulation
from conic_cases import (CVXPY_OPTIONS, directional, finite_difference_cvxpy, finite_difference_polished,
                         l1_logistic, lasso, svm, symmetric_direction)

RTOL = 1e-6
y = cp.Variable(4)
Y = cp.Variable((3, 4))
c = np.array([1.0, -2.0, 0.3, 0.7])
C = np.arange(12.0).reshape(3, 4) / 5 - 1

REWRITTEN = {
    "abs": (cp.sum(cp.abs(y - 1)), y),
    "pos": (cp.sum(cp.pos(y)), y),
    "neg": (cp.sum(cp.neg(y)), y),
    "maximum": (cp.sum(cp.maximum(y, -y + 1, 0.5)), y),
    "max": (cp.max(y), y),
    "max_axis": (cp.sum(cp.max(Y, axis=0)) + cp.sum(cp.max(Y, axis=1, keepdims=True)), Y),
    "norm1_axis": (cp.sum(cp.norm1(Y - C, axis=1)), Y),
    "norm_inf": (cp.norm_inf(y - 1) + cp.sum(cp.norm_inf(Y, axis=0)), Y),
    "min_concave": (-cp.min(y) - cp.sum(cp.minimum(y, 0.2)), y),
    "nested": (cp.sum(cp.pos(cp.abs(y) - 0.5)) + cp.norm1(cp.maximum(y, 0)), y),
}


@pytest.mark.parametrize("name", REWRITTEN)
def test_rewrite_keeps_the_optimum(name):
    """The reformulated problem is smooth and has the original's optimal value and solution."""
    atom, var = REWRITTEN[name]
    target = np.linspace(-1, 1, var.size).reshape(var.shape)
    problem = cp.Problem(cp.Minimize(0.7 * cp.sum_squares(var - target) + atom), [cp.sum(var) <= 1])
    reformulation = epigraph_reformulation(problem)
    assert reformulation.changed and reformulation.problem.is_dcp()
    problem.solve(**CVXPY_OPTIONS)
    expected_value, expected = problem.value, var.value.copy()
    reformulation.problem.solve(**CVXPY_OPTIONS)
    assert reformulation.problem.value == pytest.approx(expected_value, abs=1e-7)
    np.testing.assert_allclose(var.value, expected, atol=1e-6)


def test_rewrite_in_constraints_and_maximize():
    """Atoms on the small side of <=, in NonNeg, and a concave atom in a maximisation."""
    x = cp.Parameter(4, value=c)
    problem = cp.Problem(cp.Maximize(cp.min(y) - cp.sum_squares(y - x)),
                         [cp.norm1(y) <= 3, cp.abs(y[0]) <= 0.5, cp.constraints.NonNeg(2 - cp.max(y))])
    bilevel = cbo.BilevelProblem(problem, [x])
    assert bilevel.route == "smooth"
    assert set(bilevel.reformulation.atoms) == {"min", "norm1", "abs", "max"}
    problem.solve(**CVXPY_OPTIONS)
    expected = y.value.copy()
    bilevel.inner.solve(**CVXPY_OPTIONS)
    np.testing.assert_allclose(y.value, expected, atol=1e-6)


def test_nothing_to_rewrite_returns_the_problem():
    problem = cp.Problem(cp.Minimize(cp.sum_squares(y - c)), [cp.sum(y) == 1])
    reformulation = epigraph_reformulation(problem)
    assert reformulation.problem is problem and not reformulation.changed


def test_non_monotone_atom_in_non_dpp_problem_goes_conic():
    """abs(x) * y: abs sits where neither sign is known and the problem is not DPP: the conic route,
    re-canonicalized at each x. y* = -|x|/2, so F = sum(y*) has dF/dx = -sign(x)/2."""
    x, y_ = cp.Parameter(4), cp.Variable(4)
    problem = cbo.BilevelProblem(cp.Problem(cp.Minimize(cp.sum_squares(y_) + cp.abs(x) @ y_)), [x], [y_],
                                 outer=lambda x, y: y.sum())
    assert problem.route == "conic" and "abs" in problem.route_reason
    x0 = torch.tensor([1.0, -2.0, 0.5, -0.3], dtype=torch.float64)
    torch.testing.assert_close(cbo.hypergrad(problem, x0), -torch.sign(x0) / 2, atol=1e-7, rtol=0)


def test_labels_name_the_atom_and_users_y_excludes_epigraph_variables():
    case = lasso()
    g, info = cbo.hypergrad(case.problem, case.x_tensors, return_info=True)
    assert info.route == "smooth after epigraph reformulation of norm1"
    assert [t.shape for t in info.y] == [torch.Size([5])]
    names = case.problem.describe_entries(info.active_set.active)
    assert "epigraph of norm1(var" in names and "in the objective" in names
    # t_i = |y_i|: one of the rows +-y_i <= t_i is active where y_i != 0, both at a kink y_i = 0
    nonzero = int((np.abs(info.y[0].numpy()) > 1e-8).sum())
    assert len(info.active_set.active) == nonzero + 2 * (5 - nonzero)


def test_lasso_matches_closed_form():
    """y_S = (A_S^T A_S)^{-1} (A_S^T b - lam s_S) on the support S with signs s_S, so
    dF/db = A_S G dF/dy_S and dF/dlam = -s_S^T G dF/dy_S with G = (A_S^T A_S)^{-1}."""
    case = lasso()
    A, (b, lam) = case.data["A"], case.x
    grad, info = cbo.hypergrad(case.problem, case.x_tensors, return_info=True)
    y_star = info.y[0].numpy()
    support = np.abs(y_star) > 1e-7
    A_S, signs = A[:, support], np.sign(y_star[support])
    G = np.linalg.inv(A_S.T @ A_S)
    np.testing.assert_allclose(y_star[support], G @ (A_S.T @ b - lam * signs), atol=1e-9)
    y_t = torch.tensor(y_star, requires_grad=True)
    (dF_dy,) = torch.autograd.grad(case.problem.outer(*case.x_tensors, y_t), y_t)
    dF_dy = dF_dy.numpy()[support]
    np.testing.assert_allclose(grad[0].numpy(), A_S @ G @ dF_dy, rtol=RTOL, atol=1e-10)
    np.testing.assert_allclose(float(grad[1]), -signs @ G @ dF_dy, rtol=RTOL)


@pytest.mark.parametrize("build", [lasso, l1_logistic, svm], ids=["lasso", "l1_logistic", "svm"])
def test_hypergrad_matches_finite_differences_and_the_conic_route(build):
    case = build()
    direction = symmetric_direction(case.problem)
    grad = cbo.hypergrad(case.problem, case.x_tensors)
    got = directional(grad, direction)
    assert got == pytest.approx(finite_difference_polished(case, direction), rel=RTOL)
    assert directional(cbo.hypergrad(case.problem, case.x_tensors, route="conic"), direction) == \
        pytest.approx(got, rel=RTOL)
    assert directional(cbo.hypergrad(case.twin, case.x_tensors), direction) == pytest.approx(got, rel=RTOL)
    # cvxpy alone, unpolished: limited by the solver's accuracy over h
    assert finite_difference_cvxpy(case, direction) == pytest.approx(got, rel=1e-4)


def test_layer_gradcheck_on_lasso():
    case = lasso(n=4, samples=8)
    layer = cbo.ArgminLayer(case.problem.reformulation.original, case.problem.parameters, case.problem.variables,
                            n_workers=1)
    assert layer.route == "smooth"
    inputs = [t.clone().requires_grad_(True) for t in case.x_tensors]
    assert torch.autograd.gradcheck(lambda b, lam: layer(b, lam)[0], inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
    layer.close()


@pytest.mark.parametrize("sign", ["nonneg", "nonpos"])
def test_sign_attributes_become_labelled_constraints_on_the_smooth_route(sign):
    """cp.Variable(n, nonneg=True) is differentiated on the smooth route with y >= 0 as an explicit
    constraint (cvxpy reports no multiplier for an attribute); the user's variable stays the interface."""
    n, s = 4, 1.0 if sign == "nonneg" else -1.0
    x, y = cp.Parameter(n), cp.Variable(n, **{sign: True})
    inner = cp.Problem(cp.Minimize(cp.sum_squares(y - x) + 0.1 * cp.sum_squares(y)), [cp.sum(y) == 2 * s])
    target = torch.tensor([2.0, -1.0, 0.5, 0.0], dtype=torch.float64) * s
    problem = cbo.BilevelProblem(inner, [x], [y], outer=lambda x, y: ((y - target) ** 2).sum())
    assert problem.route == "smooth" and "sign attributes" in problem.route_reason
    x0 = torch.tensor([1.5, -0.7, 0.9, -0.5], dtype=torch.float64) * s
    g, info = cbo.hypergrad(problem, x0, return_info=True)
    assert info.active_set.active.numel() >= 1  # the sign constraint binds on some entries
    assert sign in problem.constraint_label(int(info.active_set.active[0]))
    g_conic = cbo.hypergrad(problem, x0, route="conic")
    torch.testing.assert_close(g, g_conic, atol=1e-7, rtol=1e-6)
    (y_layer,) = cbo.ArgminLayer(inner, [x], [y], n_workers=1)(x0)
    torch.testing.assert_close(y_layer, info.y[0], atol=1e-8, rtol=0)
