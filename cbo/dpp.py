r"""Make a non-DPP inner problem DPP: each parameter expression becomes a parameter of its own.

cvxpy's parametric compilation (and so the QP fast path of :mod:`cbo.qp`)
needs DPP: parameters may only enter affinely. A problem such as

    min 1/2 ||w||^2 + 1/2 sum_i exp(c_i) xi_i^2

is not DPP because of exp(c), but it is DPP in theta = exp(c). Every maximal
subexpression without variables that contains a parameter and is not a bare
parameter, e(x), is replaced by a new parameter theta with e's shape and sign
(so that DCP's sign rules still hold), and

    dF/dx = (de/dx)^T dF/dtheta

by torch autograd through e's translation (:func:`cbo.translate.to_torch`).
Where the rewritten problem is still not DPP (or not DCP: a matrix that must
be PSD, say), nothing is lifted and the general route takes the problem.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cvxpy as cp

from .translate import TorchFn, to_torch

__all__ = ["LiftedParameter", "DPPForm", "dpp_form"]


@dataclass(frozen=True)
class LiftedParameter:
    """A parameter that stands for the parameter expression ``expression`` (evaluated by ``function``)."""

    parameter: cp.Parameter
    expression: cp.Expression
    function: TorchFn


@dataclass
class DPPForm:
    """The problem with its parameter expressions lifted; ``constraint_ids`` maps each original
    constraint's id to its rewritten copy's."""

    problem: cp.Problem
    lifted: list[LiftedParameter] = field(default_factory=list)
    constraint_ids: dict[int, int] = field(default_factory=dict)


def dpp_form(problem: cp.Problem) -> DPPForm | None:
    """``problem`` itself if it is DPP, else its lifted form if that is DCP and DPP, else None."""
    if problem.is_dpp():
        return DPPForm(problem, [], {c.id: c.id for c in problem.constraints})
    lifted: list[LiftedParameter] = []
    objective = type(problem.objective)(_lift(problem.objective.expr, lifted))
    constraints = [c.copy(args=[_lift(arg, lifted) for arg in c.args]) for c in problem.constraints]
    rewritten = cp.Problem(objective, constraints)
    if not (rewritten.is_dcp() and rewritten.is_dpp()):
        return None
    return DPPForm(rewritten, lifted, {old.id: new.id for old, new in zip(problem.constraints, constraints)})


def _lift(expr: cp.Expression, lifted: list[LiftedParameter]) -> cp.Expression:
    """``expr`` with its maximal parameter expressions replaced by new parameters (appended to ``lifted``)."""
    if isinstance(expr, cp.Parameter) or not expr.parameters():
        return expr
    if not expr.variables():
        parameter = cp.Parameter(expr.shape, nonneg=expr.is_nonneg(), nonpos=expr.is_nonpos() and not expr.is_nonneg())
        lifted.append(LiftedParameter(parameter, expr, to_torch(expr)))
        return parameter
    return expr.copy(args=[_lift(arg, lifted) for arg in expr.args])
