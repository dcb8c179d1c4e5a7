"""problems.toy_llc: LV-HBA's toy problem with a coupled constraint, its singular lower level and the Tikhonov remedy.

References independent of cbo: the lower level's KKT system solved densely in
numpy, the bilevel optimum over x = t e by scipy's scalar minimizer on that
solution map, the published solution (x* = -0.3 e, y* = (0.7 e, -0.4 e)),
and central finite differences of F(x, y*(x)) with y* from cvxpy.
"""
import numpy as np
import pytest
import scipy.optimize
import torch

import cbo
from problems import toy_llc

from builders import SOLVER_OPTIONS


def _lower_level_dense(x: np.ndarray, eps: float) -> np.ndarray:
    """y = (y1, y2) from the KKT system [[H, a], [a^T, 0]] (y, nu) = (c, -e^T x) of the regularized lower level."""
    n = x.size
    H = np.diag(np.concatenate([np.full(n, 1 + eps), np.full(n, eps)]))
    a = np.ones((2 * n, 1))
    K = np.block([[H, a], [a.T, np.zeros((1, 1))]])
    rhs = np.concatenate([x, -np.ones(n), [-x.sum()]])
    return np.linalg.solve(K, rhs)[:2 * n]


def _F_dense(x: np.ndarray, eps: float) -> float:
    n = x.size
    y = _lower_level_dense(x, eps)
    return 0.5 * np.sum((x - y[n:]) ** 2) + 0.5 * np.sum((y[:n] - 1) ** 2)


@pytest.mark.parametrize("eps", [1e-1, 1e-3, 1e-5])
def test_closed_form_solution_matches_a_dense_solve(eps):
    n = 7
    t = scipy.optimize.minimize_scalar(lambda s: _F_dense(np.full(n, s), eps), bracket=(-1, 0), tol=1e-12).x
    sol = toy_llc.solution(eps)
    assert sol["t"] == pytest.approx(t, abs=1e-7)
    y = _lower_level_dense(np.full(n, sol["t"]), eps)
    np.testing.assert_allclose(y, np.concatenate([np.full(n, sol["y1"]), np.full(n, sol["y2"])]), rtol=1e-9)
    assert sol["F_per_n"] == pytest.approx(_F_dense(np.full(n, sol["t"]), eps) / n, rel=1e-9)
    # the regularized optimum tends to the published one at rate O(eps)
    assert abs(sol["t"] - toy_llc.X_STAR) <= 2 * eps * abs(toy_llc.X_STAR)


def test_published_solution_is_the_optimistic_bilevel_optimum():
    """At eps = 0, F(t e, y1 = (t + 1) e, y2 with e^T y2 = -n(2t + 1)) minimized over y2 and t gives -0.3, 0.7, -0.4."""
    F_per_n = lambda s: 0.5 * (3 * s + 1) ** 2 + 0.5 * s ** 2  # noqa: E731  (x - y2 = (3t + 1) e, y1 - e = t e)
    t = scipy.optimize.minimize_scalar(F_per_n).x
    sol = toy_llc.solution(0.0)
    assert (sol["t"], sol["y1"], sol["y2"]) == pytest.approx((t, t + 1, -(2 * t + 1)), abs=1e-7)
    assert toy_llc.build("small", eps=0.0).reference["F_star"] == pytest.approx(10 * F_per_n(t))


def test_hypergradient_matches_finite_differences():
    instance = toy_llc.build("small", eps=1e-2)
    x = np.random.default_rng(0).standard_normal(instance.data["n"])
    grad = cbo.hypergrad(instance.problem, torch.as_tensor(x)).numpy()
    v = np.random.default_rng(1).standard_normal(x.size)
    (param,), inner = instance.problem.parameters, instance.problem.inner

    def F_cvxpy(point):
        param.value = point
        inner.solve(**SOLVER_OPTIONS)
        y1, y2 = (var.value for var in instance.problem.variables)
        return 0.5 * np.sum((point - y2) ** 2) + 0.5 * np.sum((y1 - 1) ** 2)

    h = 1e-4
    fd = (F_cvxpy(x + h * v) - F_cvxpy(x - h * v)) / (2 * h)
    assert abs(fd) > 1.0
    assert grad @ v == pytest.approx(fd, rel=1e-6)
    dense = np.array([(_F_dense(x + h * e, 1e-2) - _F_dense(x - h * e, 1e-2)) / (2 * h) for e in np.eye(x.size)])
    np.testing.assert_allclose(grad, dense, rtol=1e-6, atol=1e-8)


def test_singular_lower_level_is_reported():
    """eps = 0: y2 is free on {e^T y2 = const}; cbo says the inner solution is not unique and names the remedy."""
    instance = toy_llc.build("small", eps=0.0)
    with pytest.warns(cbo.DegenerateKKTWarning,
                      match=r"not unique.*zero curvature.*in variable y2 \(100%\).*cp\.sum_squares\(y2\)"):
        grad, info = cbo.hypergrad(instance.problem, instance.x0, return_info=True)
    low, high = info.reduced_hessian_extremes
    assert abs(low) < 1e-9 * high
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("eps", [1e-2, 1e-4])
def test_driver_reaches_the_regularized_optimum(eps):
    instance = toy_llc.build("small", eps=eps)
    result = instance.minimize(progress=False)
    t = toy_llc.solution(eps)["t"]
    np.testing.assert_allclose(result.x.numpy(), t, atol=1e-8)
    assert result.history.f[-1] < result.history.f[0]
    metrics = instance.evaluate(result.x)
    assert metrics["x_error"] == pytest.approx(abs(t - toy_llc.X_STAR) / abs(toy_llc.X_STAR), rel=1e-6)
    assert metrics["F"] == pytest.approx(instance.data["n"] * toy_llc.solution(eps)["F_per_n"], rel=1e-8)


def test_bad_arguments():
    with pytest.raises(ValueError, match="Unknown size"):
        toy_llc.build("huge")
    with pytest.raises(ValueError, match="must be >= 0"):
        toy_llc.build(eps=-1.0)
    with pytest.raises(ValueError, match="eps > 0"):
        toy_llc.lower_level(0.0, 0.0)
