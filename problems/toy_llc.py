r"""LV-HBA's toy problem with a coupled lower-level constraint (Yao et al., ICLR 2024, "Toy-example/LLC").

x in R^n (n = 100 in the paper), y = (y1, y2) in R^n x R^n, e the vector of ones:

.. math::

    \min_{x} \; F(x, y^*) = \tfrac12 \lVert x - y_2^*\rVert^2 + \tfrac12 \lVert y_1^* - e\rVert^2,

    y^*(x) \in \operatorname*{argmin}_{y}\; \tfrac12 \lVert y_1\rVert^2 - x^\top y_1 + e^\top y_2
        + \tfrac{\varepsilon}{2} \lVert y\rVert^2
        \quad \text{s.t.} \quad e^\top x + e^\top y_1 + e^\top y_2 = 0 .

**Known solution** (eps = 0, optimistic selection): x* = -0.3 e, y1* = 0.7 e,
y2* = -0.4 e, F* = 5 n / 100 (= 5 at n = 100), for every n.

**Source.** SUSTech-Optimization/LV-HBA on GitHub, ``Toy-example/LLC/LV-HBA.py``:
their F_x, F_y (gradients of F above), f_x, f_y (of the lower-level
objective) and g = e^T x + e^T y, with multiplier lambda in [-u, u] (an
equality). Their start is x = 10 e, y = 10 e, projected onto the constraint
(``proj1``): x0 = -20 e, y0 = 10 e; their metric is
log(||x - x*|| / ||x*||) per iteration.

**The lower-level solution is not unique at eps = 0.** The objective is
linear in y2 and the one constraint fixes only e^T y2 = -2 e^T x - n (y1* =
x + e): every y2 with that sum solves it, an (n - 1)-dimensional set. The
Hessian of the Lagrangian is zero on that set, so the KKT matrix is singular
and y*(x) is not differentiable; cbo reports it with a
:class:`cbo.DegenerateKKTWarning` ("The inner solution is not unique ... zero
curvature ...") and returns the minimum-norm derivative. The bilevel value
above picks the best y2 in the set (the optimistic selection), which no
derivative of a solution map sees.

**Remedy: a Tikhonov term** eps/2 ||y||^2 (``build(..., eps=...)``). Then
y* is unique: with the multiplier nu of the constraint,
y1 = (x - nu e) / (1 + eps), y2 = -(1 + nu) / eps e (constant: the
minimum-norm member of the set), and the bilevel optimum is x = t(eps) e
(the part of x orthogonal to e only adds to F). :func:`solution` gives
t(eps) in closed form (F is a quadratic in t); t(eps) -> -0.3 as eps -> 0
with an error O(eps): the regularized problem has the published solution in
the limit, and y2's minimum-norm selection is the optimistic one here.

**Sizes.** ``small``: n = 10; ``large``: n = 100 (theirs).
"""
from __future__ import annotations

from typing import Any

import cvxpy as cp
import numpy as np
import torch

import cbo

from . import Instance

__all__ = ["build", "solution", "lower_level", "SIZES", "X_STAR", "Y1_STAR", "Y2_STAR", "EPS", "X0", "Y0"]

X_STAR, Y1_STAR, Y2_STAR = -0.3, 0.7, -0.4  # the published solution, times e
EPS = 1e-4          # default Tikhonov weight: error in x about 1e-4 relative (see solution())
X0, Y0 = -20.0, 10.0  # their x = y = 10 e after proj1: x0 = 10 - (10 n + 20 n) / n = -20, y0 = 10

SIZES: dict[str, dict[str, Any]] = {
    "small": dict(n=10, settings=dict(optimizer="lbfgs", steps=60, tol=1e-10)),
    "large": dict(n=100, settings=dict(optimizer="lbfgs", steps=60, tol=1e-10)),
}


def lower_level(t: float, eps: float) -> tuple[float, float, float]:
    r"""(y1, y2, nu) / e of the regularized lower level at x = t e, eps > 0, in closed form.

    Stationarity: y1 (1 + eps) = x - nu e, e + eps y2 + nu e = 0; the
    constraint n t + e^T y1 + e^T y2 = 0 then gives
    nu = (t eps (2 + eps) - (1 + eps)) / (1 + 2 eps).
    """
    if eps <= 0:
        raise ValueError(f"eps={eps}: the lower level has a unique solution only for eps > 0.")
    nu = (t * eps * (2 + eps) - (1 + eps)) / (1 + 2 * eps)
    return (t - nu) / (1 + eps), -(1 + nu) / eps, nu


def solution(eps: float = 0.0) -> dict[str, float]:
    r"""The bilevel optimum x = t e, y1 = a e, y2 = b e and F / n, for eps > 0 in closed form; eps = 0: published.

    y1 and y2 are affine in t (:func:`lower_level`), so
    F / n = (t - y2(t))^2 / 2 + (y1(t) - 1)^2 / 2 is a quadratic in t,
    minimized by one least-squares step on the two residuals.
    """
    if eps == 0:
        return dict(t=X_STAR, y1=Y1_STAR, y2=Y2_STAR, F_per_n=0.5 * (X_STAR - Y2_STAR) ** 2 + 0.5 * (Y1_STAR - 1) ** 2)
    (a0, b0, _), (a1, b1, _) = lower_level(0.0, eps), lower_level(1.0, eps)
    slopes = np.array([1.0 - (b1 - b0), a1 - a0])   # residuals r(t) = slopes * t + offsets
    offsets = np.array([-b0, a0 - 1.0])
    t = -float(slopes @ offsets) / float(slopes @ slopes)
    y1, y2, _ = lower_level(t, eps)
    return dict(t=t, y1=y1, y2=y2, F_per_n=0.5 * (t - y2) ** 2 + 0.5 * (y1 - 1) ** 2)


def build(size: str = "small", seed: int = 0, eps: float = EPS) -> Instance:
    """The toy problem (module docstring) with x in R^n at ``size``; ``eps`` = 0 is their (singular) lower level.

    ``seed`` is unused (the problem and their start are deterministic); kept for the suite's signature.
    ``reference``: ``x_star``, ``F_star`` (published, eps = 0) and ``regularized`` (:func:`solution` at eps).
    ``evaluate(x)`` returns ``F``, ``x_error`` = ||x - x*|| / ||x*|| and ``y_error`` against the published
    solution, with y* solved by cvxpy.
    """
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}; choose one of {sorted(SIZES)}.")
    if eps < 0:
        raise ValueError(f"eps={eps} must be >= 0 (a Tikhonov weight).")
    n = SIZES[size]["n"]
    x = cp.Parameter(n, name="x")
    y1, y2 = cp.Variable(n, name="y1"), cp.Variable(n, name="y2")
    objective = 0.5 * cp.sum_squares(y1) - x @ y1 + cp.sum(y2)
    if eps > 0:
        objective = objective + (eps / 2) * (cp.sum_squares(y1) + cp.sum_squares(y2))
    inner = cp.Problem(cp.Minimize(objective), [cp.sum(x) + cp.sum(y1) + cp.sum(y2) == 0])

    def outer(x_t: torch.Tensor, y1_t: torch.Tensor, y2_t: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.sum((x_t - y2_t) ** 2) + 0.5 * torch.sum((y1_t - 1) ** 2)

    problem = cbo.BilevelProblem(inner, parameters=[x], variables=[y1, y2], outer=outer)
    x_star = np.full(n, X_STAR)
    y_star = np.concatenate([np.full(n, Y1_STAR), np.full(n, Y2_STAR)])

    def evaluate(x_value) -> dict[str, float]:
        x_np = np.asarray(torch.as_tensor(x_value).detach().cpu(), dtype=float)
        x.value = x_np
        inner.solve(solver="CLARABEL")
        y = np.concatenate([y1.value, y2.value])
        F = float(outer(*(torch.as_tensor(v) for v in (x_np, y1.value, y2.value))))
        return dict(F=F, x_error=float(np.linalg.norm(x_np - x_star) / np.linalg.norm(x_star)),
                    y_error=float(np.linalg.norm(y - y_star) / np.linalg.norm(y_star)))

    published = solution(0.0)
    reference = dict(
        source="Yao, Yu, Zeng, Zhang, ICLR 2024; github.com/SUSTech-Optimization/LV-HBA, 'Toy-example/LLC/LV-HBA.py'",
        x_star=x_star, y_star=y_star, F_star=n * published["F_per_n"],
        regularized=solution(eps) if eps > 0 else published,
    )
    return Instance(problem=problem, x0=torch.full((n,), X0, dtype=torch.float64),
                    settings=dict(SIZES[size]["settings"]), reference=reference, evaluate=evaluate,
                    data=dict(n=n, eps=eps, y0=np.full(2 * n, Y0)))
