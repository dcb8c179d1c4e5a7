r"""Constrained QP families with closed-form optima.

Inner problem, a strongly convex QP in which the outer variables x move the
linear term, the inequality right-hand side and/or the equality right-hand side:

.. math::

    y^*(x) = \operatorname*{argmin}_y \; \tfrac12 y^\top Q y - (c + Bx)^\top y
    \quad \text{s.t.} \quad A y \le b + E x, \;\; C y = d + D x .

Outer problem, optionally with bounds on x:

.. math::

    \min_x \; F(x) = \tfrac12 \lVert y^*(x) - y_t\rVert^2 + \tfrac{\rho}{2}\lVert x - x_{\rm ref}\rVert^2
    \quad [\text{s.t. } l \le x \le u].

**Construction.** The optimum is chosen first: x*, y*, multipliers mu* in [1, 2]
on the ``n_active`` designed-active rows of A (which pass through y*), slacks
in [1, 2] on the ``n_inactive`` others, equality multipliers nu*; then c, b, d
are set so that (y*, mu*, nu*) is the KKT point of the inner QP at x*. On the
set of x where that active set A stays optimal (mu_A(x) > 0, slack(x) > 0) the
inner solution is affine, w(x) = (y, mu_A, nu)(x) = w_c + W x, from

.. math::

    \begin{bmatrix} Q & A_A^\top & C^\top \\ A_A & 0 & 0 \\ C & 0 & 0 \end{bmatrix}
    \begin{bmatrix} y \\ \mu_A \\ \nu \end{bmatrix}
    = \begin{bmatrix} c \\ b_A \\ d \end{bmatrix} + \begin{bmatrix} B \\ E_A \\ D \end{bmatrix} x ,

so F is the strongly convex quadratic 1/2 x^T H x + g0^T x + const there, with
H = Y^T Y + rho I, g0 = Y^T (y_c - y_t) - rho x_ref (Y, y_c the y-block of W, w_c).
y_t = y* + delta (a small offset) and x_ref is set so that x* is that
quadratic's minimizer (with bounds: its KKT point over the box, the designed
bounds active with multipliers in [kappa, 2 kappa]).

**Reference.** :func:`closed_form_optimum` recomputes x* from the problem data
alone (the KKT solve above and H x = -g0 on the free coordinates, bounds fixed),
never reading the designed x*.

**Global optimality certificate.** For every feasible x, F(x) >= rho/2 ||x - x_ref||^2,
so any x with F(x) <= F* lies in the ball of centre x_ref and radius
r = sqrt(2 F* / rho). If that ball lies inside the region where the designed
active set holds (checked row by row: distance of x_ref to each hyperplane
mu_i(x) = 0, slack_i(x) = 0 exceeds r), F equals the convex quadratic there and
x* is the **global** minimizer. :func:`certificate_margin` returns the smallest
distance minus r; :func:`make_qp` refuses data whose margin is not positive.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import cvxpy as cp
import numpy as np
import torch

import cbo
from problems import Instance

__all__ = ["QPData", "make_qp", "affine_solution_map", "closed_form_optimum", "certificate_margin",
           "inner_problem", "build", "build_from", "SMALL_FAMILY", "LARGE_FAMILY", "ENTRY_POINTS"]

ENTRY_POINTS = ("linear", "ineq_rhs", "eq_rhs")


@dataclass(frozen=True)
class QPData:
    """Data of one family member; ``active`` are the designed-active rows of A.

    ``at_lower`` / ``at_upper`` are the coordinates of x designed to sit on
    their outer bound at x* (empty without outer bounds); ``lower``/``upper``
    are None without outer bounds. ``x_design`` is the x* the data was built
    around, kept only to check :func:`closed_form_optimum` against.
    """

    Q: np.ndarray
    c: np.ndarray
    B: np.ndarray
    A: np.ndarray
    b: np.ndarray
    E: np.ndarray
    C: np.ndarray
    d: np.ndarray
    D: np.ndarray
    y_target: np.ndarray
    x_ref: np.ndarray
    reg: float
    active: np.ndarray
    enters: tuple[str, ...]
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None
    at_lower: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    at_upper: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    x_design: np.ndarray | None = None

    @property
    def n(self) -> int:
        return self.Q.shape[0]

    @property
    def n_x(self) -> int:
        return self.B.shape[1]

    @property
    def inactive(self) -> np.ndarray:
        return np.setdiff1d(np.arange(self.A.shape[0]), self.active)


def make_qp(
    n: int = 8,
    n_x: int = 4,
    n_active: int = 2,
    n_inactive: int = 3,
    n_eq: int = 1,
    enters: Sequence[str] = ENTRY_POINTS,
    outer_bounds: int = 0,
    reg: float = 1.0,
    target_offset: float = 0.05,
    kappa: float = 0.05,
    seed: int = 0,
) -> QPData:
    """Build a family member whose optimum x* is known by construction.

    Parameters
    ----------
    n, n_x : sizes of y and x.
    n_active, n_inactive : designed-active and strictly inactive inequalities
        (``n_active + n_eq <= n`` so that LICQ holds).
    n_eq : equalities.
    enters : where x enters, a subset of ``ENTRY_POINTS``: "linear" (B x in
        the linear term), "ineq_rhs" (E x), "eq_rhs" (D x).
    outer_bounds : number of coordinates of x designed to sit on an outer
        bound at x* (half lower, half upper); 0 means no outer constraints.
    reg : rho, weight of the outer regularization.
    target_offset, kappa : ||y_t - y*|| and the outer bound multipliers'
        scale; small values keep the global-optimality certificate valid.
    seed : random seed.

    Raises
    ------
    ValueError
        For inconsistent sizes, an unknown entry point, or data whose
        global-optimality certificate fails (lower ``target_offset``/``kappa``
        or raise ``reg``).
    """
    unknown = set(enters) - set(ENTRY_POINTS)
    if unknown or not enters:
        raise ValueError(f"`enters` must be a non-empty subset of {ENTRY_POINTS}, got {tuple(enters)}.")
    if "ineq_rhs" in enters and n_active + n_inactive == 0 or "eq_rhs" in enters and n_eq == 0:
        raise ValueError("x cannot enter the right-hand side of constraints that do not exist: "
                         f"enters={tuple(enters)} with n_active + n_inactive = {n_active + n_inactive}, n_eq = {n_eq}.")
    if n_active + n_eq > n:
        raise ValueError(f"n_active + n_eq = {n_active + n_eq} exceeds n = {n}: the active constraints would be "
                         "linearly dependent (LICQ fails). Lower n_active or n_eq.")
    if not 0 <= outer_bounds <= n_x:
        raise ValueError(f"outer_bounds must be in [0, n_x = {n_x}], got {outer_bounds}.")
    rng = np.random.default_rng(seed)
    m = n_active + n_inactive
    M = rng.standard_normal((n, n))
    Q = M @ M.T / n + 0.5 * np.eye(n)
    A, C = rng.standard_normal((m, n)), rng.standard_normal((n_eq, n))
    B, E, D = (rng.standard_normal((rows, n_x)) / np.sqrt(n_x) if name in enters else np.zeros((rows, n_x))
               for name, rows in (("linear", n), ("ineq_rhs", m), ("eq_rhs", n_eq)))
    active = np.sort(rng.permutation(m)[:n_active])
    x_star, y_star, nu_star = rng.standard_normal(n_x), rng.standard_normal(n), rng.standard_normal(n_eq)
    mu_star = np.zeros(m)
    mu_star[active] = 1.0 + rng.random(n_active)
    slack = np.where(mu_star > 0, 0.0, 1.0 + rng.random(m))
    c = Q @ y_star - B @ x_star + A.T @ mu_star + C.T @ nu_star   # stationarity at (y*, mu*, nu*)
    b = A @ y_star - E @ x_star + slack
    d = C @ y_star - D @ x_star
    delta = rng.standard_normal(n)
    y_target = y_star + target_offset * delta / np.linalg.norm(delta)

    at = rng.permutation(n_x)[:outer_bounds]
    at_lower, at_upper = np.sort(at[: outer_bounds // 2]), np.sort(at[outer_bounds // 2:])
    gap = 0.5 + rng.random(n_x)
    lower, upper = x_star - gap, x_star + gap[::-1]
    lower[at_lower], upper[at_upper] = x_star[at_lower], x_star[at_upper]
    outer_grad = np.zeros(n_x)   # dF/dx at x* = kappa_l - kappa_u (outer KKT)
    outer_grad[at_lower] = kappa * (1.0 + rng.random(at_lower.size))
    outer_grad[at_upper] = -kappa * (1.0 + rng.random(at_upper.size))

    partial = QPData(Q, c, B, A, b, E, C, d, D, y_target, np.zeros(n_x), reg, active, tuple(enters))
    _, W = affine_solution_map(partial)
    Y = W[:n]
    # dF/dx(x*) = Y^T (y* - y_t) + reg (x* - x_ref) = outer_grad
    x_ref = x_star - (outer_grad - Y.T @ (y_star - y_target)) / reg
    data = QPData(Q, c, B, A, b, E, C, d, D, y_target, x_ref, reg, active, tuple(enters),
                  lower if outer_bounds else None, upper if outer_bounds else None, at_lower, at_upper, x_star)
    margin = certificate_margin(data, closed_form_optimum(data))
    if margin <= 0:
        raise ValueError(f"The global-optimality certificate fails for this member (margin {margin:.3g}): "
                         "lower target_offset or kappa, or raise reg.")
    return data


def affine_solution_map(data: QPData) -> tuple[np.ndarray, np.ndarray]:
    """w(x) = (y, mu_A, nu)(x) = w_c + W x on the designed active set, by one dense KKT solve."""
    A_act = data.A[data.active]
    n, k, p = data.n, A_act.shape[0], data.C.shape[0]
    K = np.block([[data.Q, A_act.T, data.C.T],
                  [A_act, np.zeros((k, k + p))],
                  [data.C, np.zeros((p, k + p))]])
    rhs0 = np.concatenate([data.c, data.b[data.active], data.d])
    R = np.vstack([data.B, data.E[data.active], data.D])
    solution = np.linalg.solve(K, np.column_stack([rhs0, R]))
    assert solution.shape == (n + k + p, 1 + data.n_x)
    return solution[:, 0], solution[:, 1:]


def closed_form_optimum(data: QPData) -> dict:
    """x* from the data: minimize 1/2 x^T H x + g0^T x over the designed outer face.

    With H = Y^T Y + rho I and g0 = Y^T (y_c - y_t) - rho x_ref, the
    coordinates in ``at_lower``/``at_upper`` are fixed at their bounds and the
    free ones solve H_FF x_F = -(g0_F + H_F,fixed x_fixed). Returns x*, y*,
    mu_A*, nu*, F*, the outer gradient at x* (the bound multipliers on the
    fixed coordinates: > 0 at a lower bound, < 0 at an upper bound).
    """
    w_c, W = affine_solution_map(data)
    n, k = data.n, data.active.size
    y_c, Y = w_c[:n], W[:n]
    H = Y.T @ Y + data.reg * np.eye(data.n_x)
    g0 = Y.T @ (y_c - data.y_target) - data.reg * data.x_ref
    x = np.zeros(data.n_x)
    fixed = np.concatenate([data.at_lower, data.at_upper]).astype(int)
    if fixed.size:
        x[data.at_lower], x[data.at_upper] = data.lower[data.at_lower], data.upper[data.at_upper]
    free = np.setdiff1d(np.arange(data.n_x), fixed)
    x[free] = np.linalg.solve(H[np.ix_(free, free)], -(g0[free] + H[np.ix_(free, fixed)] @ x[fixed]))
    w = w_c + W @ x
    y = w[:n]
    F = 0.5 * np.sum((y - data.y_target) ** 2) + 0.5 * data.reg * np.sum((x - data.x_ref) ** 2)
    return {"x_star": x, "y_star": y, "mu_active": w[n: n + k], "nu": w[n + k:], "F_star": float(F),
            "outer_grad": H @ x + g0}


def region_rows(data: QPData) -> tuple[np.ndarray, np.ndarray]:
    """The region where the designed active set is optimal, as {x : G x + h > 0}.

    Rows: mu_A(x) = mu_c + M x (multipliers of the active rows) and
    slack_I(x) = b_I + E_I x - A_I y(x) (the inactive rows).
    """
    w_c, W = affine_solution_map(data)
    n, k = data.n, data.active.size
    I = data.inactive
    G = np.vstack([W[n: n + k], data.E[I] - data.A[I] @ W[:n]])
    h = np.concatenate([w_c[n: n + k], data.b[I] - data.A[I] @ w_c[:n]])
    return G, h


def certificate_margin(data: QPData, reference: dict) -> float:
    """min over the region's rows of dist(x_ref, hyperplane) - sqrt(2 F* / rho); > 0 certifies global optimality."""
    G, h = region_rows(data)
    radius = np.sqrt(2 * reference["F_star"] / data.reg)
    values = G @ data.x_ref + h
    if values.size == 0:
        return np.inf
    norms = np.maximum(np.linalg.norm(G, axis=1), 1e-300)
    return float(np.min(values / norms) - radius)


def inner_problem(data: QPData) -> tuple[cp.Problem, cp.Parameter, cp.Variable]:
    """The inner QP in cvxpy, with x a Parameter that appears only where it enters."""
    x, y = cp.Parameter(data.n_x, name="x"), cp.Variable(data.n, name="y")
    linear = data.c + data.B @ x if "linear" in data.enters else data.c
    constraints = []
    if data.A.shape[0]:
        constraints.append(data.A @ y <= (data.b + data.E @ x if "ineq_rhs" in data.enters else data.b))
    if data.C.shape[0]:
        constraints.append(data.C @ y == (data.d + data.D @ x if "eq_rhs" in data.enters else data.d))
    objective = 0.5 * cp.quad_form(y, cp.psd_wrap(data.Q)) - linear @ y
    return cp.Problem(cp.Minimize(objective), constraints), x, y


def outer_objective(data: QPData):
    """F(x, y) = 1/2 ||y - y_t||^2 + rho/2 ||x - x_ref||^2 as a torch callable."""
    y_target, x_ref = torch.as_tensor(data.y_target), torch.as_tensor(data.x_ref)

    def outer(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((y - y_target.to(y)) ** 2).sum() + 0.5 * data.reg * ((x - x_ref.to(x)) ** 2).sum()

    return outer


# The members the test runs (small) and the example runs (large): every entry point, alone and together.
SMALL_FAMILY = (
    dict(n=8, n_x=4, n_active=2, n_inactive=3, n_eq=1, enters=("linear",), seed=0),
    dict(n=8, n_x=3, n_active=3, n_inactive=2, n_eq=2, enters=("ineq_rhs",), seed=1),
    dict(n=10, n_x=4, n_active=2, n_inactive=4, n_eq=2, enters=("eq_rhs", "linear"), seed=2),
    dict(n=10, n_x=5, n_active=3, n_inactive=3, n_eq=1, enters=ENTRY_POINTS, seed=3),
)
SMALL_BOUNDED = dict(n=8, n_x=4, n_active=2, n_inactive=3, n_eq=1, enters=ENTRY_POINTS, outer_bounds=2, seed=4)
LARGE_FAMILY = (
    dict(n=60, n_x=20, n_active=15, n_inactive=30, n_eq=5, enters=("linear",), target_offset=0.02, seed=10),
    dict(n=60, n_x=20, n_active=20, n_inactive=25, n_eq=10, enters=("ineq_rhs",), target_offset=0.02, seed=11),
    dict(n=60, n_x=20, n_active=15, n_inactive=30, n_eq=10, enters=ENTRY_POINTS, target_offset=0.02, seed=12),
    dict(n=60, n_x=20, n_active=15, n_inactive=30, n_eq=5, enters=ENTRY_POINTS, outer_bounds=6,
         target_offset=0.02, kappa=0.02, seed=13),
)


def build_from(data: QPData) -> Instance:
    """The :class:`~problems.Instance` of one family member: start at x = 0, reference from the closed form."""
    inner, x, y = inner_problem(data)
    problem = cbo.BilevelProblem(inner, parameters=[x], variables=[y], outer=outer_objective(data))
    reference = closed_form_optimum(data)
    reference["active"] = data.active
    reference["certificate_margin"] = certificate_margin(data, reference)
    bounded = data.lower is not None
    outer_constraints = [x >= data.lower, x <= data.upper] if bounded else []
    settings = dict(steps=100, tol=1e-8)  # the default optimizer (L-BFGS-B on the bounds) and method (the QP fast path)
    x_star = reference["x_star"]

    def evaluate(xv) -> dict:
        xv = np.asarray(xv.detach() if isinstance(xv, torch.Tensor) else xv, dtype=float)
        return {"distance_inf": float(np.abs(xv - x_star).max())}

    return Instance(problem=problem, x0=torch.zeros(data.n_x, dtype=torch.float64),
                    outer_constraints=outer_constraints, settings=settings, reference=reference,
                    evaluate=evaluate, data={"qp": data})


def build(size: str = "small", seed: int = 0) -> Instance:
    """One member with x in every entry point: n = 10, n_x = 5 ("small") or n = 60, n_x = 20 ("large")."""
    if size == "small":
        spec = dict(SMALL_FAMILY[3], seed=SMALL_FAMILY[3]["seed"] + seed)
    elif size == "large":
        spec = dict(LARGE_FAMILY[2], seed=LARGE_FAMILY[2]["seed"] + seed)
    else:
        raise ValueError(f"size must be 'small' or 'large', got {size!r}.")
    return build_from(make_qp(**spec))
