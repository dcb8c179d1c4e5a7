r"""Decision-focused portfolio hyperparameters: return adjustments and a risk budget, on the conic route.

Monthly-style asset returns (in percent per period) are simulated from a
factor model and split in time into a short training window, a longer
validation period and a long test period. A risk-budgeted mean-variance model
turns the training estimates into long-only weights:

.. math::

    w^*(\delta, \sigma) = \operatorname*{argmax}_{w} \; (\hat\mu + \delta)^\top w - \tfrac{\rho}{2}\lVert w\rVert^2
    \quad \text{s.t.} \quad \lVert L^\top w\rVert_2 \le \sigma \;\; (\texttt{cp.SOC}),
    \quad \mathbf 1^\top w = 1, \quad w \ge 0,

with :math:`\hat\mu` the training mean, :math:`L` the Cholesky factor of the
training covariance (so :math:`\lVert L^\top w\rVert` is the training
volatility of the portfolio) and :math:`\rho` a small diversification term
that keeps :math:`w^*` unique. The risk budget is an explicit second-order
cone constraint, so cbo takes its conic route (``problem.route == "conic"``).

The outer variables are :math:`x = (\delta, \sigma)`: one additive correction
per estimated mean (the sample mean of a 60-period window is mostly noise) and
the risk budget. They are chosen for the decision they produce, not for the
accuracy of the estimates ("decision-focused"): the outer objective is the
investor's mean-variance utility of :math:`w^*` realized on the validation
period, minus a ridge penalty on the corrections,

.. math::

    \min_{\delta, \sigma} \; F = -\Big(\overline{r_v^\top w^*} - \tfrac{\gamma}{2}\,
    \operatorname{var}(r_v^\top w^*)\Big) + \tfrac{\tau}{2}\lVert\delta\rVert^2
    \quad \text{s.t.} \quad \lvert\delta_i\rvert \le b, \quad \sigma_{\min} \le \sigma \le \sigma_{\max},

(mean and population variance over the validation periods; the utility is a
certainty-equivalent return in percent per period). :math:`\sigma_{\min}` is
5 % above the smallest long-only training volatility, below which the inner
problem is infeasible; :math:`\sigma_{\max}` is the largest single-asset
training volatility, above which the budget cannot bind.

Choices that keep the risk budget binding. At the sigma where the budget
stops binding (the volatility the model would take without it) the SOC is
weakly active: w* has a kink there and dF/dsigma = 0 beyond it. cbo warns
(:class:`cbo.DegenerateKKTWarning`, "nearly weakly active") within about
1e-4 relative of that point and raises :class:`cbo.StrictComplementarityError`
on it, so the task is set up to stay away from it:

* the outer objective is a utility, not the mean validation return: with
  gamma = 0, in 2 of 3 seeds of the large task the driver pushes sigma up
  until the budget stops binding, after which sigma no longer acts;
* rho is small (0.1): the model without the budget then concentrates on a
  few assets, riskier than the budgets the driver visits; with rho = 0.5 or 2
  the corrections delta walk the model onto the kink in some seeds (before
  cbo told a small multiplier from a zero one, that stopped the run). With the
  defaults the budget is tight at every final iterate of 80 runs (seeds 0-29
  small with 40 and 60 steps, 0-19 large);
* the start sigma0 is halfway between sigma_min and the volatility the
  model takes without the budget at delta = 0.

Hypergradient structure: an asset at :math:`w_i^* = 0` (its bound active)
does not move with its own :math:`\delta_i`, so :math:`\partial F/\partial\delta_i
= \tau\delta_i`: the driver can only enter an asset through the prices
(multipliers) that the held ones move, and it never corrects an asset that
none of its iterates holds. It stops at a stationary point that depends on the
start. With the defaults, its final F is below the best of the grid in 29 of
30 small and 19 of 20 large seeds, and below the best of the random search
in 27 of 30 and 19 of 20; the misses are such stationary points. Where it is
held, the learned correction tracks the true estimation error mu - mu_hat
(correlation 0.72-0.78 on the large task, seeds 0-2).

**Baselines** (``reference``), each with ``budget`` = steps + 1 inner solves,
the driver's count: :func:`grid_search` sweeps :math:`\sigma` over the box at
:math:`\delta = 0` (the usual way a risk budget is tuned), and
:func:`random_search` draws :math:`(\delta, \sigma)` uniformly in the box.
For comparison without inner solves: equal weights :math:`1/n`, the plain
long-only Markowitz portfolio :math:`\operatorname{argmax} \hat\mu^\top w -
\tfrac{\gamma}{2} w^\top \hat\Sigma w` on the training estimates, the start
:math:`x_0 = (0, \sigma_0)`, and the oracle Markowitz portfolio on the true
:math:`(\mu, \Sigma)` (unknowable; an upper reference).
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import cvxpy as cp
import numpy as np
import torch

import cbo

from . import Instance

__all__ = ["build", "factor_returns", "markowitz", "min_volatility", "portfolio_metrics", "inner_weights",
           "outer_values", "grid_search", "random_search", "SIZES", "GAMMA", "RHO", "TAU", "DELTA_BOUND",
           "SOLVER"]

GAMMA = 0.05  # the investor's risk aversion, per (percent per period)^2
RHO = 0.1  # inner diversification term rho/2 ||w||^2 (small: see the module docstring)
TAU = 0.01  # outer ridge penalty tau/2 ||delta||^2 on the corrections
DELTA_BOUND = 2.0  # |delta_i| <= b, in percent per period
# cvxpy's own solve for the baselines and evaluations (cbo solves and polishes on its own). Near the sigma
# where the budget stops binding Clarabel may stop at "optimal_inaccurate" (still ~1e-8 accurate): accepted.
SOLVER = {"solver": "CLARABEL", "tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10}

SIZES: dict[str, dict[str, Any]] = {
    "small": dict(n_assets=8, n_train=60, n_val=600, n_test=2400,
                  settings=dict(optimizer="adam", lr=0.05, steps=40)),
    "large": dict(n_assets=30, n_train=60, n_val=600, n_test=2400,
                  settings=dict(optimizer="adam", lr=0.05, steps=100)),
}
# The factor model: a market factor and two style factors (volatility, premium, in percent per period).
FACTOR_VOL = np.array([4.0, 2.0, 2.0])
FACTOR_PREMIUM = np.array([0.6, 0.3, 0.2])


# ---------------------------------------------------------------- data

def factor_returns(n_assets: int, n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict[str, np.ndarray]:
    r"""Returns r_t = mu + B f_t + e_t (percent per period), split in time into train / val / test.

    f_t ~ N(0, diag(FACTOR_VOL^2)), e_t ~ N(0, diag(s^2)) independent over t;
    market betas B_i1 ~ U(0.6, 1.4), style loadings B_i2, B_i3 ~ N(0, 0.7^2),
    idiosyncratic volatilities s_i ~ U(3, 6) and mu = B FACTOR_PREMIUM + alpha,
    alpha_i ~ N(0, 0.1^2). Returns ``R_train``, ``R_val``, ``R_test`` (periods x
    assets) and the true ``mu``, ``Sigma`` = B diag(FACTOR_VOL^2) B^T + diag(s^2).
    """
    rng = np.random.default_rng(seed)
    B = np.column_stack([rng.uniform(0.6, 1.4, n_assets), rng.normal(0.0, 0.7, (n_assets, 2))])
    idio = rng.uniform(3.0, 6.0, n_assets)
    mu = B @ FACTOR_PREMIUM + rng.normal(0.0, 0.1, n_assets)
    data = dict(mu=mu, Sigma=B @ np.diag(FACTOR_VOL ** 2) @ B.T + np.diag(idio ** 2), loadings=B)
    for split, periods in (("train", n_train), ("val", n_val), ("test", n_test)):
        factors = rng.standard_normal((periods, 3)) * FACTOR_VOL
        data[f"R_{split}"] = mu + factors @ B.T + rng.standard_normal((periods, n_assets)) * idio
    return data


# ---------------------------------------------------------------- portfolios without the bilevel loop

def markowitz(mu: np.ndarray, Sigma: np.ndarray, gamma: float = GAMMA) -> np.ndarray:
    """argmax_w mu^T w - gamma/2 w^T Sigma w  s.t.  sum(w) = 1, w >= 0 (long-only mean-variance)."""
    w = cp.Variable(mu.size)
    cp.Problem(cp.Maximize(mu @ w - gamma / 2 * cp.quad_form(w, cp.psd_wrap(Sigma))),
               [cp.sum(w) == 1, w >= 0]).solve(**SOLVER)
    return np.asarray(w.value, dtype=float)


def min_volatility(L: np.ndarray) -> float:
    """min_w ||L^T w||  s.t.  sum(w) = 1, w >= 0: the smallest long-only volatility."""
    w = cp.Variable(L.shape[0])
    problem = cp.Problem(cp.Minimize(cp.norm(L.T @ w)), [cp.sum(w) == 1, w >= 0])
    problem.solve(**SOLVER)
    return float(problem.value)


def portfolio_metrics(data: dict[str, np.ndarray], w: np.ndarray, gamma: float = GAMMA) -> dict[str, Any]:
    """Mean, volatility and utility mean - gamma/2 var of r^T w on val and test, and its true utility."""
    metrics: dict[str, Any] = {}
    for split in ("val", "test"):
        returns = data[f"R_{split}"] @ w
        metrics[f"{split}_mean"] = float(returns.mean())
        metrics[f"{split}_vol"] = float(returns.std())
        metrics[f"{split}_utility"] = float(returns.mean() - gamma / 2 * returns.var())
    metrics["true_utility"] = float(data["mu"] @ w - gamma / 2 * w @ data["Sigma"] @ w)
    metrics["holdings"] = int(np.sum(w > 1e-6))
    return metrics


# ---------------------------------------------------------------- the task

def build(size: str = "small", seed: int = 0, gamma: float = GAMMA, rho: float = RHO, tau: float = TAU,
          delta_bound: float = DELTA_BOUND) -> Instance:
    r"""The risk-budgeted portfolio task (see the module docstring).

    ``reference``: ``budget``, ``grid`` (sigma sweep at delta = 0), ``random``
    (uniform draws of (delta, sigma)), and the weights ``equal``, ``markowitz``,
    ``start`` (the inner solution at x0) and ``oracle``. ``evaluate(x)``:
    :func:`portfolio_metrics` of w*(x), F and w. ``data``: the returns, the
    true (mu, Sigma), the training estimates ``mu_hat`` and ``L``, ``bounds``
    of sigma, ``gamma``, ``rho``, ``tau``, ``delta_bound``.
    """
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}; choose one of {sorted(SIZES)}.")
    if gamma < 0 or tau < 0 or not rho > 0 or not delta_bound > 0:
        raise ValueError(f"Need gamma, tau >= 0 and rho, delta_bound > 0; got gamma={gamma}, rho={rho}, "
                         f"tau={tau}, delta_bound={delta_bound}.")
    config = SIZES[size]
    data = factor_returns(config["n_assets"], config["n_train"], config["n_val"], config["n_test"], seed)
    n = config["n_assets"]
    mu_hat = data["R_train"].mean(axis=0)
    L = np.linalg.cholesky(np.cov(data["R_train"], rowvar=False))

    delta, sigma = cp.Parameter(n, name="delta"), cp.Parameter(name="sigma")
    w = cp.Variable(n, name="w")
    inner = cp.Problem(cp.Maximize((mu_hat + delta) @ w - rho / 2 * cp.sum_squares(w)),
                       [cp.SOC(sigma, L.T @ w), cp.sum(w) == 1, w >= 0])
    R_val = torch.as_tensor(data["R_val"])

    def outer(delta_t: torch.Tensor, sigma_t: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
        returns = R_val @ w_t
        utility = returns.mean() - gamma / 2 * (returns - returns.mean()).square().mean()
        return -utility + tau / 2 * delta_t.square().sum()

    problem = cbo.BilevelProblem(inner, parameters=[delta, sigma], variables=[w], outer=outer)
    bounds = (1.05 * min_volatility(L), float(np.sqrt(np.diag(L @ L.T)).max()))
    data.update(mu_hat=mu_hat, L=L, bounds=bounds, gamma=gamma, rho=rho, tau=tau, delta_bound=delta_bound)

    # Start where the budget binds: halfway between sigma_min and the volatility the model takes without it.
    free = inner_weights(problem, np.zeros(n), bounds[1])
    sigma0 = 0.5 * (bounds[0] + min(float(np.linalg.norm(L.T @ free)), bounds[1]))
    x0 = [torch.zeros(n, dtype=torch.float64), torch.tensor(sigma0, dtype=torch.float64)]

    def evaluate(x) -> dict[str, Any]:
        w_x = inner_weights(problem, *x)
        return dict(portfolio_metrics(data, w_x, gamma), F=_outer_numpy(data, x[0], w_x), w=w_x)

    settings = dict(config["settings"])
    budget = settings["steps"] + 1
    reference = dict(
        budget=budget, grid=grid_search(problem, data, budget), random=random_search(problem, data, budget, seed),
        equal=np.full(n, 1.0 / n), markowitz=markowitz(mu_hat, np.cov(data["R_train"], rowvar=False), gamma),
        start=inner_weights(problem, *x0), oracle=markowitz(data["mu"], data["Sigma"], gamma))
    constraints = [delta >= -delta_bound, delta <= delta_bound, sigma >= bounds[0], sigma <= bounds[1]]
    return Instance(problem=problem, x0=x0, outer_constraints=constraints, settings=settings, reference=reference,
                    evaluate=evaluate, data=data)


# ---------------------------------------------------------------- inner solves and baselines

def inner_weights(problem: cbo.BilevelProblem, delta, sigma) -> np.ndarray:
    """w*(delta, sigma) by cvxpy alone (Clarabel, ``SOLVER``)."""
    delta_p, sigma_p = problem.parameters
    delta_p.value = np.asarray(torch.as_tensor(delta).detach(), dtype=float)
    sigma_p.value = float(torch.as_tensor(sigma))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Solution may be inaccurate")
        problem.inner.solve(**SOLVER)
    if problem.inner.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
        raise RuntimeError(f"The inner problem is {problem.inner.status} at sigma = {sigma_p.value}.")
    return np.asarray(problem.variables[0].value, dtype=float)


def outer_values(problem: cbo.BilevelProblem, data: dict[str, Any],
                 points: Sequence[tuple[np.ndarray, float]]) -> np.ndarray:
    """F(delta, sigma) at each point, one inner solve each."""
    return np.array([_outer_numpy(data, d, inner_weights(problem, d, s)) for d, s in points])


def grid_search(problem: cbo.BilevelProblem, data: dict[str, Any], n_points: int) -> dict[str, Any]:
    """F on ``n_points`` evenly spaced sigma in [sigma_min, sigma_max], delta = 0.

    Returns ``sigma`` (the grid), ``F``, ``best_x`` = (delta, sigma) and ``best_F``.
    """
    n = data["mu_hat"].size
    sigmas = np.linspace(*data["bounds"], n_points)
    return _search_result(problem, data, [(np.zeros(n), float(s)) for s in sigmas], sigma=sigmas)


def random_search(problem: cbo.BilevelProblem, data: dict[str, Any], n_points: int,
                  seed: int = 0) -> dict[str, Any]:
    """F at ``n_points`` draws of delta ~ U[-b, b]^n and sigma ~ U[sigma_min, sigma_max].

    Returns ``points``, ``F``, ``best_x`` and ``best_F``.
    """
    rng = np.random.default_rng(seed + 10_000)
    b, n = data["delta_bound"], data["mu_hat"].size
    points = [(rng.uniform(-b, b, n), float(rng.uniform(*data["bounds"]))) for _ in range(n_points)]
    return _search_result(problem, data, points)


def _search_result(problem, data, points, **extra) -> dict[str, Any]:
    values = outer_values(problem, data, points)
    best = int(np.argmin(values))
    return dict(extra, points=points, F=values, best_x=points[best], best_F=float(values[best]))


def _outer_numpy(data: dict[str, Any], delta, w: np.ndarray) -> float:
    """F = -(mean - gamma/2 var of the validation returns of w) + tau/2 ||delta||^2, in numpy."""
    delta = np.asarray(torch.as_tensor(delta).detach(), dtype=float)
    returns = data["R_val"] @ w
    return float(-(returns.mean() - data["gamma"] / 2 * returns.var()) + data["tau"] / 2 * delta @ delta)
