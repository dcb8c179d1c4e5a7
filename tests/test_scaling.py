"""Badly scaled QPs: objectives, constraint rows, parameters and variables from 1e-6 to 1e6.

Each case is one QP written at unit scale and rescaled,

    min_y  1/2 y^T P y + (q + Q x)^T y   s.t.  G y <= h + R x,  C y == d,

with y = sigma * yh (``variables``), the objective times ``objective``,
constraint row i times ``rows[i]`` and x = ``parameter`` * xh: a change of
units. With F = 1/2 ||(y - y_target) / sigma||^2 (every variable weighed in
its own units) F(x) is the unit-scale problem's F(xh), so the hypergradient is
exactly the unit-scale one divided by ``parameter``, whatever the other
scales. The reference is that closed form, with the unit-scale gradient from a
dense numpy solve of the KKT system at the designed optimum (y0, mu0, nu0),
without cvxpy, cbo or torch:

    dF/dxh = -(dR/dxh)^T v,   [[P, A^T], [A, 0]] v = (dF/dyh, 0),   dR/dxh = (Q, -R_A, 0),

with A the active rows of G and C (all at unit scale).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import cvxpy as cp
import numpy as np
import pytest
import torch

import cbo
from builders import relative_error

IMPLICIT_METHODS = ["direct", "minres", "cg", "fixed_point", "neumann"]
N, M, P_EQ, K = 12, 6, 2, 3  # variables, inequalities (even rows active), equalities, parameters


@dataclass
class ScaledQP:
    problem: cbo.BilevelProblem
    x0: np.ndarray
    reference: np.ndarray


def scaled_qp(objective: float = 1.0, rows: np.ndarray | float = 1.0, variables: np.ndarray | float = 1.0,
              parameter: float = 1.0, placement: str = "linear", seed: int = 12) -> ScaledQP:
    """The unit-scale QP rescaled as in the module docstring; x in the linear term or in the rhs of G y <= h."""
    rng = np.random.default_rng(seed)
    sigma = np.broadcast_to(np.asarray(variables, dtype=float), (N,))
    rows = np.broadcast_to(np.asarray(rows, dtype=float), (M + P_EQ,))
    # the unit-scale problem (y = yh, x = xh) and its hypergradient
    Mh = rng.standard_normal((N, N))
    Ph = Mh.T @ Mh / N + 0.5 * np.eye(N)
    Gh, Ch = rng.standard_normal((M, N)), rng.standard_normal((P_EQ, N))
    yh0, nuh0, xh0 = rng.standard_normal(N), rng.standard_normal(P_EQ), rng.standard_normal(K)
    muh0 = np.where(np.arange(M) % 2 == 0, 1.0 + rng.random(M), 0.0)
    Qh = rng.standard_normal((N, K)) if placement == "linear" else np.zeros((N, K))
    Rh = rng.standard_normal((M, K)) if placement == "rhs" else np.zeros((M, K))
    hh = Gh @ yh0 + np.where(muh0 > 0, 0.0, 1.0 + rng.random(M)) - Rh @ xh0
    dh = Ch @ yh0
    qh = -(Ph @ yh0 + Qh @ xh0 + Gh.T @ muh0 + Ch.T @ nuh0)
    yh_target = rng.standard_normal(N)
    active = muh0 > 0
    A, R_A = np.vstack([Gh[active], Ch]), np.vstack([Rh[active], np.zeros((P_EQ, K))])
    v = np.linalg.solve(np.block([[Ph, A.T], [A, np.zeros((len(A), len(A)))]]),
                        np.concatenate([yh0 - yh_target, np.zeros(len(A))]))
    unit_gradient = -(Qh.T @ v[:N] - R_A.T @ v[N:])
    # change of units
    c_in, c_eq = rows[:M], rows[M:]
    P = objective * Ph / np.outer(sigma, sigma)
    q, Q = objective * qh / sigma, objective * Qh / sigma[:, None] / parameter
    G, h, R = c_in[:, None] * Gh / sigma, c_in * hh, c_in[:, None] * Rh / parameter
    C, d = c_eq[:, None] * Ch / sigma, c_eq * dh
    x, y = cp.Parameter(K), cp.Variable(N)
    inner = cp.Problem(cp.Minimize(0.5 * cp.quad_form(y, cp.psd_wrap(P)) + (q + Q @ x) @ y),
                       [G @ y <= h + R @ x, C @ y == d])
    target, weights = torch.as_tensor(sigma * yh_target), torch.as_tensor(1 / sigma ** 2)
    problem = cbo.BilevelProblem(inner, [x], [y], outer=lambda x, y: 0.5 * (weights * (y - target) ** 2).sum())
    return ScaledQP(problem, parameter * xh0, unit_gradient / parameter)


def assert_all_methods_match(case: ScaledQP, tol: float = 1e-6):
    """Every implicit method within ``tol`` (relative) of the reference, and no warning about the KKT point."""
    for method in IMPLICIT_METHODS:
        with warnings.catch_warnings():
            warnings.simplefilter("error", cbo.InaccurateSolutionWarning)
            warnings.simplefilter("error", cbo.DegenerateKKTWarning)
            grad, info = cbo.hypergrad(case.problem, torch.as_tensor(case.x0), method=method, warm_start=False,
                                       return_info=True)
        assert info.linear_solve.converged, method
        assert relative_error([grad.numpy()], [case.reference]) <= tol, method


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 0.1, 1.0, 10.0, 1e3, 1e6])
def test_objective_and_constraint_scales(scale):
    """Objective times s, constraint rows times 1/s (multipliers times s^2), x ~ s in the linear term."""
    assert_all_methods_match(scaled_qp(objective=scale, rows=1 / scale, parameter=scale))


@pytest.mark.parametrize("placement", ["linear", "rhs"])
@pytest.mark.parametrize("scale", [1e-6, 1e6])
def test_parameter_scales(scale, placement):
    """x ~ 1e-6 or 1e6 entering the linear term or the inequalities' right-hand side (gradient ~ 1 / scale)."""
    assert_all_methods_match(scaled_qp(parameter=scale, placement=placement))


def problem_scaled_with_x(scale: float) -> ScaledQP:
    """x ~ s, y* ~ s, multipliers ~ s: every datum of the QP scaled by s (q, x, h and d ~ s; P, G, C ~ 1)."""
    return scaled_qp(objective=scale ** 2, rows=scale, variables=scale, parameter=scale, placement="rhs")


@pytest.mark.parametrize("scale", [1e-6, 1e-5, 1e6])
def test_whole_problem_scales_with_x(scale):
    """At 1e-6 Clarabel's absolute tolerances (1e-10, and its regularization) exceed the problem's own
    scale and it returns a point with a wrong active set as "optimal"; the polish's active-set
    correction repairs it (before that correction, cbo could only warn)."""
    assert_all_methods_match(problem_scaled_with_x(scale))


def test_variables_and_constraint_rows_at_different_scales():
    """Variables from 1e-3 to 1e3 (Hessian entries over 12 orders of magnitude) and constraint rows
    from 1e-4 to 1e4: the equilibration balances each row and column of the KKT matrix."""
    rng = np.random.default_rng(0)
    variables = 10.0 ** rng.uniform(-3, 3, N)
    rows = 10.0 ** rng.uniform(-4, 4, M + P_EQ)
    assert_all_methods_match(scaled_qp(rows=rows, variables=variables))
