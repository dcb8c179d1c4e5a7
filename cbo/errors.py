"""The exceptions and warnings cbo raises.

Every message says what happened, where (which constraint, atom or parameter)
and what to try next.
"""
import os
import sys
import warnings

_INTERNAL_DIRS = (os.path.dirname(os.path.abspath(__file__)),)


def external_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` called here that points at the first frame outside cbo and torch.

    Warnings then name the user's line (``cbo.minimize(...)``, ``loss.backward()``)
    instead of a line inside the library, however deep the call.
    """
    frame, level = sys._getframe(1), 1
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not path.startswith(_INTERNAL_DIRS) and f"{os.sep}torch{os.sep}" not in path:
            return level
        frame, level = frame.f_back, level + 1
    return 1


class CboError(Exception):
    """Base class of every error raised by cbo."""


class ProblemDefinitionError(CboError, ValueError):
    """The bilevel problem, as declared, cannot be differentiated by cbo."""


class UnsupportedAtomError(ProblemDefinitionError):
    """The inner problem uses a cvxpy atom that has no smooth torch translation."""


class NonSmoothAtomError(UnsupportedAtomError):
    """The inner problem uses a nonsmooth atom (abs, pos, maximum, norm1, ...).

    The message names the atom and its smooth epigraph rewrite.
    """


class StrictComplementarityError(CboError, ValueError):
    """Strict complementarity fails in a cone: y*(x) has no derivative there.

    The message names the constraint (both the primal slack and the dual
    variable are on the cone's boundary, e.g. at its apex).
    """


class InnerSolveError(CboError, RuntimeError):
    """cvxpy could not solve the inner problem (infeasible, unbounded, solver failure)."""


class ConvergenceError(CboError, RuntimeError):
    """An iterative linear solver stopped before reaching its tolerance.

    Attributes
    ----------
    info : SolveInfo
        Residual reached, iterations, and method of the failed solve.
    """

    def __init__(self, message: str, info=None):
        super().__init__(message)
        self.info = info


class DivergenceError(CboError, RuntimeError):
    """The outer loop of :func:`cbo.minimize` diverged (the objective blew up or became NaN).

    Attributes
    ----------
    history : cbo.driver.History
        The iterates up to the divergence.
    """

    def __init__(self, message: str, history=None):
        super().__init__(message)
        self.history = history


class CboWarning(UserWarning):
    """Base class of every warning issued by cbo."""


class DegenerateKKTWarning(CboWarning):
    """The KKT system at the inner solution is degenerate.

    Raised for weakly active constraints (strict complementarity fails: the
    derivative is one-sided there) and for dependent active constraints
    (LICQ fails: the multipliers are not unique).
    """


class InaccurateSolutionWarning(CboWarning):
    """The inner solution is less accurate than the hypergradient needs."""


class ConvergenceWarning(CboWarning):
    """An iterative linear solve did not converge and ``on_nonconvergence='warn'``."""


def check_status(status: str, solver: str) -> None:
    """Raise for statuses without a solution. 'optimal_inaccurate' passes: the Newton polish
    usually repairs it, and cbo.kkt warns if the KKT residual stays large."""
    if status in ("optimal", "optimal_inaccurate"):
        return
    if status in ("infeasible", "infeasible_inaccurate"):
        raise InnerSolveError(
            f"The inner problem is infeasible for this x (solver status '{status}'): no y satisfies "
            "the constraints, so y*(x) does not exist. Check the constraints, or keep x in the region "
            "where the inner problem is feasible (e.g. with outer constraints)."
        )
    if status in ("unbounded", "unbounded_inaccurate"):
        raise InnerSolveError(
            f"The inner problem is unbounded for this x (solver status '{status}'): the objective "
            "decreases without limit, so y*(x) does not exist. Add bounds on y or a strongly convex "
            "term (e.g. a small ridge penalty) to the inner objective."
        )
    raise InnerSolveError(f"The inner solver {solver} stopped with status '{status}'. Try another solver.")


def warn_weakly_active(where: str, description: str) -> None:
    """Warn (:class:`DegenerateKKTWarning`) that the constraints ``description`` are weakly active."""
    warnings.warn(
        f"{where}Strict complementarity fails at the inner solution: {description} touch(es) the bound with "
        "a zero multiplier (weakly active). y*(x) is not differentiable there; cbo returns the one-sided "
        "derivative that keeps these constraints inactive. Move x slightly, or check info.active_set.",
        DegenerateKKTWarning,
        stacklevel=external_stacklevel(),
    )
