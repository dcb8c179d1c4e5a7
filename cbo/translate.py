"""Translate cvxpy expressions into torch functions of the parameters and variables.

``to_torch(expr)`` walks the cvxpy expression tree once and returns a function
``f(env) -> torch.Tensor`` that evaluates the same expression on torch tensors,
so that torch autograd supplies every derivative of the inner objective and
constraints with respect to both the variables y and the parameters x.

Because the original expression is differentiated (not cvxpy's cone program),
parameters may enter anywhere, DPP or not: ``x * cp.square(y)`` translates to
``x * y**2``.

Shapes follow cvxpy, which follows numpy: 1-D vectors, 0-D scalars, numpy
broadcasting; ``reshape`` honours cvxpy's ``order`` ('F' by default in cvxpy).

Nonsmooth atoms (abs, pos, maximum, norm1, norm_inf, ...) have no Hessian at
their kinks and are refused with :class:`~cbo.errors.NonSmoothAtomError`,
whose message gives the epigraph rewrite that keeps the problem smooth.
Complex leaves are refused (:class:`~cbo.errors.UnsupportedAtomError`).

Some atoms that translate are smooth only almost everywhere: a p-norm has no
gradient at 0, and an atom on the boundary of its domain (``sqrt``, ``power``,
``entr`` at 0) sits where the smooth route's KKT conditions do not hold.
:func:`kinks` lists these sets for an expression and :func:`kink_at` finds the
one an inner solution is on, so that the caller can take the conic route there.
docs/atoms.md lists every cvxpy atom with the route cbo takes for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cvxpy as cp
import numpy as np
import scipy.sparse as sp
import torch

from cvxpy.atoms.affine.add_expr import AddExpression
from cvxpy.atoms.affine.binary_operators import DivExpression, MulExpression, multiply
from cvxpy.atoms.affine.broadcast_to import broadcast_to
from cvxpy.atoms.affine.concatenate import Concatenate
from cvxpy.atoms.affine.conj import conj
from cvxpy.atoms.affine.conv import conv, convolve
from cvxpy.atoms.affine.cumsum import cumsum
from cvxpy.atoms.affine.diag import diag_mat, diag_vec
from cvxpy.atoms.affine.hstack import Hstack
from cvxpy.atoms.affine.imag import imag
from cvxpy.atoms.affine.index import index, special_index
from cvxpy.atoms.affine.kron import kron
from cvxpy.atoms.affine.promote import Promote
from cvxpy.atoms.affine.real import real
from cvxpy.atoms.affine.reshape import reshape
from cvxpy.atoms.affine.sum import Sum
from cvxpy.atoms.affine.trace import Trace
from cvxpy.atoms.affine.transpose import transpose
from cvxpy.atoms.affine.unary_operators import NegExpression
from cvxpy.atoms.affine.upper_tri import upper_tri
from cvxpy.atoms.affine.vstack import Vstack
from cvxpy.atoms.affine.wraps import Wrap
from cvxpy.atoms.cumprod import cumprod
from cvxpy.atoms.elementwise.entr import entr
from cvxpy.atoms.elementwise.exp import exp
from cvxpy.atoms.elementwise.huber import huber
from cvxpy.atoms.elementwise.kl_div import kl_div
from cvxpy.atoms.elementwise.log import log
from cvxpy.atoms.elementwise.log1p import log1p
from cvxpy.atoms.elementwise.logistic import logistic
from cvxpy.atoms.elementwise.power import Power
from cvxpy.atoms.elementwise.rel_entr import rel_entr
from cvxpy.atoms.elementwise.xexp import xexp
from cvxpy.atoms.log_sum_exp import log_sum_exp
from cvxpy.atoms.pnorm import Pnorm
from cvxpy.atoms.prod import Prod
from cvxpy.atoms.quad_form import QuadForm
from cvxpy.atoms.quad_over_lin import quad_over_lin
from cvxpy.expressions.leaf import Leaf

from .errors import NonSmoothAtomError, UnsupportedAtomError

__all__ = ["Env", "to_torch", "SUPPORTED_ATOMS", "Kink", "kinks", "kink_at"]


@dataclass
class Env:
    """Values of the cvxpy leaves for one evaluation.

    ``values`` maps ``leaf.id`` to a tensor shaped like the leaf. A parameter
    missing from ``values`` is read from its current ``.value`` (a constant of
    the evaluation). Constants are created on ``device`` with ``dtype``
    (scipy.sparse matrices become dense: torch's sparse tensors have no
    efficient ``vmap`` rules).
    """

    values: dict[int, torch.Tensor]
    dtype: torch.dtype = torch.float64
    device: torch.device | str = "cpu"

    def tensor(self, value) -> torch.Tensor:
        """``value`` (numpy, scipy.sparse or scalar) as a tensor of this env."""
        if sp.issparse(value):
            value = value.toarray()
        return torch.as_tensor(np.asarray(value, dtype=float), dtype=self.dtype, device=self.device)


TorchFn = Callable[[Env], torch.Tensor]


def to_torch(expr: cp.Expression) -> TorchFn:
    """Return ``f(env)`` evaluating the cvxpy expression ``expr`` in torch.

    Raises
    ------
    NonSmoothAtomError
        For abs, pos, neg, maximum, minimum, max, min, norm1, norm_inf, ...
    UnsupportedAtomError
        For any atom with no translation yet.
    """
    if isinstance(expr, Leaf) and expr.is_complex():
        raise UnsupportedAtomError(
            f"`{_short(expr)}` is complex: cbo differentiates real problems only. Write the problem with its real "
            "and imaginary parts as separate real variables and parameters.")
    if isinstance(expr, cp.Constant):
        return _constant(expr.value)
    if isinstance(expr, cp.Parameter):
        return _parameter(expr)
    if isinstance(expr, cp.Variable):
        return _variable(expr)
    handler = _find_handler(expr)
    args = [to_torch(a) for a in expr.args]
    return handler(expr, *args)


# ---------------------------------------------------------------- leaves

def _constant(value) -> TorchFn:
    cache: dict = {}

    def f(env: Env) -> torch.Tensor:
        key = (str(env.device), env.dtype)
        if key not in cache:
            cache[key] = env.tensor(value)
        return cache[key]

    return f


def _parameter(param: cp.Parameter) -> TorchFn:
    def f(env: Env) -> torch.Tensor:
        if param.id in env.values:
            return env.values[param.id]
        if param.value is None:
            raise ValueError(
                f"Parameter {param.name()} has no value. Either list it in "
                "`parameters=[...]` of the BilevelProblem or set `.value` before solving."
            )
        return env.tensor(param.value)

    return f


def _variable(var: cp.Variable) -> TorchFn:
    def f(env: Env) -> torch.Tensor:
        return env.values[var.id]

    return f


# ---------------------------------------------------------------- helpers

def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cvxpy's ``@``/``*`` between expressions: matmul, or scaling if one is a scalar."""
    if a.dim() == 0 or b.dim() == 0:
        return a * b
    return a @ b


def _reverse_axes(t: torch.Tensor) -> torch.Tensor:
    """numpy's ``t.T`` for any number of axes, 0-d included (``permute(*())`` would fail there)."""
    return t.permute(tuple(reversed(range(t.dim()))))


def _reshape(t: torch.Tensor, shape: tuple, order: str) -> torch.Tensor:
    """numpy's ``reshape(t, shape, order)``; torch reshapes in 'C' order only."""
    if order == "C":
        return t.reshape(shape)
    # Fortran order = C order on the reversed axes.
    return _reverse_axes(_reverse_axes(t).reshape(tuple(reversed(shape))))


def _numpy_index(shape: tuple, key) -> torch.Tensor:
    """Flat positions that numpy's ``a[key]`` picks from an array of ``shape``."""
    positions = np.arange(int(np.prod(shape, dtype=int))).reshape(shape)[key]
    return torch.as_tensor(np.array(positions), dtype=torch.long)  # np.array keeps 0-d keys 0-d


def _sum_axis(t: torch.Tensor, axis, keepdims: bool) -> torch.Tensor:
    if axis is None:
        s = t.sum()
        return s.reshape((1,) * t.dim()) if keepdims else s
    return t.sum(dim=axis, keepdim=keepdims)


# ---------------------------------------------------------------- handlers
# Each handler takes the cvxpy atom and the torch functions of its arguments
# and returns the torch function of the atom.

def _elementwise(op):
    return lambda expr, a: (lambda env: op(a(env)))


def _index(expr, a):
    positions = _numpy_index(expr.args[0].shape, expr.get_data()[-1])
    return lambda env: a(env).reshape(-1)[positions.to(env.device)]


def _special_index(expr, a):
    positions = _numpy_index(expr.args[0].shape, expr.key)
    return lambda env: a(env).reshape(-1)[positions.to(env.device)]


def _power(expr, a):
    p = to_torch(expr.p) if isinstance(expr.p, cp.Expression) else _constant(expr.p)
    return lambda env: a(env) ** p(env)


def _pnorm(expr, a):
    p, axis, keepdims = float(expr.p), expr.axis, expr.keepdims
    if p == 1 or np.isinf(p):
        raise _nonsmooth(expr)
    return lambda env: torch.linalg.vector_norm(a(env), ord=p, dim=axis, keepdim=keepdims)


def _quad_over_lin(expr, x, y):
    axis, keepdims = expr.axis, expr.keepdims
    return lambda env: _sum_axis(x(env) ** 2, axis, keepdims) / y(env)


def _quad_form(expr, x, P):
    return lambda env: x(env).reshape(-1) @ P(env) @ x(env).reshape(-1)


def _log_sum_exp(expr, a):
    axis, keepdims = expr.axis, expr.keepdims
    if axis is None:
        return lambda env: _flat_lse(a(env), keepdims)
    return lambda env: torch.logsumexp(a(env), dim=axis, keepdim=keepdims)


def _flat_lse(t, keepdims):
    return _flat_reduce(lambda u: torch.logsumexp(u, dim=0), t, keepdims)


def _flat_reduce(reduce, t, keepdims):
    """``reduce`` over all entries of ``t``, kept as a tensor of ones of t's rank if ``keepdims``."""
    s = reduce(t.reshape(-1))
    return s.reshape((1,) * t.dim()) if keepdims else s


def _huber(expr, a):
    M = to_torch(expr.M)

    def f(env):
        t, m = a(env), M(env)
        absolute = t.abs()
        return torch.where(absolute <= m, t ** 2, 2 * m * absolute - m ** 2)

    return f


def _entr(t: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(t, t)


def _rel_entr_values(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x log(x / y), with 0 log 0 = 0."""
    return torch.special.xlogy(x, x) - torch.special.xlogy(x, y)


def _kl_div(expr, x, y):
    return lambda env: _rel_entr_values(x(env), y(env)) - x(env) + y(env)


def _rel_entr(expr, x, y):
    return lambda env: _rel_entr_values(x(env), y(env))


def _xexp(t: torch.Tensor) -> torch.Tensor:
    return t * torch.exp(t)


def _add(expr, *args):
    def f(env):
        total = args[0](env)
        for a in args[1:]:
            total = total + a(env)
        return total

    return f


def _hstack(expr, *args):
    return lambda env: torch.hstack([a(env) for a in args])


def _vstack(expr, *args):
    return lambda env: torch.vstack([a(env) for a in args])


def _diag_vec(expr, a):
    k = expr.k if hasattr(expr, "k") else 0
    return lambda env: torch.diag(a(env), k)


def _diag_mat(expr, a):
    k = expr.k if hasattr(expr, "k") else 0
    return lambda env: torch.diagonal(a(env), offset=k)


def _concatenate(expr, *args):
    """numpy's ``concatenate(args, axis)``; axis None joins the flattened (C order) arguments."""
    if expr.axis is None:
        return lambda env: torch.cat([a(env).reshape(-1) for a in args])
    return lambda env: torch.cat([a(env) for a in args], dim=expr.axis)


def _convolve(expr, a, b):
    r"""Full 1-D convolution, (a * b)_k = sum_{i + j = k} a_i b_j, shaped like cvxpy's (conv: a column)."""
    def f(env):
        u, v = a(env).reshape(-1), b(env).reshape(-1)
        positions = (torch.arange(u.numel(), device=u.device)[:, None] + torch.arange(v.numel(), device=u.device))
        out = torch.zeros(u.numel() + v.numel() - 1, dtype=u.dtype, device=u.device)
        return out.index_add(0, positions.reshape(-1), (u[:, None] * v).reshape(-1)).reshape(expr.shape)

    return f


def _upper_tri(expr, a):
    """The strictly upper triangular entries, row by row (numpy's ``triu_indices(n, k=1)``), as a column."""
    n = expr.args[0].shape[-1]
    rows, cols = (torch.as_tensor(i) for i in np.triu_indices(n, k=1))
    return lambda env: a(env)[..., rows.to(env.device), cols.to(env.device)].reshape(expr.shape)  # (.., k, 1)


def _real_part(expr, a):
    """real and conj (the identity) and imag (zero) of a real expression (to_torch refuses complex leaves)."""
    if isinstance(expr, imag):
        return lambda env: torch.zeros_like(a(env))
    return a


def _cumprod(expr, a):
    if expr.axis is None:
        return lambda env: torch.cumprod(a(env).reshape(-1), 0)
    return lambda env: torch.cumprod(a(env), dim=expr.axis)


def _prod(expr, a):
    axis, keepdims = expr.axis, expr.keepdims
    if axis is None:
        return lambda env: _flat_reduce(torch.prod, a(env), keepdims)
    return lambda env: torch.prod(a(env), dim=axis, keepdim=keepdims)


def _cumsum(expr, a):
    axis = expr.axis
    if axis is None:
        return lambda env: torch.cumsum(a(env).reshape(-1), 0)
    return lambda env: torch.cumsum(a(env), dim=axis)


_HANDLERS: dict[type, Callable] = {
    # affine
    AddExpression: _add,
    NegExpression: lambda e, a: (lambda env: -a(env)),
    MulExpression: lambda e, a, b: (lambda env: _matmul(a(env), b(env))),
    multiply: lambda e, a, b: (lambda env: a(env) * b(env)),
    DivExpression: lambda e, a, b: (lambda env: a(env) / b(env)),
    index: _index,
    special_index: _special_index,
    reshape: lambda e, a: (lambda env: _reshape(a(env), e.shape, e.order)),
    Sum: lambda e, a: (lambda env: _sum_axis(a(env), e.axis, e.keepdims)),
    transpose: lambda e, a: (lambda env: _reverse_axes(a(env)) if e.axes is None else a(env).permute(tuple(e.axes))),
    Hstack: _hstack,
    Vstack: _vstack,
    Trace: lambda e, a: (lambda env: torch.diagonal(a(env)).sum()),
    Promote: lambda e, a: (lambda env: a(env).expand(e.shape)),
    broadcast_to: lambda e, a: (lambda env: a(env).expand(e.shape)),
    diag_vec: _diag_vec,
    diag_mat: _diag_mat,
    cumsum: _cumsum,
    cumprod: _cumprod,
    Concatenate: _concatenate,
    kron: lambda e, a, b: (lambda env: torch.kron(a(env).contiguous(), b(env).contiguous())),  # torch's kron views
    conv: _convolve,
    convolve: _convolve,
    upper_tri: _upper_tri,
    real: _real_part,
    conj: _real_part,
    imag: _real_part,
    Wrap: lambda e, a: a,  # psd_wrap, symmetric_wrap, ...: assertions for cvxpy, the identity here
    # smooth nonlinear
    Power: _power,
    Pnorm: _pnorm,
    Prod: _prod,
    quad_over_lin: _quad_over_lin,
    QuadForm: _quad_form,
    exp: _elementwise(torch.exp),
    log: _elementwise(torch.log),
    log1p: _elementwise(torch.log1p),
    log_sum_exp: _log_sum_exp,
    logistic: _elementwise(lambda t: torch.logaddexp(torch.zeros_like(t), t)),
    entr: _elementwise(_entr),
    huber: _huber,
    kl_div: _kl_div,
    rel_entr: _rel_entr,
    xexp: _elementwise(_xexp),
}

SUPPORTED_ATOMS = sorted({cls.__name__ for cls in _HANDLERS})

# Nonsmooth atoms and the epigraph rewrite that makes each smooth.
# ``{e}`` is the atom's argument as cvxpy prints it.
_EPIGRAPH_REWRITES = {
    "abs": "t = cp.Variable({shape}) with constraints [-t <= {e}, {e} <= t], and use t in place of abs({e})",
    "maximum": "t = cp.Variable({shape}) with constraints [t >= a for each argument a], and use t in place of the maximum",
    "minimum": "minimum is concave: in a concave position use t = cp.Variable({shape}) with [t <= a for each argument a]",
    "max": "t = cp.Variable() with the constraint {e} <= t, and use t in place of max({e})",
    "min": "t = cp.Variable() with the constraint t <= {e}, and use t in place of min({e})",
    "norm1": "t = cp.Variable({arg_shape}) with [-t <= {e}, {e} <= t], and use cp.sum(t) in place of norm1({e})",
    "norm_inf": "s = cp.Variable() with [-s <= {e}, {e} <= s], and use s in place of norm_inf({e})",
    "Pnorm": "for p=1 use t = cp.Variable({arg_shape}) with [-t <= {e}, {e} <= t] and cp.sum(t); "
             "for p=inf use s = cp.Variable() with [-s <= {e}, {e} <= s]",
}


def _nonsmooth(expr) -> NonSmoothAtomError:
    name = next(c.__name__ for c in type(expr).__mro__ if c.__name__ in _EPIGRAPH_REWRITES)
    arg = expr.args[0]
    rewrite = _EPIGRAPH_REWRITES[name].format(e=arg, shape=expr.shape, arg_shape=arg.shape)
    return NonSmoothAtomError(
        f"The atom {type(expr).__name__} in `{expr}` is nonsmooth: it has no Hessian at its kinks, "
        f"so the KKT conditions cbo differentiates do not exist there. Rewrite it in smooth "
        f"epigraph form: {rewrite}."
    )


def _find_handler(expr) -> Callable:
    for cls in type(expr).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
        if cls.__name__ in _EPIGRAPH_REWRITES and cls.__name__ != "Pnorm":
            raise _nonsmooth(expr)
    raise UnsupportedAtomError(
        f"cbo cannot translate the cvxpy atom {type(expr).__name__} (in `{expr}`) to torch yet. "
        f"Supported atoms: {', '.join(SUPPORTED_ATOMS)}. Rewrite the expression with these, "
        "or open an issue asking for the atom."
    )


# ---------------------------------------------------------------- kinks

@dataclass(frozen=True)
class Kink:
    r"""A set of points where an atom that translates smoothly has no second derivative.

    ``distance(env)`` is a nonnegative scalar that vanishes on the set:

    * the boundary of the atom's domain as cvxpy declares it (``atom._domain()``:
      ``sqrt``, ``power`` with p not a power of 2, ``entr``, ``kl_div``, ``xexp``
      ... at 0): the smooth route, which differentiates the atom's formula,
      knows nothing of the constraint ``a >= 0`` that holds y* there;
    * the origin of a p-norm, 1 < p < inf (and, for p < 2, every point with a
      zero entry, where |a_i|^(p-2) blows up).

    ``atom`` names the atom as cvxpy prints it, ``what`` the set ("its argument is 0").
    """

    atom: str
    what: str
    distance: TorchFn


def kinks(expr) -> list[Kink]:
    """The :class:`Kink` sets of every atom of ``expr`` (an expression or a constraint), innermost first.

    Call it where the parameters of a power's exponent have values (cvxpy's domain reads them).
    """
    found = [k for arg in expr.args for k in kinks(arg)]
    if isinstance(expr, cp.Expression) and expr.args:
        found += _domain_boundaries(expr)
        if isinstance(expr, Pnorm) and 1 < float(expr.p) < np.inf:
            found.append(_norm_origin(expr))
    return found


def _domain_boundaries(expr) -> list[Kink]:
    """cvxpy's domain of ``expr``, as slack functions of its inequalities (lhs <= rhs: min(rhs - lhs))."""
    found = []
    for constraint in _declared_domain(expr):
        if not isinstance(constraint, cp.constraints.Inequality) or not constraint.variables():
            continue  # constant or parameter-only domains say nothing about y*; other cones are not translated
        lhs, rhs = (to_torch(a) for a in constraint.args)
        found.append(Kink(_short(expr), f"the boundary of its domain `{_short(constraint)}`",
                          lambda env, lhs=lhs, rhs=rhs: (rhs(env) - lhs(env)).min()))
    return found


def _declared_domain(expr) -> list:
    """``expr._domain()``, or [] where cvxpy cannot say it: a power whose exponent is a parameter without a
    value (in a process that did not solve the inner problem); the translation reads the exponent from env."""
    try:
        return expr._domain()
    except ValueError:
        return []


def _norm_origin(expr) -> Kink:
    r"""||a||_p: no gradient at a = 0 (a slice along ``axis``); for p < 2 no Hessian where an entry is 0."""
    a, p, axis = to_torch(expr.args[0]), float(expr.p), expr.axis
    if p < 2:
        return Kink(_short(expr), "an entry of its argument is 0", lambda env: a(env).abs().min())
    if axis is None:
        return Kink(_short(expr), "its argument is 0", lambda env: a(env).abs().max())
    return Kink(_short(expr), f"a slice of its argument along axis {axis} is 0",
                lambda env: a(env).abs().amax(dim=axis).min())


def kink_at(found: list[Kink], env: Env, tol: float) -> Kink | None:
    """The first of ``found`` whose distance at ``env`` is at most ``tol`` times max(1, |leaf values|)."""
    scale = max([1.0] + [float(t.detach().abs().max()) for t in env.values.values() if t.numel()])
    with torch.no_grad():
        return next((k for k in found if float(k.distance(env)) <= tol * scale), None)


def _short(item) -> str:
    text = str(item)
    return text if len(text) <= 60 else f"{type(item).__name__}(...) of shape {item.shape}"
