"""`BilevelProblem`: a convex cvxpy inner problem, its parameters x, and an outer objective F.

    min_x F(x, y*(x)),   y*(x) = argmin_y g(x, y)  s.t.  p(x, y) <= 0,  q(x, y) = 0

The inner problem is validated and translated to torch once, here. The
constraints are kept in cvxpy's own sign convention: ``a <= b`` is
``p = a - b <= 0`` with multiplier ``mu = constraint.dual_value >= 0``, and
``a == b`` is ``q = a - b = 0`` with multiplier ``nu = constraint.dual_value``,
so that the Lagrangian is ``L = g + mu . p + nu . q``.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import cvxpy as cp
import numpy as np
import torch

from .errors import ProblemDefinitionError
from .compiled import compiled
from .reformulate import epigraph_reformulation
from .translate import Env, TorchFn, to_torch

__all__ = ["BilevelProblem", "ConstraintBlock", "Output"]

_ALLOWED_VARIABLE_ATTRIBUTES = {"complex": False, "imag": False, "bounds": None, "sparsity": False}


@dataclass(frozen=True)
class ConstraintBlock:
    """One cvxpy constraint as a torch function ``p(env)`` (inequality) or ``q(env)`` (equality).

    ``offset`` is the position of its first entry in the stacked vector of all
    inequalities (or equalities) of the problem; ``sign`` turns the torch
    function into cvxpy's ``p <= 0`` form (``-1`` for ``NonNeg(expr)``, whose
    ``p`` is ``-expr``), so that ``dual_value`` is the multiplier as it stands.
    """

    constraint: cp.Constraint
    function: TorchFn
    offset: int
    size: int
    sign: float
    index: int
    origin: str = ""

    def label(self, entry: int | None = None, entries: str = "") -> str:
        """Human-readable name: ``constraint 2, entry 5: var1 <= param3``, 2 its position in the problem
        (``entries``: the text of several entries, as ``entries 0, 3``); for a constraint added by the
        epigraph reformulation, its ``origin``: ``epigraph of abs(var1) in the objective, entry 5:
        var1 <= epi_abs_0``. The expression is cvxpy's, on one line, shortened in the middle when long."""
        name = self.origin or f"constraint {self.index}"
        where = f", {entries}" if entries else self._entry_text(entry)
        return f"{name}{where}: {short_expression(str(self.constraint))}"

    def _entry_text(self, entry: int | None) -> str:
        if entry is None or self.size == 1:
            return ""
        position = tuple(int(i) for i in np.unravel_index(entry, self.constraint.shape))
        return f", entry {position[0] if len(position) == 1 else position}"


def short_expression(text: str, limit: int = 60) -> str:
    """cvxpy's text of an expression on one line; when longer than ``limit``, its start and end around
    " ... " (the relation and the right-hand side stay visible)."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    keep = (limit - 5) // 2
    return f"{text[:keep]} ... {text[-keep:]}"


class BilevelProblem:
    """A bilevel problem whose inner level is a convex cvxpy problem.

    Parameters
    ----------
    inner : cvxpy.Problem
        The inner (lower-level) problem, DCP, with the outer variables as
        ``cp.Parameter`` and the inner variables as ``cp.Variable``.
    parameters : sequence of cvxpy.Parameter
        The outer variables x, in the order ``hypergrad`` receives them.
        Other parameters of ``inner`` are constants read from their ``.value``.
    variables : sequence of cvxpy.Variable, optional
        The inner variables passed to ``outer`` (default: all variables of
        ``inner``, in ``inner.variables()`` order). All variables take part in
        the KKT system either way. A constraint's multiplier is asked for by
        its dual variable, ``constraint.dual_variables[0]``: F then receives
        mu >= 0 (inequality, in cvxpy's sign convention, zero where inactive)
        or nu (equality), shaped like the constraint, differentiated from the
        same KKT solve (smooth route and QP fast path).
    outer : callable, optional
        ``outer(*x_tensors, *y_tensors) -> scalar tensor``: the outer objective
        F, with one tensor per entry of ``variables``. Needed by
        :func:`cbo.hypergrad`, not by :class:`cbo.ArgminLayer`.

    Notes
    -----
    Routes (see docs/conic.md): piecewise-linear atoms (abs, pos, maximum,
    norm1, norm_inf, ...) in monotone positions are rewritten in epigraph form
    (``reformulation``; ``inner`` is the rewritten problem and ``all_variables``
    includes its epigraph variables) and the smooth Lagrangian route applies.
    When it does not (cone constraints, atoms without a smooth translation,
    variable attributes such as ``symmetric=True``), ``route`` is "conic" and
    ``route_reason`` says why: cvxpy's cone program is differentiated instead.

    Raises
    ------
    ProblemDefinitionError
        With what is wrong and how to fix it: a non-DCP inner problem, a
        parameter or variable that is not in it, an ``outer`` that is not
        callable, or a problem that neither route applies to (no smooth
        translation and not DPP).
    NonSmoothAtomError
        For a nonsmooth atom that cannot be rewritten (not in a monotone
        position) in a problem that is not DPP: the message gives its rewrite.
    """

    def __init__(
        self,
        inner: cp.Problem,
        parameters: Sequence[cp.Parameter],
        variables: Sequence[cp.Variable] | None = None,
        outer: Callable[..., torch.Tensor] | None = None,
    ):
        if not isinstance(inner, cp.Problem):
            raise ProblemDefinitionError(
                f"`inner` must be a cvxpy.Problem, got {type(inner).__name__}. "
                "Build it as cp.Problem(cp.Minimize(...), [constraints])."
            )
        self.parameters = _check_parameters(inner, parameters)
        self.variables = _check_variables(inner, variables)
        # Multipliers asked for as outputs: dual variable id -> index of its constraint in inner.constraints.
        self._dual_owners = _dual_owners(inner, self.variables)
        if outer is not None and not callable(outer):
            raise ProblemDefinitionError(
                f"`outer` must be callable as outer(*parameters, *variables) -> scalar tensor, "
                f"got {type(outer).__name__}."
            )
        _check_outer_arity(outer, outer_argument_count(self.parameters, self.variables))
        self.outer = outer
        _check_dcp(inner)
        # The problem cbo solves and differentiates: the user's, with piecewise-linear atoms rewritten
        # in epigraph form (cbo.reformulate); its extra variables are in all_variables, not in variables.
        self.reformulation = epigraph_reformulation(inner)
        self.inner = self.reformulation.problem
        self.all_variables = list(self.inner.variables())
        # The user's variables as they appear in `inner` (a nonneg=True variable is replaced there).
        self.inner_variables = [self.reformulation.inner_variable(v) for v in self.variables
                                if v.id not in self._dual_owners]
        self.smooth_error = _smooth_setup(self)
        self.outputs = _outputs(self)
        self.uses_multipliers = any(o.multiplier for o in self.outputs)  # a constraint's dual variable is an output
        # The length of the stacked solution w: (y, mu, nu) on the smooth route, (y, multiplier outputs) on the conic.
        self.n_w = self.n_y + self.n_ineq + self.n_eq + sum(
            o.size for o in self.outputs if o.multiplier and self.smooth_error is not None)
        self.is_linear = bool(self.inner.objective.expr.is_affine()) and all(
            _constraint_is_affine(c) for c in self.inner.constraints)
        compiled(self)  # the QP of the fast path, compiled now (cbo.compiled): the first call only moves numbers

    @property
    def route(self) -> str:
        """The route :func:`cbo.hypergrad` takes by default: "smooth" or "conic"."""
        return "smooth" if self.smooth_error is None else "conic"

    @property
    def route_reason(self) -> str:
        """Why that route: "smooth Lagrangian", "smooth after epigraph reformulation of abs, norm1",
        or "conic: SOC constraint 2 has no smooth Lagrangian form"."""
        if self.smooth_error is not None:
            reason = f"conic: {str(self.smooth_error).split('. ')[0].rstrip('.')}"
            return reason if self.inner.is_dpp() else f"{reason}; not DPP: re-canonicalized at each x"
        if self.reformulation.changed:
            return f"smooth after epigraph reformulation of {', '.join(self.reformulation.atoms)}"
        if self.reformulation.substitutes:
            return "smooth Lagrangian, with variable sign attributes as constraints"
        return "smooth Lagrangian"

    def __repr__(self) -> str:
        return (
            f"BilevelProblem(parameters={[p.name() for p in self.parameters]}, "
            f"variables={[v.name() for v in self.variables]}, n_y={self.n_y}, "
            f"n_ineq={self.n_ineq}, n_eq={self.n_eq})"
        )

    # ------------------------------------------------------------ evaluation

    def env(self, x: Sequence[torch.Tensor], y: Sequence[torch.Tensor]) -> Env:
        """Evaluation environment for parameters ``x`` and all variables ``y``."""
        values = {p.id: t for p, t in zip(self.parameters, x)}
        values.update({v.id: t for v, t in zip(self.all_variables, y)})
        return Env(values, dtype=x[0].dtype, device=x[0].device)

    @functools.cached_property
    def _y_layout(self) -> list[tuple[int, int, tuple, bool]]:
        """(start, stop, shape, the user's: not an epigraph variable) of each of ``all_variables`` in y."""
        added, start, layout = {v.id for v in self.reformulation.variables}, 0, []
        for v in self.all_variables:
            layout.append((start, start + v.size, v.shape, v.id not in added))
            start += v.size
        return layout

    def split_y(self, y_flat: torch.Tensor) -> list[torch.Tensor]:
        """Split the stacked variable vector into tensors shaped like the variables."""
        return [y_flat[start:stop].reshape(shape) for start, stop, shape, _ in self._y_layout]

    def output_values(self, w: torch.Tensor, batch_shape: Sequence[int], like: torch.Tensor) -> tuple:
        """The outputs (``self.variables``) from a batch of stacked solutions w = (y, mu, nu), (B, n_w): one
        tensor each, shaped (*batch_shape, *shape), in the dtype (float64 for integer input) and on the device
        of ``like``. Without multiplier outputs, w may stop after y."""
        dtype = like.dtype if like.is_floating_point() else torch.float64
        if w.dtype != dtype or w.device != like.device:
            w = w.to(dtype=dtype, device=like.device)
        return tuple(_reshaped(w[..., o.start:o.start + o.size], (*batch_shape, *o.shape)) for o in self.outputs)

    def output_cotangent(self, grad_outputs: Sequence[torch.Tensor | None], batch: int, dtype, device) -> torch.Tensor:
        """dL/dw for the gradients of the outputs (None: zero), (batch, n_w): zero for the variables and
        multipliers that are not outputs, without a graph (every caller differentiates once). On the CPU it is
        assembled in numpy, whose per-operation cost is a fifth of torch's at small sizes."""
        if torch.device(device).type != "cpu":
            cotangent = torch.zeros(batch, self.n_w, dtype=dtype, device=device)
            for o, g in zip(self.outputs, grad_outputs):
                if g is not None:
                    cotangent[:, o.start:o.start + o.size] += g.reshape(batch, o.size).to(dtype=dtype, device=device)
            return cotangent
        cotangent = np.zeros((batch, self.n_w))
        for o, g in zip(self.outputs, grad_outputs):
            if g is not None:
                cotangent[:, o.start:o.start + o.size] += g.to("cpu", torch.float64).numpy().reshape(batch, o.size)
        return torch.from_numpy(cotangent) if dtype == torch.float64 else torch.from_numpy(cotangent).to(dtype)

    def user_y(self, y_flat: torch.Tensor) -> list[torch.Tensor]:
        """``split_y`` without the epigraph variables: one tensor per variable of the user's problem."""
        return [y_flat[start:stop].reshape(shape) for start, stop, shape, users in self._y_layout if users]

    def stack(self, blocks: Sequence[ConstraintBlock], env: Env) -> torch.Tensor:
        """All entries of ``blocks`` at ``env``, stacked into one vector."""
        if not blocks:
            return torch.zeros(0, dtype=env.dtype, device=env.device)
        return torch.cat([b.sign * b.function(env).reshape(-1) for b in blocks])

    def inequality_values(self, x: Sequence[torch.Tensor], y_flat: torch.Tensor) -> torch.Tensor:
        """p(x, y): the stacked inequality constraint values (feasible where <= 0)."""
        return self.stack(self.inequalities, self.env(x, self.split_y(y_flat)))

    def active_constraints(self, x: Sequence[torch.Tensor], y_flat: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """(a * p, q): the active inequalities (zero where inactive) and the equalities, stacked."""
        env = self.env(x, self.split_y(y_flat))
        return torch.cat([active * self.stack(self.inequalities, env), self.stack(self.equalities, env)])

    def lagrangian(self, x: Sequence[torch.Tensor], w: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        r"""Lagrangian of the active set, padded to all inequalities, for one item.

            L(w, x) = g(x, y) + sum_i a_i mu_i p_i(x, y) + 1/2 sum_i (1 - a_i) mu_i^2 + nu . q(x, y)

        with w = (y, mu, nu) stacking all variables, all inequality multipliers
        and all equality multipliers, and a = ``active`` in {0, 1}^{n_ineq}. At a
        KKT point (mu_i = 0 off the active set) grad_w L = (grad_y L, p_A, 0, q):
        inactive multipliers get the trivial equation mu_i = 0, so every item of
        a batch has a KKT system of the same size, whatever its active set.
        """
        y, mu, nu = torch.split(w, [self.n_y, self.n_ineq, self.n_eq])
        env = self.env(x, self.split_y(y))
        L = self.objective(env)
        if self.n_ineq:
            L = L + (active * mu) @ self.stack(self.inequalities, env) + 0.5 * ((1 - active) * mu ** 2).sum()
        if self.n_eq:
            L = L + nu @ self.stack(self.equalities, env)
        return L

    def outer_value(self, x, w) -> torch.Tensor:
        """F(x, outputs) with the outputs (``self.variables``) read from w = (y, mu, nu) (or y alone when no
        multiplier is an output)."""
        return self.outer_at_outputs(x, self.output_values(w, (), w))

    def outer_at_outputs(self, x, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """F(x, outputs), a scalar tensor, for the outputs (``self.variables``) shaped as they are."""
        if self.outer is None:
            raise ProblemDefinitionError(
                "This BilevelProblem has no outer objective. Pass "
                "`outer=lambda *params_then_vars: scalar` to BilevelProblem to use cbo.hypergrad."
            )
        value = self.outer(*x, *outputs)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ProblemDefinitionError(
                f"`outer` must return a scalar torch tensor, got {type(value).__name__}"
                f"{' of shape ' + str(tuple(value.shape)) if isinstance(value, torch.Tensor) else ''}. "
                "Use torch operations on its tensor arguments and reduce to a scalar (e.g. .sum())."
            )
        return value if value.dim() == 0 else value.reshape(())

    def constraint_label(self, flat_index: int, equality: bool = False) -> str:
        """Name of entry ``flat_index`` of the stacked inequalities (or equalities)."""
        block = self._block_of(flat_index, equality)
        return block.label(flat_index - block.offset)

    def describe_entries(self, flat_indices, equality: bool = False) -> str:
        """Names of several stacked entries, grouped by constraint:
        ``constraint 2, entries 0, 3: G @ y <= h``."""
        groups: dict[int, list[int]] = {}
        for i in flat_indices:
            block = self._block_of(int(i), equality)
            groups.setdefault(block.offset, []).append(int(i) - block.offset)
        parts = []
        for offset, entries in groups.items():
            block = self._block_of(offset, equality)
            if block.size == 1:
                parts.append(block.label())
            else:
                positions = [block._entry_text(e).removeprefix(", entry ") for e in entries]
                parts.append(block.label(entries=f"entr{'y' if len(entries) == 1 else 'ies'} {', '.join(positions)}"))
        return "; ".join(parts)

    def _block_of(self, flat_index: int, equality: bool) -> ConstraintBlock:
        for block in self.equalities if equality else self.inequalities:
            if block.offset <= flat_index < block.offset + block.size:
                return block
        raise IndexError(flat_index)


# ---------------------------------------------------------------- validation

def _check_parameters(inner: cp.Problem, parameters) -> list[cp.Parameter]:
    if isinstance(parameters, cp.Parameter):
        parameters = [parameters]
    parameters = list(parameters)
    if not parameters:
        raise ProblemDefinitionError(
            "`parameters` is empty: list the cp.Parameter objects that are the outer variables x."
        )
    known = {p.id for p in inner.parameters()}
    for p in parameters:
        if not isinstance(p, cp.Parameter):
            raise ProblemDefinitionError(
                f"Every entry of `parameters` must be a cp.Parameter, got {type(p).__name__} ({p}). "
                "Declare the outer variables as cp.Parameter(shape) and use them in the inner problem."
            )
        if p.id not in known:
            raise ProblemDefinitionError(
                f"Parameter {p.name()} does not appear in the inner problem, so y* does not depend on it. "
                "Use it in the inner objective or constraints, or drop it from `parameters`."
            )
    if len({p.id for p in parameters}) != len(parameters):
        raise ProblemDefinitionError("`parameters` lists the same cp.Parameter twice.")
    _check_constant_values(inner, parameters)
    return parameters


def _check_constant_values(inner: cp.Problem, parameters: Sequence[cp.Parameter]) -> None:
    """Every parameter of ``inner`` not in ``parameters`` is a constant: it must have a value."""
    inputs = {p.id for p in parameters}
    missing = [p.name() for p in inner.parameters() if p.id not in inputs and p.value is None]
    if missing:
        raise ProblemDefinitionError(
            f"Parameter(s) {', '.join(missing)} of the inner problem are neither in `parameters` nor given a "
            f"value: `parameters` must exactly match problem.parameters() but for the parameters held constant "
            f"by a value. List each in `parameters=[...]` to make it an input (x), or set its value "
            f"(`{missing[0]}.value = ...`) to hold it constant."
        )


def outer_argument_count(parameters: Sequence[cp.Parameter], variables: Sequence[cp.Variable]) -> int:
    """How many positional arguments ``outer`` receives: one tensor per parameter, then one per output
    (a variable or a constraint's multiplier)."""
    return len(parameters) + len(variables)


def _check_outer_arity(outer: Callable | None, expected: int) -> None:
    """Raise if ``outer``'s signature cannot take ``expected`` positional arguments (``*args`` takes any
    number; callables without a readable signature, such as some builtins, are not checked)."""
    if outer is None:
        return
    try:
        signature = inspect.signature(outer)
    except (TypeError, ValueError):
        return
    positional = [p for p in signature.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    required_keywords = [p.name for p in signature.parameters.values()
                         if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    takes_any = any(p.kind is p.VAR_POSITIONAL for p in signature.parameters.values())
    if len(required) > expected or (len(positional) < expected and not takes_any) or required_keywords:
        raise ProblemDefinitionError(
            f"`outer` is called as outer(*parameters, *variables) with {expected} positional argument(s) "
            f"(one tensor per parameter, then one per variable), but its signature is "
            f"{getattr(outer, '__name__', type(outer).__name__)}{signature}. Give it {expected} arguments "
            "(or *args)."
        )


def _check_variables(inner: cp.Problem, variables) -> list[cp.Variable]:
    """The outputs asked for: variables of ``inner`` or dual variables of its constraints."""
    all_variables = inner.variables()
    if variables is None:
        variables = all_variables
    if isinstance(variables, cp.Variable):
        variables = [variables]
    variables = list(variables)
    known = {v.id for v in all_variables} | {d.id for c in inner.constraints for d in c.dual_variables}
    for v in variables:
        if not isinstance(v, cp.Variable):
            raise ProblemDefinitionError(f"Every entry of `variables` must be a cp.Variable, got {type(v).__name__}.")
        if v.id not in known:
            raise ProblemDefinitionError(
                f"Variable {v.name()} is neither a variable of the inner problem nor the dual variable of one "
                f"of its constraints: `variables` must be a subset of problem.variables() and of the constraints' "
                f"dual variables. Its variables are: {[w.name() for w in all_variables]}; a constraint's "
                "multiplier is `constraint.dual_variables[0]` of a constraint in the problem."
            )
    return variables


def _dual_owners(inner: cp.Problem, variables: Sequence[cp.Variable]) -> dict[int, tuple[int, int]]:
    """For each dual variable in ``variables``: the index of its constraint in ``inner.constraints`` and its
    position among the constraint's dual variables (an SOC constraint has two: t's and X's)."""
    owner = {d.id: (index, part) for index, c in enumerate(inner.constraints) for part, d in enumerate(c.dual_variables)}
    return {v.id: owner[v.id] for v in variables if v.id in owner}


@dataclass(frozen=True)
class Output:
    """One output of the inner solution: a variable y_j or a constraint's multiplier.

    The inner solution is stacked as w = (y, mu, nu) on the smooth route (all
    variables, then the inequality and the equality multipliers in
    :class:`ConstraintBlock` order) and as w = (y, the multiplier outputs) on
    the conic route; the output is ``w[start:start + size]`` reshaped (C order)
    to ``shape``. ``constraint`` is the index in ``inner.constraints`` of a
    multiplier's constraint (None for a variable), ``part`` the position of its
    dual variable in ``constraint.dual_variables``.
    """

    name: str
    shape: tuple
    start: int
    size: int
    constraint: int | None = None
    part: int = 0

    @property
    def multiplier(self) -> bool:
        return self.constraint is not None


def _outputs(problem: BilevelProblem) -> list[Output]:
    """The :class:`Output` of each entry of ``problem.variables``, in order."""
    starts = np.cumsum([0] + [v.size for v in problem.all_variables])
    start_of = {v.id: int(s) for v, s in zip(problem.all_variables, starts)}
    outputs, conic_start = [], problem.n_y
    for v in problem.variables:
        if v.id not in problem._dual_owners:
            inner_v = problem.reformulation.inner_variable(v)
            outputs.append(Output(v.name(), v.shape, start_of[inner_v.id], v.size))
            continue
        index, part = problem._dual_owners[v.id]
        if problem.smooth_error is not None:  # the conic route: the multipliers follow y in the order asked
            name = f"multiplier {part} of constraint {index}: {short_expression(str(problem.inner.constraints[index]))}"
            outputs.append(Output(name, v.shape, conic_start, v.size, index, part))
            conic_start += v.size
            continue
        block = next(b for b in problem.inequalities + problem.equalities if b.index == index)
        start = problem.n_y + block.offset + (problem.n_ineq if block in problem.equalities else 0)
        outputs.append(Output(f"multiplier of {block.label()}", block.constraint.shape, start, block.size, index))
    return outputs


def _smooth_setup(problem: BilevelProblem) -> ProblemDefinitionError | None:
    """Translate ``problem.inner`` for the smooth Lagrangian route; return why it does not apply, if so.

    Sets ``objective``, ``inequalities``, ``equalities``, ``n_y``, ``n_ineq``, ``n_eq`` (no
    constraint blocks when the route does not apply: the conic route then takes the problem).
    """
    inner = problem.inner
    problem.n_y = sum(v.size for v in problem.all_variables)
    problem.objective, problem.inequalities, problem.equalities = None, [], []
    problem.n_ineq = problem.n_eq = 0
    try:
        _check_variable_attributes(problem.all_variables)
        objective = _objective_function(inner.objective)
        inequalities, equalities = _constraint_blocks(inner.constraints, problem.reformulation.origins)
    except ProblemDefinitionError as err:  # UnsupportedAtomError, cone constraints, variable attributes
        return err
    problem.objective, problem.inequalities, problem.equalities = objective, inequalities, equalities
    problem.n_ineq = sum(b.size for b in inequalities)
    problem.n_eq = sum(b.size for b in equalities)
    return None


def _check_variable_attributes(all_variables) -> None:
    for v in all_variables:
        extra = {k: val for k, val in v.attributes.items() if val and _ALLOWED_VARIABLE_ATTRIBUTES.get(k, False) != val}
        if extra:
            raise ProblemDefinitionError(
                f"Variable {v.name()} is declared with {extra}, which has no multiplier to read on the "
                f"smooth route. For that route declare cp.Variable({v.shape}) and add the constraint "
                f"(e.g. `{v.name()} >= 0` for nonneg=True)."
            )


def _check_dcp(inner: cp.Problem) -> None:
    if inner.is_dcp():
        return
    culprits = []
    if not inner.objective.is_dcp():
        culprits.append(f"the objective `{inner.objective}`")
    culprits += [f"constraint `{c}`" for c in inner.constraints if not c.is_dcp()]
    raise ProblemDefinitionError(
        f"The inner problem is not DCP (not provably convex), so its KKT conditions need not "
        f"characterise y*: {'; '.join(culprits)}. Rewrite it following cvxpy's DCP rules "
        "(https://www.cvxpy.org/tutorial/dcp/) — e.g. minimise a convex function, use convex <= concave."
    )


def _constraint_is_affine(constraint) -> bool:
    """An affine (in)equality; cone constraints (SOC, PSD, ExpCone) are not, even with affine arguments."""
    linear = (cp.constraints.Inequality, cp.constraints.NonPos, cp.constraints.NonNeg, cp.constraints.Equality,
              cp.constraints.Zero)
    return isinstance(constraint, linear) and all(arg.is_affine() for arg in constraint.args)


def _objective_function(objective) -> TorchFn:
    f = to_torch(objective.expr)
    if isinstance(objective, cp.Maximize):
        return lambda env: -f(env)
    return f


def _constraint_blocks(constraints, origins: dict[int, str]) -> tuple[list[ConstraintBlock], list[ConstraintBlock]]:
    """Split constraints into inequalities p <= 0 and equalities q = 0 (cvxpy's signs).

    ``origins`` names the constraints added by the epigraph reformulation (by ``constraint.id``)."""
    inequalities, equalities = [], []
    n_ineq = n_eq = 0
    for index, c in enumerate(constraints):
        if isinstance(c, cp.constraints.Inequality):
            lhs, rhs = (to_torch(a) for a in c.args)
            fn, sign, equality = (lambda env, lhs=lhs, rhs=rhs: lhs(env) - rhs(env)), 1.0, False
        elif isinstance(c, cp.constraints.NonPos):
            fn, sign, equality = to_torch(c.args[0]), 1.0, False
        elif isinstance(c, cp.constraints.NonNeg):
            fn, sign, equality = to_torch(c.args[0]), -1.0, False
        elif isinstance(c, cp.constraints.Equality):
            lhs, rhs = (to_torch(a) for a in c.args)
            fn, sign, equality = (lambda env, lhs=lhs, rhs=rhs: lhs(env) - rhs(env)), 1.0, True
        elif isinstance(c, cp.constraints.Zero):
            fn, sign, equality = to_torch(c.args[0]), 1.0, True
        else:
            raise ProblemDefinitionError(
                f"{type(c).__name__} constraint {index} has no smooth Lagrangian form (`{short_expression(str(c))}`)."
            )
        if equality:
            equalities.append(ConstraintBlock(c, fn, n_eq, c.size, sign, index, origins.get(c.id, "")))
            n_eq += c.size
        else:
            inequalities.append(ConstraintBlock(c, fn, n_ineq, c.size, sign, index, origins.get(c.id, "")))
            n_ineq += c.size
    return inequalities, equalities


def _reshaped(tensor: torch.Tensor, shape: tuple) -> torch.Tensor:
    """``tensor`` reshaped to ``shape``, itself where it has that shape (a reshape costs a microsecond)."""
    return tensor if tensor.shape == shape else tensor.reshape(shape)
