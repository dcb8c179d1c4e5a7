"""problems.portfolio: data, inner solution, hypergradient on the conic route, and the driver against search.

References independent of cbo:

* the inner solution from the reduced KKT system of the risk-budgeted problem,
  solved by Newton in numpy from cvxpy's solution: on the support S of w (the
  held assets), with the risk budget tight (r = ||L^T w|| = sigma),

      (mu_hat + delta)_S - rho w_S - lam (Sigma w)_S / r - nu = 0,   r = sigma,   1^T w_S = 1,

  and the bound multipliers of the assets not held, m_i = nu + lam (Sigma w)_i / r
  - (mu_hat + delta)_i, positive. Clarabel alone stops at "optimal_inaccurate"
  below tolerances of 1e-10 on this problem and its solutions are then only
  ~1e-8 accurate, which makes finite differences with h <= 1e-4 wrong by up to
  1e-2 (relative) at some points; the polished solutions are accurate to ~1e-15;
* central finite differences of F over that polished solution, F in numpy;
* scipy's SLSQP for the smallest long-only volatility;
* the sample moments of a long simulated series for the factor model.
"""
from functools import cache

import numpy as np
import pytest
import torch

import cbo
from problems import portfolio as pf

from builders import central_jacobian, relative_error

# The hypergradient against finite differences of the polished solution (measured: 1.4e-10 at both points).
GRAD_RTOL = 1e-7
# cvxpy's solution is ~1e-8 accurate: how far from the polished one it may be.
CVXPY_ATOL = 1e-6
# Strict complementarity margins required at a finite-difference point (the active set must not change).
MARGIN = 1e-4


@cache
def _instance():
    return pf.build("small", seed=0)


@cache
def _solved():
    instance = _instance()
    return instance.minimize(progress=False)


# ---------------------------------------------------------------- numpy reference

def _kkt_residual(z, support, target, Sigma, rho, sigma):
    """The reduced KKT residual at z = (w_S, lam, nu), and its Jacobian."""
    k = support.size
    w_s, lam, nu = z[:k], z[k], z[k + 1]
    Sigma_ss = Sigma[np.ix_(support, support)]
    g = Sigma_ss @ w_s
    r = np.sqrt(w_s @ g)
    residual = np.concatenate([target[support] - rho * w_s - lam * g / r - nu, [r - sigma], [w_s.sum() - 1]])
    jacobian = np.zeros((k + 2, k + 2))
    jacobian[:k, :k] = -rho * np.eye(k) - lam * (Sigma_ss / r - np.outer(g, g) / r ** 3)
    jacobian[:k, k], jacobian[:k, k + 1] = -g / r, -1.0
    jacobian[k, :k], jacobian[k + 1, :k] = g / r, 1.0
    return residual, jacobian


def _polished_solution(data, delta, sigma, w_cvxpy, support=None):
    """w*(delta, sigma) by Newton on the reduced KKT system, started from cvxpy's solution.

    Returns (w, lam, bound multipliers of the assets not held, support). The
    support is read from ``w_cvxpy`` unless given.
    """
    Sigma, rho = data["L"] @ data["L"].T, data["rho"]
    target = data["mu_hat"] + delta
    if support is None:
        support = np.flatnonzero(w_cvxpy > 1e-7)
    w_s = w_cvxpy[support]
    g = Sigma[np.ix_(support, support)] @ w_s
    lam, nu = np.linalg.lstsq(np.column_stack([g / np.sqrt(w_s @ g), np.ones(support.size)]),
                              target[support] - rho * w_s, rcond=None)[0]
    z = np.concatenate([w_s, [lam, nu]])
    for _ in range(20):
        residual, jacobian = _kkt_residual(z, support, target, Sigma, rho, sigma)
        if np.abs(residual).max() < 1e-14:
            break
        z = z - np.linalg.solve(jacobian, residual)
    assert np.abs(residual).max() < 1e-13, "Newton did not converge"
    w = np.zeros_like(w_cvxpy)
    w[support] = z[:support.size]
    lam, nu = z[support.size], z[support.size + 1]
    outside = np.setdiff1d(np.arange(w.size), support)
    bound_multipliers = nu + lam * (Sigma @ w)[outside] / np.sqrt(w @ Sigma @ w) - target[outside]
    return w, lam, bound_multipliers, support


def _validation_objective(data, delta, w):
    """F = -(mean - gamma/2 var of the validation returns) + tau/2 ||delta||^2."""
    returns = data["R_val"] @ w
    return -(returns.mean() - data["gamma"] / 2 * returns.var()) + data["tau"] / 2 * delta @ delta


def _reference_objective(instance, delta, sigma, support=None):
    w_cvxpy = pf.inner_weights(instance.problem, delta, sigma)
    w, *_ = _polished_solution(instance.data, delta, sigma, w_cvxpy, support)
    return _validation_objective(instance.data, delta, w)


# ---------------------------------------------------------------- data and problem

def test_factor_model_moments():
    """The simulated returns have the stated mean and covariance (sample moments of a long series)."""
    data = pf.factor_returns(5, 10, 10, 200_000, seed=3)
    R = data["R_test"]
    standard_error = np.sqrt(np.diag(data["Sigma"]) / R.shape[0])
    assert np.all(np.abs(R.mean(axis=0) - data["mu"]) < 5 * standard_error)
    np.testing.assert_allclose(np.cov(R, rowvar=False), data["Sigma"], rtol=0.03, atol=0.03 * data["Sigma"].max())
    assert {k: data[k].shape for k in ("R_train", "R_val")} == {"R_train": (10, 5), "R_val": (10, 5)}


def test_inner_problem_takes_the_conic_route():
    problem = _instance().problem
    assert problem.route == "conic"
    assert "SOC" in problem.route_reason
    assert problem.inner.is_dpp()  # compiled once, parameters enter the cone data affinely


def test_sigma_min_is_just_above_the_smallest_long_only_volatility():
    from scipy.optimize import minimize

    data = _instance().data
    Sigma = data["L"] @ data["L"].T
    n = Sigma.shape[0]
    result = minimize(lambda w: w @ Sigma @ w, np.full(n, 1 / n), jac=lambda w: 2 * Sigma @ w, method="SLSQP",
                      bounds=[(0, None)] * n, constraints=[dict(type="eq", fun=lambda w: w.sum() - 1)],
                      options=dict(ftol=1e-15, maxiter=1000))
    assert data["bounds"][0] == pytest.approx(1.05 * np.sqrt(result.fun), rel=1e-6)
    assert data["bounds"][1] == pytest.approx(np.sqrt(np.diag(Sigma)).max())


def test_inner_solution_matches_the_kkt_system():
    instance = _instance()
    data = instance.data
    rng = np.random.default_rng(4)
    lo, hi = data["bounds"]
    for delta, sigma in [(np.zeros(8), float(instance.x0[1])), (rng.uniform(-1, 1, 8), 0.5 * (lo + hi))]:
        w_cvxpy = pf.inner_weights(instance.problem, delta, sigma)
        w, lam, bound_multipliers, support = _polished_solution(data, delta, sigma, w_cvxpy)
        np.testing.assert_allclose(w_cvxpy, w, atol=CVXPY_ATOL)
        assert lam > MARGIN and np.all(bound_multipliers > MARGIN)  # a strict KKT point: the true solution
        assert 1 < support.size < 8  # some assets held, some at their bound
        assert np.linalg.norm(data["L"].T @ w) == pytest.approx(sigma, rel=1e-12)  # the budget binds


# ---------------------------------------------------------------- hypergradient

@pytest.mark.parametrize("point", ["start", "random"])
def test_hypergradient_matches_finite_differences(point):
    instance = _instance()
    data = instance.data
    if point == "start":
        delta, sigma = instance.x0[0].numpy(), float(instance.x0[1])
    else:
        lo, hi = data["bounds"]
        rng = np.random.default_rng(2)
        delta, sigma = rng.uniform(-1, 1, 8), float(rng.uniform(lo, 0.5 * (lo + hi)))
    x = [torch.tensor(delta), torch.tensor(sigma, dtype=torch.float64)]  # float64: torch.tensor(float) is float32
    grad, info = cbo.hypergrad(instance.problem, x, return_info=True)
    assert info.route.startswith("conic")
    soc = [cone for cone in info.cones if cone.label.startswith("SOC constraint 0")]
    assert len(soc) == 1 and soc[0].tight

    w_cvxpy = pf.inner_weights(instance.problem, delta, sigma)
    _, lam, bound_multipliers, support = _polished_solution(data, delta, sigma, w_cvxpy)
    assert lam > MARGIN and np.all(bound_multipliers > MARGIN)  # differentiable here: a fixed active set

    def objective(z):
        return np.array([_reference_objective(instance, z[:-1], z[-1], support)])

    fd = central_jacobian(objective, np.concatenate([delta, [sigma]]), h=1e-5)[0]
    got = np.concatenate([grad[0].numpy(), [float(grad[1])]])
    assert np.linalg.norm(fd) > 1e-2  # a non-trivial check
    assert np.all(np.isfinite(got))
    assert relative_error([got], [fd]) < GRAD_RTOL
    # The assets not held do not move with their own delta: dF/d delta_i = tau delta_i there.
    outside = np.setdiff1d(np.arange(8), support)
    np.testing.assert_allclose(got[outside], data["tau"] * delta[outside], atol=1e-10)


# ---------------------------------------------------------------- baselines and the driver

def test_baselines_match_an_independent_evaluation():
    instance = _instance()
    for name in ("grid", "random"):
        search = instance.reference[name]
        assert search["F"].size == instance.reference["budget"]
        delta, sigma = search["best_x"]
        assert search["best_F"] == pytest.approx(_reference_objective(instance, delta, sigma), rel=1e-6, abs=1e-7)
    assert np.all(instance.reference["grid"]["sigma"][[0, -1]] == instance.data["bounds"])


def test_driver_beats_grid_and_random_search():
    """With as many inner solves, the driver's final F is below the best of the grid and of the random search.

    No slack is needed: on this instance the margin is ~0.04 (10 % of |F|). Its
    F is checked against an independent evaluation at its final x, the risk
    budget binds there (cbo's cone report and numpy), and x is feasible.
    """
    instance, result = _instance(), _solved()
    reference = instance.reference
    assert len(result.history) <= reference["budget"]
    assert result.fun < reference["grid"]["best_F"]
    assert result.fun < reference["random"]["best_F"]
    delta, sigma = result.x[0].numpy(), float(result.x[1])
    assert result.fun == pytest.approx(_reference_objective(instance, delta, sigma), rel=1e-8)
    w = pf.inner_weights(instance.problem, delta, sigma)
    assert np.linalg.norm(instance.data["L"].T @ w) == pytest.approx(sigma, rel=1e-7)
    assert [c.tight for c in result.info.cones if c.label.startswith("SOC constraint 0")] == [True]
    lo, hi = instance.data["bounds"]
    assert lo - 1e-9 <= sigma <= hi + 1e-9
    assert np.abs(delta).max() <= instance.data["delta_bound"] + 1e-9


def test_bad_arguments():
    with pytest.raises(ValueError, match="Unknown size"):
        pf.build("huge")
    with pytest.raises(ValueError, match="rho"):
        pf.build(rho=0.0)
