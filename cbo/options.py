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

__all__ = ["Options", "OptionIgnoredWarning", "resolve_options"]


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
