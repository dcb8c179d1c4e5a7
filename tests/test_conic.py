"""The conic route (cbo.conic): SOCP, SDP and exponential-cone problems, route selection and
diagnostics, strict complementarity errors, and agreement with the smooth route."""
from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import cbo
from builders import random_qp
from cbo.conic import StrictComplementarityError
from conic_cases import (NonsmoothCase, cvxpy_solution, directional, entropy, finite_difference_cvxpy, finite_difference_polished,
                         geo_mean, power_cone, sdp, socp, symmetric_direction)

RTOL = 1e-6
CONE_CASES = [socp, sdp, entropy, power_cone]
CONE_IDS = ["socp", "sdp", "entropy", "power_cone"]


@pytest.mark.parametrize("build", CONE_CASES, ids=CONE_IDS)
def test_hypergrad_matches_finite_differences(build):
    case = build()
    direction = symmetric_direction(case.problem)
    grad, info = cbo.hypergrad(case.problem, case.x_tensors, return_info=True)
    assert info.route.startswith("conic: ")
    # the polished forward solution agrees with cvxpy's
    position = [v.id for v in case.problem.reformulation.original.variables()].index(case.problem.variables[0].id)
    np.testing.assert_allclose(info.y[position].numpy(), cvxpy_solution(case.problem, case.x), atol=1e-6)
    got = directional(grad, direction)
    assert got == pytest.approx(finite_difference_polished(case, direction), rel=RTOL)
    if build not in (entropy, power_cone):  # cvxpy's solutions on these cones are too coarse for differences
        assert finite_difference_cvxpy(case, direction) == pytest.approx(got, rel=1e-5)


@pytest.mark.parametrize("case", [lambda: socp(500), lambda: sdp(20)], ids=["socp_500", "sdp_20"])
def test_large_reduced_systems_match_finite_differences(case):
    """Reduced systems above the dense check's size take the Lanczos curvature check on the cone KKT operator
    (it has no user variables to name: it raised AttributeError before)."""
    case = case()
    direction = symmetric_direction(case.problem)
    grad = cbo.hypergrad(case.problem, case.x_tensors)
    assert directional(grad, direction) == pytest.approx(finite_difference_polished(case, direction), rel=RTOL)


@pytest.mark.parametrize("build", [socp, entropy], ids=["socp", "entropy"])
def test_cone_and_smooth_formulations_agree(build):
    """cp.SOC vs cp.norm(y, 2) <= t, cp.ExpCone vs cp.entr: conic route vs smooth Lagrangian route."""
    case = build()
    assert case.twin.route == "smooth"
    conic, smooth = cbo.hypergrad(case.problem, case.x_tensors), cbo.hypergrad(case.twin, case.x_tensors)
    for a, b in zip(conic, smooth):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=RTOL, atol=1e-10)


def test_both_routes_agree_on_a_qp():
    case = random_qp(8)
    default = cbo.hypergrad(case.problem, case.x_tensors)
    conic, info = cbo.hypergrad(case.problem, case.x_tensors, route="conic", return_info=True)
    assert info.route == "conic: requested"
    for a, b in zip(conic, default):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=RTOL, atol=1e-10)


def test_info_reports_cone_activity():
    case = socp()
    _, info = cbo.hypergrad(case.problem, case.x_tensors, return_info=True)
    assert info.route.startswith("conic: SOC constraint 0 has no smooth Lagrangian form")
    (user_soc,) = [c for c in info.cones if c.label.startswith("SOC constraint 0")]
    assert user_soc.tight and user_soc.detail == "on the boundary"
    (bound,) = [c for c in info.cones if c.label.startswith("Inequality constraint 1")]
    assert bound.kind == "nonneg" and bound.active == 1


def test_sdp_reports_rank():
    case = sdp()
    _, info = cbo.hypergrad(case.problem, case.x_tensors, return_info=True)
    (psd,) = [c for c in info.cones if c.kind == "psd"]
    X = info.y[0].numpy()
    assert psd.label.startswith("PSD constraint 0") and psd.rank == int((np.linalg.eigvalsh(X) > 1e-6).sum())
    assert psd.tight == (psd.rank < 3)


def test_strict_complementarity_failure_names_the_constraint():
    """min 1/2 ||y - a||^2 s.t. SOC(r, y) with ||a|| = r: y* = a on the cone's boundary with a zero
    multiplier; y*(a) = a inside the ball and r a / ||a|| outside, not differentiable here."""
    a, r, y = cp.Parameter(3), cp.Parameter(), cp.Variable(3)
    inner = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - a)), [cp.SOC(r, y)])
    problem = cbo.BilevelProblem(inner, [a, r], outer=lambda a, r, y: y.sum())
    with pytest.raises(StrictComplementarityError, match=r"SOC constraint 0 \(`SOC.*boundary"):
        cbo.hypergrad(problem, [torch.tensor([0.6, 0.8, 0.0], dtype=torch.float64), torch.tensor(1.0)])


@pytest.mark.parametrize("active", [True, False], ids=["active", "slack"])
def test_non_unique_canonicalization_variable_is_not_an_error(active):
    """A slack geo_mean constraint leaves cvxpy's hypograph variable free: the cone program's Jacobian is
    singular, but the user's solution and its derivative exist (the null space carries no sensitivity)."""
    case = geo_mean(active)
    direction = symmetric_direction(case.problem)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cbo.DegenerateKKTWarning)
        grad = cbo.hypergrad(case.problem, case.x_tensors)
    assert directional(grad, direction) == pytest.approx(finite_difference_cvxpy(case, direction, h=1e-5), rel=1e-5)


def test_non_unique_multiplier_is_an_error():
    """The same at r = 0: y* = 0 at the apex, and the SOC multiplier's t-part is not unique."""
    a, r, y = cp.Parameter(3), cp.Parameter(), cp.Variable(3)
    inner = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - a)), [cp.SOC(r, y)])
    problem = cbo.BilevelProblem(inner, [a, r], outer=lambda a, r, y: y.sum())
    with pytest.raises(StrictComplementarityError, match="singular"):
        cbo.hypergrad(problem, [torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), torch.tensor(0.0)])


def test_route_selection_errors():
    case = socp()
    with pytest.raises(cbo.ProblemDefinitionError, match="SOC constraint 0 has no smooth Lagrangian form"):
        cbo.hypergrad(case.problem, case.x_tensors, route="smooth")
    with pytest.raises(ValueError, match="Unknown route"):
        cbo.hypergrad(case.problem, case.x_tensors, route="cone")


def test_non_dpp_cone_problem_is_recanonicalized_per_x():
    """Radius exp(r) and a nonneg parameter at 0: not DPP, so the cone data's derivative comes from
    re-canonicalizing at x +- h (one-sided at the bound); checked against finite differences of F."""
    a, r, y = cp.Parameter(3, nonneg=True), cp.Parameter(), cp.Variable(3)
    inner = cp.Problem(cp.Minimize(cp.sum_squares(y - a)), [cp.SOC(cp.exp(r), y)])
    case = NonsmoothCase("non_dpp_socp", cbo.BilevelProblem(inner, [a, r], [y], outer=lambda a, r, y: 0.5 * (
        (y - torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)) ** 2).sum()), [np.array([1.0, 2.0, 0.0]),
                                                                                  np.array(0.1)])
    assert case.problem.route == "conic" and "not DPP" in case.problem.route_reason
    grad = cbo.hypergrad(case.problem, case.x_tensors)
    for direction in ([np.array([1.0, -0.5, 0.0]), np.array(0.0)], [np.zeros(3), np.array(1.0)]):
        assert directional(grad, direction) == pytest.approx(finite_difference_cvxpy(case, direction, h=1e-5), rel=1e-6)


@pytest.mark.parametrize("build", CONE_CASES, ids=CONE_IDS)
def test_layer_gradcheck(build):
    case = build()
    layer = cbo.ArgminLayer(case.problem.inner, case.problem.parameters, case.problem.variables, n_workers=1)
    assert layer.route == "conic"
    inputs = [t.clone().requires_grad_(True) for t in case.x_tensors]
    if build is sdp:  # gradcheck perturbs entries one at a time: pass the symmetric part
        function = lambda C: layer((C + C.T) / 2)[0]  # noqa: E731
    else:
        function = lambda *xs: layer(*xs)[0]  # noqa: E731
    assert torch.autograd.gradcheck(function, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
    _, info = layer(*case.x_tensors, return_info=True)
    assert info.route.startswith("conic: ") and len(info.cones) == 1


def test_layer_batch_matches_hypergrad():
    case = socp()
    layer = cbo.ArgminLayer(case.problem.inner, case.problem.parameters, case.problem.variables, n_workers=1)
    a = torch.stack([case.x_tensors[0], 0.5 * case.x_tensors[0]]).requires_grad_(True)
    r = case.x_tensors[1].clone().requires_grad_(True)
    (y,) = layer(a, r)
    loss = sum(case.problem.outer(a[b], r, y[b]) for b in range(2))
    ga, gr = torch.autograd.grad(loss, [a, r])
    for b in range(2):
        expected = cbo.hypergrad(case.problem, [a[b].detach(), r.detach()])
        np.testing.assert_allclose(ga[b].numpy(), expected[0].numpy(), rtol=RTOL, atol=1e-10)
    total = sum(float(cbo.hypergrad(case.problem, [a[b].detach(), r.detach()])[1]) for b in range(2))
    assert float(gr) == pytest.approx(total, rel=RTOL)
