r"""`minimize`: the outer loop of a bilevel problem, driven by hypergradients.

    min_{x in C} F(x, y*(x)),   C = {x : outer constraints}

Each step computes g = dF/dx at x_k with :func:`cbo.hypergrad`. The default,
``optimizer="auto"``, takes steps whose length does not depend on the scale of F
or x, chosen by a line search on F:

* "lbfgsb": L-BFGS-B (scipy.optimize, Byrd, Lu, Nocedal and Zhu 1995) when C is
  a box lo <= x <= hi (bounds, or no constraints at all); where its line search
  fails (a kink of F), SPG takes over from there;
* "spg": spectral projected gradient (Birgin, Martinez and Raydan 2000) for any
  other convex C, with Barzilai-Borwein steps and a nonmonotone line search:

      d_k = P_C(x_k - a_k g_k) - x_k,   x_{k+1} = x_k + t_k d_k,
      F(x_{k+1}) <= max_{0 <= j < M} F(x_{k-j}) + gamma t_k g_k^T d_k,
      a_{k+1} = s^T s / s^T y   (s = x_{k+1} - x_k, y = g_{k+1} - g_k).

Fixed-step methods remain for stochastic objectives (a minibatch F, where a
line search compares values of different functions): projected gradient
("sgd"), projected Adam ("adam"), and L-BFGS with a strong-Wolfe line search
("lbfgs", torch.optim.LBFGS, unconstrained x only):

    x_{k+1} = P_C(x_k - lr * g_k)            (sgd)
    x_{k+1} = P_C(adam_step(x_k, g_k))        (adam)

P_C is the Euclidean projection of :mod:`cbo.projection`. The loop stops after
``steps`` updates or when the gradient mapping

    G(x) = (x - P_C(x - lr * g)) / lr

(the gradient itself when x is unconstrained; lr = 1 for "lbfgsb" and "spg",
where ||G|| is the projected-gradient norm ||x - P_C(x - g)||) has norm below
``tol``. F(x, y*(x)) is only piecewise smooth: it kinks where the inner active
set changes. At a kink, where the line search along -g finds no decrease, SPG
steps along the kink instead, in the direction of the smallest convex
combination of g and the gradient g_r beyond the kink (a bundle of two, as in
gradient sampling); when that fails too, or F decreases by less than
SPG_FTOL (1 + |F|) over SPG_MEMORY steps, the loop stops and the result's
``message`` says why.
:func:`plot_history` (:mod:`cbo.plotting`, needs matplotlib) draws the
:class:`History` of a run.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import cvxpy as cp
import numpy as np
import scipy.optimize
import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .errors import (ConvergenceError, DivergenceError, InnerSolveError, StrictComplementarityError,
                     external_stacklevel)
from .hypergrad import HypergradInfo, TensorLike, hypergrad
from .inputs import as_parameter_tensors, like_input, timed
from .options import Options, resolve_options
from .plotting import plot_history
from .problem import BilevelProblem
from .projection import OuterProjection
from .qp_solvers import QP_SOLVERS

__all__ = ["minimize", "MinimizeResult", "History", "OuterProjection", "plot_history", "OPTIMIZERS"]

OPTIMIZERS = ("auto", "lbfgsb", "spg", "adam", "sgd", "lbfgs")
LINE_SEARCH_OPTIMIZERS = ("lbfgsb", "spg")  # choose their own steps: no lr
DEFAULT_LR = {"adam": 1e-2, "sgd": 1e-2, "lbfgs": 1.0}
# Spectral projected gradient (Birgin, Martinez and Raydan 2000, algorithm SPG2): the nonmonotone window M,
# the sufficient-decrease constant gamma, the safeguards of the quadratic backtracking and of the
# Barzilai-Borwein step a, all theirs.
SPG_MEMORY, SPG_GAMMA, SPG_SHRINK, SPG_STEP_RANGE = 10, 1e-4, (0.1, 0.9), (1e-30, 1e30)
# The SPG line search gives up after this many reductions of t, or once t ||d|| is below this fraction of
# 1 + ||x|| (no representable decrease left): F is not smooth along d at x, or g is inaccurate.
SPG_MAX_BACKTRACKS, SPG_MIN_RELATIVE_STEP = 40, 1e-12
# SPG stops once F decreases by less than SPG_FTOL (1 + |F|) over SPG_MEMORY steps (creeping along a kink), and
# a line search once the decrease t |g^T d| it could still find is below that.
SPG_FTOL = 1e-10
# Trial points per L-BFGS-B line search (scipy's default is 20): where F kinks the line search fails, and
# each failure costs this many inner solves before SPG takes over.
LBFGSB_MAX_LINE_SEARCH = 10
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
    optimizer : str
        The optimizer that ran ("auto" resolved to "lbfgsb" or "spg").
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
    optimizer: str
    n_steps: int
    history: History
    info: HypergradInfo

    def __repr__(self) -> str:
        return (f"MinimizeResult(fun={self.fun:.6g}, converged={self.converged}, optimizer={self.optimizer!r}, "
                f"n_steps={self.n_steps}, message={self.message!r})")


# ---------------------------------------------------------------- the loop

def minimize(
    problem: BilevelProblem,
    x0: TensorLike | Sequence[TensorLike],
    *,
    optimizer: str = "auto",
    lr: float | None = None,
    lr_decay: float = 0.0,
    steps: int = 100,
    outer_constraints: Sequence[cp.Constraint] = (),
    callback: Callable[..., bool | None] | None = None,
    progress: bool = True,
    tol: float = 1e-6,
    options: Options | None = None,
    **settings,
) -> MinimizeResult:
    r"""Minimize F(x, y*(x)) over x in C by steps along the hypergradient.

    Parameters
    ----------
    problem : BilevelProblem
        With an ``outer`` objective.
    x0 : tensor or list of tensors
        Starting point, one value per ``problem.parameters``; projected onto C first.
    optimizer : {"auto", "lbfgsb", "spg", "adam", "sgd", "lbfgs"}
        "auto" (the default, for deterministic F) is "lbfgsb" (L-BFGS-B) when the
        outer constraints are bounds or absent, else "spg" (spectral projected
        gradient); both choose their steps by a line search, whatever the scale
        of F and x. For a stochastic F (a minibatch per call) choose "adam"
        (projected Adam) or "sgd" (projected gradient descent); "lbfgs" is
        torch.optim.LBFGS with a strong-Wolfe line search, without outer constraints.
    lr : float, optional
        Step size of adam, sgd and lbfgs (default 1e-2 for adam and sgd, 1.0 for
        lbfgs); lbfgsb and spg take none.
    lr_decay : float
        sgd and adam use the step lr / (1 + lr_decay * k) at step k: constant-step
        Adam hovers at a distance of about lr from a solution, a decaying step settles.
    steps : int
        Maximum number of updates of x (lbfgs: of hypergradient evaluations; a
        line search may evaluate several points per update).
    outer_constraints : sequence of cvxpy constraints
        Convex constraints on the problem's parameters, e.g. ``[w >= 0, cp.sum(w) == 1]``.
        A parameter declared ``nonneg=True`` (``nonpos=True``) gets ``>= 0`` (``<= 0``) implicitly.
    callback : callable, optional
        ``callback(step, x, f, grad, info)`` after each evaluation (``step`` counts
        evaluations, line-search trials included); return True to stop.
    progress : bool
        Show a tqdm progress bar with F, ||dF/dx|| and the inner KKT residual.
    tol : float
        Stop when the gradient-mapping norm ||G(x)|| <= tol (for lbfgsb and spg
        the projected-gradient norm ||x - P_C(x - dF/dx)||).
    options : Options, optional
        Settings of each hypergradient (:class:`cbo.Options`: method, solver,
        warm_start, ...); its ``tol`` is the adjoint solve's tolerance.
    **settings
        Fields of :class:`cbo.Options` other than ``tol`` (which is the outer
        stopping tolerance here), e.g. ``method="cg"``, ``solver="OSQP"``,
        ``warm_start=False``. With ``warm_start`` (the default) each step reuses
        the previous step's active set and factorization (QP fast path), starts
        the adjoint solve from the previous adjoint vector, and lets solvers that
        warm-start (OSQP, SCS on the general route) start from the previous solution.

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
    lr = _step_size(problem, optimizer, lr, lr_decay, steps)
    xs, like = as_parameter_tensors(problem, x0)
    project = OuterProjection(problem.parameters, outer_constraints)
    optimizer = _resolve_optimizer(optimizer, project)
    xs = project(xs)
    evaluate = _Evaluator(problem, resolve_options(options, **settings),
                          watch_growth=optimizer not in LINE_SEARCH_OPTIMIZERS)
    loop = _LOOPS[optimizer]
    # cbo's log records (and the application's console logging) are written around the bar, not into it.
    with tqdm(total=steps, desc="cbo.minimize", disable=not progress, leave=True, mininterval=0.5) as bar, \
            logging_redirect_tqdm(tqdm_class=tqdm):
        xs, record, message, converged, n_steps = loop(evaluate, project, optimizer, lr, lr_decay, steps, tol, callback,
                                                       bar).run(xs)
    return MinimizeResult(
        x=like_input(xs, x0, like), fun=record.f, grad=like_input(record.grads, x0, like), converged=converged,
        message=message, optimizer=optimizer, n_steps=n_steps, history=evaluate.history, info=record.info)


def _step_size(problem: BilevelProblem, optimizer: str, lr: float | None, lr_decay: float, steps: int) -> float:
    """The step size lr (the optimizer's default if None), after checking the arguments of :func:`minimize`."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {optimizer!r}. Known optimizers: {', '.join(OPTIMIZERS)}.")
    if problem.outer is None:
        raise ValueError("The problem has no outer objective: pass outer=F to BilevelProblem.")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}.")
    if optimizer in ("auto",) + LINE_SEARCH_OPTIMIZERS:
        if lr is not None or lr_decay:
            raise ValueError(
                f"optimizer={optimizer!r} chooses its steps by a line search and takes no lr or lr_decay (got "
                f"lr={lr}, lr_decay={lr_decay}). Drop them, or pass optimizer='adam' or 'sgd' for fixed steps.")
        return 1.0  # the unit of the gradient mapping G(x) = x - P_C(x - g)
    lr = DEFAULT_LR[optimizer] if lr is None else float(lr)
    if not lr > 0 or not lr_decay >= 0:
        raise ValueError(f"lr must be positive and lr_decay nonnegative, got lr={lr}, lr_decay={lr_decay}.")
    return lr


def _resolve_optimizer(optimizer: str, project: OuterProjection) -> str:
    """"auto" -> "lbfgsb" if C is a box (or everything), else "spg"; refuse the combinations that cannot run."""
    box = project.box() is not None
    if optimizer == "auto":
        return "lbfgsb" if box else "spg"
    if optimizer == "lbfgsb" and not box:
        raise ValueError(
            "optimizer='lbfgsb' handles bounds lo <= x <= hi only, and the outer constraints "
            f"{'; '.join(str(c) for c in project.constraints)} are not all bounds. Use optimizer='spg' (or 'auto').")
    if optimizer == "lbfgs" and project.constraints:
        raise ValueError(
            "optimizer='lbfgs' does not handle outer constraints (a projection breaks its line search), "
            "including the x >= 0 implied by a parameter declared nonneg=True. Use optimizer='auto' "
            "(L-BFGS-B for bounds, SPG otherwise), 'adam' or 'sgd', or reparametrize x so that it is unconstrained.")
    return optimizer


@dataclass
class _Point:
    """One evaluated iterate."""

    xs: list[torch.Tensor]
    f: float
    grads: list[torch.Tensor]
    info: HypergradInfo
    stationarity: float = math.nan  # ||x - P_C(x - g)||, set by the line-search loops


class _Evaluator:
    """F and dF/dx at x with :func:`cbo.hypergrad`; records the history and watches for divergence
    (non-finite values always; F growing far above its best value only with ``watch_growth``: a line
    search rejects such a trial point itself)."""

    def __init__(self, problem: BilevelProblem, options: Options, watch_growth: bool = True):
        self.problem = problem
        self.watch_growth = watch_growth
        if not options.warm_start and options.solver is not None and options.solver.upper() not in QP_SOLVERS:
            # cvxpy solvers that warm-start (OSQP, SCS) start cold too
            options = dataclasses.replace(options, solver_options={**(options.solver_options or {}), "warm_start": False})
        self.options = options
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
                grads, info = hypergrad(self.problem, xs, options=self.options, return_info=True)
        except (InnerSolveError, StrictComplementarityError, ConvergenceError) as err:
            raise self._at_step(err, step, xs) from err
        self._report_warnings(step, caught)
        point = _Point(xs, info.outer_value, grads, info)
        self._check_divergence(step, point)
        self._record(point, {**info.timings, "total": time.perf_counter() - start})
        return point

    def _record(self, point: _Point, timings: dict[str, float]) -> None:
        """Append the point to the history (stationarity is the loop's to add) and update the best F."""
        h = self.history
        h.f.append(point.f)
        h.grad_norm.append(_norm(point.grads))
        h.kkt_residual.append(point.info.kkt_residual)
        h.adjoint_iterations.append(point.info.linear_solve.iterations)
        h.x.append([x.detach().cpu().clone() for x in point.xs])
        h.timings.append(timings)
        self.best = min(self.best, point.f)

    def _at_step(self, err: Exception, step: int, xs: list[torch.Tensor]) -> Exception:
        """``err`` (same type and attributes) with the step, x and advice in its message and the history
        so far as ``err.history``."""
        advice = {
            InnerSolveError: "The outer iterate may have left the region where the inner problem is solvable: add "
                             "outer_constraints that keep x there, or lower lr.",
            StrictComplementarityError: "The outer iterate reached a point where y*(x) is not differentiable (a "
                                        "constraint switching between active and inactive): lower lr, start "
                                        "elsewhere, or add outer_constraints that keep x on one side.",
            ConvergenceError: "Pass method='direct' or on_nonconvergence='warn'.",
        }
        advice = next(text for kind, text in advice.items() if isinstance(err, kind))
        located = copy.copy(err)
        located.args = (f"At outer step {step}, x = {_describe(self.problem, xs)}: {err} {advice}",)
        located.history = self.history
        return located

    def _report_warnings(self, step: int, caught) -> None:
        """Record every warning; show the first of each category only, not one per step, on a line of its
        own (the progress bars are cleared while it is printed, then redrawn)."""
        for w in caught:
            category = w.category.__name__
            if not any(seen == category for _, seen, _ in self.history.warnings):
                with tqdm.external_write_mode():
                    warnings.warn(
                        f"{w.message} [outer step {step}; later {category}s are recorded in result.history.warnings]",
                        w.category, stacklevel=external_stacklevel())
            self.history.warnings.append((step, category, str(w.message)))

    def _check_divergence(self, step: int, point: _Point) -> None:
        """Raise DivergenceError if F or dF/dx is non-finite or F - F_best > factor * max(|F_0 - F_best|, |F_best|)."""
        f0 = self.history.f[0] if self.history.f else point.f
        scale = max(abs(f0 - self.best), abs(self.best), 1e-12) if math.isfinite(self.best) else math.inf
        blown_up = not math.isfinite(point.f) or not all(bool(torch.isfinite(g).all()) for g in point.grads)
        grown = self.watch_growth and point.f - self.best > _DIVERGENCE_FACTOR * scale
        if blown_up or grown:
            raise DivergenceError(
                f"The outer loop diverged at step {step}: F = {point.f:.6g} (started at {f0:.6g}, best "
                f"{self.best:.6g}), ||dF/dx|| = {_norm(point.grads):.3g}. The step size is too large for this "
                "problem: lower lr (e.g. by 10x), or use optimizer='adam' or 'lbfgs'.", self.history)


class _Loop:
    """What every optimizer's loop shares: the projection, the progress report and the callback."""

    def __init__(self, evaluate, project, optimizer, lr, lr_decay, steps, tol, callback, bar):
        self.evaluate, self.project, self.optimizer = evaluate, project, optimizer
        self.lr, self.lr_decay, self.steps, self.tol, self.callback, self.bar = lr, lr_decay, steps, tol, callback, bar

    def _project(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """P_C(xs), its time added to the last history entry's "projection"."""
        with timed(self.evaluate.history.timings[-1], "projection"):
            return self.project(xs)

    def _report(self, point: _Point, stationarity: float) -> None:
        """Record ||G(x_k)|| in the history and show F, ||G|| and the KKT residual on the progress bar."""
        self.evaluate.history.stationarity.append(stationarity)
        self.bar.set_postfix(F=f"{point.f:.4g}", grad=f"{stationarity:.2e}", kkt=f"{point.info.kkt_residual:.1e}",
                             refresh=False)

    def _stopped_by_callback(self, step: int, point: _Point) -> bool:
        """callback(step, x, f, grad, info) returned True."""
        return self.callback is not None and bool(self.callback(step, point.xs, point.f, point.grads, point.info))


class _ProjectedLoop(_Loop):
    """x_{k+1} = P_C(step(x_k, g_k)) for sgd and adam; one hypergradient per step."""

    def run(self, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], _Point, str, bool, int]:
        """(last x, its point, why the loop stopped, converged, updates made)."""
        leaves = [x.clone() for x in xs]
        adam = torch.optim.Adam(leaves, lr=self.lr) if self.optimizer == "adam" else None
        for step in range(self.steps + 1):
            lr = self.lr / (1 + self.lr_decay * step)
            point = self.evaluate(step, [x.clone() for x in leaves])
            descended = self._project([x - lr * g for x, g in zip(point.xs, point.grads)])
            stationarity = _norm([x - d for x, d in zip(point.xs, descended)]) / lr
            self._report(point, stationarity)
            if self._stopped_by_callback(step, point):
                return point.xs, point, f"stopped by the callback at step {step}", False, step
            if stationarity <= self.tol:
                return point.xs, point, f"||G(x)|| = {stationarity:.2e} <= tol = {self.tol:g}", True, step
            if step == self.steps:
                break
            new = descended if adam is None else self._adam_step(adam, leaves, point.grads, lr)
            with torch.no_grad():
                for leaf, value in zip(leaves, new):
                    leaf.copy_(value)
            self.bar.update(1)
        return point.xs, point, f"reached steps = {self.steps} with ||G(x)|| = {stationarity:.2e} > tol", False, step

    def _adam_step(self, adam: torch.optim.Adam, leaves: list[torch.Tensor], grads: list[torch.Tensor],
                   lr: float) -> list[torch.Tensor]:
        """P_C(adam_step(x_k, g_k)) with step size lr; moves ``leaves`` to the unprojected Adam step."""
        for leaf, g in zip(leaves, grads):
            leaf.grad = g.clone()
        adam.param_groups[0]["lr"] = lr
        adam.step()
        return self._project(leaves)


class _StopLBFGS(Exception):
    """Raised inside the L-BFGS closure to end the loop early."""


class _LBFGSLoop(_Loop):
    """torch.optim.LBFGS with a strong-Wolfe line search; one history entry per hypergradient."""

    def run(self, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], _Point, str, bool, int]:
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
            self.evaluate.history.timings[-1]["projection"] = 0.0
            self._report(point, stationarity)
            if step:
                self.bar.update(1)
            for leaf, g in zip(leaves, point.grads):
                leaf.grad = g.clone()
            if self._stopped_by_callback(step, point):
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


class _Stop(Exception):
    """Ends a line-search loop at ``point``: the projected-gradient norm reached tol, or the callback asked."""

    def __init__(self, message: str, point: _Point, converged: bool):
        super().__init__(message)
        self.point, self.converged = point, converged


class _LineSearchLoop(_Loop):
    """Shared by lbfgsb and spg: iterates stay in C, each evaluation is checked for the stopping rule.

    Subclasses implement ``_iterate(xs) -> message``, which updates ``self.current`` (the accepted iterate)
    and ``self.updates`` and returns why it stopped when it ends without :class:`_Stop`.
    """

    def run(self, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], _Point, str, bool, int]:
        """(last x, its point, why the loop stopped, converged, updates made)."""
        self.current, self.updates, self.failed_trials = None, 0, 0
        try:
            message, converged = self._iterate(xs), False
        except _Stop as stop:
            if self.current is not None and stop.point is not self.current:
                self.updates += 1  # a trial point that ends the loop is taken as the next iterate
            self.current, message, converged = stop.point, str(stop), stop.converged
        return self.current.xs, self.current, message, converged, self.updates

    def _visit(self, xs: list[torch.Tensor]) -> _Point:
        """F and dF/dx at xs (a point of C) and ||x - P_C(x - g)||, recorded and shown; raises :class:`_Stop`
        if the callback asks or the norm is at most tol."""
        step = len(self.evaluate.history)
        point = self.evaluate(step, xs)
        point.stationarity = _norm([x - p for x, p in zip(xs, self._project([x - g for x, g in zip(xs, point.grads)]))])
        self._report(point, point.stationarity)
        if self._stopped_by_callback(step, point):
            raise _Stop(f"stopped by the callback at step {step}", point, False)
        if point.stationarity <= self.tol:
            raise _Stop(f"||x - P_C(x - g)|| = {point.stationarity:.2e} <= tol = {self.tol:g}", point, True)
        return point

    def _trial(self, xs: list[torch.Tensor]) -> _Point | None:
        """:meth:`_visit` at a trial point of a line search, or None where F is not defined there: F or
        dF/dx non-finite (e.g. exp(c) overflowing far out) or no inner solution. The line search then
        shrinks its step, as it does for a trial point with too little decrease."""
        try:
            return self._visit(xs)
        except (DivergenceError, InnerSolveError):
            self.failed_trials += 1
            return None

    def _accept(self, point: _Point) -> None:
        """point is the next iterate."""
        self.current = point
        self.updates += 1
        self.bar.update(1)

    def _reached_steps(self) -> str:
        return f"reached steps = {self.steps} with ||x - P_C(x - g)|| = {self.current.stationarity:.2e} > tol"

    def _stalled(self, what: str) -> str:
        """The message of a loop that cannot make progress at x: ``what`` happened."""
        return (f"{what} at ||x - P_C(x - g)|| = {self.current.stationarity:.2e} > tol = {self.tol:g}: "
                "F(x, y*(x)) is probably not differentiable at x (an inner constraint switches "
                "between active and inactive there, a kink that may be the solution) or the hypergradient is "
                "inaccurate (tighten the inner solver's tolerance)")

    def _spg(self, point: _Point, steps: int) -> str:
        """At most ``steps`` SPG2 iterations from ``point``, with a step along the kink where the line search
        along -g stalls on one; why they ended (unless by :class:`_Stop`)."""
        self.current = point
        recent = collections.deque([point.f], maxlen=SPG_MEMORY)
        best = collections.deque([point.f], maxlen=SPG_MEMORY + 1)  # the lowest F after each of the last updates
        step = self._kink_step = _clip_step(1.0 / _inf_norm(self._direction(point, point.grads, 1.0)))
        for _ in range(steps):
            direction = self._direction(point, point.grads, step)
            slope = _dot(point.grads, direction)
            trial, rejected, at_kink = self._line_search(point, direction, max(recent), slope, stop_at_kink=True)
            if trial is None and at_kink:
                trial = self._across_kink(point, rejected)
            if trial is None and at_kink:  # no descent along the kink: approach it along d
                trial = self._line_search(point, direction, max(recent), slope)[0]
            if trial is None:
                return self._stalled("SPG's line search found no decrease of F")
            step = _spectral_step(point, trial, step)
            self._accept(trial)
            if _negligible(_norm([b - a for a, b in zip(point.xs, trial.xs)]), point.xs):
                return self._stalled("SPG's steps shrank to round-off")
            point = trial
            recent.append(point.f)
            best.append(min(best[-1], point.f))
            if len(best) > SPG_MEMORY and best[0] - best[-1] <= SPG_FTOL * (1.0 + abs(best[-1])):
                return self._stalled(f"F decreased by less than {SPG_FTOL:g} (1 + |F|) over {SPG_MEMORY} SPG steps")
        return self._reached_steps()

    def _direction(self, point: _Point, grads: list[torch.Tensor], step: float) -> list[torch.Tensor]:
        """d = P_C(x - step * g) - x."""
        return [p - x for x, p in zip(point.xs, self._project([x - step * g for x, g in zip(point.xs, grads)]))]

    def _line_search(self, point: _Point, direction: list[torch.Tensor], reference: float, slope: float,
                     stop_at_kink: bool = False) -> tuple[_Point | None, _Point | None, bool]:
        r"""(The first x + t d, t = 1, then backtracking, with F(x + t d) <= reference + gamma t slope, or None if
        t d shrinks to round-off, the decrease it promises, -t slope, to below SPG_FTOL (1 + |F|), or
        SPG_MAX_BACKTRACKS trials fail; the last rejected trial, or None; whether it stopped at a kink).

        With ``stop_at_kink``, give up early where x sits on a kink of F along d: the secant slope
        (F(x + t d) - F(x)) / t of two rejected trials stays positive and does not halve as t shrinks (for a
        smooth F it tends to g^T d < 0)."""
        length, rejected, t, secant = _norm(direction), None, 1.0, math.inf
        for _ in range(SPG_MAX_BACKTRACKS):
            trial = self._trial([x + t * d for x, d in zip(point.xs, direction)])
            if trial is None:  # F undefined there: a much shorter step
                t *= SPG_SHRINK[0]
                continue
            if trial.f <= reference + SPG_GAMMA * t * slope:
                return trial, rejected, False
            rejected, previous, secant = trial, secant, (trial.f - point.f) / t
            if stop_at_kink and 0 < 2 * secant and 2 * secant >= previous:
                return None, rejected, True
            if _negligible(t * length, point.xs) or -slope * t <= SPG_FTOL * (1.0 + abs(point.f)):
                break
            t = _backtrack(t, slope, trial.f - point.f)
        return None, rejected, False

    def _across_kink(self, point: _Point, rejected: _Point) -> _Point | None:
        r"""Where the line search along -g fails, x sits on a kink of F (the gradient g_r at the last rejected
        trial, beyond the kink, differs from g): step along the smallest convex combination h of g and g_r
        (a bundle of two, as in gradient sampling), to P_C(x - a h) with a descent for both gradients. The
        BB step is no guide there (g jumps across the kink): a starts from the last such step and doubles
        while F decreases, or backtracks. None if no step decreases F (x is close to a Clarke-stationary point)."""
        aggregate = _smallest_combination(point.grads, rejected.grads)
        best, a = None, self._kink_step
        for _ in range(SPG_MAX_BACKTRACKS):
            direction = self._direction(point, aggregate, a)
            slope = max(_dot(point.grads, direction), _dot(rejected.grads, direction))
            if not slope < 0:
                return best
            if best is None:
                best = self._line_search(point, direction, point.f, slope)[0]
                if best is None:
                    return None
                if _norm([b - x for x, b in zip(point.xs, best.xs)]) < _norm(direction):
                    return best  # backtracked: a was too long
            else:
                trial = self._trial([x + d for x, d in zip(point.xs, direction)])
                if trial is None or not trial.f <= best.f + SPG_GAMMA * slope / 2:
                    return best
                best = trial
            self._kink_step = a
            a *= 2
        return best


class _UndefinedTrial(Exception):
    """L-BFGS-B's line search tried a point where F is undefined: scipy's loop is left for SPG's."""


class _LBFGSBLoop(_LineSearchLoop):
    """L-BFGS-B (scipy.optimize) on the bounds lo <= x <= hi of C; x as one float64 vector.

    Its first step is x - g (on bounds, the Cauchy point of the model with Hessian I), whose length is
    that of g: scale-dependent, and on a bounded problem it is taken in full (revenue tolls jumped onto
    a plateau where a link carries no flow). With bounds, F is therefore handed to it divided by
    ||g_0||_inf, so that the first step has the length of SPG's, 1 in the largest entry (without bounds
    scipy's first step is g / ||g|| already); the curvature pairs take over from the second step on, and
    cbo's own rule stops it.
    """

    def _iterate(self, xs: list[torch.Tensor]) -> str:
        flat = _FlatView(xs)
        lower, upper = self.project.box()
        self.current = self._visit(xs)
        points = {flat.vector(xs).tobytes(): self.current}
        bounded = any(bool(np.isfinite(np.asarray(t)).any()) for t in (*lower, *upper))
        scale = max(_inf_norm(self.current.grads), 1e-300) if bounded else 1.0  # unbounded: scipy's first step is 1/||g||

        def fun(v: np.ndarray) -> tuple[float, np.ndarray]:
            key = v.tobytes()
            if key not in points:
                points[key] = self._trial(flat.tensors(v))
                if points[key] is None:  # scipy's line search cannot shrink past an undefined F: SPG's can
                    raise _UndefinedTrial
            return points[key].f / scale, flat.vector(points[key].grads) / scale

        try:
            result = scipy.optimize.minimize(
                fun, flat.vector(xs), jac=True, method="L-BFGS-B",
                callback=lambda v: self._accept(points.get(v.tobytes(), next(reversed(points.values())))),
                bounds=scipy.optimize.Bounds(flat.vector(lower), flat.vector(upper)),
                options=dict(maxiter=self.steps, maxfun=(LBFGSB_MAX_LINE_SEARCH + 1) * (self.steps + 1), ftol=0.0,
                             gtol=0.0, maxls=LBFGSB_MAX_LINE_SEARCH))
        except _UndefinedTrial:
            return ("L-BFGS-B tried a point where F is undefined (non-finite, or no inner solution), then "
                    + self._spg(self.current, self.steps - self.updates))
        if self.updates >= self.steps:
            return self._reached_steps()
        if "ABNORMAL" in str(result.message):  # a kink: SPG's step along it takes over
            return "L-BFGS-B's line search stalled, then " + self._spg(self.current, self.steps - self.updates)
        return f"L-BFGS-B stopped ({result.message}) with ||x - P_C(x - g)|| = {self.current.stationarity:.2e} > tol"


class _SPGLoop(_LineSearchLoop):
    """Spectral projected gradient, algorithm SPG2 of Birgin, Martinez and Raydan (2000), see :mod:`cbo.driver`."""

    def _iterate(self, xs: list[torch.Tensor]) -> str:
        return self._spg(self._visit(xs), self.steps)


_LOOPS = {"adam": _ProjectedLoop, "sgd": _ProjectedLoop, "lbfgs": _LBFGSLoop, "lbfgsb": _LBFGSBLoop, "spg": _SPGLoop}


def _backtrack(t: float, slope: float, rise: float) -> float:
    r"""The minimizer of the quadratic through F(x), its slope g^T d < 0 and F(x + t d) = F(x) + rise,

        t_q = -slope t^2 / (2 (rise - slope t)),

    safeguarded into [sigma_1 t, sigma_2 t] (else t / 2), as in SPG2."""
    low, high = SPG_SHRINK
    curvature = rise - slope * t
    t_q = -0.5 * slope * t * t / curvature if curvature > 0 else -1.0
    return t_q if low * t <= t_q <= high * t else 0.5 * t


def _spectral_step(point: _Point, trial: _Point, previous: float) -> float:
    r"""Barzilai-Borwein step a = s^T s / s^T y, s = x_+ - x, y = g_+ - g. Where the curvature s^T y is not
    positive (F is nonconvex or kinked along s), a = ||s|| / ||y||, the scale on which g changes as much as x
    (the previous step if g did not change); clipped to SPG_STEP_RANGE."""
    s = [b - a for a, b in zip(point.xs, trial.xs)]
    y = [b - a for a, b in zip(point.grads, trial.grads)]
    sy, ss, yy = _dot(s, y), _dot(s, s), _dot(y, y)
    if sy > 0:
        return _clip_step(ss / sy)
    return _clip_step(math.sqrt(ss / yy)) if yy > 0 else previous


def _smallest_combination(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
    r"""The point of the segment [a, b] closest to 0: theta a + (1 - theta) b with
    theta = clip((b - a)^T b / ||a - b||^2, 0, 1)."""
    gap = _dot(a, a) - 2 * _dot(a, b) + _dot(b, b)
    theta = min(max((_dot(b, b) - _dot(a, b)) / gap, 0.0), 1.0) if gap > 0 else 1.0
    return [theta * x + (1 - theta) * y for x, y in zip(a, b)]


def _negligible(length: float, xs: list[torch.Tensor]) -> bool:
    """A move of this length from x is round-off: at most SPG_MIN_RELATIVE_STEP * (1 + ||x||)."""
    return length <= SPG_MIN_RELATIVE_STEP * (1.0 + _norm(xs))


def _clip_step(step: float) -> float:
    """step inside SPG_STEP_RANGE (the upper end for inf or nan)."""
    low, high = SPG_STEP_RANGE
    return min(max(step, low), high) if math.isfinite(step) else high


class _FlatView:
    """Tensors shaped like the parameters <-> one float64 numpy vector (scipy's x), on the tensors' device."""

    def __init__(self, like: Sequence[torch.Tensor]):
        self.shapes = [tuple(t.shape) for t in like]
        self.sizes = [math.prod(shape) for shape in self.shapes]
        self.device = like[0].device

    def vector(self, parts: Sequence[torch.Tensor | np.ndarray]) -> np.ndarray:
        """The entries of ``parts`` stacked into one float64 vector."""
        return np.concatenate([np.asarray(p.detach().cpu() if isinstance(p, torch.Tensor) else p, dtype=np.float64)
                               .reshape(-1) for p in parts])

    def tensors(self, vector: np.ndarray) -> list[torch.Tensor]:
        """One float64 tensor per parameter from the vector."""
        pieces = np.split(vector, np.cumsum(self.sizes)[:-1])
        return [torch.tensor(piece.reshape(shape), dtype=torch.float64, device=self.device)
                for piece, shape in zip(pieces, self.shapes)]


# ---------------------------------------------------------------- helpers

def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """sum_i <a_i, b_i>: the inner product of the tensors stacked into vectors, in float64."""
    return float(sum((x.detach().double() * y.detach().double()).sum() for x, y in zip(a, b)))


def _inf_norm(tensors: Sequence[torch.Tensor]) -> float:
    """max_i ||t_i||_inf."""
    return max(float(t.detach().abs().max()) if t.numel() else 0.0 for t in tensors)


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    """sqrt(sum_i ||t_i||^2): the Euclidean norm of the tensors stacked into one vector, in float64."""
    return float(torch.sqrt(sum((t.detach().double() ** 2).sum() for t in tensors)))


def _describe(problem: BilevelProblem, xs: Sequence[torch.Tensor]) -> str:
    """Parameter values for an error message: ``{name = value; ...}``."""
    return "{" + "; ".join(f"{p.name()} = {_summarize(x.detach().cpu().numpy())}"
                           for p, x in zip(problem.parameters, xs)) + "}"


def _summarize(values: np.ndarray) -> str:
    """The entries if at most 6, else shape, norm and range."""
    if values.size <= 6:
        return np.array2string(values, precision=4, separator=", ")
    return f"<{values.shape} array, norm {np.linalg.norm(values):.4g}, min {values.min():.4g}, max {values.max():.4g}>"
