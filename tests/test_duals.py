"""Multipliers as outputs: ``variables=[y, constraint.dual_variables[0]]`` in BilevelProblem and ArgminLayer.

References: central finite differences of cvxpy's own ``dual_value`` (solved at tight tolerances) and
cvxpylayers' dual outputs on DPP problems.
"""
import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import cbo
from cbo.errors import ProblemDefinitionError

TIGHT = dict(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)


def _qp(seed=0, n=6):
    """min 0.5 y'Py + x'y  s.t.  G y <= h (some rows active),  C y = d."""
    rng = np.random.default_rng(seed)
    P = rng.standard_normal((n, n))
    P = P @ P.T + np.eye(n)
    G, h, C = rng.standard_normal((4, n)), 0.1 * rng.standard_normal(4), rng.standard_normal((2, n))
    x, d, y = cp.Parameter(n), cp.Parameter(2), cp.Variable(n)
    ineq, eq = G @ y <= h, C @ y == d
    inner = cp.Problem(cp.Minimize(0.5 * cp.quad_form(y, P) + x @ y), [ineq, eq])
    return inner, (x, d), y, ineq, eq, (rng.standard_normal(n), rng.standard_normal(2))


def _smooth(seed=1, n=5):
    """Projection onto a ball and a hyperplane, min 0.5||y - x||^2 s.t. ||y||^2 <= r, sum(y) = S: a QCQP on
    the general smooth route, with the closed form of ``_ball_solution`` as its reference."""
    rng = np.random.default_rng(seed)
    x, r, y = cp.Parameter(n), cp.Parameter(nonneg=True), cp.Variable(n)
    ball, eq = cp.sum_squares(y) <= r, cp.sum(y) == BALL_SUM
    inner = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - x)), [ball, eq])
    return inner, (x, r), y, ball, eq, (2.0 * rng.standard_normal(n), np.array(0.8))


BALL_SUM = 0.5


def _ball_solution(x: np.ndarray, r: float):
    """y*, mu, nu of the ball problem in closed form (ball active). With x = xbar 1 + x_perp:
    y = (S/n) 1 + y_perp, y_perp = x_perp sqrt(r - S^2/n) / ||x_perp||; stationarity y - x + 2 mu y + nu 1 = 0
    gives 1 + 2 mu = ||x_perp|| / ||y_perp|| and nu = xbar - (S/n)(1 + 2 mu)."""
    n = x.size
    x_perp = x - x.mean()
    scale = np.linalg.norm(x_perp) / np.sqrt(r - BALL_SUM ** 2 / n)
    assert scale > 1, "the ball must be active"
    y = BALL_SUM / n + x_perp / scale
    return y, (scale - 1) / 2, x.mean() - BALL_SUM / n * scale


def _weights(constraints, seed=3):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(c.shape) for c in constraints]


def _outer(weights):
    """F(x, y, mu, nu) = ||y||^2 + w_mu . mu + w_nu . nu (x unused)."""
    w_mu, w_nu = (torch.as_tensor(w) for w in weights)
    return lambda *args: (args[-3] ** 2).sum() + (w_mu * args[-2]).sum() + (w_nu * args[-1]).sum()


def _finite_difference(inner, params, y, constraints, weights, values, eps=1e-6):
    """Central differences of F = ||y*||^2 + sum_k w_k . dual_k through cvxpy's solution and dual values
    (through the closed form for the ball problem, where Clarabel's answer is too coarse)."""
    def F(vals):
        if inner.constraints[0].args[0].is_quadratic() and not inner.constraints[0].args[0].is_affine():
            solution, *duals = _ball_solution(*vals)
        else:
            for p, v in zip(params, vals):
                p.value = v
            inner.solve(**TIGHT)
            solution, duals = y.value, [c.dual_value for c in constraints]
        return float((solution ** 2).sum() + sum(np.sum(w * d) for w, d in zip(weights, duals)))

    grads = []
    for k, v in enumerate(values):
        v = np.asarray(v, dtype=float)
        g = np.zeros(v.shape)
        for i in np.ndindex(v.shape):
            step = np.zeros(v.shape)
            step[i] = eps
            plus = [u if j != k else v + step for j, u in enumerate(values)]
            minus = [u if j != k else v - step for j, u in enumerate(values)]
            g[i] = (F(plus) - F(minus)) / (2 * eps)
        grads.append(g)
    return grads


@pytest.mark.parametrize("build", [_qp, _smooth], ids=["qp", "smooth"])
@pytest.mark.parametrize("method", [None, "cg", "minres", "direct"])
def test_hypergrad_through_multipliers_matches_finite_differences(build, method):
    inner, params, y, ineq, eq, values = build()
    weights = _weights([ineq, eq])
    problem = cbo.BilevelProblem(inner, list(params), [y, ineq.dual_variables[0], eq.dual_variables[0]],
                                 outer=_outer(weights))
    reference = _finite_difference(inner, params, y, [ineq, eq], weights, values)
    grads, info = cbo.hypergrad(problem, [torch.as_tensor(v, dtype=torch.float64) for v in values], method=method,
                                return_info=True)
    assert info.active_set.active.numel() > 0, "the case must have active inequalities"
    for g, ref in zip(grads, reference):
        np.testing.assert_allclose(g.numpy(), ref, rtol=1e-6, atol=1e-6)


def test_fast_path_and_general_route_agree_on_multiplier_gradients():
    inner, params, y, ineq, eq, values = _qp(seed=4)
    weights = _weights([ineq, eq], seed=5)
    problem = cbo.BilevelProblem(inner, list(params), [y, ineq.dual_variables[0], eq.dual_variables[0]],
                                 outer=_outer(weights))
    xs = [torch.as_tensor(v) for v in values]
    fast, info_fast = cbo.hypergrad(problem, xs, return_info=True)
    general, info_general = cbo.hypergrad(problem, xs, method="minres", tol=1e-13, return_info=True)
    assert info_fast.path == "compiled QP" and info_general.path == "general"
    for a, b in zip(fast, general):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", [None, "cg"])
def test_layer_multiplier_outputs_match_cvxpylayers(method):
    from cvxpylayers.torch import CvxpyLayer

    inner, params, y, ineq, eq, values = _qp(seed=2)
    outputs = [y, ineq.dual_variables[0], eq.dual_variables[0]]
    layer = cbo.ArgminLayer(inner, list(params), outputs, method=method, n_workers=1)
    peer = CvxpyLayer(inner, parameters=list(params), variables=outputs)
    rng = np.random.default_rng(7)
    batch = [torch.as_tensor(np.stack([v + 0.1 * rng.standard_normal(v.shape) for _ in range(3)]))
             for v in values]
    weights = [torch.as_tensor(rng.standard_normal((3, *o.shape))) for o in outputs]

    def run(function):
        inputs = [t.clone().requires_grad_(True) for t in batch]
        results = function(*inputs)
        sum(((w * r).sum() for w, r in zip(weights, results))).backward()
        return [r.detach() for r in results], [t.grad for t in inputs]

    (ours, our_grads), (theirs, their_grads) = run(layer), run(peer)
    # cvxpylayers' answers are accurate to its solver's tolerance, ~1e-5 relative in norm.
    for a, b in [*zip(ours, theirs), *zip(our_grads, their_grads)]:
        assert np.linalg.norm(a.numpy() - b.numpy()) <= 1e-4 * np.linalg.norm(b.numpy())


def test_layer_multiplier_gradcheck():
    inner, params, y, ineq, eq, values = _smooth()
    layer = cbo.ArgminLayer(inner, list(params), [ineq.dual_variables[0], eq.dual_variables[0]], n_workers=1)
    inputs = [torch.as_tensor(v, dtype=torch.float64).requires_grad_(True) for v in values]
    assert torch.autograd.gradcheck(lambda *t: layer(*t), inputs, eps=1e-6, atol=1e-5)


def test_inactive_multiplier_is_zero_with_zero_derivative():
    x, y = cp.Parameter(2), cp.Variable(2)
    far = y <= 10.0
    inner = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [far])
    problem = cbo.BilevelProblem(inner, [x], [far.dual_variables[0]], outer=lambda x, mu: (mu * mu).sum() + mu.sum())
    grad, info = cbo.hypergrad(problem, torch.tensor([1.0, 2.0]), return_info=True)
    assert torch.all(grad == 0) and torch.all(info.mu == 0)


def test_multiplier_output_shapes_follow_the_constraint():
    x, Y = cp.Parameter((2, 3)), cp.Variable((2, 3))
    box = Y <= 0.5
    inner = cp.Problem(cp.Minimize(cp.sum_squares(Y - x)), [box])
    layer = cbo.ArgminLayer(inner, [x], [Y, box.dual_variables[0]])
    X = torch.tensor([[1.0, 0.0, 2.0], [0.2, 0.9, -1.0]], dtype=torch.float64)
    Y_star, mu = layer(X)
    assert mu.shape == (2, 3)
    # Stationarity 2 (Y - X) + mu = 0 entrywise, so mu = 2 (X - 0.5) where the bound is active.
    np.testing.assert_allclose(mu.numpy(), np.maximum(2 * (X.numpy() - 0.5), 0), atol=1e-9)


def test_unknown_dual_variable_and_unsupported_methods_are_refused():
    x, y = cp.Parameter(2), cp.Variable(2)
    con = y >= x
    inner = cp.Problem(cp.Minimize(cp.sum_squares(y)), [con])
    stranger = (cp.Variable(2) >= 0).dual_variables[0]
    with pytest.raises(ProblemDefinitionError, match="dual variable of one of its constraints"):
        cbo.BilevelProblem(inner, [x], [stranger])
    problem = cbo.BilevelProblem(inner, [x], [con.dual_variables[0]], outer=lambda x, mu: mu.sum())
    with pytest.raises(ValueError, match="does not differentiate multipliers"):
        cbo.hypergrad(problem, torch.tensor([1.0, 2.0]), method="reverse")


def _cone_problem():
    """An SOC, a PSD, a nonnegative and two equality constraints: the conic route, every multiplier asked for
    (the SOC's two dual variables, t's and X's, separately)."""
    x, r = cp.Parameter(3), cp.Parameter(nonneg=True)
    y, X = cp.Variable(3), cp.Variable((2, 2), symmetric=True)
    soc, floor, psd = cp.SOC(r + 0.1 * cp.sum(x), y), y >= -1, X >> 0
    trace, total = cp.trace(X) == 1, cp.sum(y) == x[0]
    objective = cp.sum_squares(y - x) + cp.trace(X @ np.array([[1.0, 0.2], [0.2, 2.0]])) + x[1] * X[0, 1]
    inner = cp.Problem(cp.Minimize(objective), [soc, floor, psd, trace, total])
    outputs = [y, *soc.dual_variables, psd.dual_variables[0], trace.dual_variables[0], total.dual_variables[0],
               floor.dual_variables[0]]
    values = [np.array([0.5, 2.0, -1.0]), np.array(1.0)]
    return inner, [x, r], outputs, [soc, soc, psd, trace, total, floor], values


def test_conic_route_multipliers_are_cvxpys_dual_values_and_pass_gradcheck():
    inner, params, outputs, constraints, values = _cone_problem()
    layer = cbo.ArgminLayer(inner, params, outputs)
    assert layer.route == "conic"
    results = layer(*[torch.as_tensor(v) for v in values])
    for p, v in zip(params, values):
        p.value = v
    with warnings.catch_warnings():  # Clarabel calls its answer at these tolerances inaccurate: ~1e-7 here
        warnings.simplefilter("ignore", UserWarning)
        inner.solve(**TIGHT)
    duals = [c.dual_value[k] if isinstance(c.dual_value, list) else c.dual_value
             for c, k in zip(constraints, [0, 1, 0, 0, 0, 0])]
    for result, dual in zip(results[1:], duals):
        np.testing.assert_allclose(result.numpy(), np.reshape(dual, result.shape), atol=1e-5)
    inputs = [torch.as_tensor(v).requires_grad_(True) for v in values]
    assert torch.autograd.gradcheck(lambda *t: layer(*t)[1:], inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_conic_route_hypergradient_through_multipliers_matches_the_layer_and_cvxpylayers():
    from cvxpylayers.torch import CvxpyLayer

    inner, params, outputs, _, values = _cone_problem()
    rng = np.random.default_rng(11)
    weights = [torch.as_tensor(rng.standard_normal(v.shape)) for v in outputs]
    outer = lambda x, r, *outs: sum((w * o).sum() for w, o in zip(weights, outs))  # noqa: E731
    grads = cbo.hypergrad(cbo.BilevelProblem(inner, params, outputs, outer=outer), [torch.as_tensor(v) for v in values])

    def layer_gradient(layer):
        inputs = [torch.as_tensor(v).requires_grad_(True) for v in values]
        outer(*inputs, *layer(*inputs)).backward()
        return [t.grad for t in inputs]

    for ours, reference, tol in [(grads, layer_gradient(cbo.ArgminLayer(inner, params, outputs)), 1e-10),
                                 (grads, layer_gradient(CvxpyLayer(inner, parameters=params, variables=outputs)), 1e-3)]:
        for a, b in zip(ours, reference):
            assert np.linalg.norm(a.numpy() - b.numpy()) <= tol * np.linalg.norm(b.numpy())


def test_forcing_the_conic_route_on_a_smooth_problem_with_multipliers_is_refused():
    x, y = cp.Parameter(2), cp.Variable(2)
    con = y >= x
    inner = cp.Problem(cp.Minimize(cp.sum_squares(y)), [con])
    problem = cbo.BilevelProblem(inner, [x], [con.dual_variables[0]], outer=lambda x, mu: mu.sum())
    with pytest.raises(ValueError, match="stack them differently"):
        cbo.hypergrad(problem, torch.tensor([1.0, 2.0]), route="conic")


def test_batched_layer_multipliers_with_a_broadcast_input():
    """A batch of 3 items with one input broadcast: each item's multipliers are those of its own problem, and
    the broadcast input's gradient is the sum over the batch (checked by gradcheck)."""
    inner, (x, d), y, ineq, eq, (x0, d0) = _qp(seed=6)
    layer = cbo.ArgminLayer(inner, [x, d], [ineq.dual_variables[0], eq.dual_variables[0]])
    rng = np.random.default_rng(8)
    X = torch.as_tensor(np.stack([x0 + 0.2 * rng.standard_normal(x0.shape) for _ in range(3)]))
    D = torch.as_tensor(d0)
    mu, nu = layer(X, D)
    assert mu.shape == (3, 4) and nu.shape == (3, 2)
    for b in range(3):
        x.value, d.value = X[b].numpy(), d0
        inner.solve(**TIGHT)
        np.testing.assert_allclose(mu[b].numpy(), ineq.dual_value, atol=1e-7)
        np.testing.assert_allclose(nu[b].numpy(), eq.dual_value, atol=1e-7)
    inputs = [X.clone().requires_grad_(True), D.clone().requires_grad_(True)]
    assert torch.autograd.gradcheck(lambda *t: layer(*t), inputs, eps=1e-6, atol=1e-5)


def test_minimize_on_a_price_target():
    """cbo.minimize with an outer objective on a multiplier: choose the right-hand side r of y <= r so that
    the multiplier hits a target. min 1/2 ||y - c||^2 s.t. y <= r has mu = max(c - r, 0), so the optimum is
    r = c - target (target > 0): an independent closed form."""
    c = np.array([2.0, 1.0, 3.0])
    target = torch.tensor([0.5, 0.25, 1.0], dtype=torch.float64)
    r, y = cp.Parameter(3), cp.Variable(3)
    cap = y <= r
    inner = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - c)), [cap])
    problem = cbo.BilevelProblem(inner, [r], [cap.dual_variables[0]], outer=lambda r, mu: ((mu - target) ** 2).sum())
    result = cbo.minimize(problem, torch.zeros(3, dtype=torch.float64), progress=False)
    np.testing.assert_allclose(result.x.numpy(), c - target.numpy(), atol=1e-6)
