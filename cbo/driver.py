r"""`minimize`: the outer loop of a bilevel problem, driven by hypergradients.

    min_{x in C} F(x, y*(x)),   C = {x : outer constraints}

Each step computes g = dF/dx at x_k with :func:`cbo.hypergrad` and moves by
projected gradient ("sgd"), projected Adam ("adam") or L-BFGS with a
strong-Wolfe line search ("lbfgs", unconstrained x only):

    x_{k+1} = P_C(x_k - lr * g_k)            (sgd)
    x_{k+1} = P_C(adam_step(x_k, g_k))        (adam)

P_C is the Euclidean projection, a small cvxpy problem
``argmin_z ||z - v||^2 s.t. z in C`` compiled once (a shifted clip when C is
a box, possibly with a fixed sum: the simplex, a budget).
The loop stops after ``steps`` updates or when the gradient mapping

    G(x) = (x - P_C(x - lr * g)) / lr

(the gradient itself when x is unconstrained) has norm below ``tol``.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import cvxpy as cp
import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import (ConvergenceError, DivergenceError, InnerSolveError, ProblemDefinitionError,
                     StrictComplementarityError, external_stacklevel)
from .hypergrad import HypergradInfo, TensorLike, as_parameter_tensors, hypergrad, like_input
from .problem import BilevelProblem
from .reformulate import substitute

__all__ = ["minimize", "MinimizeResult", "History", "OuterProjection", "plot_history", "OPTIMIZERS"]

OPTIMIZERS = ("adam", "sgd", "lbfgs")
DEFAULT_LR = {"adam": 1e-2, "sgd": 1e-2, "lbfgs": 1.0}
PROJECTION_QP_SOLVER = {"solver": "OSQP", "polishing": True, "eps_abs": 1e-10, "eps_rel": 1e-10, "max_iter": 20_000}
PROJECTION_CONIC_SOLVER = {"solver": "CLARABEL", "tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10}
FEASIBILITY_TOL = 1e-12  # a point violating no outer constraint by more than this is its own projection
# Divergence: F above its best value by this many times the progress made so far (or |F|).
_DIVERGENCE_FACTOR = 1e4


@dataclass
class History:
    """What :func:`minimize` saw at each evaluated point x_k (one entry per hypergradient).

    ``stationarity`` is ||G(x_k)||, the norm of the gradient mapping (see
    :mod:`cbo.driver`); ``timings`` holds seconds per phase (inner_solve, polish,
    kkt_checks, adjoint_solve from :class:`cbo.HypergradInfo`, plus projection
    and total); ``warnings`` holds (step, category, message) of every warning
    raised by the hypergradients (each kind is shown once, when first seen).
    """

    f: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    stationarity: list[float] = field(default_factory=list)
    kkt_residual: list[float] = field(default_factory=list)
    adjoint_iterations: list[int] = field(default_factory=list)
    x: list[list[torch.Tensor]] = field(default_factory=list)
    timings: list[dict[str, float]] = field(default_factory=list)
    warnings: list[tuple[int, str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.f)

    def best(self) -> tuple[int, float, list[torch.Tensor]]:
        """(step, F, x) of the evaluated point with the smallest F."""
        step = int(np.argmin(self.f))
        return step, self.f[step], self.x[step]

    def total_time(self, phase: str = "total") -> float:
        """Seconds spent in ``phase`` over all steps."""
        return sum(t.get(phase, 0.0) for t in self.timings)


@dataclass(repr=False)
class MinimizeResult:
    """Outcome of :func:`minimize`.

    Attributes
    ----------
    x : tensor or list of tensors
        Last iterate, shaped, typed and placed like ``x0``.
    fun : float
        F(x, y*(x)) at ``x``.
    grad : tensor or list of tensors
        dF/dx at ``x``.
    converged : bool
        The gradient-mapping norm went below ``tol``.
    message : str
        Why the loop stopped.
    n_steps : int
        Updates of x made.
    history : History
    info : HypergradInfo
        Diagnostics of the last hypergradient.
    """

    x: torch.Tensor | list[torch.Tensor]
    fun: float
    grad: torch.Tensor | list[torch.Tensor]
    converged: bool
    message: str
    n_steps: int
    history: History
    info: HypergradInfo

    def __repr__(self) -> str:
        return (f"MinimizeResult(fun={self.fun:.6g}, converged={self.converged}, n_steps={self.n_steps}, "
                f"message={self.message!r})")


# ---------------------------------------------------------------- projection

class OuterProjection:
    r"""Euclidean projection onto the outer constraints, P_C(v) = argmin_{z in C} ||z - v||^2.

    The constraints are written on the problem's ``cp.Parameter`` objects; each
    parameter is replaced by a variable z of its shape, and the projection is
    compiled once by cvxpy (the point v enters as a parameter).

    Raises
    ------
    ProblemDefinitionError
        If a constraint involves an inner variable, none of the parameters, or
        is not DCP once the parameters become variables; or, when called, if
        the constraints are infeasible.
    """

    def __init__(self, parameters: Sequence[cp.Parameter], constraints: Sequence[cp.Constraint]):
        self.constraints = list(constraints) + _sign_constraints(parameters)
        self._signs = [(p.is_nonneg(), p.is_nonpos()) for p in parameters]
        if not self.constraints:
            self._problem = None
            return
        self._points = [cp.Parameter(p.shape) for p in parameters]
        self._projected = [cp.Variable(p.shape, name=f"{p.name()}_projected") for p in parameters]
        substitution = {p.id: z for p, z in zip(parameters, self._projected)}
        rewritten = [_rewrite_outer_constraint(c, i, parameters, substitution) for i, c in enumerate(self.constraints)]
        distance = sum(cp.sum_squares(z - v) for z, v in zip(self._projected, self._points))
        self._problem = cp.Problem(cp.Minimize(distance), rewritten)
        self._box_and_sum = _box_and_sum(self._projected, rewritten)
        # An interior-point solution of a projection that lands on a bound is off by about
        # sqrt(tolerance) there (z_i s_i = mu): OSQP's polish finds the exact face of a QP.
        # Clarabel is the fallback when OSQP stops short.
        self._solvers = [PROJECTION_QP_SOLVER, PROJECTION_CONIC_SOLVER] if self._problem.is_qp() \
            else [PROJECTION_CONIC_SOLVER]

    def __call__(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """P_C(xs), as tensors like ``xs``; a point of C is returned as it is."""
        if self._problem is None:
            return xs
        values = [x.detach().cpu().numpy() for x in xs]
        for z, value in zip(self._projected, values):
            z.value = value
        if all(np.all(c.violation() <= FEASIBILITY_TOL) for c in self._problem.constraints):
            return xs
        if self._box_and_sum is not None:  # bounds and sums: a clip after a shift, no solve
            return [torch.as_tensor(_project_box_and_sum(v, *part), dtype=x.dtype, device=x.device)
                    for v, part, x in zip(values, self._box_and_sum, xs)]
        for point, value in zip(self._points, values):
            point.value = value
        for solver in self._solvers:
            with warnings.catch_warnings():  # the status is checked below
                warnings.filterwarnings("ignore", message="Solution may be inaccurate.*")
                try:
                    self._problem.solve(**solver)
                except cp.error.SolverError:
                    continue
            if self._problem.status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE, cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
                break
        if self._problem.status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
            raise ProblemDefinitionError(
                "The outer constraints are infeasible: no x satisfies "
                f"{'; '.join(str(c) for c in self.constraints)}. Check their bounds and signs."
            )
        if self._problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
            raise ProblemDefinitionError(f"Projecting x onto the outer constraints failed (cvxpy status "
                                         f"{self._problem.status!r}). Simplify the constraints or rescale x.")
        # Solver round-off must not step outside a sign attribute: cvxpy rejects -1e-9 for nonneg=True.
        values = [np.clip(z.value, 0 if nonneg else None, 0 if nonpos else None) if nonneg or nonpos else z.value
                  for z, (nonneg, nonpos) in zip(self._projected, self._signs)]
        return [torch.as_tensor(np.asarray(v, dtype=float), dtype=x.dtype, device=x.device).reshape(x.shape)
                for v, x in zip(values, xs)]


def _box_and_sum(variables: Sequence[cp.Variable], constraints) -> list[tuple] | None:
    """(lower, upper, total) per variable if every constraint is a bound ``z <= c`` / ``c <= z`` with c
    constant (broadcast to z's shape) or ``cp.sum(z) == c`` (total None without one), else None."""
    parts = {v.id: [np.full(v.shape, -np.inf), np.full(v.shape, np.inf), None] for v in variables}
    for c in constraints:
        lhs, rhs = c.args
        if isinstance(c, cp.constraints.Equality):
            summed, total = (lhs, rhs) if isinstance(lhs, cp.atoms.affine.sum.Sum) else (rhs, lhs)
            z = summed.args[0] if isinstance(summed, cp.atoms.affine.sum.Sum) and summed.axis is None else None
            if getattr(z, "id", None) not in parts or not total.is_constant() or total.parameters() \
                    or parts[z.id][2] is not None:
                return None
            parts[z.id][2] = float(total.value)
        elif isinstance(c, cp.constraints.Inequality):
            if getattr(lhs, "id", None) in parts and rhs.is_constant() and not rhs.parameters():
                part = parts[lhs.id]
                part[1] = np.minimum(part[1], np.broadcast_to(rhs.value, lhs.shape))
            elif getattr(rhs, "id", None) in parts and lhs.is_constant() and not lhs.parameters():
                part = parts[rhs.id]
                part[0] = np.maximum(part[0], np.broadcast_to(lhs.value, rhs.shape))
            else:
                return None
        else:
            return None
    for lo, hi, total in parts.values():
        if np.any(lo > hi) or (total is not None and not lo.sum() <= total <= hi.sum()):
            return None  # infeasible: the solver path reports it
    return [tuple(parts[v.id]) for v in variables]


def _project_box_and_sum(v: np.ndarray, lo: np.ndarray, hi: np.ndarray, total: float | None) -> np.ndarray:
    r"""argmin ||z - v||^2 s.t. lo <= z <= hi (and sum(z) = total): z = clip(v - tau, lo, hi), with the
    shift tau = 0 without a sum, else the root of the nonincreasing sum(clip(v - tau, lo, hi)) = total,
    bracketed by bisection and then solved exactly on the entries strictly between their bounds."""
    if total is None:
        return np.clip(v, lo, hi)
    excess = lambda tau: np.clip(v - tau, lo, hi).sum() - total  # noqa: E731
    low, high = v.min() - abs(total) - 1.0, v.max() + abs(total) + 1.0  # excess(low) >= 0 >= excess(high)
    while excess(low) < 0:  # unbounded above: widen (excess(low) grows without limit)
        low -= 2 * (high - low)
    while excess(high) > 0:
        high += 2 * (high - low)
    for _ in range(100):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if excess(middle) > 0 else (low, middle)
    free = (v - high > lo) & (v - high < hi)
    if free.any():  # sum over free entries of (v_i - tau) + the clipped ones = total, solved for tau
        clipped = np.clip(v - high, lo, hi)
        high = (v[free].sum() + clipped[~free].sum() - total) / free.sum()
    return np.clip(v - high, lo, hi)


def _sign_constraints(parameters: Sequence[cp.Parameter]) -> list[cp.Constraint]:
    """x >= 0 for parameters declared ``nonneg=True`` (x <= 0 for ``nonpos``): implied outer constraints."""
    return [p >= 0 for p in parameters if p.is_nonneg()] + [p <= 0 for p in parameters if p.is_nonpos()]


def _rewrite_outer_constraint(constraint, index, parameters, substitution):
    """The constraint with each outer parameter replaced by its projection variable."""
    where = f"Outer constraint {index} (`{constraint}`)"
    if constraint.variables():
        raise ProblemDefinitionError(
            f"{where} involves the variable(s) {[v.name() for v in constraint.variables()]}. Outer "
            "constraints restrict the parameters x only; constraints on y belong in the inner problem.")
    if not any(p.id in substitution for p in constraint.parameters()):
        raise ProblemDefinitionError(
            f"{where} involves none of the problem's parameters {[p.name() for p in parameters]}. "
            "Write it on the same cp.Parameter objects that were given to BilevelProblem.")
    rewritten = substitute(constraint, substitution)
    if not rewritten.is_dcp():
        raise ProblemDefinitionError(
            f"{where} is not convex in x (not DCP once x is a variable); the projection onto it is not "
            "defined. Rewrite it following cvxpy's DCP rules.")
    return rewritten


# ---------------------------------------------------------------- the loop

def minimize(
    problem: BilevelProblem,
    x0: TensorLike | Sequence[TensorLike],
    *,
    method: str = "cg",
    optimizer: str = "adam",
    lr: float | None = None,
    lr_decay: float = 0.0,
    steps: int = 100,
    outer_constraints: Sequence[cp.Constraint] = (),
    callback: Callable[..., bool | None] | None = None,
    progress: bool = True,
    tol: float = 1e-6,
    warm_start: bool = True,
    hypergrad_options: dict | None = None,
    solver: str | None = None,
    solver_options: dict | None = None,
) -> MinimizeResult:
    r"""Minimize F(x, y*(x)) over x in C by first-order steps on the hypergradient.

    Parameters
    ----------
    problem : BilevelProblem
        With an ``outer`` objective.
    x0 : tensor or list of tensors
        Starting point, one value per ``problem.parameters``; projected onto C first.
    method : str
        Hypergradient method of :func:`cbo.hypergrad` ("cg", "minres", "direct", ...).
    optimizer : {"adam", "sgd", "lbfgs"}
        Projected Adam, projected gradient descent, or L-BFGS with a strong-Wolfe
        line search (torch.optim.LBFGS; only without outer constraints).
    lr : float, optional
        Step size (default 1e-2 for adam and sgd, 1.0 for lbfgs).
    lr_decay : float
        sgd and adam use the step lr / (1 + lr_decay * k) at step k: constant-step
        Adam hovers at a distance of about lr from a solution, a decaying step settles.
    steps : int
        Maximum number of updates of x (lbfgs: of hypergradient evaluations).
    outer_constraints : sequence of cvxpy constraints
        Convex constraints on the problem's parameters, e.g. ``[w >= 0, cp.sum(w) == 1]``.
        A parameter declared ``nonneg=True`` (``nonpos=True``) gets ``>= 0`` (``<= 0``) implicitly.
    callback : callable, optional
        ``callback(step, x, f, grad, info)`` after each evaluation; return True to stop.
    progress : bool
        Show a tqdm progress bar with F, ||dF/dx|| and the inner KKT residual.
    tol : float
        Stop when the gradient-mapping norm ||G(x)|| <= tol.
    warm_start : bool
        Start each inner solve (for solvers that warm-start: OSQP, SCS) and each
        adjoint solve from the previous step's solution.
    hypergrad_options : dict, optional
        Further keywords of :func:`cbo.hypergrad` (tol, maxiter, active_tol, ...).
    solver, solver_options
        cvxpy solver of the inner problem and its options.

    Returns
    -------
    MinimizeResult

    Raises
    ------
    DivergenceError
        If F or dF/dx becomes non-finite, or F grows far above its best value
        (step size too large); the message says at which step.
    InnerSolveError, StrictComplementarityError, ConvergenceError
        If the inner problem cannot be solved at some iterate, y*(x) is not
        differentiable there, or the adjoint solve fails; the message names the
        step and x, and ``err.history`` holds the iterates so far.
    ProblemDefinitionError
        For infeasible or ill-formed outer constraints.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {optimizer!r}. Known optimizers: {', '.join(OPTIMIZERS)}.")
    if problem.outer is None:
        raise ValueError("The problem has no outer objective: pass outer=F to BilevelProblem.")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}.")
    lr = DEFAULT_LR[optimizer] if lr is None else float(lr)
    if not lr > 0 or not lr_decay >= 0:
        raise ValueError(f"lr must be positive and lr_decay nonnegative, got lr={lr}, lr_decay={lr_decay}.")

    xs, like = as_parameter_tensors(problem, x0)
    project = OuterProjection(problem.parameters, outer_constraints)
    if optimizer == "lbfgs" and project.constraints:
        raise ValueError(
            "optimizer='lbfgs' does not handle outer constraints (a projection breaks its line search), "
            "including the x >= 0 implied by a parameter declared nonneg=True. Use optimizer='adam' or "
            "'sgd', or reparametrize x so that it is unconstrained.")
    xs = project(xs)
    evaluate = _Evaluator(problem, method, warm_start, hypergrad_options, solver, solver_options)
    loop = _LBFGSLoop if optimizer == "lbfgs" else _ProjectedLoop
    with tqdm(total=steps, desc="cbo.minimize", disable=not progress, leave=True, mininterval=0.5) as bar:
        xs, record, message, converged, n_steps = loop(evaluate, project, optimizer, lr, lr_decay, steps, tol, callback,
                                                       bar).run(xs)
    return MinimizeResult(
        x=like_input(xs, x0, like), fun=record.f, grad=like_input(record.grads, x0, like),
        converged=converged, message=message, n_steps=n_steps, history=evaluate.history, info=record.info)


@dataclass
class _Point:
    """One evaluated iterate."""

    xs: list[torch.Tensor]
    f: float
    grads: list[torch.Tensor]
    info: HypergradInfo


class _Evaluator:
    """F and dF/dx at x with :func:`cbo.hypergrad`; records the history and watches for divergence."""

    def __init__(self, problem, method, warm_start, hypergrad_options, solver, solver_options):
        self.problem = problem
        self.options = {"method": method, "warm_start": warm_start, "solver": solver, **(hypergrad_options or {})}
        self.options["solver_options"] = {**(solver_options or {}), **({} if warm_start else {"warm_start": False})}
        self.history = History()
        self.best = math.inf

    def __call__(self, step: int, xs: list[torch.Tensor]) -> _Point:
        if not all(bool(torch.isfinite(x).all()) for x in xs):
            raise DivergenceError(
                f"The outer loop diverged at step {step}: x has non-finite entries. The step size is too large "
                "for this problem: lower lr (e.g. by 10x), or use optimizer='adam'.", self.history)
        start = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                grads, info = hypergrad(self.problem, xs, return_info=True, **self.options)
        except (InnerSolveError, StrictComplementarityError, ConvergenceError) as err:
            raise self._at_step(err, step, xs) from err
        self._report_warnings(step, caught)
        timings = {**info.timings, "total": time.perf_counter() - start}
        point = _Point(xs, info.outer_value, grads, info)
        self._check_divergence(step, point)
        h = self.history
        h.f.append(point.f)
        h.grad_norm.append(_norm(grads))
        h.kkt_residual.append(info.kkt_residual)
        h.adjoint_iterations.append(info.linear_solve.iterations)
        h.x.append([x.detach().cpu().clone() for x in xs])
        h.timings.append(timings)
        self.best = min(self.best, point.f)
        return point

    def _at_step(self, err: Exception, step: int, xs: list[torch.Tensor]) -> Exception:
        """``err`` (same type and attributes) with the step, x and advice in its message and the history
        so far as ``err.history``."""
        advice = {
            InnerSolveError: "The outer iterate may have left the region where the inner problem is solvable: add "
                             "outer_constraints that keep x there, or lower lr.",
            StrictComplementarityError: "The outer iterate reached a point where y*(x) is not differentiable (a "
                                        "constraint switching between active and inactive): lower lr, start "
                                        "elsewhere, or add outer_constraints that keep x on one side.",
            ConvergenceError: "Pass hypergrad_options={'method': 'direct'} or {'on_nonconvergence': 'warn'}.",
        }
        advice = next(text for kind, text in advice.items() if isinstance(err, kind))
        located = copy.copy(err)
        located.args = (f"At outer step {step}, x = {_describe(self.problem, xs)}: {err} {advice}",)
        located.history = self.history
        return located

    def _report_warnings(self, step: int, caught) -> None:
        """Record every warning; show the first of each category only, not one per step."""
        for w in caught:
            category = w.category.__name__
            if not any(seen == category for _, seen, _ in self.history.warnings):
                warnings.warn(
                    f"{w.message} [outer step {step}; later {category}s are recorded in result.history.warnings]",
                    w.category, stacklevel=external_stacklevel())
            self.history.warnings.append((step, category, str(w.message)))

    def _check_divergence(self, step: int, point: _Point) -> None:
        f0 = self.history.f[0] if self.history.f else point.f
        scale = max(abs(f0 - self.best), abs(self.best), 1e-12) if math.isfinite(self.best) else math.inf
        blown_up = not math.isfinite(point.f) or not all(bool(torch.isfinite(g).all()) for g in point.grads)
        if blown_up or point.f - self.best > _DIVERGENCE_FACTOR * scale:
            raise DivergenceError(
                f"The outer loop diverged at step {step}: F = {point.f:.6g} (started at {f0:.6g}, best "
                f"{self.best:.6g}), ||dF/dx|| = {_norm(point.grads):.3g}. The step size is too large for this "
                "problem: lower lr (e.g. by 10x), or use optimizer='adam' or 'lbfgs'.", self.history)


class _ProjectedLoop:
    """x_{k+1} = P_C(step(x_k, g_k)) for sgd and adam; one hypergradient per step."""

    def __init__(self, evaluate, project, optimizer, lr, lr_decay, steps, tol, callback, bar):
        self.evaluate, self.project, self.optimizer = evaluate, project, optimizer
        self.lr, self.lr_decay, self.steps, self.tol, self.callback, self.bar = lr, lr_decay, steps, tol, callback, bar

    def run(self, xs):
        leaves = [x.clone() for x in xs]
        adam = torch.optim.Adam(leaves, lr=self.lr) if self.optimizer == "adam" else None
        history = self.evaluate.history
        for step in range(self.steps + 1):
            lr = self.lr / (1 + self.lr_decay * step)
            point = self.evaluate(step, [x.clone() for x in leaves])
            start = time.perf_counter()
            descended = self.project([x - lr * g for x, g in zip(point.xs, point.grads)])
            history.timings[-1]["projection"] = time.perf_counter() - start
            stationarity = _norm([x - d for x, d in zip(point.xs, descended)]) / lr
            history.stationarity.append(stationarity)
            _show(self.bar, point, stationarity)
            if self.callback is not None and self.callback(step, point.xs, point.f, point.grads, point.info):
                return point.xs, point, f"stopped by the callback at step {step}", False, step
            if stationarity <= self.tol:
                return point.xs, point, f"||G(x)|| = {stationarity:.2e} <= tol = {self.tol:g}", True, step
            if step == self.steps:
                break
            if adam is None:
                new = descended
            else:
                for leaf, g in zip(leaves, point.grads):
                    leaf.grad = g.clone()
                adam.param_groups[0]["lr"] = lr
                adam.step()
                start = time.perf_counter()
                new = self.project(leaves)
                history.timings[-1]["projection"] += time.perf_counter() - start
            with torch.no_grad():
                for leaf, value in zip(leaves, new):
                    leaf.copy_(value)
            self.bar.update(1)
        return point.xs, point, f"reached steps = {self.steps} with ||G(x)|| = {stationarity:.2e} > tol", False, step


class _StopLBFGS(Exception):
    """Raised inside the L-BFGS closure to end the loop early."""


class _LBFGSLoop(_ProjectedLoop):
    """torch.optim.LBFGS with a strong-Wolfe line search; one history entry per hypergradient."""

    def run(self, xs):
        leaves = [x.clone().requires_grad_(True) for x in xs]
        lbfgs = torch.optim.LBFGS(leaves, lr=self.lr, max_iter=self.steps, max_eval=self.steps + 1,
                                  tolerance_grad=self.tol, tolerance_change=0.0, history_size=20,
                                  line_search_fn="strong_wolfe")
        points: list[_Point] = []

        def closure():
            step = len(points)
            point = self.evaluate(step, [x.detach().clone() for x in leaves])
            points.append(point)
            stationarity = _norm(point.grads)
            self.evaluate.history.stationarity.append(stationarity)
            self.evaluate.history.timings[-1]["projection"] = 0.0
            _show(self.bar, point, stationarity)
            if step:
                self.bar.update(1)
            for leaf, g in zip(leaves, point.grads):
                leaf.grad = g.clone()
            if self.callback is not None and self.callback(step, point.xs, point.f, point.grads, point.info):
                raise _StopLBFGS(f"stopped by the callback at step {step}")
            if stationarity <= self.tol:
                raise _StopLBFGS(f"||dF/dx|| = {stationarity:.2e} <= tol = {self.tol:g}")
            return torch.tensor(point.f, dtype=torch.float64)

        try:
            lbfgs.step(closure)
            message = f"L-BFGS stopped after {len(points)} evaluations with ||dF/dx|| = {_norm(points[-1].grads):.2e}"
        except _StopLBFGS as stop:
            message = str(stop)
        best = points[-1]
        converged = self.evaluate.history.stationarity[-1] <= self.tol
        return best.xs, best, message, converged, len(points) - 1


# ---------------------------------------------------------------- helpers

def _norm(tensors: Sequence[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.detach().double() ** 2).sum() for t in tensors)))


def _show(bar, point: _Point, stationarity: float) -> None:
    bar.set_postfix(F=f"{point.f:.4g}", grad=f"{stationarity:.2e}", kkt=f"{point.info.kkt_residual:.1e}",
                    refresh=False)


def _describe(problem: BilevelProblem, xs: Sequence[torch.Tensor]) -> str:
    """Parameter values for an error message: the entries if few, else norm and range."""
    parts = []
    for param, x in zip(problem.parameters, xs):
        values = x.detach().cpu().numpy()
        if values.size <= 6:
            text = np.array2string(values, precision=4, separator=", ")
        else:
            text = f"<{values.shape} array, norm {np.linalg.norm(values):.4g}, min {values.min():.4g}, max {values.max():.4g}>"
        parts.append(f"{param.name()} = {text}")
    return "{" + "; ".join(parts) + "}"


def plot_history(history: History, path: str | None = None, title: str | None = None):
    """Draw a :class:`History`: F, ||G(x)|| and ||dF/dx||, the inner KKT residual, and time per phase.

    Returns the matplotlib Figure; saves it as ``path`` (PNG, ...) if given.
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps = np.arange(len(history))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    (ax_f, ax_g), (ax_kkt, ax_t) = axes
    f = np.asarray(history.f)
    log_scale = len(f) > 1 and f.min() > 0 and f.max() > 100 * f.min()  # F spanning decades
    (ax_f.semilogy if log_scale else ax_f.plot)(steps, f, color="C0")
    ax_f.set(title="outer objective F(x, y*(x))", xlabel="step", ylabel="F")
    ax_g.semilogy(steps, np.maximum(history.grad_norm, 1e-300), label="||dF/dx||", color="C1")
    ax_g.semilogy(steps, np.maximum(history.stationarity, 1e-300), label="||G(x)|| (projected)", color="C2", ls="--")
    ax_g.set(title="hypergradient norm", xlabel="step")
    ax_g.legend()
    ax_kkt.semilogy(steps, np.maximum(history.kkt_residual, 1e-300), color="C3", label="KKT residual")
    ax_kkt.set(title="inner KKT residual after polish", xlabel="step")
    ax_it = ax_kkt.twinx()
    ax_it.plot(steps, history.adjoint_iterations, color="C4", alpha=0.6, label="adjoint iterations")
    ax_it.set_ylabel("adjoint iterations")
    ax_kkt.legend(handles=ax_kkt.get_lines() + ax_it.get_lines(), loc="upper right")
    phases = ["inner_solve", "polish", "kkt_checks", "adjoint_solve", "projection"]
    per_phase = [[t.get(p, 0.0) * 1e3 for t in history.timings] for p in phases]
    ax_t.stackplot(steps, per_phase, labels=phases, alpha=0.8)
    ax_t.set(title="time per step by phase", xlabel="step", ylabel="ms")
    ax_t.legend(loc="upper right", fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
