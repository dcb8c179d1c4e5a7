r"""`hypergrad`: dF/dx of F(x, y*(x)) by implicit differentiation of the inner KKT conditions.

At the inner solution w* = (y*, mu_A, nu) the KKT residual R(w*, x) = 0, so
K dw*/dx = -dR/dx and

    dF/dx = d_x F + (dy*/dx)^T d_y F = d_x F - (dR/dx)^T v,   K v = (d_y F, 0, 0),

one adjoint solve with the KKT matrix K (see :mod:`cbo.kkt`) whatever the
dimension of x.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace
from functools import cached_property
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import DegenerateKKTWarning, one_warning_per_category, warn
from .inner import solve_inner
from .compiled import compiled
from .conic import ConeStatus
from .kkt import ActiveSet, LICQInfo, PolishInfo, curvature_check, kkt_at_solutions, licq_check
from .linsolve import ADJOINT_SOLVERS, SolveInfo, adjoint_solve
from .approximate import UNROLLED_METHODS, PENALTY_METHODS, iterative_hypergrad, penalty_hypergrad
from .inputs import as_parameter_tensors, like_input, timed
from .options import Options, resolve_options
from .problem import BilevelProblem
from .qp import GeneralPathNeeded, QPPoint
from .qp_solvers import QP_SOLVERS
from .translate import kink_at, kinks

__all__ = ["hypergrad", "HypergradInfo", "Solved", "solve_at", "METHODS", "ROUTES"]

TensorLike = torch.Tensor | np.ndarray | float | Sequence[float]
METHODS = (*ADJOINT_SOLVERS, *UNROLLED_METHODS, *PENALTY_METHODS)
ROUTES = ("smooth", "conic")


class _Detail:
    """A field of :class:`HypergradInfo` read from the call's details, which are assembled at the first
    read of any of them (``info.details``)."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, info, owner=None):
        return self if info is None else info.details[self.name]


@dataclass(repr=False, eq=False)
class HypergradInfo:
    """Diagnostics of one :func:`hypergrad` call.

    ``outer_value``, ``linear_solve``, ``timings`` and ``route`` are set by the
    call; the other fields (the inner solution and its diagnostics) are
    assembled from the call's state at the first read of any of them, so that
    a call with ``return_info=True`` pays only for what is read (on the QP fast
    path the tensors of y, mu, nu and the active set cost as much as the
    adjoint solve).

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

    outer_value: float
    linear_solve: SolveInfo
    timings: dict[str, float]
    route: str
    assemble: Callable[[], dict]  # returns the other fields, by name

    method = _Detail()
    solver = _Detail()
    solver_status = _Detail()
    y = _Detail()
    mu = _Detail()
    nu = _Detail()
    active_set = _Detail()
    licq = _Detail()
    reduced_hessian_extremes = _Detail()
    kkt_residual = _Detail()
    polish = _Detail()
    cones = _Detail()
    path = _Detail()

    @cached_property
    def details(self) -> dict:
        """The assembled fields, by name (assembled once)."""
        return {"cones": None, "path": "general", **self.assemble()}

    def __repr__(self) -> str:
        names = [f.name for f in fields(self) if f.name != "assemble"]
        names += [name for name, value in vars(HypergradInfo).items() if isinstance(value, _Detail)]
        return f"HypergradInfo({', '.join(f'{name}={getattr(self, name)!r}' for name in names)})"


@one_warning_per_category()
def hypergrad(
    problem: BilevelProblem,
    x: TensorLike | Sequence[TensorLike],
    method: str | None = None,
    *,
    options: Options | None = None,
    return_info: bool = False,
    **settings,
):
    r"""Hypergradient dF/dx of F(x, y*(x)) for a :class:`BilevelProblem`.

    Solves the inner problem at x, polishes (y*, mu_A, nu) on the KKT system of
    the active set, then solves the adjoint system K v = (d_y F, 0, 0) and
    returns dF/dx = d_x F - (dR/dx)^T v. On an inner QP (``compiled(problem).qp``)
    one factorization of K serves the polish, the checks and the adjoint
    (:mod:`cbo.qp`); elsewhere the KKT operator of :mod:`cbo.kkt` (smooth
    route) or the reduced cone program of :mod:`cbo.conic` (conic route).

    Parameters
    ----------
    problem : BilevelProblem
    x : tensor or list of tensors
        Values of ``problem.parameters``: one tensor if there is one parameter,
        else a list in the same order. numpy arrays and floats are accepted.
        Computation runs in float64 on the device of the first tensor.
    method : str, optional
        As :attr:`Options.method`: default the QP fast path on QPs, "cg" elsewhere.
    options : Options, optional
        Settings (:class:`cbo.Options`); keyword ``settings`` override its fields.
    return_info : bool
        Also return a :class:`HypergradInfo`.
    **settings
        Any field of :class:`cbo.Options`: ``tol``, ``maxiter``,
        ``on_nonconvergence``, ``solver``, ``solver_options``, ``active_tol``,
        ``polish_solution``, ``warm_start``, ``route``, ``steps``, ``truncate``,
        ``penalty``.

    Returns
    -------
    grad : tensor or list of tensors
        Shaped, typed and placed like ``x``.
    info : HypergradInfo, if ``return_info``.

    Warns
    -----
    DegenerateKKTWarning, InaccurateSolutionWarning, ConvergenceWarning
        At most one of each category per call (:func:`cbo.errors.one_warning_per_category`).
    """
    options = resolve_options(options, method=method, **settings)
    if options.method is not None and options.method not in METHODS:
        raise ValueError(f"Unknown method {options.method!r}. Known methods: {', '.join(METHODS)}.")
    if problem.uses_multipliers and options.method in (*UNROLLED_METHODS, *PENALTY_METHODS):
        raise ValueError(f"method={options.method!r} does not differentiate multipliers, and `outer` takes one. "
                         f"Use an implicit method ({', '.join(ADJOINT_SOLVERS)}) or the default.")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    xs, like = as_parameter_tensors(problem, x)
    _warn_if_linear(problem)
    route, reason = select_route(problem, options.route)
    solved = solve_at(problem, xs, route, reason, options, timings)
    outer_value, dF_dx, dF_dw = _outer_gradients(problem, xs, solved.w)
    with timed(timings, "adjoint_solve"):
        grads, solve_info = solved.gradient(dF_dx, dF_dw)
    timings["total"] = time.perf_counter() - start
    result = like_input(grads, x, like, problem.parameters)
    if not return_info:
        return result
    w, route_fields = solved.w, solved.info  # not ``solved``: its gradient closure holds the factorization

    def assemble() -> dict:
        return {"y": problem.user_y(w[:problem.n_y]), **route_fields()}

    return result, HypergradInfo(outer_value, solve_info, timings, solved.route or reason, assemble)


@dataclass
class Solved:
    """The inner solution at x on one route, and how the gradient follows from it.

    ``w`` stacks all variables and the multipliers, w = (y, mu, nu) on the
    smooth route, (y, the multiplier outputs) on the conic route;
    ``gradient(dF_dx, dF_dw)`` returns dF/dx (a list, one per parameter) and
    the :class:`SolveInfo` of its linear solve; ``info()`` the route's fields of
    :class:`HypergradInfo` (built at their first read); it keeps no factorization alive.
    """

    w: torch.Tensor
    gradient: Callable[[list[torch.Tensor], torch.Tensor], tuple[list[torch.Tensor], SolveInfo]]
    info: Callable[[], dict]
    route: str | None = None  # the reason of a hand-over from the smooth to the conic route


def solve_at(problem: BilevelProblem, xs: list[torch.Tensor], route: str, reason: str, options: Options,
             timings: dict) -> Solved:
    """Solve the inner problem at ``xs`` on ``route``: the compiled QP where it applies (a degenerate point
    there hands over to the general smooth route, which diagnoses it), else the smooth or conic route (an
    atom at a kink of the smooth route's inner solution hands over to the conic route, :func:`check_kinks`)."""
    if route == "conic":
        return _solve_conic(problem, xs, reason, options, timings)
    if uses_qp_path(problem, options.method, options.solver, options.polish_solution):
        try:
            return _solve_compiled_qp(problem, xs, options, timings)
        except GeneralPathNeeded:
            timings.clear()
    try:
        return _solve_smooth(problem, xs, options, timings)
    except ConicRouteNeeded as handover:
        reason = str(handover)  # the conic route runs outside the handler: its errors do not chain to this one
    timings.clear()
    return replace(_solve_conic(problem, xs, reason, options, timings), route=reason)


def _warn_if_linear(problem: BilevelProblem) -> None:
    if problem.is_linear:
        warn(
            "The inner problem is a linear program: y*(x) is piecewise linear in the constraints' "
            "right-hand sides and piecewise constant in the cost, so the hypergradient is zero almost "
            "everywhere in cost parameters and undefined where the optimal vertex changes. For informative "
            "gradients add a small strongly convex term, e.g. 1e-3 * cp.sum_squares(y), to the inner objective.",
            DegenerateKKTWarning,
        )


def uses_qp_path(problem: BilevelProblem, method: str | None, solver: str | None, polish_solution: bool) -> bool:
    """Whether a call takes the compiled QP fast path of :mod:`cbo.qp`: the problem compiles to a QP,
    the method is the default or "direct", the solver is one that path calls, and the polish is on."""
    return (compiled(problem).qp is not None and method in (None, "direct") and polish_solution
            and (solver is None or solver.upper() in QP_SOLVERS))


# ---------------------------------------------------------------- the compiled QP, the smooth and the conic route

def _solve_compiled_qp(problem: BilevelProblem, xs, options: Options, timings: dict) -> Solved:
    """The compiled QP (:mod:`cbo.qp`): dF/dx = d_x F + theta-map^T (dF/d data), one factorization of K_S."""
    program = compiled(problem).qp
    point = program.solve([t.detach().cpu().numpy() for t in xs], solver=options.solver,
                          solver_options=options.solver_options, active_tol=options.active_tol,
                          warm_start=options.warm_start)
    timings.update(point.timings)
    device = xs[0].device

    def gradient(dF_dx, dF_dw):
        implicit = program.vjp(point, dF_dw.cpu().numpy())
        grads = [gx + torch.as_tensor(g, dtype=gx.dtype, device=gx.device) for gx, g in zip(dF_dx, implicit)]
        return grads, qp_solve_info([point])

    # The info keeps what it shows, not the point: a kept info does not hold the factorization.
    scalars = dict(method="direct", solver=point.how, solver_status=point.status, licq=qp_licq(point),
                   reduced_hessian_extremes=None, kkt_residual=point.kkt_residual, polish=qp_polish_info(point),
                   path="compiled QP")
    mu, nu, active, weak = point.mu, point.nu, point.active, point.weak

    def info() -> dict:
        return dict(scalars, mu=torch.as_tensor(mu, device=device), nu=torch.as_tensor(nu, device=device),
                    active_set=qp_active_set(program, active, weak))

    return Solved(torch.as_tensor(np.concatenate([point.y, point.mu, point.nu]), device=device), gradient, info)


def _solve_smooth(problem: BilevelProblem, xs, options: Options, timings: dict) -> Solved:
    """The smooth route (:mod:`cbo.kkt`): the KKT operator of the active set, an adjoint solver of
    :mod:`cbo.linsolve` for K v = (d_y F, 0), or an unrolled or penalty method of :mod:`cbo.approximate`."""
    method = options.method or "cg"
    with timed(timings, "inner_solve"):
        sol = solve_inner(problem, [t.detach().cpu().numpy() for t in xs], options.solver, options.solver_options)
    check_kinks(problem, xs, sol.y, options.active_tol)
    batch = [t.unsqueeze(0) for t in xs]  # the KKT machinery is batched: a batch of one
    with timed(timings, "polish"):
        op, (active,), (polish_info,) = kkt_at_solutions(problem, batch, [sol], method, options.active_tol,
                                                         options.polish_solution)
    with timed(timings, "kkt_checks"):
        (licq,) = licq_check(op)
        (curvature,) = curvature_check(op)
    if method in PENALTY_METHODS:
        options.warn_ignored(("solver", "solver_options"), "the penalized problem is solved with Clarabel")

    def gradient(dF_dx, dF_dw):
        if method in ADJOINT_SOLVERS:
            return _adjoint_gradients(problem, op, active, method, options, dF_dx, dF_dw)
        return _unrolled_or_penalty_gradients(problem, xs, op, method, options)

    w = op.w.detach()[0]
    _, mu, nu = torch.split(w, [problem.n_y, problem.n_ineq, problem.n_eq])
    def info() -> dict:
        return dict(method=method, solver=sol.solver, solver_status=sol.status, mu=mu, nu=nu, active_set=active,
                    licq=licq, reduced_hessian_extremes=curvature, kkt_residual=polish_info.residual_after,
                    polish=polish_info)

    return Solved(w, gradient, info)


def _solve_conic(problem: BilevelProblem, xs, reason: str, options: Options, timings: dict) -> Solved:
    """The conic route (:mod:`cbo.conic`): the cone program's KKT system reduced to the active part of each cone."""
    method = options.method or "cg"
    if method not in ADJOINT_SOLVERS:
        raise ValueError(
            f"method={method!r} differentiates the smooth route's Lagrangian, which this problem does not "
            f"have ({reason}). The conic route takes the adjoint solvers: {', '.join(ADJOINT_SOLVERS)}.")
    options.warn_ignored(("solver", "active_tol"), "the conic route solves the cone program with Clarabel and "
                         "reads each cone's activity at the polished solution")
    program = compiled(problem).conic
    with timed(timings, "inner_solve"):
        point = program.solve([t.detach().cpu().numpy() for t in xs], options.solver_options,
                              options.polish_solution)
    w = np.concatenate([*program.variable_values(point), program.multiplier_values(point)])

    def gradient(dF_dx, dF_dw):
        dF_dy, dF_dmultipliers = dF_dw[:problem.n_y], dF_dw[problem.n_y:]
        (implicit,), solve_info = program.vjp(
            [point], [[g.cpu().numpy() for g in problem.split_y(dF_dy)]], method, tol=options.tol,
            maxiter=options.maxiter, on_nonconvergence=options.on_nonconvergence, like=xs[0],
            grads_multipliers=[dF_dmultipliers.cpu().numpy()])
        return [gx + torch.as_tensor(g, dtype=gx.dtype, device=gx.device) for gx, g in zip(dF_dx, implicit)], \
            solve_info

    polish_info = PolishInfo(point.polish_steps, point.residual_before, point.residual_after, True,
                             "" if options.polish_solution else "disabled")
    diagnostics = dict(method=method, solver="CLARABEL", solver_status=point.status, mu=None, nu=None,
                       active_set=None, licq=None, reduced_hessian_extremes=None, kkt_residual=point.residual_after,
                       polish=polish_info, cones=point.cones)  # built here: nothing to convert, and no point kept

    return Solved(torch.as_tensor(w, dtype=torch.float64, device=xs[0].device), gradient, lambda: diagnostics)


def _adjoint_gradients(problem, op, active, method, options: Options, dF_dx, dF_dw):
    """dF/dx = d_x F - (dR/dx)^T v with K v = (d_y F, d_mu F, d_nu F) solved by ``method`` (d_mu F, d_nu F
    zero unless F takes multipliers; an inactive mu_i's row is mu_i = 0, which does not move with x)."""
    b = dF_dw.unsqueeze(0)
    x0 = _warm_start(problem, method, active) if options.warm_start else None
    v, solve_info = adjoint_solve(op, b, method, x0=x0, tol=options.tol, maxiter=options.maxiter,
                                  on_nonconvergence=options.on_nonconvergence)
    compiled(problem).adjoint_warm_starts[method] = (active.signature, v.detach())
    return [gx - gr[0] for gx, gr in zip(dF_dx, op.vjp_x(v))], solve_info


def _unrolled_or_penalty_gradients(problem, xs, op, method, options: Options):
    """The unrolled and penalty methods of :mod:`cbo.approximate` (they differentiate F themselves)."""
    if method in UNROLLED_METHODS:
        grads, info = iterative_hypergrad(problem, xs, op, method, options.steps, options.truncate)
    else:
        _, mu, nu = torch.split(op.w.detach()[0], [problem.n_y, problem.n_ineq, problem.n_eq])
        grads, info, _ = penalty_hypergrad(problem, xs, method, options.penalty, mu.cpu().numpy(), nu.cpu().numpy(),
                                           options.tol, options.maxiter or 10000)
    return grads, SolveInfo(method, True, info.iterations, info.residual, options.tol, info.extra)


# ---------------------------------------------------------------- the QP fast path's diagnostics

def qp_active_set(program, active_rows: np.ndarray, weak_rows: np.ndarray | None = None) -> ActiveSet:
    """The fast path's active and weakly active inequality rows (boolean masks over the QP's inequality
    rows, e.g. a :class:`QPPoint`'s ``active`` and ``weak``) as entries of the problem's stacked inequalities."""
    active = torch.from_numpy(program.entries(np.flatnonzero(active_rows)).astype(np.int64))
    if weak_rows is None or not weak_rows.any():
        return ActiveSet(active)
    weak = [int(i) for i in program.entries(np.flatnonzero(weak_rows))]
    return ActiveSet(active, weak, {i: program.problem.constraint_label(i) for i in weak})


def qp_licq(point: QPPoint) -> LICQInfo:
    """LICQ from the factorization: K_S is nonsingular (the fast path checked it), so the active rows are
    independent; ``conditioning`` is K_S's reciprocal condition number."""
    n_rows = point.factor.size - point.z.size
    return LICQInfo(n_rows, n_rows, point.factor.rcond)


def qp_solve_info(points: Sequence[QPPoint]) -> SolveInfo:
    """The fast path's adjoint solves (after :meth:`cbo.qp.QPProgram.vjp`): the largest true relative
    residual on K_S, the kind of factorization and the smallest reciprocal condition number."""
    return SolveInfo("direct", True, 1, max(p.adjoint_residual for p in points), 0.0,
                     {"factorization": points[0].factor.kind, "rcond": min(p.factor.rcond for p in points)})


def qp_polish_info(point: QPPoint) -> PolishInfo:
    """The fast path's polish: one solve of the KKT system on the active set."""
    return PolishInfo(1, float("nan"), point.kkt_residual, True, "one solve on the active set")


# ---------------------------------------------------------------- shared

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
    if route == "conic" and problem.uses_multipliers and problem.smooth_error is None:
        raise ValueError("route='conic' on a problem that takes the smooth route does not give its multipliers "
                         "(the two routes stack them differently), and a multiplier is among the outputs. Leave "
                         "route at its default or ask for variables only.")
    return route, problem.route_reason if route == problem.route else "conic: requested"


def _outer_gradients(problem, xs, w):
    """F(x, w), d_x F (list), d_w F (flat, like w = (y, mu, nu); zero off the outputs).

    The parameters and the outputs are the leaves of F's graph (slicing the outputs out of one leaf w
    added a third to the autograd time of a small F)."""
    x_req = [t.detach().requires_grad_(True) for t in xs]
    outputs = [o.requires_grad_(True) for o in problem.output_values(w.detach(), (), w)]
    with torch.enable_grad():
        F = problem.outer_at_outputs(x_req, outputs)
        grads = torch.autograd.grad(F, [*x_req, *outputs], allow_unused=True)
    dF_dx = [torch.zeros_like(t) if g is None else g for t, g in zip(x_req, grads)]
    return float(F.detach()), dF_dx, problem.output_cotangent(grads[len(xs):], 1, w.dtype, w.device)[0]


class ConicRouteNeeded(Exception):
    """The smooth route's inner solution is at a kink (:func:`check_kinks`); the message is the conic route's
    reason. Raised by the smooth route, caught where the conic route takes over (not seen by users)."""


def check_kinks(problem: BilevelProblem, xs: Sequence[torch.Tensor], y: np.ndarray, tol: float) -> None:
    r"""Hand over to the conic route if an atom of the inner problem has no second derivative at its solution.

    The smooth route differentiates the KKT conditions of the atoms' formulas; at a kink of a p-norm
    (its argument 0) or on the boundary of an atom's domain (``sqrt``, ``power``, ``entr`` at 0, see
    :class:`cbo.translate.Kink`) those conditions do not hold or have no Jacobian, and the adjoint
    solve returns a wrong gradient or none. The cone program has no such point. ``y`` is one item's
    stacked variables, ``xs`` its parameters; a kink counts within ``tol`` (relative to the largest
    value of x and y).

    Raises
    ------
    ConicRouteNeeded
        With the reason, e.g. "conic: PnormApprox(y, 2) is at its kink (its argument is 0) at the inner solution".
    """
    env = problem.env(xs, problem.split_y(torch.as_tensor(y, dtype=xs[0].dtype, device=xs[0].device)))
    parts = [problem.inner.objective, *problem.inner.constraints]
    kink = kink_at([k for part in parts for k in kinks(part)], env, tol)
    if kink is not None:
        raise ConicRouteNeeded(f"conic: {kink.atom} is at its kink ({kink.what}) at the inner solution")


def _warm_start(problem, method, active: ActiveSet):
    cached = compiled(problem).adjoint_warm_starts.get(method)
    if cached is not None and cached[0] == active.signature:
        return cached[1]
    return None
