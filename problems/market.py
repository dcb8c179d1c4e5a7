r"""Capacity planning against market prices: the outer objective is a multiplier (the clearing price).

Inner problem (the market operator's economic dispatch, every period t at once):
generators k with cost b_k g + a_k/2 g^2 produce g_kt to meet demand d_t,

.. math::

    g^*(x) = \operatorname*{argmin}_{g \ge 0} \sum_{t,k} b_k g_{kt} + \tfrac{a_k}{2} g_{kt}^2
    \quad \text{s.t.} \quad g_{kt} \le c_k + x_k, \qquad d_t = \textstyle\sum_k g_{kt} \;\; (\lambda_t),

with c_k the existing capacity and x_k >= 0 the capacity added (x_k = 0 where
generator k cannot be extended). Written as ``d == cp.sum(g, axis=0)``, the
balance constraint's multiplier (cvxpy's ``dual_value``, Lagrangian term
lambda . (d - sum_k g_k)) is the clearing price:
stationarity in g_kt reads b_k + a_k g_kt + mu_kt - lambda_t = 0 for a generator between its bounds,
so lambda_t is the marginal cost of every generator that is not at a bound, and
mu_kt >= 0 (the capacity constraint's multiplier) is generator k's scarcity
rent in period t.

Outer problem (a buyers' cooperative that pays for the new capacity):

.. math::

    \min_{x \ge 0} \; F(x, \lambda^*(x)) = \sum_t h_t\, d_t\, \lambda_t^*(x) + \sum_k \kappa_k x_k,

the bill at the clearing prices (h_t hours per period) plus the annualised cost
kappa of the new capacity. Adding capacity to a cheap generator lowers the price
in the periods where it is at its limit, by 1 / sum_j (1/a_j) per MW over the
generators j setting the price; the optimum balances that saving against
kappa_k. F depends on x only through the multipliers lambda: the example of
``BilevelProblem(..., variables=[balance.dual_variables[0]])``.

``size="small"``: 3 generators (2 extendable), 4 periods; ``size="large"``:
6 generators (3 extendable), 24 hourly periods. :func:`outer_value` evaluates
F with cvxpy's own ``dual_value``, independent of cbo's derivatives. F is
piecewise quadratic and not convex: where the peaker stops setting the price,
fewer generators share each extra MW and the price falls faster (a concave
kink), so the outer problem has local minima.
"""
from __future__ import annotations

from dataclasses import dataclass

import cvxpy as cp
import numpy as np
import torch

import cbo

from . import Instance

__all__ = ["Market", "market", "build", "bilevel_problem", "dispatch", "outer_value"]


@dataclass(frozen=True)
class Market:
    """Generators (cost b + a g / 2 per MW, capacity c, extension cost kappa or None) and demand d per period."""

    a: np.ndarray
    b: np.ndarray
    capacity: np.ndarray
    kappa: np.ndarray
    extendable: np.ndarray
    demand: np.ndarray
    hours: np.ndarray


def market(size: str = "small", seed: int = 0) -> Market:
    """The market of ``size`` ("small": 3 generators, 4 periods; "large": 6 generators, 24 hours)."""
    rng = np.random.default_rng(seed)
    if size == "small":
        a, b = np.array([0.02, 0.05, 0.2]), np.array([10.0, 30.0, 60.0])
        capacity, extendable = np.array([60.0, 50.0, 400.0]), np.array([True, True, False])
        kappa = np.array([150.0, 60.0, 0.0])
        demand, hours = np.array([70.0, 105.0, 150.0, 200.0]), np.array([6.0, 6.0, 6.0, 6.0])
    elif size == "large":
        a = np.array([0.01, 0.02, 0.04, 0.06, 0.1, 0.3]) * (1 + 0.1 * rng.random(6))
        b = np.array([5.0, 12.0, 25.0, 35.0, 50.0, 80.0]) * (1 + 0.1 * rng.random(6))
        capacity = np.array([80.0, 60.0, 60.0, 50.0, 60.0, 500.0])
        extendable = np.array([True, True, True, False, False, False])
        kappa = np.array([200.0, 150.0, 100.0, 0.0, 0.0, 0.0])
        hour = np.arange(24)
        demand = 180 + 90 * np.sin((hour - 8) * np.pi / 12).clip(0) + 25 * np.sin(hour * np.pi / 12) \
            + 5 * rng.standard_normal(24)
        hours = np.full(24, 1.0)
    else:
        raise ValueError(f"size must be 'small' or 'large', got {size!r}.")
    return Market(a, b, capacity, kappa, extendable, demand, hours)


def bilevel_problem(m: Market) -> tuple[cbo.BilevelProblem, cp.Parameter, cp.Constraint]:
    """The BilevelProblem of the module docstring: parameter x (added capacity of the extendable generators),
    outputs the clearing prices lambda (the balance constraint's multipliers)."""
    n_gen, n_t = m.a.size, m.demand.size
    x = cp.Parameter(int(m.extendable.sum()), nonneg=True, name="added_capacity")
    g = cp.Variable((n_gen, n_t), name="dispatch")
    added = cp.hstack([x[int(m.extendable[:k].sum())] if m.extendable[k] else 0.0 for k in range(n_gen)])
    limit = cp.reshape(m.capacity + added, (n_gen, 1), order="C") @ np.ones((1, n_t))
    balance = cp.Constant(m.demand) == cp.sum(g, axis=0)  # a numpy array on the left would swap the sides
    cost = cp.sum(m.b @ g) + 0.5 * cp.sum(cp.multiply(m.a[:, None], cp.square(g)))
    inner = cp.Problem(cp.Minimize(cost), [g >= 0, g <= limit, balance])
    bill_weights = torch.as_tensor(m.hours * m.demand)
    kappa = torch.as_tensor(m.kappa[m.extendable])

    def outer(x, prices):
        return bill_weights @ prices + kappa @ x

    return cbo.BilevelProblem(inner, [x], [balance.dual_variables[0]], outer=outer), x, balance


def dispatch(m: Market, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dispatch and clearing prices at added capacity ``x``, by cvxpy (tight tolerances): the reference."""
    problem, parameter, balance = bilevel_problem(m)
    parameter.value = np.maximum(np.asarray(x, dtype=float), 0)
    problem.inner.solve(solver=cp.CLARABEL, tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11)
    dispatch_variable = next(v for v in problem.inner.variables() if v.name() == "dispatch")
    return dispatch_variable.value, balance.dual_value


def outer_value(m: Market, x: np.ndarray) -> float:
    """F(x) evaluated with cvxpy's dual values (independent of cbo's derivatives)."""
    _, prices = dispatch(m, x)
    return float((m.hours * m.demand) @ prices + m.kappa[m.extendable] @ np.maximum(x, 0))


def build(size: str = "small", seed: int = 0) -> Instance:
    """The capacity-planning task (see the module docstring); starts from no added capacity."""
    m = market(size, seed)
    problem, x, _ = bilevel_problem(m)

    def evaluate(added) -> dict:
        added = np.asarray(added.detach() if isinstance(added, torch.Tensor) else added, dtype=float)
        g, prices = dispatch(m, added)
        return {"prices": prices, "dispatch": g, "bill": float((m.hours * m.demand) @ prices),
                "investment": float(m.kappa[m.extendable] @ added)}

    return Instance(problem=problem, x0=torch.zeros(x.size, dtype=torch.float64), outer_constraints=[x >= 0],
                    settings={}, reference={}, evaluate=evaluate, data={"market": m})
