r"""`hypergrad`: dF/dx of F(x, y*(x)) by implicit differentiation of the inner KKT conditions.

At the inner solution w* = (y*, mu_A, nu) the KKT residual R(w*, x) = 0, so
K dw*/dx = -dR/dx and

    dF/dx = d_x F + (dy*/dx)^T d_y F = d_x F - (dR/dx)^T v,   K v = (d_y F, 0, 0),

one adjoint solve with the KKT matrix K (see :mod:`cbo.kkt`) whatever the
dimension of x.
"""
from __future__ import annotations

import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .errors import DegenerateKKTWarning, external_stacklevel
from .inner import solve_inner
from .conic import ConeStatus, conic_program
from .kkt import ActiveSet, LICQInfo, PolishInfo, curvature_check, kkt_at_solutions, licq_check
from .linsolve import ADJOINT_SOLVERS, SolveInfo, adjoint_solve
from .routes import ITERATIVE_ROUTES, PENALTY_ROUTES, iterative_hypergrad, penalty_hypergrad
from .inputs import as_parameter_tensors, like_input, timed
from .problem import BilevelProblem
from .qp import GeneralPathNeeded, QPPoint
from .qp_solvers import QP_SOLVERS

__all__ = ["hypergrad", "HypergradInfo", "forget_warm_starts", "METHODS", "ROUTES"]

TensorLike = torch.Tensor | np.ndarray | float | Sequence[float]
METHODS = (*ADJOINT_SOLVERS, *ITERATIVE_ROUTES, *PENALTY_ROUTES)
ROUTES = ("smooth", "conic")
# The last adjoint vector of each method per problem, to warm-start the next iterative solve.
_ADJOINT_CACHE: "weakref.WeakKeyDictionary[BilevelProblem, dict]" = weakref.WeakKeyDictionary()


@dataclass
class HypergradInfo:
    """Diagnostics of one :func:`hypergrad` call.

    Attributes
    ----------
    method : str
        Adjoint solver used.
    solver, solver_status : str
        cvxpy solver and its status for the inner problem.
    outer_value : float
        F(x, y*).
    y : list of tensors
        y*, one tensor per variable of the user's inner problem (without the
        epigraph variables of :mod:`cbo.reformulate`), polished.
    mu, nu : tensors
        Stacked inequality multipliers (zero off the active set) and equality
        multipliers (None on the conic route).
    active_set : ActiveSet
        Active inequality entries, weakly active ones, thresholds (None on the
        conic route). ``problem.describe_entries(active_set.active)`` names
        them, epigraph constraints by their atom ("epigraph of abs(y) in the objective").
    licq : LICQInfo
        Rank of the active constraint Jacobian (None on the conic route).
    reduced_hessian_extremes : (float, float)
        Lanczos estimates of the extreme eigenvalues of the Hessian of the
        Lagrangian on the active constraints' null space, in the equilibrated
        KKT system (:func:`cbo.kkt.equilibration`; a smallest near 0: the
        inner solution is not unique). None on the conic route.
    kkt_residual : float
        ||R(w, x)||_inf after polishing (``polish.residual_before`` before it);
        on the conic route, that of the cone program's residual map N.
    polish : PolishInfo
    linear_solve : SolveInfo
        Adjoint solve: residual, iterations, convergence, method-specific extras.
    timings : dict[str, float]
        Seconds per phase: inner_solve, polish, kkt_checks, adjoint_solve, total.
    route : str
        Which route and why: "smooth Lagrangian", "smooth after epigraph
        reformulation of abs, norm1", "conic: SOC constraint 2 has no smooth
        Lagrangian form", "conic: requested".
    cones : list of ConeStatus, optional
        Conic route: each cone constraint's activity at the solution (which
        SOC constraints are tight, the rank of a PSD solution, active
        nonnegative entries).
    path : str
        "compiled QP": the fast path of :mod:`cbo.qp` (then ``solver`` is the
        QP solver called, or "active set reused" when the previous call's
        active set was optimal and no solver ran; ``reduced_hessian_extremes``
        is None: the nonsingular factorization of K_S certifies the curvature);
        "general": the route of :mod:`cbo.kkt` or :mod:`cbo.conic`.
    """

    method: str
    solver: str
    solver_status: str
    outer_value: float
    y: list[torch.Tensor]
    mu: torch.Tensor
    nu: torch.Tensor
    active_set: ActiveSet
    licq: LICQInfo
    reduced_hessian_extremes: tuple[float, float]
    kkt_residual: float
    polish: PolishInfo
    linear_solve: SolveInfo
    timings: dict[str, float] = field(default_factory=dict)
    route: str = "smooth Lagrangian"
    cones: list[ConeStatus] | None = None
    path: str = "general"


def hypergrad(
    problem: BilevelProblem,
    x: TensorLike | Sequence[TensorLike],
    method: str | None = None,
    *,
    tol: float = 1e-10,
    maxiter: int | None = None,
    solver: str | None = None,
    solver_options: dict | None = None,
    active_tol: float = 1e-6,
    polish_solution: bool = True,
    warm_start: bool = True,
    on_nonconvergence: str = "raise",
    steps: int = 100,
    truncate: int | None = None,
    penalty: float = 1e3,
    route: str | None = None,
    return_info: bool = False,
):
    r"""Hypergradient dF/dx of F(x, y*(x)) for a :class:`BilevelProblem`.

    Solves the inner problem with cvxpy at x, polishes (y*, mu_A, nu) by Newton
    on the active-set KKT system, then solves the adjoint system
    K v = (d_y F, 0, 0) and returns dF/dx = d_x F - (dR/dx)^T v.

    Parameters
    ----------
    problem : BilevelProblem
    x : tensor or list of tensors
        Values of ``problem.parameters``: one tensor if there is one parameter,
        else a list in the same order. numpy arrays and floats are accepted.
        Computation runs in float64 on the device of the first tensor.
    method : str, optional
        Default: on an inner QP (DPP, affine constraints, quadratic objective;
        ``problem.qp_program``) the compiled fast path of :mod:`cbo.qp`, which
        factors the active-set KKT matrix once and solves it directly; elsewhere
        "cg". Implicit differentiation with an adjoint solver (see :mod:`cbo.linsolve`):
        "cg" (CG on the null space of the active constraints), "minres" (on the
        indefinite K), "direct" (dense K; on a QP, the fast path), "fixed_point", "neumann". Or a route
        of :mod:`cbo.routes`: "reverse", "truncated", "forward" (differentiate
        ``steps`` descent-ascent steps of the Lagrangian from the solution; the
        last ``truncate`` of them for "truncated"), "penalty",
        "augmented_lagrangian" (quadratic penalty / augmented Lagrangian with
        weight ``penalty`` instead of the constraints).
    tol : float
        Relative residual tolerance of the adjoint solve.
    maxiter : int, optional
        Iteration cap of the adjoint solve (default: a multiple of its size).
    solver : str, optional
        Solver of the inner problem. On the QP fast path "DAQP" (default for
        small problems), "PIQP" or "CLARABEL" (default for large ones), called
        directly; another name takes the general path, where it is a cvxpy
        solver (default Clarabel with tight tolerances).
    solver_options : dict, optional
        Options passed to that solver.
    active_tol : float
        Threshold of the active-set classification (see :func:`cbo.kkt.active_set`).
    polish_solution : bool
        Newton-polish the cvxpy solution on the KKT system (recommended).
    warm_start : bool
        Start the adjoint solve from the previous call's solution on this problem
        (when the active set is the same).
    on_nonconvergence : {"raise", "warn"}
        What a non-converged adjoint solve does.
    steps : int
        Steps T of the iterative routes.
    truncate : int, optional
        K for "truncated": differentiate through the last K of the T steps.
    penalty : float
        Weight rho of the penalty routes.
    route : {"smooth", "conic"}, optional
        Default: "smooth" (the KKT system of the inner problem, after the
        epigraph reformulation of piecewise-linear atoms) when it applies, else
        "conic" (cvxpy's cone program, :mod:`cbo.conic`, for problems with cone
        constraints): its KKT system, reduced to the active part of each cone, is
        solved by the same adjoint solvers. The routes "reverse", "truncated",
        "forward" and the penalty methods are the smooth route's only.
    return_info : bool
        Also return a :class:`HypergradInfo`.

    Returns
    -------
    grad : tensor or list of tensors
        Shaped, typed and placed like ``x``.
    info : HypergradInfo, if ``return_info``.
    """
    if method is not None and method not in METHODS:
        raise ValueError(f"Unknown method {method!r}. Known methods: {', '.join(METHODS)}.")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    xs, like = as_parameter_tensors(problem, x)
    if problem.is_linear:
        warnings.warn(
            "The inner problem is a linear program: y*(x) is piecewise linear in the constraints' "
            "right-hand sides and piecewise constant in the cost, so the hypergradient is zero almost "
            "everywhere in cost parameters and undefined where the optimal vertex changes. For informative "
            "gradients add a small strongly convex term, e.g. 1e-3 * cp.sum_squares(y), to the inner objective.",
            DegenerateKKTWarning,
            stacklevel=external_stacklevel(),
        )

    route, reason = select_route(problem, route)
    if route == "smooth" and uses_qp_path(problem, method, solver, polish_solution):
        try:
            return _qp_hypergrad(problem, x, xs, like, solver, solver_options, active_tol, warm_start,
                                 reason, return_info, timings, start)
        except GeneralPathNeeded:  # a degenerate point: the general route diagnoses it
            timings.clear()
    method = method or "cg"
    if route == "conic":
        if method not in ADJOINT_SOLVERS:
            raise ValueError(
                f"method={method!r} differentiates the smooth route's Lagrangian, which this problem does not "
                f"have ({reason}). The conic route takes the adjoint solvers: {', '.join(ADJOINT_SOLVERS)}.")
        return _conic_hypergrad(problem, x, xs, like, method, tol, maxiter, on_nonconvergence, solver_options,
                                polish_solution, reason, return_info, timings, start)

    with timed(timings, "inner_solve"):
        sol = solve_inner(problem, [t.detach().cpu().numpy() for t in xs], solver, solver_options)
    batch = [t.unsqueeze(0) for t in xs]  # the KKT machinery is batched: a batch of one
    with timed(timings, "polish"):
        op, (active,), (polish_info,) = kkt_at_solutions(problem, batch, [sol], method, active_tol, polish_solution)
    with timed(timings, "kkt_checks"):
        (licq,) = licq_check(op)
        ((curvature_min, curvature_max),) = curvature_check(op)
    with timed(timings, "adjoint_solve"):
        if method in ADJOINT_SOLVERS:
            grads, solve_info, outer_value = _implicit_gradients(problem, xs, op, active, method, tol, maxiter,
                                                                 warm_start, on_nonconvergence)
        else:
            grads, solve_info, outer_value = _route_gradients(problem, xs, op, method, steps, truncate, penalty,
                                                              tol, maxiter)
    timings["total"] = time.perf_counter() - start

    result = like_input(grads, x, like)
    if not return_info:
        return result
    y, mu, nu = torch.split(op.w.detach()[0], [problem.n_y, problem.n_ineq, problem.n_eq])
    info = HypergradInfo(
        method=method, solver=sol.solver, solver_status=sol.status, outer_value=outer_value,
        y=problem.user_y(y), mu=mu, nu=nu, active_set=active,
        licq=licq, reduced_hessian_extremes=(curvature_min, curvature_max),
        kkt_residual=polish_info.residual_after, polish=polish_info,
        linear_solve=solve_info, timings=timings, route=reason,
    )
    return result, info


def uses_qp_path(problem: BilevelProblem, method: str | None, solver: str | None, polish_solution: bool) -> bool:
    """Whether a call takes the compiled QP fast path of :mod:`cbo.qp`: the problem compiles to a QP,
    the method is the default or "direct", the solver is one that path calls, and the polish is on."""
    return (problem.qp_program is not None and method in (None, "direct") and polish_solution
            and (solver is None or solver.upper() in QP_SOLVERS))


def _qp_hypergrad(problem, x, xs, like, solver, solver_options, active_tol, warm_start, reason, return_info,
                  timings, start):
    """dF/dx = d_x F + (dy*/dx)^T d_y F on the compiled QP: one factorization of K_S (:mod:`cbo.qp`)."""
    program = problem.qp_program
    values = [t.detach().cpu().numpy() for t in xs]
    point = program.solve(values, solver=solver, solver_options=solver_options, active_tol=active_tol,
                          warm_start=warm_start)
    timings.update(point.timings)
    y_flat = torch.as_tensor(point.y, device=xs[0].device)
    outer_value, dF_dx, dF_dy = _outer_gradients(problem, xs, y_flat)
    with timed(timings, "adjoint_solve"):
        implicit = program.vjp(point, dF_dy.cpu().numpy())
    grads = [gx + torch.as_tensor(g, dtype=gx.dtype, device=gx.device) for gx, g in zip(dF_dx, implicit)]
    timings["total"] = time.perf_counter() - start
    result = like_input(grads, x, like)
    if not return_info:
        return result
    device = xs[0].device
    info = HypergradInfo(
        method="direct", solver=point.how, solver_status=point.status, outer_value=outer_value,
        y=problem.user_y(y_flat), mu=torch.as_tensor(point.mu, device=device),
        nu=torch.as_tensor(point.nu, device=device), active_set=qp_active_set(program, point),
        licq=qp_licq(point), reduced_hessian_extremes=None, kkt_residual=point.kkt_residual,
        polish=PolishInfo(1, float("nan"), point.kkt_residual, True, "one solve on the active set"),
        linear_solve=qp_solve_info(program, point, dF_dy.cpu().numpy()), timings=timings,
        route=reason, path="compiled QP",
    )
    return result, info


def qp_active_set(program, point: QPPoint) -> ActiveSet:
    """The fast path's active set as the entries of the problem's stacked inequalities."""
    active_rows = program.n_eq + np.flatnonzero(point.active)
    return ActiveSet(torch.as_tensor(np.flatnonzero(np.isin(program.mu_index, active_rows)), dtype=torch.long))


def qp_licq(point: QPPoint) -> LICQInfo:
    """LICQ from the factorization: K_S is nonsingular (the fast path checked it), so the active rows are
    independent; ``conditioning`` is K_S's reciprocal condition number."""
    n_rows = point.factor.size - point.z.size
    return LICQInfo(n_rows, n_rows, point.factor.rcond)


def qp_solve_info(program, point: QPPoint, dF_dy: np.ndarray) -> SolveInfo:
    """The adjoint solve's true relative residual on K_S."""
    residual = program.adjoint_residual(point, dF_dy)
    return SolveInfo("direct", True, 1, residual, 0.0, {"factorization": point.factor.kind, "rcond": point.factor.rcond})


def select_route(problem: BilevelProblem, route: str | None) -> tuple[str, str]:
    """The route ("smooth" or "conic") for ``route`` (None: the problem's default) and why.

    Raises the reason the smooth route does not apply if it is requested anyway.
    """
    if route is None:
        return problem.route, problem.route_reason
    if route not in ROUTES:
        raise ValueError(f"Unknown route {route!r}. Known routes: {', '.join(ROUTES)} (or None: automatic).")
    if route == "smooth" and problem.smooth_error is not None:
        raise problem.smooth_error
    return route, problem.route_reason if route == problem.route else "conic: requested"


def _conic_hypergrad(problem, x, xs, like, method, tol, maxiter, on_nonconvergence, solver_options,
                     polish_solution, reason, return_info, timings, start):
    """dF/dx = d_x F + (dy*/dx)^T d_y F with the reduced conic adjoint of :mod:`cbo.conic`."""
    program = conic_program(problem)
    with timed(timings, "inner_solve"):
        point = program.solve([t.detach().cpu().numpy() for t in xs], solver_options, polish_solution)
    y_flat = torch.as_tensor(np.concatenate(program.variable_values(point)), dtype=torch.float64,
                             device=xs[0].device)
    outer_value, dF_dx, dF_dy = _outer_gradients(problem, xs, y_flat)
    with timed(timings, "adjoint_solve"):
        (implicit,), solve_info = program.vjp([point], [[g.cpu().numpy() for g in problem.split_y(dF_dy)]], method,
                                              tol=tol, maxiter=maxiter, on_nonconvergence=on_nonconvergence,
                                              like=xs[0])
    grads = [gx + torch.as_tensor(g, dtype=gx.dtype, device=gx.device) for gx, g in zip(dF_dx, implicit)]
    timings["total"] = time.perf_counter() - start
    result = like_input(grads, x, like)
    if not return_info:
        return result
    polish_info = PolishInfo(point.polish_steps, point.residual_before, point.residual_after, True,
                             "" if polish_solution else "disabled")
    info = HypergradInfo(
        method=method, solver="CLARABEL", solver_status=point.status, outer_value=outer_value,
        y=problem.user_y(y_flat), mu=None, nu=None, active_set=None, licq=None, reduced_hessian_extremes=None,
        kkt_residual=point.residual_after, polish=polish_info, linear_solve=solve_info, timings=timings,
        route=reason, cones=point.cones,
    )
    return result, info


# ---------------------------------------------------------------- steps

def _implicit_gradients(problem, xs, op, active, method, tol, maxiter, warm_start, on_nonconvergence):
    """dF/dx = d_x F - (dR/dx)^T v with K v = (d_y F, 0) solved by ``method``."""
    y_flat = op.w.detach()[0, : problem.n_y]
    outer_value, dF_dx, dF_dy = _outer_gradients(problem, xs, y_flat)
    b = torch.cat([dF_dy, torch.zeros(op.n_dual, dtype=dF_dy.dtype, device=dF_dy.device)]).unsqueeze(0)
    x0 = _warm_start(problem, method, active) if warm_start else None
    v, solve_info = adjoint_solve(op, b, method, x0=x0, tol=tol, maxiter=maxiter, on_nonconvergence=on_nonconvergence)
    _ADJOINT_CACHE.setdefault(problem, {})[method] = (active.signature, v.detach())
    return [gx - gr[0] for gx, gr in zip(dF_dx, op.vjp_x(v))], solve_info, outer_value


def _route_gradients(problem, xs, op, method, steps, truncate, penalty, tol, maxiter):
    """The iterative and penalty routes of :mod:`cbo.routes`, reported as a SolveInfo."""
    if method in ITERATIVE_ROUTES:
        grads, info = iterative_hypergrad(problem, xs, op, method, steps, truncate)
    else:
        _, mu, nu = torch.split(op.w.detach()[0], [problem.n_y, problem.n_ineq, problem.n_eq])
        grads, info, _ = penalty_hypergrad(problem, xs, method, penalty, mu.cpu().numpy(), nu.cpu().numpy(),
                                           tol, maxiter or 10000)
    outer_value = _outer_gradients(problem, xs, op.w.detach()[0, : problem.n_y])[0]
    return grads, SolveInfo(method, True, info.iterations, info.residual, tol, info.extra), outer_value


def _outer_gradients(problem, xs, y_flat):
    """F(x, y), d_x F (list), d_y F (flat)."""
    x_req = [t.detach().requires_grad_(True) for t in xs]
    y_req = y_flat.detach().requires_grad_(True)
    with torch.enable_grad():
        F = problem.outer_value(x_req, y_req)
        grads = torch.autograd.grad(F, [*x_req, y_req], allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip([*x_req, y_req], grads)]
    return float(F.detach()), grads[:-1], grads[-1]


def forget_warm_starts(problem: BilevelProblem) -> None:
    """Drop the adjoint vectors and active sets kept from earlier calls on ``problem`` (the next call starts cold)."""
    _ADJOINT_CACHE.pop(problem, None)
    if problem.qp_program is not None:
        problem.qp_program.forget_warm_starts()


def _warm_start(problem, method, active: ActiveSet):
    cached = _ADJOINT_CACHE.get(problem, {}).get(method)
    if cached is not None and cached[0] == active.signature:
        return cached[1]
    return None
