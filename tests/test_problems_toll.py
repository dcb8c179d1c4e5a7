"""problems.toll: the toll-setting references are right, and cbo.minimize reaches the known optimum.

References, none of which calls cbo:

* small network (three parallel links, revenue): the closed form of
  :func:`parallel_piece_optimum` against a global zooming grid search over the
  toll box (:func:`parallel_grid_optimum`, equilibria by bisection), and the
  bisection equilibrium against cvxpy's;
* large network: Pigouvian tolls make the equilibrium the system optimum;
* hypergradients: central finite differences of F through the cvxpy equilibrium
  (made exact on the face cvxpy identifies, see ``toll._polish_flows``).

Tolerance of the driver test: ||x - x*||_inf <= 1e-5 (absolute; tolls are O(1))
and the revenue to 1e-8 relative.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import cbo
from problems import Instance, toll

# An interior variant of the small network: no capacity, tolls inside the box.
INTERIOR = dict(toll.SMALL, cap=[np.inf] * 3, x_max=[5.0, 5.0])


@pytest.fixture(scope="module")
def small():
    return toll.build("small")


def minimize(instance, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cbo.DegenerateKKTWarning)
        return instance.minimize(progress=False, **overrides)


@pytest.mark.parametrize("spec, saturated", [(toll.SMALL, toll.SMALL_SATURATED), (INTERIOR, ())],
                         ids=["saturated-link-toll-at-bound", "interior"])
def test_closed_form_is_the_global_optimum(spec, saturated):
    net = toll.parallel_network(**spec)
    closed = toll.parallel_piece_optimum(net, saturated)
    assert closed["consistent"]
    grid = toll.parallel_grid_optimum(net, points=61, levels=5)
    np.testing.assert_allclose(grid["x_star"], closed["x_star"], atol=1e-5)
    assert grid["revenue"] <= closed["revenue"] + 1e-9          # nothing in the box does better
    np.testing.assert_allclose(toll.parallel_equilibrium(net, closed["x_star"][None])[0], closed["flows"], atol=1e-10)
    np.testing.assert_allclose(toll.equilibrium(net, closed["x_star"]), closed["flows"], atol=1e-7)


def test_small_instance_has_the_designed_active_sets(small):
    """Link 1 saturated (capacity multiplier > 0) with its toll at x_max (revenue still rising in it)."""
    net, ref = small.data["network"], small.reference
    assert ref["x_star"][0] == net.x_max[0] and 0 < ref["x_star"][1] < net.x_max[1]
    queue_delay = ref["lambda"] - (net.a[0] + net.b[0] * net.cap[0] + ref["x_star"][0])
    assert queue_delay > 0.1
    _, info = cbo.hypergrad(small.problem, torch.as_tensor(ref["x_star"]), return_info=True)
    np.testing.assert_allclose(info.y[0].numpy(), ref["flows"], atol=1e-8)
    assert info.active_set.active.tolist() == [small.problem.n_ineq - 1]   # the one capacity row
    np.testing.assert_allclose(info.mu[-1].item(), queue_delay, rtol=1e-7)


def test_hypergrad_matches_finite_differences(small):
    rng = np.random.default_rng(0)
    x = np.array([0.6, 2.0])
    direction = rng.standard_normal(2)
    h = 1e-5
    F = lambda tolls: -small.evaluate(tolls)["revenue"]  # noqa: E731
    fd = (F(x + h * direction) - F(x - h * direction)) / (2 * h)
    g = cbo.hypergrad(small.problem, torch.as_tensor(x)).numpy()
    assert abs(g @ direction - fd) <= 1e-8 * max(1.0, abs(fd))


@pytest.mark.parametrize("spec", [None, INTERIOR], ids=["small", "interior"])
def test_minimize_reaches_the_revenue_optimum(spec):
    instance = toll.build("small")      # a fresh problem: no adjoint warm start left by other tests
    ref = instance.reference
    if spec is not None:
        net = toll.parallel_network(**spec)
        problem, x = toll.bilevel_problem(net, "revenue")
        instance = Instance(problem=problem, x0=instance.x0, outer_constraints=[x >= 0, x <= net.x_max],
                            settings=instance.settings)
        ref = toll.parallel_piece_optimum(net, ())
    result = minimize(instance)
    assert result.converged, result.message
    assert np.abs(result.x.numpy() - ref["x_star"]).max() <= 1e-5
    assert abs(-result.fun - ref["revenue"]) <= 1e-8 * ref["revenue"]


def test_pigouvian_tolls_give_the_system_optimum():
    instance = toll.build("large")
    net, ref = instance.data["network"], instance.reference
    pigou = toll.pigouvian_tolls(net)
    metrics = instance.evaluate(pigou)
    np.testing.assert_allclose(metrics["flows"], instance.data["flows_system_optimum"], atol=1e-6)
    assert ref["system_optimum_cost"] < 0.97 * ref["no_toll_cost"]          # tolls matter on this network
    # system-cost hypergradient against central differences through cvxpy, at tolls between 0 and Pigou's
    x = 0.5 * pigou
    direction = np.random.default_rng(1).standard_normal(x.size)
    h = 1e-3
    cost = lambda tolls: instance.evaluate(tolls)["total_cost"]  # noqa: E731
    fd = (cost(x + h * direction) - cost(x - h * direction)) / (2 * h)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cbo.DegenerateKKTWarning)
        g = cbo.hypergrad(instance.problem, torch.as_tensor(x)).numpy()
    assert abs(g @ direction - fd) <= 1e-8 * max(1.0, abs(fd))


def test_bad_input():
    with pytest.raises(ValueError, match="objective"):
        toll.build("small", objective="welfare")
    with pytest.raises(ValueError, match="size"):
        toll.build("huge")
    with pytest.raises(ValueError, match="capacity"):
        toll.parallel_equilibrium(toll.parallel_network(**dict(toll.SMALL, cap=[1.0, 1.0, 1.0])), np.zeros((1, 2)))
