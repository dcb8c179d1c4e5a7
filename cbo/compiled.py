"""What an inner problem compiles to, and the state that its calls share.

A :class:`cbo.BilevelProblem` is a description: the cvxpy problem, the
parameters, the variables and the outer objective. Everything that the calls
on it build once and reuse lives in one :class:`CompiledProblem`, reached by
:func:`compiled`:

* ``qp``: the parametric QP of the fast path (:class:`cbo.qp.QPProgram`: the
  data maps theta -> (P, q, A, b), the index maps back to y, mu and nu, the
  kept active sets, factorizations and solver set-ups), or None with the
  reason in ``qp_reason``;
* ``conic``: the cone program of the conic route
  (:class:`cbo.conic.ConicProgram`), built at its first use;
* ``adjoint_warm_starts``: the last adjoint vector of each iterative method on
  the smooth route, keyed by method, with the active set it solved on.

The QP is compiled when the :class:`~cbo.BilevelProblem` is constructed (it
calls :func:`compiled`), so that the first hypergradient only moves numbers.
:func:`cbo.hypergrad`, :class:`cbo.ArgminLayer` and :func:`cbo.minimize` share
the compiled problem of the same :class:`~cbo.BilevelProblem`;
:func:`forget_warm_starts` drops what they kept from earlier calls.
"""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch

from .conic import ConicProgram
from .inputs import is_symmetric
from .qp import QPProgram, compile_qp

if TYPE_CHECKING:
    from .problem import BilevelProblem

__all__ = ["CompiledProblem", "compiled", "forget_warm_starts"]

_COMPILED: "weakref.WeakKeyDictionary[BilevelProblem, CompiledProblem]" = weakref.WeakKeyDictionary()


class CompiledProblem:
    """The compiled forms of one :class:`~cbo.BilevelProblem` and the warm-start state of its calls."""

    def __init__(self, problem: BilevelProblem):
        self.problem = weakref.proxy(problem)  # the registry's key: no reference cycle keeps it alive
        self.qp: QPProgram | None
        self.qp, self.qp_reason = _compile_qp_unless_symmetric(self.problem)
        self._conic: ConicProgram | None = None
        self.adjoint_warm_starts: dict[str, tuple[tuple, torch.Tensor]] = {}

    @property
    def conic(self) -> ConicProgram:
        """The cone program of the conic route, built at the first use and kept."""
        if self._conic is None:
            self._conic = ConicProgram(self.problem)
        return self._conic

    def forget_warm_starts(self) -> None:
        """Drop the adjoint vectors, active sets, factorizations and solver set-ups kept from earlier calls."""
        self.adjoint_warm_starts.clear()
        if self.qp is not None:
            self.qp.forget_warm_starts()


def compiled(problem: BilevelProblem) -> CompiledProblem:
    """The :class:`CompiledProblem` of ``problem`` (compiled at its construction, and kept while it lives)."""
    if problem not in _COMPILED:
        _COMPILED[problem] = CompiledProblem(problem)
    return _COMPILED[problem]


def forget_warm_starts(problem: BilevelProblem) -> None:
    """Drop the adjoint vectors and active sets kept from earlier calls on ``problem`` (the next call starts cold)."""
    compiled(problem).forget_warm_starts()


def _compile_qp_unless_symmetric(problem: BilevelProblem) -> tuple[QPProgram | None, str]:
    """:func:`cbo.qp.compile_qp`, except for symmetric matrix parameters: cvxpy's QP data holds only their
    upper triangle, which the compiled map does not read yet; the general route takes those problems."""
    symmetric = [p.name() for p in problem.inner.parameters() if is_symmetric(p)]
    if symmetric:
        return None, f"symmetric matrix parameter(s) {', '.join(symmetric)} (not on the compiled QP path yet)"
    return compile_qp(problem)
