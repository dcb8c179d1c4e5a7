"""`Options`: the settings of a hypergradient, shared by :func:`cbo.hypergrad`, :class:`cbo.ArgminLayer`
and :func:`cbo.minimize`.

Each entry point takes ``options=cbo.Options(...)`` and/or the same fields as
keywords (``cbo.hypergrad(problem, x, tol=1e-8)``); keywords override the
object's fields. A setting that the route taken cannot honour warns
(:class:`cbo.OptionIgnoredWarning`) instead of being dropped silently.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

from .errors import CboWarning, external_stacklevel

__all__ = ["Options", "OptionIgnoredWarning", "resolve_options", "with_solver_args", "SOLVER_ARG_KEYS"]


class OptionIgnoredWarning(CboWarning):
    """A setting was given that the route taken cannot honour (e.g. ``solver=`` on the conic route)."""


@dataclass(frozen=True)
class Options:
    """Settings of the inner solve and of the adjoint solve.

    Attributes
    ----------
    method : str, optional
        How dy*/dx is applied. Default: on an inner QP the compiled fast path of
        :mod:`cbo.qp` (one factorization of the active-set KKT matrix, solved
        directly); elsewhere "cg". The adjoint solvers of :mod:`cbo.linsolve`:
        "cg" (CG on the null space of the active constraints), "minres" (on the
        indefinite K), "direct" (dense K; on a QP the fast path), "fixed_point",
        "neumann". :func:`cbo.hypergrad` also takes the unrolled methods
        "reverse", "truncated", "forward" and the penalty methods "penalty",
        "augmented_lagrangian" (:mod:`cbo.approximate`).
    tol : float
        Relative residual tolerance of the adjoint solve.
    maxiter : int, optional
        Iteration cap of the adjoint solve (default: a multiple of its size).
    on_nonconvergence : {"raise", "warn"}
        What a non-converged adjoint solve does.
    solver : str, optional
        Solver of the inner problem. On the QP fast path "DAQP", "PIQP" or
        "CLARABEL", called directly (default by size, see :mod:`cbo.qp`);
        another name takes the general path, as a cvxpy solver (default
        Clarabel with tight tolerances). The conic route always uses Clarabel.
    solver_options : dict, optional
        Options passed to that solver.
    active_tol : float
        Threshold of the active-set classification (:func:`cbo.kkt.active_set`).
    polish_solution : bool
        Polish (y*, mu_A, nu) on the KKT system of the active set (recommended).
    warm_start : bool
        Reuse the previous call's active set and factorization (QP fast path)
        and start iterative adjoint solves from the previous adjoint vector.
    route : {"smooth", "conic"}, optional
        Default: "smooth" (the Lagrangian of the inner problem, after the
        epigraph reformulation of piecewise-linear atoms) where it applies, else
        "conic" (cvxpy's cone program, :mod:`cbo.conic`).
    steps : int
        Steps T of the unrolled methods.
    truncate : int, optional
        K for "truncated": differentiate through the last K of the T steps.
    penalty : float
        Weight rho of the penalty methods.
    """

    method: str | None = None
    tol: float = 1e-10
    maxiter: int | None = None
    on_nonconvergence: str = "raise"
    solver: str | None = None
    solver_options: dict | None = None
    active_tol: float = 1e-6
    polish_solution: bool = True
    warm_start: bool = True
    route: str | None = None
    steps: int = 100
    truncate: int | None = None
    penalty: float = 1e3

    def __post_init__(self):
        if self.on_nonconvergence not in ("raise", "warn"):
            raise ValueError(f"on_nonconvergence must be 'raise' or 'warn', got {self.on_nonconvergence!r}.")

    def given(self) -> dict:
        """The fields that differ from their defaults."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default}

    def warn_ignored(self, names: tuple[str, ...], why: str) -> None:
        """Warn for each of ``names`` that was set although the route taken ignores it (``why``)."""
        ignored = [f"{name}={getattr(self, name)!r}" for name in names if name in self.given()]
        if ignored:
            warnings.warn(f"{', '.join(ignored)} ignored: {why}.", OptionIgnoredWarning,
                          stacklevel=external_stacklevel())


FIELDS = tuple(f.name for f in dataclasses.fields(Options))
DEFAULT_OPTIONS = Options()


def resolve_options(options: Options | None, **settings) -> Options:
    """``options`` (default ``Options()``) with the keyword ``settings`` on top; None-valued ``method``
    keeps the object's. Raises TypeError for a keyword that is not a field of Options."""
    unknown = sorted(set(settings) - set(FIELDS))
    if unknown:
        raise TypeError(f"Unknown setting(s) {', '.join(unknown)}. Settings are the fields of cbo.Options: "
                        f"{', '.join(FIELDS)}.")
    if options is not None and not isinstance(options, Options):
        raise TypeError(f"options must be a cbo.Options, got {type(options).__name__}.")
    if settings.get("method", 0) is None:
        settings.pop("method")
    if not settings:
        return options or DEFAULT_OPTIONS
    return dataclasses.replace(options or DEFAULT_OPTIONS, **settings)


# cvxpylayers' generic solver_args keys, per inner solver: the tolerance "eps" and the iteration cap
# "max_iters" under that solver's own names (the same names on cvxpy's interface and cbo's QP backends).
SOLVER_ARG_KEYS = {
    "CLARABEL": {"eps": ("tol_gap_abs", "tol_gap_rel", "tol_feas"), "max_iters": ("max_iter",)},
    "PIQP": {"eps": ("eps_abs", "eps_rel"), "max_iters": ("max_iter",)},
    "OSQP": {"eps": ("eps_abs", "eps_rel"), "max_iters": ("max_iter",)},
    "SCS": {"eps": ("eps_abs", "eps_rel"), "max_iters": ("max_iters",)},
    "ECOS": {"eps": ("abstol", "reltol", "feastol"), "max_iters": ("max_iters",)},
    "MOREAU": {"max_iters": ("max_iter",)},
}
# Keys of diffcp's derivative computation: cbo differentiates the KKT system its own way.
_DIFFERENTIATION_KEYS = ("mode", "n_jobs_forward", "n_jobs_backward", "gpu")


def with_solver_args(options: Options, solver_args: dict | None) -> Options:
    """``options`` with cvxpylayers' ``solver_args`` on top (:class:`cbo.ArgminLayer` takes them as
    ``CvxpyLayer`` does, at construction and per call).

    * ``solve_method`` names the inner solver (``"Clarabel"`` -> ``solver="CLARABEL"``);
    * ``eps`` and ``max_iters`` become the named solver's tolerance and iteration cap
      (:data:`SOLVER_ARG_KEYS`: ``eps`` -> Clarabel's ``tol_gap_abs``, ``tol_gap_rel``, ``tol_feas``);
    * every other key (``verbose``, ``acceleration_lookback``, ...) goes to the named solver as it is,
      in ``solver_options``.

    Solver keys need a named solver (``solver=`` or ``solve_method``): where cbo picks the solver per
    problem (a QP solver on the fast path, Clarabel elsewhere) they are ignored with an
    :class:`OptionIgnoredWarning`, as are diffcp's derivative keys (``mode``, ``n_jobs_backward``, ...).
    Every solution is Newton-polished on its KKT system whatever the solver's tolerance.
    """
    if not solver_args:
        return options
    args = dict(solver_args)
    method = args.pop("solve_method", None)
    solver = method.upper() if isinstance(method, str) else options.solver
    ignored = {key: args.pop(key) for key in _DIFFERENTIATION_KEYS if key in args}
    if ignored:
        _warn_ignored(ignored, "cbo differentiates the KKT system of the inner problem, not diffcp's cone program")
    if args and solver is None:
        _warn_ignored(args, "they are settings of a named inner solver, and cbo picks the solver per problem; "
                      "name one with solver='CLARABEL' (or solver_args={'solve_method': 'Clarabel'})")
        args = {}
    translated, unknown = _solver_keys(solver, args)
    if unknown:
        _warn_ignored(unknown, f"cbo does not know {solver}'s name for them: pass its own setting instead")
    if not translated and solver == options.solver:
        return options
    solver_options = {**(options.solver_options or {}), **translated} or options.solver_options
    return dataclasses.replace(options, solver=solver, solver_options=solver_options)


def _solver_keys(solver: str | None, args: dict) -> tuple[dict, dict]:
    """``args`` under ``solver``'s own names, and the generic keys (eps, max_iters) it has no name for."""
    names = SOLVER_ARG_KEYS.get(solver or "", {})
    known = _solver_settings(solver)
    translated, unknown = {}, {}
    for key, value in args.items():
        if key in ("eps", "max_iters") and key not in names or known is not None and key not in known:
            unknown[key] = value
        else:
            translated.update({name: value for name in names.get(key, (key,))})
    return translated, unknown


def _solver_settings(solver: str | None) -> set[str] | None:
    """The settings ``solver`` accepts, where its interface rejects others (Moreau's validated Settings;
    cvxpylayers' Moreau interface drops the keys it does not know, and so does cbo, with a warning);
    None where any key is passed on."""
    if solver != "MOREAU":
        return None
    try:
        import moreau
    except ImportError:
        return None
    return set(moreau.Settings.model_fields) | set(SOLVER_ARG_KEYS["MOREAU"])


def _warn_ignored(args: dict, why: str) -> None:
    given = ", ".join(f"{key}={value!r}" for key, value in args.items())
    warnings.warn(f"solver_args {given} ignored: {why}.", OptionIgnoredWarning, stacklevel=external_stacklevel())
