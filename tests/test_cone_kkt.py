"""The conic route's KKT system reduced to the active part of each cone (cbo.cone_kkt): every adjoint
solver against finite differences and against the dense residual-map Jacobian (a different
formulation), the PSD curvature term against second differences, batching in the layer, errors."""
from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import cbo
from cbo.cone_kkt import _psd_piece
from cbo.cones import _boundary_projection_derivative, _in_pow_dual, _pow_boundary, _pow_project, in_pow_cone, \
    projection_jacobian, smat, svec
from conic_cases import (NonsmoothCase, _pair, directional, entropy, finite_difference_polished, l1_logistic, lasso,
                         power_cone, sdp, socp, svm, symmetric_direction)

METHODS = ["direct", "minres", "cg", "fixed_point", "neumann"]
CASES = {"socp": socp, "sdp": sdp, "entropy": entropy, "power_cone": power_cone, "lasso": lasso,
         "l1_logistic": l1_logistic, "svm": svm}
_REFERENCES: dict[str, tuple[NonsmoothCase, list, float]] = {}


def reference(name: str) -> tuple[NonsmoothCase, list, float]:
    """(case, direction, central difference of F along it through the polished cone program), built once."""
    if name not in _REFERENCES:
        case = CASES[name]()
        direction = symmetric_direction(case.problem)
        _REFERENCES[name] = case, direction, finite_difference_polished(case, direction)
    return _REFERENCES[name]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(CASES))
def test_every_adjoint_method_matches_finite_differences(name, method):
    """lasso, L1-logistic and the SVM have a smooth route too: forced onto the conic one here."""
    case, direction, expected = reference(name)
    grad, info = cbo.hypergrad(case.problem, case.x_tensors, method=method, route="conic", return_info=True)
    assert info.method == method and info.linear_solve.method == method and info.linear_solve.converged
    assert info.linear_solve.residual <= 1e-8
    assert directional(grad, direction) == pytest.approx(expected, rel=1e-6)


def residual_map_gradients(program, point, grad_y) -> list[np.ndarray]:
    r"""The reference: the adjoint of the full residual map N(z, v) = (c + A^T Pi(v), A z + Pi(v) - v - b),
    J^T w = (dz, 0) with J = [[0, A^T D], [A, D - I]], solved densely (Busseti et al. 2019)."""
    A = point.A.toarray()
    m, n = A.shape
    D = projection_jacobian(point.y - point.s, point.y, program.blocks)
    J = np.block([[np.zeros((n, n)), A.T @ D], [A, D - np.eye(m)]])
    w = np.linalg.solve(J.T, np.concatenate([program._variable_adjoint(grad_y), np.zeros(m)]))
    return program._parameter_gradients(point, w)


@pytest.mark.parametrize("name", list(CASES))
def test_reduced_system_matches_the_full_residual_map(name):
    case = CASES[name]()
    program = cbo.compiled.compiled(case.problem).conic
    point = program.solve(case.x)
    rng = np.random.default_rng(0)
    grad_y = [rng.standard_normal(v.size) for v in case.problem.all_variables]
    (reduced,), info = program.vjp([point], [grad_y], "direct")
    assert sum(info.extra["active_pieces"][0].values()) < point.y.size  # inactive rows were dropped
    for got, want in zip(reduced, residual_map_gradients(program, point, grad_y)):
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10 * max(1.0, np.abs(want).max()))


def test_psd_piece_is_the_schur_complement_to_second_order():
    r"""G and C of a PSD block of rank 2 of 4 against differences of g(S) = -E(S), E the Schur complement
    V^T S V - V^T S U (U^T S U)^{-1} U^T S V: first derivative -<E_ab, V^T dS V>, second <dS, C dS>."""
    rng = np.random.default_rng(3)
    Q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    U, V = Q[:, :2], Q[:, 2:]
    S = U @ np.diag([2.0, 0.7]) @ U.T
    M = np.array([[1.0, 0.3], [0.3, 0.8]])
    Y = V @ M @ V.T
    piece = _psd_piece(svec(S), svec(Y))
    gradient, multipliers = piece.gradient, piece.multipliers
    curvature = piece.factor @ np.diag(piece.weights) @ piece.factor.T
    def lagrangian_term(s):  # -<M, E(S)> = <M, g(S)>: the piece's term of the Lagrangian
        T = smat(s)
        E = V.T @ T @ V - V.T @ T @ U @ np.linalg.solve(U.T @ T @ U, U.T @ T @ V)
        return -np.sum(M * E)

    ds = rng.standard_normal(svec(S).size)  # a symmetric direction dS = smat(ds)
    eps = 1e-4
    second = (lagrangian_term(svec(S) + eps * ds) - 2 * lagrangian_term(svec(S))
              + lagrangian_term(svec(S) - eps * ds)) / eps ** 2
    first = (lagrangian_term(svec(S) + eps * ds) - lagrangian_term(svec(S) - eps * ds)) / (2 * eps)
    assert ds @ curvature @ ds == pytest.approx(second, rel=1e-5)
    assert multipliers @ gradient @ ds == pytest.approx(first, rel=1e-7)  # <M, dg> with M in the same basis
    np.testing.assert_allclose(-gradient.T @ multipliers, svec(Y), atol=1e-12)  # y = -G^T mu


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.8])
def test_power_cone_projection(alpha):
    """Moreau: p = Pi_K(w) in K, p - w in K^*, <p, p - w> = 0; and dPi_K against central differences."""
    rng = np.random.default_rng(int(10 * alpha))
    for w in rng.standard_normal((20, 3)) * 2:
        p = _pow_project(w, alpha)
        assert in_pow_cone(p + np.array([1e-12, 1e-12, 0]), alpha) and _in_pow_dual(p - w + 1e-12, alpha)
        assert abs(p @ (p - w)) <= 1e-10 * max(1.0, w @ w)
        D = _boundary_projection_derivative(w, p, _pow_boundary(alpha))
        eps = 1e-6
        columns = [(_pow_project(w + eps * e, alpha) - _pow_project(w - eps * e, alpha)) / (2 * eps) for e in np.eye(3)]
        np.testing.assert_allclose(D, np.stack(columns, axis=1), atol=1e-6)


def test_power_cone_and_geo_mean_formulations_agree():
    """cp.PowCone3D against the same bound by cp.geo_mean, which cvxpy writes with second-order cones."""
    case = power_cone()
    grad, info = cbo.hypergrad(case.problem, case.x_tensors, return_info=True)
    (pow_status,) = [c for c in info.cones if c.kind == "pow"]
    assert pow_status.tight and info.linear_solve.extra["active_pieces"][0]["pow"] == 1
    for a, b in zip(grad, cbo.hypergrad(case.twin, case.x_tensors)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-7, atol=1e-10)


def _larger_sdp(n: int, seed: int) -> NonsmoothCase:
    rng = np.random.default_rng(seed)
    C, X = cp.Parameter((n, n), symmetric=True), cp.Variable((n, n), symmetric=True)
    B = rng.standard_normal((n, n))
    problem = cp.Problem(cp.Minimize(cp.trace(C @ X) + 0.1 * cp.sum_squares(X)), [X >> 0, cp.trace(X) == 1])
    case = _pair("sdp_large", lambda variant: (problem, X) if variant == "main" else None, [C], [(B + B.T) / 2],
                 rng.standard_normal((n, n)))
    return case


@pytest.mark.parametrize("n, seed", [(5, 0), (6, 1)])
def test_sdp_with_a_rank_deficient_solution(n, seed):
    """PSD solutions of rank strictly between 0 and n: the curvature term Y dS S^+ + S^+ dS Y matters."""
    case = _larger_sdp(n, seed)
    direction = symmetric_direction(case.problem)
    grad, info = cbo.hypergrad(case.problem, case.x_tensors, method="cg", return_info=True)
    (psd,) = [c for c in info.cones if c.kind == "psd"]
    assert 0 < psd.rank < n
    assert info.linear_solve.extra["active_pieces"][0]["psd"] == (n - psd.rank) * (n - psd.rank + 1) // 2
    assert directional(grad, direction) == pytest.approx(finite_difference_polished(case, direction), rel=1e-6)


@pytest.mark.parametrize("method", ["minres", "cg"])
def test_layer_solves_the_batch_at_once(method):
    case = socp()
    layer = cbo.ArgminLayer(case.problem.inner, case.problem.parameters, case.problem.variables, method=method,
                            n_workers=1)
    a = torch.stack([case.x_tensors[0], 0.5 * case.x_tensors[0], -case.x_tensors[0]]).requires_grad_(True)
    r = case.x_tensors[1]
    (y,), info = layer(a, r, return_info=True)
    (ga,) = torch.autograd.grad(y.sum(), [a])
    assert info.linear_solve.method == method and info.linear_solve.converged
    assert len(info.linear_solve.extra["active_pieces"]) == 3
    for b in range(3):
        problem = cbo.BilevelProblem(case.problem.inner, case.problem.parameters, case.problem.variables,
                                     outer=lambda a, r, y: y.sum())
        expected = cbo.hypergrad(problem, [a[b].detach(), r], method="direct")[0]
        np.testing.assert_allclose(ga[b].numpy(), expected.numpy(), rtol=1e-7, atol=1e-10)


def test_conic_route_refuses_the_smooth_routes_methods():
    case = socp()
    with pytest.raises(ValueError, match="conic route takes the adjoint solvers"):
        cbo.hypergrad(case.problem, case.x_tensors, method="reverse")


def test_nonconvergence_raises_or_warns():
    case = l1_logistic()
    with pytest.raises(cbo.ConvergenceError, match="did not converge"):
        cbo.hypergrad(case.problem, case.x_tensors, method="minres", maxiter=2, route="conic")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cbo.hypergrad(case.problem, case.x_tensors, method="minres", maxiter=2, route="conic",
                      on_nonconvergence="warn")
    assert any(issubclass(w.category, cbo.ConvergenceWarning) for w in caught)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_adjoint_runs_on_the_inputs_device():
    case = sdp()
    cpu = cbo.hypergrad(case.problem, case.x_tensors)
    gpu, info = cbo.hypergrad(case.problem, [t.cuda() for t in case.x_tensors], return_info=True)
    assert gpu.device.type == "cuda"
    np.testing.assert_allclose(gpu.cpu().numpy(), cpu.numpy(), rtol=1e-9, atol=1e-12)


def test_n_dimensional_power_cone_is_refused_with_a_rewrite():
    y, a, t = cp.Variable(3), cp.Parameter(3), cp.Variable()
    inner = cp.Problem(cp.Minimize(cp.sum_squares(y - a) - t), [cp.PowConeND(y, t, np.array([0.2, 0.3, 0.5]))])
    problem = cbo.BilevelProblem(inner, [a], [y], outer=lambda a, y: y.sum())
    with pytest.raises(cbo.ProblemDefinitionError, match="PowConeND cone.*chain of cp.PowCone3D"):
        cbo.hypergrad(problem, torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("name", ["socp", "sdp", "entropy", "power_cone", "l1_logistic", "svm"])
def test_polish_on_the_reduced_system_alone(name, monkeypatch):
    """Newton on the reduced conditions brings Clarabel's solution to ||N||_inf ~ 1e-15 without the full
    residual-map Jacobian; with the reduced step failing, the full one still does (the fallback)."""
    case = CASES[name]()
    program = cbo.compiled.compiled(case.problem).conic

    def unavailable(*args):
        raise np.linalg.LinAlgError("disabled in this test")

    for disabled in ("_full_step", "_reduced_step"):
        with monkeypatch.context() as patch:
            patch.setattr(type(program), disabled, unavailable)
            point = program.solve(case.x)
        assert point.polish_steps >= 1
        assert point.residual_after <= 1e-13 * max(1.0, np.abs(point.z).max(), np.abs(point.y).max())


@pytest.mark.parametrize("gap", [3e-4, 1e-7])
def test_nearly_weakly_active_cone_warns_and_differentiates(gap):
    """Projection of a = (3, 4) onto the disk of radius r < 5: y* = a r / 5, F = sum(y*), dF/dr = 7/5. Near
    r = 5 the SOC multiplier is ~gap: tiny but positive, so the derivative exists (a warning, not an error);
    at r = 5 it is zero (an error, naming the constraint)."""
    a, r, y = np.array([3.0, 4.0]), cp.Parameter(), cp.Variable(2)
    inner = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - a)), [cp.SOC(r, y)])
    problem = cbo.BilevelProblem(inner, [r], [y], outer=lambda r, y: y.sum())
    with pytest.warns(cbo.DegenerateKKTWarning, match="Nearly weakly active cone constraint.*SOC constraint 0"):
        grad = cbo.hypergrad(problem, torch.tensor(5.0 - gap, dtype=torch.float64))
    assert float(grad) == pytest.approx(1.4, rel=1e-9)
    with pytest.raises(cbo.StrictComplementarityError, match="SOC constraint 0.*multiplier has size"):
        cbo.hypergrad(problem, torch.tensor(5.0, dtype=torch.float64))
