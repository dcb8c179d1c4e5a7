"""The exceptions and warnings cbo raises, and how its warnings reach the user.

Every message says what happened, where (which constraint, atom, parameter or
batch item) and what to try next.

Warnings are issued with :func:`warn`. Inside a call that collects them
(:func:`one_warning_per_category`: ``cbo.hypergrad``, ``ArgminLayer``'s
forward pass) they are held back and issued at the end of the call, one
warning per category: a batch of 64 items with weakly active constraints gives
one :class:`DegenerateKKTWarning` that says how many items and which. The
categories stay, so ``warnings.simplefilter`` and ``pytest.warns`` work as
usual. Each warning as it arose (per batch item) is also logged at INFO level
to the ``"cbo.warnings"`` logger; the ``"cbo"`` logger has a
``logging.NullHandler``, so nothing is printed unless the application
configures logging.
"""
import contextlib
import contextvars
import logging
import os
import re
import sys
import warnings

_INTERNAL_DIRS = (os.path.dirname(os.path.abspath(__file__)),)
_INTERNAL_FILES = (os.path.abspath(contextlib.__file__),)

logging.getLogger("cbo").addHandler(logging.NullHandler())
logger = logging.getLogger("cbo.warnings")


def external_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` called here that points at the first frame outside cbo and torch.

    Warnings then name the user's line (``cbo.minimize(...)``, ``loss.backward()``)
    instead of a line inside the library, however deep the call.
    """
    frame, level = sys._getframe(1), 1
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        internal = path.startswith(_INTERNAL_DIRS) or path in _INTERNAL_FILES
        if not internal and f"{os.sep}torch{os.sep}" not in path:
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


def _peer_solver_errors() -> tuple[type, ...]:
    """(diffcp.SolverError,) where diffcp is installed (cvxpy loads it as one of its solvers), else ()."""
    try:
        from diffcp import SolverError
    except ImportError:
        return ()
    return (SolverError,)


class InnerSolveError(CboError, RuntimeError, *_peer_solver_errors()):
    """cvxpy could not solve the inner problem (infeasible, unbounded, solver failure).

    Where diffcp is installed it is also a ``diffcp.SolverError``, which cvxpylayers' CvxpyLayer raises in
    these cases: code written for CvxpyLayer that catches that error catches this one.
    """


class NoneInputError(CboError, TypeError, AttributeError):
    """An input is None where a tensor is expected: a TypeError, and also an AttributeError, which is what
    cvxpylayers' CvxpyLayer raises for it (code written for it that catches that keeps working)."""


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


# Warnings held back by the call that collects them (None: issued at once).
_PENDING: contextvars.ContextVar = contextvars.ContextVar("cbo_pending_warnings", default=None)
# Categories dropped by warn() (see suppressed).
_SUPPRESSED: contextvars.ContextVar = contextvars.ContextVar("cbo_suppressed_warnings", default=())
# The prefix that cbo.inputs.item_names puts before a batch item's message.
_ITEM_PREFIX = re.compile(r"^batch item (\d+|\([\d, ]*\)): ", re.S)
# Distinct messages quoted in one collected warning; the rest are counted (all are logged).
_QUOTED_MESSAGES = 3
_LISTED_ITEMS = 12


def warn(message: str, category: type[CboWarning]) -> None:
    """Issue a cbo warning: held back while a call collects its warnings, else at once.

    Unless suppressed (:func:`suppressed`), the message is logged at INFO level to the ``"cbo.warnings"``
    logger either way.
    """
    if issubclass(category, _SUPPRESSED.get()):
        return
    logger.info("%s: %s", category.__name__, message)
    pending = _PENDING.get()
    if pending is None:
        warnings.warn(message, category, stacklevel=external_stacklevel())
    else:
        pending.append((category, message))


@contextlib.contextmanager
def one_warning_per_category():
    """Collect the :func:`warn` calls of the block and issue one warning per category at its end.

    Usable as a decorator. A block inside another collecting block hands its
    warnings to the outer one. The collected warnings are issued even when the
    block raises, so the diagnosis of a failed call is not lost.
    """
    if _PENDING.get() is not None:
        yield
        return
    pending: list = []
    token = _PENDING.set(pending)
    try:
        yield
    finally:
        _PENDING.reset(token)
        for category, messages in _by_category(pending).items():
            warnings.warn(collected_message(messages), category, stacklevel=external_stacklevel())


@contextlib.contextmanager
def suppressed(category: type[CboWarning]):
    """Drop the :func:`warn` calls of ``category`` in the block: for checks run by a caller that words
    their findings itself (``warnings.catch_warnings`` would not reach warnings held back by a collecting
    call)."""
    token = _SUPPRESSED.set((*_SUPPRESSED.get(), category))
    try:
        yield
    finally:
        _SUPPRESSED.reset(token)


def _by_category(pending: list) -> dict:
    """{category: [message, ...]} in order of first appearance."""
    grouped: dict = {}
    for category, message in pending:
        grouped.setdefault(category, []).append(message)
    return grouped


def collected_message(messages: list[str]) -> str:
    """One message for the warnings of one category issued by one call.

    A single message is kept as it is. Otherwise each distinct message (without
    its "batch item b: " prefix) is quoted once with the items that issued it,
    after a count of the items; past the first few, distinct messages are
    counted (all of them are in the ``"cbo.warnings"`` log).
    """
    if len(set(messages)) == 1:
        return messages[0]
    items_of: dict[str, list[str]] = {}
    items: list[str] = []
    for message in messages:
        match = _ITEM_PREFIX.match(message)
        item, text = (match.group(1), message[match.end():]) if match else (None, message)
        items_of.setdefault(text, [])
        if item is not None:
            items_of[text] += [item] if item not in items_of[text] else []
            items += [item] if item not in items else []
    head = f"{len(items)} batch item(s) ({_listed(items)}): " if items else f"{len(items_of)} warnings: "
    quoted = [text + (f" [batch item(s) {_listed(listed)}]" if listed and len(items_of) > 1 else "")
              for text, listed in list(items_of.items())[:_QUOTED_MESSAGES]]
    rest = len(items_of) - _QUOTED_MESSAGES
    tail = (f" ... and {rest} other message(s), each logged at INFO level to logging.getLogger('cbo.warnings')."
            if rest > 0 else "")
    return head + " | ".join(quoted) + tail


def _listed(items: list[str]) -> str:
    """'0, 1, 2, ..., 63': all items, or the first ones and the last when there are many."""
    if len(items) <= _LISTED_ITEMS:
        return ", ".join(items)
    return f"{', '.join(items[:_LISTED_ITEMS - 1])}, ..., {items[-1]}"


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
    warn(
        f"{where}Strict complementarity fails at the inner solution: {description} touch(es) the bound with "
        "a zero multiplier (weakly active). y*(x) is not differentiable there; cbo returns the one-sided "
        "derivative that keeps these constraints inactive. Move x slightly, or check info.active_set.",
        DegenerateKKTWarning,
    )
