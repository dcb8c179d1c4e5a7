"""Unrolled and penalty methods (cbo.unroll, cbo.approximate) against the implicit hypergradient,
closed forms, and an explicit implementation of the LDS-GNN recursion (Franceschi et al. 2019, appendix)."""
import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian

import cbo
from builders import random_qp, relative_error


def flat(grads):
    return np.concatenate([np.ravel(g.detach().numpy()) for g in grads])


@pytest.fixture(scope="module")
def qp():
    case = random_qp(8, seed=3)
    return case, cbo.hypergrad(case.problem, case.x_tensors, method="direct")


# ---------------------------------------------------------------- a ridge-regression map (functional API)

@pytest.fixture(scope="module")
def ridge():
    """Phi(w, lam) = w - a (X^T (X w - y) + exp(lam) * w): a gradient step of a ridge problem."""
    torch.manual_seed(0)
    X, y = torch.randn(25, 6, dtype=torch.float64), torch.randn(25, dtype=torch.float64)
    Xv, yv = torch.randn(25, 6, dtype=torch.float64), torch.randn(25, dtype=torch.float64)
    lam = torch.full((6,), -0.5, dtype=torch.float64)
    a = 1.0 / float(torch.linalg.eigvalsh(X.T @ X).max() + 1)

    def phi(w, params):
        return w - a * (X.T @ (X @ w - y) + torch.exp(params[0]) * w)

    def outer(w, params):
        return 0.5 * ((Xv @ w - yv) ** 2).sum() + 0.01 * (params[0] ** 2).sum()

    H = X.T @ X + torch.diag(torch.exp(lam))
    w_star = torch.linalg.solve(H, X.T @ y)
    v = torch.linalg.solve(H, Xv.T @ (Xv @ w_star - yv))
    exact = 0.02 * lam - torch.exp(lam) * w_star * v  # d_lam E - (d_lam grad g)^T H^{-1} d_w E
    return phi, outer, lam, w_star, exact


@pytest.mark.parametrize("method, kwargs", [
    ("fixed_point", {}), ("cg", {}), ("neumann", {"steps": 3000}),
    ("reverse", {"steps": 3000}), ("forward", {"steps": 3000}), ("truncated", {"steps": 3000, "truncate": 3000}),
])
def test_functional_routes_match_closed_form(ridge, method, kwargs):
    phi, outer, lam, w_star, exact = ridge
    (g,) = cbo.fixed_point_hypergrad(phi, w_star, [lam], outer, method, **kwargs)
    assert float((g - exact).norm() / exact.norm()) <= 1e-8


def test_lds_gnn_recursion_equals_truncated_reverse(ridge):
    """Seed 000: P_T = F_w, G_T = F_theta; P_{t-1} = P_t D_{t-1}, G_{t-1} = P_t E_{t-1} + G_t,
    with explicit Jacobians D = dPhi/dw and E = dPhi/dtheta along the trajectory; after tau
    steps back the gradient is G_{T-tau} (the start of the window treated as constant)."""
    phi, outer, lam, _, _ = ridge
    T, tau = 30, 7
    w0 = torch.zeros(6, dtype=torch.float64)
    trajectory = [w0]
    for _ in range(T):
        trajectory.append(phi(trajectory[-1], [lam]))
    w_T = trajectory[-1].clone().requires_grad_(True)
    theta = lam.clone().requires_grad_(True)
    P, G = torch.autograd.grad(outer(w_T, [theta]), [w_T, theta])
    for t in range(T, T - tau, -1):
        D = jacobian(lambda w: phi(w, [lam]), trajectory[t - 1])
        E = jacobian(lambda th: phi(trajectory[t - 1], [th]), lam)
        P, G = P @ D, P @ E + G
    (truncated,) = cbo.fixed_point_hypergrad(phi, None, [lam], outer, "truncated", steps=T, truncate=tau, w0=w0)
    assert torch.allclose(truncated, G, rtol=1e-12, atol=1e-14)


def test_forward_equals_reverse_off_the_fixed_point(ridge):
    phi, outer, lam, _, _ = ridge
    w0 = torch.ones(6, dtype=torch.float64)
    (reverse,) = cbo.fixed_point_hypergrad(phi, None, [lam], outer, "reverse", steps=40, w0=w0)
    (forward,) = cbo.fixed_point_hypergrad(phi, None, [lam], outer, "forward", steps=40, w0=w0)
    assert float((forward - reverse).norm() / reverse.norm()) <= 1e-10


# ---------------------------------------------------------------- routes on a constrained QP

def test_reverse_mode_converges_to_implicit_hypergradient(qp):
    case, reference = qp
    grads, info = cbo.hypergrad(case.problem, case.x_tensors, method="reverse", steps=1500, return_info=True)
    assert 0 < info.linear_solve.extra["contraction_factor"] < 1
    assert relative_error(flat(grads), flat(reference)) <= 1e-6


def test_forward_mode_equals_reverse_mode(qp):
    case, _ = qp
    reverse = cbo.hypergrad(case.problem, case.x_tensors, method="reverse", steps=200)
    forward = cbo.hypergrad(case.problem, case.x_tensors, method="forward", steps=200)
    assert relative_error(flat(forward), flat(reverse)) <= 1e-10


def test_truncated_error_decays_geometrically(qp):
    case, reference = qp
    truncations = [20, 40, 80, 160]
    errors = []
    for K in truncations:
        grads, info = cbo.hypergrad(case.problem, case.x_tensors, method="truncated", steps=400, truncate=K,
                                    return_info=True)
        errors.append(relative_error(flat(grads), flat(reference)))
    slope = np.polyfit(truncations, np.log(errors), 1)[0]
    rate = float(np.exp(slope))
    assert rate < 1 and all(b < a for a, b in zip(errors, errors[1:]))
    # The fitted rate is the map's contraction factor.
    assert abs(rate - info.linear_solve.extra["contraction_factor"]) < 0.02


@pytest.mark.parametrize("method", ["penalty", "augmented_lagrangian"])
def test_penalty_error_decreases_monotonically(qp, method):
    case, reference = qp
    errors = [relative_error(flat(cbo.hypergrad(case.problem, case.x_tensors, method=method, penalty=rho)),
                             flat(reference)) for rho in [1e1, 1e2, 1e3, 1e4]]
    assert all(b < a for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-3


def test_truncate_must_be_within_steps(qp):
    case, _ = qp
    with pytest.raises(ValueError, match="truncate must be between 1 and steps"):
        cbo.hypergrad(case.problem, case.x_tensors, method="truncated", steps=10, truncate=20)


def test_unknown_route_lists_methods():
    with pytest.raises(ValueError, match="reverse"):
        cbo.fixed_point_hypergrad(lambda w, p: w, torch.zeros(2), [torch.zeros(1)], lambda w, p: w.sum(), "rmd")
