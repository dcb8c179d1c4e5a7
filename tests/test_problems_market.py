"""problems.market: an outer objective that is a multiplier (the clearing price), checked through cvxpy."""
import numpy as np
import pytest
import torch

import cbo
from problems import market


@pytest.mark.parametrize("size", ["small", "large"])
def test_price_hypergradient_matches_finite_differences_of_cvxpy_duals(size):
    instance = market.build(size)
    m = instance.data["market"]
    rng = np.random.default_rng(0)
    h = 1e-4
    for _ in range(2):
        x = rng.uniform(2.0, 40.0, instance.x0.numel())
        grad = cbo.hypergrad(instance.problem, torch.as_tensor(x)).numpy()
        reference = np.array([(market.outer_value(m, x + h * e) - market.outer_value(m, x - h * e)) / (2 * h)
                              for e in np.eye(x.size)])
        np.testing.assert_allclose(grad, reference, rtol=1e-6, atol=1e-6 * np.abs(reference).max())


def test_prices_are_the_marginal_costs_of_the_dispatch():
    """The multiplier output is the clearing price: every generator strictly between its bounds runs at
    marginal cost b + a g equal to its hour's price."""
    instance = market.build("small")
    m = instance.data["market"]
    _, info = cbo.hypergrad(instance.problem, torch.tensor([7.0, 5.0]), return_info=True)
    g, prices = market.dispatch(m, np.array([7.0, 5.0]))
    interior = (g > 1e-6) & (g < (m.capacity + np.r_[7.0, 5.0, 0.0])[:, None] - 1e-6)
    marginal = m.b[:, None] + m.a[:, None] * g
    assert interior.any()
    np.testing.assert_allclose(np.broadcast_to(prices, g.shape)[interior], marginal[interior], rtol=1e-7)
    np.testing.assert_allclose(info.nu.numpy(), prices, rtol=1e-7)


def test_minimize_lowers_the_bill_plus_investment():
    instance = market.build("small")
    m = instance.data["market"]
    result = instance.minimize(progress=False)
    start, end = market.outer_value(m, instance.x0.numpy()), market.outer_value(m, result.x.numpy())
    assert end < 0.7 * start
    assert np.all(result.x.numpy() >= 0)
