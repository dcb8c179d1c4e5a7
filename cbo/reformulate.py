r"""Automatic epigraph reformulation of piecewise-linear atoms, so that the inner problem stays smooth.

abs, pos, neg, maximum, max, norm1 and norm_inf (and minimum, min where they
are concave) have no Hessian at their kinks, so their Lagrangian has no KKT
system to differentiate there. Where such an atom ``f(a)`` is convex and sits
in a position that the problem pushes down (the objective of a minimisation,
the small side of ``<=``, through arguments in which every enclosing atom is
nondecreasing), it equals the smallest t with t >= f(a), and

    f(a) = max_k l_k(a)   ->   t,   l_k(a) <= t  for every linear piece l_k

leaves the optimal y unchanged and the problem smooth:

    ==================  ==========================================
    atom                pieces l_k(a) <= t
    ==================  ==========================================
    abs(a)              a <= t,  -a <= t
    maximum(a_1, ...)   a_i <= t
    max(a, axis)        a <= t (t broadcast along axis)
    norm1(a, axis)      a <= s, -a <= s, norm1 -> sum(s, axis)
    norm_inf(a, axis)   a <= t, -a <= t (t broadcast along axis)
    ==================  ==========================================

(pos(a) is maximum(a, 0) and neg(a) is -minimum(a, 0) in cvxpy.) Concave
minimum and min in a position pushed up become hypographs t <= a_i. Each new
constraint is labelled with the atom it comes from, e.g. "epigraph of
abs(var1) in the objective", so that the active set stays inspectable: the
active entries of ``a <= t`` are the kinks the solution sits on.

Atoms elsewhere (under a non-monotone atom, in an equality) are left as they
are; translation then refuses them and the conic route of :mod:`cbo.conic`
takes the problem.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cvxpy as cp
import numpy as np
from cvxpy.atoms.elementwise.abs import abs as cp_abs
from cvxpy.atoms.elementwise.maximum import maximum
from cvxpy.atoms.elementwise.minimum import minimum
from cvxpy.atoms.max import max as cp_max
from cvxpy.atoms.min import min as cp_min
from cvxpy.atoms.norm1 import norm1
from cvxpy.atoms.norm_inf import norm_inf
from cvxpy.atoms.perspective import perspective

__all__ = ["Reformulation", "epigraph_reformulation", "substitute"]

# +1: the enclosing problem pushes the expression down (convex atoms may become epigraphs);
# -1: pushes it up (concave atoms may become hypographs); 0: neither.
_DOWN, _UP, _FREE = 1, -1, 0
# Atoms whose arguments are not the expressions they are built from: cvxpy's perspective(f, s) has the
# arguments (s, *variables of f) and keeps f aside, so it cannot be rebuilt from new arguments. The rewriter
# leaves them as they are, and their variables keep their sign attributes (the conic route takes them).
_OPAQUE = (perspective,)


@dataclass
class Reformulation:
    """The inner problem after epigraph reformulation, and where each new piece comes from.

    Attributes
    ----------
    problem : cvxpy.Problem
        The smooth problem (``original`` itself if nothing was rewritten).
    original : cvxpy.Problem
        The problem as the user wrote it.
    variables : list of cvxpy.Variable
        The epigraph variables added (not returned to users).
    origins : dict[int, str]
        ``constraint.id`` of each added constraint -> "epigraph of abs(var1) in the objective".
    atoms : list of str
        Names of the rewritten atoms, in order of first appearance (no repeats).
    substitutes : dict[int, cvxpy.Variable]
        ``variable.id`` of each user variable declared ``nonneg=True`` or
        ``nonpos=True`` -> the plain variable that replaces it, whose sign is an
        explicit (labelled) constraint with a multiplier.
    """

    problem: cp.Problem
    original: cp.Problem
    variables: list = field(default_factory=list)
    origins: dict = field(default_factory=dict)
    atoms: list = field(default_factory=list)
    substitutes: dict = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.variables)

    def inner_variable(self, variable: cp.Variable) -> cp.Variable:
        """The variable of ``problem`` that stands for the user's ``variable``."""
        return self.substitutes.get(variable.id, variable)


def epigraph_reformulation(problem: cp.Problem) -> Reformulation:
    """Rewrite the piecewise-linear atoms of a DCP ``problem`` that sit in monotone positions.

    The objective and constraints keep their order; the epigraph constraints
    are appended after them. The returned problem has the same optimal values
    of the original variables.
    """
    original = problem
    problem, substitutes, sign_constraints = _explicit_signs(problem)
    rewriter = _Rewriter()
    rewriter.added = list(sign_constraints)
    sense = _DOWN if isinstance(problem.objective, cp.Minimize) else _UP
    rewriter.where = "the objective"
    objective = type(problem.objective)(rewriter.rewrite(problem.objective.expr, sense))
    constraints = []
    for index, constraint in enumerate(problem.constraints):
        rewriter.where = f"constraint {index}"
        constraints.append(rewriter.constraint(constraint))
    if not rewriter.added:
        return Reformulation(problem, original)
    new_problem = cp.Problem(objective, constraints + [c for c, _ in rewriter.added])
    return Reformulation(new_problem, original, rewriter.variables,
                         {c.id: origin for c, origin in rewriter.added}, rewriter.atoms, substitutes)


def _explicit_signs(problem: cp.Problem) -> tuple[cp.Problem, dict, list]:
    """Replace each variable declared nonneg=True (nonpos=True), and nothing else, by a plain variable
    with the constraint v >= 0 (v <= 0): cvxpy reports no multiplier for an attribute, a constraint has one."""
    substitutes, added = {}, []
    opaque = {v.id for atom in _atoms_of(problem, _OPAQUE) for v in atom.variables()}
    for v in problem.variables():
        declared = {k for k, value in v.attributes.items() if value}
        if not declared or not declared <= {"nonneg", "nonpos"} or v.id in opaque:
            continue  # other attributes (symmetric, PSD, integer, ...) stay: the conic route or an error
        plain = cp.Variable(v.shape, name=v.name())
        substitutes[v.id] = plain
        sign = "nonneg" if "nonneg" in declared else "nonpos"
        added.append((plain >= 0 if sign == "nonneg" else plain <= 0, f"{sign}=True attribute of {v.name()}"))
    if not substitutes:
        return problem, {}, []
    objective = type(problem.objective)(substitute(problem.objective.expr, substitutes))
    return cp.Problem(objective, [substitute(c, substitutes) for c in problem.constraints]), substitutes, added


def _atoms_of(problem: cp.Problem, types: tuple):
    """The atoms of ``types`` in the objective and the constraints of ``problem``."""
    stack = [problem.objective.expr, *problem.constraints]
    while stack:
        item = stack.pop()
        if isinstance(item, types):
            yield item
        stack.extend(item.args)


def substitute(expr, substitutes: dict):
    """A copy of a cvxpy expression or constraint with the leaves in ``substitutes`` (by id) replaced."""
    if getattr(expr, "id", None) in substitutes:
        return substitutes[expr.id]
    if not expr.args:
        return expr
    return expr.copy([substitute(arg, substitutes) for arg in expr.args])


class _Rewriter:
    """Walks expression trees, replacing rewritable atoms by epigraph variables."""

    def __init__(self):
        self.variables: list[cp.Variable] = []
        self.added: list[tuple[cp.Constraint, str]] = []
        self.atoms: list[str] = []
        self.where = ""

    def constraint(self, constraint: cp.Constraint) -> cp.Constraint:
        """``constraint`` with its arguments rewritten in their DCP contexts (same type)."""
        if isinstance(constraint, cp.constraints.Inequality):  # lhs <= rhs
            lhs, rhs = constraint.args
            new_lhs, new_rhs = self.rewrite(lhs, _DOWN), self.rewrite(rhs, _UP)
            return constraint if new_lhs is lhs and new_rhs is rhs else new_lhs <= new_rhs
        if isinstance(constraint, cp.constraints.NonPos):  # rewritten as arg <= 0: same p and multiplier
            arg = self.rewrite(constraint.args[0], _DOWN)
            return constraint if arg is constraint.args[0] else arg <= 0
        if isinstance(constraint, cp.constraints.NonNeg):  # as 0 <= arg
            arg = self.rewrite(constraint.args[0], _UP)
            return constraint if arg is constraint.args[0] else 0 <= arg
        return constraint  # equalities and cones: nothing in a monotone position

    def rewrite(self, expr: cp.Expression, sense: int) -> cp.Expression:
        """``expr`` with every rewritable atom (given the context ``sense``) replaced."""
        if not expr.args or not expr.variables() or isinstance(expr, _OPAQUE):
            return expr
        if sense == _DOWN and isinstance(expr, (cp_abs, maximum, cp_max, norm1, norm_inf)):
            return self._epigraph(expr)
        if sense == _UP and isinstance(expr, (minimum, cp_min)):
            return self._epigraph(expr)
        args = [self.rewrite(a, _child_sense(expr, i, sense)) for i, a in enumerate(expr.args)]
        if all(new is old for new, old in zip(args, expr.args)):
            return expr
        return expr.copy(args)

    def _epigraph(self, expr) -> cp.Expression:
        r"""A new variable t standing for ``expr``, with the constraints l_k(a) <= t (>= t if concave)."""
        name = type(expr).__name__
        if name not in self.atoms:
            self.atoms.append(name)
        origin = f"{'hypograph' if isinstance(expr, (minimum, cp_min)) else 'epigraph'} of {_short(expr)} " \
                 f"in {self.where}"
        axis = getattr(expr, "axis", None)
        if isinstance(expr, norm1):
            arg = expr.args[0]
            s = self._new_variable(arg.shape, name)
            self._bound(_signed_pieces(arg), s, origin)
            return cp.sum(s, axis=axis, keepdims=expr.keepdims)
        if isinstance(expr, (cp_max, cp_min, norm_inf)):
            arg = expr.args[0]
            kept = _kept_shape(arg.shape, axis)
            t = self._new_variable(kept, name)
            pieces = _signed_pieces(arg) if isinstance(expr, norm_inf) else [arg]
            self._bound(pieces, t, origin, upper=not isinstance(expr, cp_min))
            return t if kept == expr.shape else cp.reshape(t, expr.shape, order="C")
        t = self._new_variable(expr.shape, name)
        if isinstance(expr, cp_abs):
            self._bound(_signed_pieces(expr.args[0]), t, origin)
        else:  # maximum / minimum
            self._bound(list(expr.args), t, origin, upper=isinstance(expr, maximum))
        return t

    def _new_variable(self, shape, atom: str) -> cp.Variable:
        t = cp.Variable(shape, name=f"epi_{atom}_{len(self.variables)}")
        self.variables.append(t)
        return t

    def _bound(self, pieces, t, origin: str, upper: bool = True) -> None:
        """piece <= t (``upper``) or t <= piece for each piece, the pieces rewritten in turn."""
        for piece in pieces:
            if upper:
                constraint = self.rewrite(piece, _DOWN) <= t
            else:
                constraint = t <= self.rewrite(piece, _UP)
            self.added.append((constraint, origin))


def _child_sense(expr, index: int, sense: int) -> int:
    """Context of argument ``index``: kept where ``expr`` is nondecreasing in it, flipped where nonincreasing."""
    if sense == _FREE:
        return _FREE
    if expr.is_incr(index):
        return sense
    if expr.is_decr(index):
        return -sense
    return _FREE


def _signed_pieces(arg: cp.Expression) -> list:
    """The pieces of |arg|: arg and -arg, or only the one that a known sign makes the maximum."""
    if arg.is_nonneg():
        return [arg]
    if arg.is_nonpos():
        return [-arg]
    return [arg, -arg]


def _kept_shape(shape: tuple, axis) -> tuple:
    """Shape of a reduction over ``axis`` with keepdims (broadcasts against ``shape``)."""
    if axis is None:
        return ()
    axes = {a % len(shape) for a in np.atleast_1d(axis)}
    return tuple(1 if i in axes else n for i, n in enumerate(shape))


def _short(expr) -> str:
    text = str(expr)
    return text if len(text) <= 50 else f"{type(expr).__name__}(...) of shape {expr.shape}"
