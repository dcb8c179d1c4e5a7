"""The exceptions and warnings cbo raises.

Every message says what happened, where (which constraint, atom or parameter)
and what to try next.
"""


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
