"""Property tests of cbo.translate over every atom that cvxpy exports, and the coverage table docs/atoms.md.

Every public atom class and atom function of ``cvxpy.atoms`` (enumerated from
the module, so that a new cvxpy atom fails ``test_every_exported_atom_has_a_recipe``
until it gets one) has a *recipe*: how to call it on arguments of the right
shapes and domains. The arguments come from an :class:`Args` provider:

* in the fuzz tests, random affine expressions over fresh variables and
  parameters (indexing, slicing, fancy and boolean indexing, C- and F-order
  reshapes, transposes, hstack/vstack/bmat/concatenate of mixed scalars and
  arrays, broadcasting, matmul with constants, sums and cumulative sums along
  axes, diagonals). The translated torch value is compared with cvxpy's own
  ``.value`` at random leaf values, its autograd gradient with central
  differences of ``.value``; an atom cbo does not translate must be refused
  with a cbo error that names an atom of the expression.
* for the coverage table, plain variables: each recipe becomes an inner
  problem (minimise a convex expression, maximise a concave one) whose route
  :class:`cbo.BilevelProblem` reports ("smooth", "epigraph", "conic") or
  which cbo refuses with one of its errors. ``python tests/test_atoms_fuzz.py``
  writes docs/atoms.md from it; a test checks that the page is current.

References are cvxpy's numeric evaluation and finite differences, never cbo.
The default run is seeded and bounded (a few seconds); ``-m slow`` runs a
larger sweep.
"""
from __future__ import annotations

import functools
import inspect
import re
import sys
import warnings
from pathlib import Path
from typing import Callable

import cvxpy as cp
import cvxpy.atoms
import numpy as np
import pytest
import torch
from cvxpy.atoms.atom import Atom

import cbo
from cbo.compiled import compiled
from cbo.errors import CboError
from cbo.translate import Env, to_torch

DOCS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "atoms.md"


def exported_atoms() -> list[str]:
    """Public atom classes and atom functions of ``cvxpy.atoms``."""
    names = []
    for name, value in vars(cvxpy.atoms).items():
        if name.startswith("_") or inspect.ismodule(value):
            continue
        if (inspect.isclass(value) and issubclass(value, Atom)) or inspect.isfunction(value):
            names.append(name)
    return sorted(names, key=str.lower)


# ---------------------------------------------------------------- argument providers

class Args:
    """Arguments for recipes: plain variables (``fuzz=False``) or random affine expressions (``fuzz=True``).

    ``pos`` arguments are positive at every leaf value (fuzz: ``square(a) + 0.5``; plain: a nonneg=True
    variable), ``psd`` ones symmetric positive definite (fuzz: ``a a^T + I`` with a constant a; plain: a
    variable), ``const`` ones constants.
    """

    def __init__(self, rng: np.random.Generator, fuzz: bool, depth: int = 2):
        self.rng, self.fuzz, self.depth = rng, fuzz, depth
        self.count = 0

    # what recipes ask for
    def vec(self, n: int) -> cp.Expression:
        return self.affine((n,), self.depth) if self.fuzz else self._leaf((n,))

    def mat(self, m: int, n: int) -> cp.Expression:
        return self.affine((m, n), self.depth) if self.fuzz else self._leaf((m, n))

    def scalar(self) -> cp.Expression:
        return self.affine((), self.depth) if self.fuzz else self._leaf(())

    def pos(self, shape) -> cp.Expression:
        shape = tuple(np.atleast_1d(shape)) if shape != () else ()
        if not self.fuzz:
            self.count += 1
            return cp.Variable(shape, nonneg=True, name=f"n{self.count}")
        return cp.square(self.affine(shape, self.depth)) + 0.5

    def psd(self, n: int) -> cp.Expression:
        return self.psd_const(n) if self.fuzz else self._leaf((n, n))

    def sym(self, n: int) -> cp.Expression:
        """A symmetric argument, for atoms that check it (quantum entropies): a constant, or a symmetric variable."""
        if self.fuzz:
            return self.psd_const(n)
        self.count += 1
        return cp.Variable((n, n), symmetric=True, name=f"s{self.count}")

    def psd_const(self, n: int) -> cp.Constant:
        B = self.rng.standard_normal((n, n))
        return cp.Constant(B @ B.T / n + np.eye(n))

    def gp(self, shape) -> cp.Variable:
        """A variable declared positive, as geometric programs (DGP atoms) require."""
        self.count += 1
        return cp.Variable(shape, pos=True, name=f"g{self.count}")

    def const(self, shape) -> np.ndarray:
        return self.rng.standard_normal(shape)

    # random affine expressions
    def _leaf(self, shape) -> cp.Expression:
        self.count += 1
        if self.fuzz and self.rng.random() < 0.3:
            return cp.Parameter(shape, name=f"p{self.count}")
        return cp.Variable(shape, name=f"v{self.count}")

    def affine(self, shape: tuple, depth: int) -> cp.Expression:
        """A random affine expression of ``shape`` (numpy rules), ``depth`` levels of operations deep."""
        if depth <= 0 or self.rng.random() < 0.2:
            return self._leaf(shape)
        makers = {0: self._scalar_ops, 1: self._vector_ops, 2: self._matrix_ops}[len(shape)](shape, depth - 1)
        expr = makers[self.rng.integers(len(makers))]()
        assert expr.shape == shape, (expr, expr.shape, shape)
        return expr

    def _scalar_part(self, depth: int) -> cp.Expression:
        """A scalar expression of one of the forms users write inside stacks: a leaf, an entry, 1 - 3 x[0], a float."""
        k = self.rng.integers(4)
        if k == 0:
            return self._leaf(())
        if k == 1:
            return self.affine((3,), depth)[self.rng.integers(3)]
        if k == 2:
            return 1 - 3 * self._leaf((2,))[0]
        return float(self.rng.standard_normal())

    def _scalar_ops(self, shape, d):
        a = self.affine
        return [
            lambda: a((3,), d)[int(self.rng.integers(-3, 3))],
            lambda: a((2, 3), d)[1, -1],
            lambda: cp.sum(a((2, 3), d)),
            lambda: cp.trace(a((3, 3), d)),
            lambda: self.const(3) @ a((3,), d),
            lambda: 2.0 * a((), d) - self._scalar_part(d),
            lambda: cp.transpose(a((), d)) / 3.0,
        ]

    def _vector_ops(self, shape, d):
        (n,), a, rng = shape, self.affine, self.rng
        ops = [
            lambda: a((n + 2,), d)[1:n + 1],
            lambda: a((2 * n,), d)[::-2],
            lambda: a((4,), d)[rng.integers(0, 4, n)],
            lambda: a((n + 1,), d)[np.arange(n + 1) != rng.integers(n + 1)],  # a boolean mask
            lambda: a((2, n), d)[int(rng.integers(2))],
            lambda: a((n, 2), d)[:, -1],
            lambda: cp.reshape(a((n, 1), d), (n,), order=str(rng.choice(["C", "F"]))),
            lambda: cp.vec(a((1, n), d), order=str(rng.choice(["C", "F"]))),
            lambda: self._stacked_vector(n, d),
            lambda: self.const((n, 3)) @ a((3,), d),
            lambda: cp.sum(a((3, n), d), axis=0),
            lambda: cp.sum(a((n, 2), d), axis=1),
            lambda: a((n,), d) + a((), d),
            lambda: cp.multiply(self.const(n), a((n,), d)) - a((n,), d),
            lambda: self._leaf(()) * a((n,), d),
            lambda: cp.cumsum(a((n,), d)),
            lambda: cp.diag(a((n, n), d)) if n > 1 else a((n,), d),  # cvxpy's diag of a 1x1 matrix is 1x1
            lambda: -a((n,), d) / 2.0,
        ]
        return ops

    def _stacked_vector(self, n: int, d: int) -> cp.Expression:
        """hstack or concatenate of scalars and vectors whose lengths add up to n."""
        parts, left = [], n
        while left:
            k = int(self.rng.integers(1, left + 1))
            parts.append(self._scalar_part(d) if k == 1 and self.rng.random() < 0.7 else self.affine((k,), d))
            left -= k
        if all(isinstance(p, cp.Expression) and p.ndim == 1 for p in parts) and self.rng.random() < 0.5:
            return cp.concatenate(parts)
        return cp.hstack(parts)

    def _matrix_ops(self, shape, d):
        (m, n), a, rng = shape, self.affine, self.rng
        ops = [
            lambda: a((n, m), d).T,
            lambda: cp.reshape(a((m * n,), d), (m, n), order=str(rng.choice(["C", "F"]))),
            lambda: cp.reshape(a((n, m), d), (m, n), order=str(rng.choice(["C", "F"]))),
            lambda: cp.vstack([a((n,), d) for _ in range(m)]),
            lambda: cp.hstack([a((m, 1), d), a((m, n - 1), d)]) if n > 1 else a((m, 1), d),
            lambda: cp.bmat([[a((1, n), d)], [a((m - 1, n), d)]]) if m > 1 else a((1, n), d),
            lambda: cp.concatenate([a((m, 1), d), a((m, n - 1), d)], axis=1) if n > 1 else a((m, n), d),
            lambda: self.const((m, 2)) @ a((2, n), d),
            lambda: a((m + 1, n + 2), d)[1:, ::-1][:, :n],
            lambda: a((m + 2, n), d)[rng.permutation(m + 2)[:m]],
            lambda: a((m, 1), d) + a((1, n), d),
            lambda: a((m, n), d) + a((n,), d),
            lambda: cp.multiply(self.const((m, n)), a((m, n), d)),
            lambda: cp.cumsum(a((m, n), d), axis=int(rng.integers(2))),
            lambda: cp.diag(a((n,), d)) if m == n else a((m, n), d),
            lambda: cp.broadcast_to(a((1, n), d), (m, n)),
            lambda: cp.kron(self.const((m, 1)), a((1, n), d)),
        ]
        return ops


# ---------------------------------------------------------------- recipes

def _sq(args: Args) -> cp.Expression:
    return args.mat(3, 3)


RECIPES: dict[str, Callable[[Args], cp.Expression]] = {
    # affine
    "AddExpression": lambda a: a.vec(3) + a.vec(3),
    "MulExpression": lambda a: a.const((2, 3)) @ a.vec(3),
    "multiply": lambda a: cp.multiply(a.const(3), a.vec(3)),
    "Sum": lambda a: cp.sum(a.mat(2, 3), axis=1),
    "sum": lambda a: cp.sum(a.mat(2, 3), axis=0, keepdims=True),
    "Trace": lambda a: cp.trace(_sq(a)),
    "trace": lambda a: cp.trace(_sq(a)),
    "broadcast_to": lambda a: cp.broadcast_to(a.vec(3), (2, 3)),
    "conj": lambda a: cp.conj(a.vec(3)),
    "real": lambda a: cp.real(a.vec(3)),
    "imag": lambda a: cp.imag(a.vec(3)),
    "conv": lambda a: cp.conv(a.const(2), a.vec(3)),
    "convolve": lambda a: cp.convolve(a.const(2), a.vec(3)),
    "cumsum": lambda a: cp.cumsum(a.mat(2, 3), axis=1),
    "kron": lambda a: cp.kron(a.const((2, 2)), a.mat(2, 3)),
    "reshape": lambda a: cp.reshape(a.mat(2, 3), (3, 2), order="F"),
    "transpose": lambda a: cp.transpose(a.mat(2, 3)),
    "upper_tri": lambda a: cp.upper_tri(_sq(a)),
    "hermitian_wrap": lambda a: cp.hermitian_wrap(a.mat(3, 3)),
    "psd_wrap": lambda a: cp.psd_wrap(a.psd(3)),
    "symmetric_wrap": lambda a: cp.symmetric_wrap(a.mat(3, 3)),
    "skew_symmetric_wrap": lambda a: cp.skew_symmetric_wrap(a.mat(3, 3)),
    "bmat": lambda a: cp.bmat([[a.mat(2, 2), a.mat(2, 1)], [a.mat(1, 2), cp.reshape(a.scalar(), (1, 1), order="F")]]),
    "concatenate": lambda a: cp.concatenate([a.mat(2, 3), a.mat(1, 3)], axis=0),
    "deep_flatten": lambda a: cp.deep_flatten(a.mat(2, 3)),
    "diag": lambda a: cp.diag(a.vec(3), 1),
    "diff": lambda a: cp.diff(a.vec(4)),
    "einsum": lambda a: cp.einsum("ij,j->i", a.const((2, 3)), a.vec(3)),
    "hstack": lambda a: cp.hstack([a.scalar(), a.vec(2), 0.5]),
    "matmul": lambda a: cp.matmul(a.const((2, 3)), a.mat(3, 2)),
    "mean": lambda a: cp.mean(a.mat(2, 3), axis=1),
    "moveaxis": lambda a: cp.moveaxis(a.mat(2, 3), 0, 1),
    "outer": lambda a: cp.outer(a.vec(3), a.const(2)),
    "partial_trace": lambda a: cp.partial_trace(a.mat(4, 4), [2, 2], 1),
    "partial_transpose": lambda a: cp.partial_transpose(a.mat(4, 4), [2, 2], 0),
    "permute_dims": lambda a: cp.permute_dims(a.mat(2, 3), (1, 0)),
    "promote": lambda a: cp.promote(a.scalar(), (3,)),
    "scalar_product": lambda a: cp.scalar_product(a.vec(3), a.const(3)),
    "squeeze": lambda a: cp.squeeze(cp.reshape(a.vec(3), (3, 1), order="C")),
    "stack": lambda a: cp.stack([a.vec(3), a.vec(3)], axis=1),
    "swapaxes": lambda a: cp.swapaxes(a.mat(2, 3), 0, 1),
    "vdot": lambda a: cp.vdot(a.vec(3), a.const(3)),
    "vec": lambda a: cp.vec(a.mat(2, 3), order="C"),
    "vec_to_upper_tri": lambda a: cp.vec_to_upper_tri(a.vec(6), strict=False),
    "vstack": lambda a: cp.vstack([a.vec(3), a.const(3)]),
    "cumprod": lambda a: cp.cumprod(a.vec(3)),
    # smooth
    "Power": lambda a: cp.power(a.pos(3), 1.5),
    "power": lambda a: cp.power(a.vec(3), 2),
    "PowerApprox": lambda a: cp.power(a.pos(3), 0.5),
    "sqrt": lambda a: cp.sqrt(a.pos(3)),
    "square": lambda a: cp.square(a.vec(3)),
    "inv_pos": lambda a: cp.inv_pos(a.pos(3)),
    "Pnorm": lambda a: cp.pnorm(a.vec(3), 3),
    "PnormApprox": lambda a: cp.norm(a.mat(2, 3), 2, axis=1),
    "pnorm": lambda a: cp.pnorm(a.vec(3), 1.5),
    "norm": lambda a: cp.norm(a.mat(2, 3), "fro"),
    "norm2": lambda a: cp.norm2(a.vec(3)),
    "QuadForm": lambda a: cp.quad_form(a.vec(3), a.psd_const(3)),
    "quad_form": lambda a: cp.quad_form(a.vec(3), cp.psd_wrap(a.psd_const(3))),
    "quad_over_lin": lambda a: cp.quad_over_lin(a.vec(3), a.pos(())),
    "sum_squares": lambda a: cp.sum_squares(a.mat(2, 3)),
    "exp": lambda a: cp.exp(a.vec(3)),
    "log": lambda a: cp.log(a.pos(3)),
    "log1p": lambda a: cp.log1p(a.pos(3)),
    "log_sum_exp": lambda a: cp.log_sum_exp(a.mat(2, 3), axis=0),
    "logistic": lambda a: cp.logistic(a.vec(3)),
    "entr": lambda a: cp.entr(a.pos(3)),
    "kl_div": lambda a: cp.kl_div(a.pos(3), a.pos(3)),
    "rel_entr": lambda a: cp.rel_entr(a.pos(3), a.pos(3)),
    "xexp": lambda a: cp.xexp(a.pos(3)),
    "huber": lambda a: cp.huber(a.vec(3), 0.7),
    "GeoMean": lambda a: cp.geo_mean(a.pos(3), [1, 2, 1]),
    "GeoMeanApprox": lambda a: cp.geo_mean(a.pos(3)),
    "geo_mean": lambda a: cp.geo_mean(a.pos((3, 2)), axis=0),
    "harmonic_mean": lambda a: cp.harmonic_mean(a.pos(3)),
    "inv_prod": lambda a: cp.inv_prod(a.pos(3)),
    "Prod": lambda a: cp.prod(a.pos(3)),
    "prod": lambda a: cp.prod(a.pos((2, 3)), axis=1),
    "std": lambda a: cp.std(a.vec(4)),
    "var": lambda a: cp.var(a.vec(4)),
    # piecewise linear: the epigraph reformulation
    "abs": lambda a: cp.abs(a.vec(3)),
    "max": lambda a: cp.max(a.mat(2, 3), axis=0),
    "maximum": lambda a: cp.maximum(a.vec(3), a.vec(3)),
    "min": lambda a: cp.min(a.vec(3)),
    "minimum": lambda a: cp.minimum(a.vec(3), 0.5),
    "norm1": lambda a: cp.norm1(a.vec(3)),
    "norm_inf": lambda a: cp.norm_inf(a.vec(3)),
    "neg": lambda a: cp.neg(a.vec(3)),
    "pos": lambda a: cp.pos(a.vec(3)),
    "mixed_norm": lambda a: cp.mixed_norm(a.mat(2, 3), 2, 1),
    "tv": lambda a: cp.tv(a.vec(4)),
    "ptp": lambda a: cp.ptp(a.vec(3)),
    "scalene": lambda a: cp.scalene(a.vec(3), 1.0, 2.0),
    "log_normcdf": lambda a: cp.log_normcdf(a.vec(3)),
    "loggamma": lambda a: cp.loggamma(a.pos(3)),
    # cones
    "MatrixFrac": lambda a: cp.matrix_frac(a.vec(3), a.psd(3)),
    "matrix_frac": lambda a: cp.matrix_frac(a.mat(3, 2), a.psd(3)),
    "cummax": lambda a: cp.cummax(a.vec(3)),
    "dotsort": lambda a: cp.dotsort(a.vec(3), [1.0, 0.5]),
    "sum_largest": lambda a: cp.sum_largest(a.vec(4), 2),
    "sum_smallest": lambda a: cp.sum_smallest(a.vec(4), 2),
    "cvar": lambda a: cp.cvar(a.vec(4), 0.5),
    "lambda_max": lambda a: cp.lambda_max(a.psd(3)),
    "lambda_min": lambda a: cp.lambda_min(a.psd(3)),
    "lambda_sum_largest": lambda a: cp.lambda_sum_largest(a.psd(3), 2),
    "lambda_sum_smallest": lambda a: cp.lambda_sum_smallest(a.psd(3), 2),
    "log_det": lambda a: cp.log_det(a.psd(3)),
    "normNuc": lambda a: cp.normNuc(a.mat(2, 3)),
    "sigma_max": lambda a: cp.sigma_max(a.mat(2, 3)),
    "tr_inv": lambda a: cp.tr_inv(a.psd(3)),
    "von_neumann_entr": lambda a: cp.von_neumann_entr(a.sym(3)),
    "quantum_rel_entr": lambda a: cp.quantum_rel_entr(a.sym(2), a.sym(2)),
    "quantum_cond_entr": lambda a: cp.quantum_cond_entr(a.sym(4), [2, 2]),
    "perspective": lambda a: cp.perspective(cp.square(_scalar_variable(a)), _scalar_variable(a, nonneg=True)),
    # quasiconvex, geometric, or not DCP at all
    "ceil": lambda a: cp.ceil(a.vec(3)),
    "floor": lambda a: cp.floor(a.vec(3)),
    "sign": lambda a: cp.sign(a.scalar()),
    "length": lambda a: cp.length(a.vec(3)),
    "condition_number": lambda a: cp.condition_number(a.psd(3)),
    "dist_ratio": lambda a: cp.dist_ratio(a.vec(3), a.const(3), a.const(3)),
    "gen_lambda_max": lambda a: cp.gen_lambda_max(a.psd(3), a.psd(3)),
    "eye_minus_inv": lambda a: cp.eye_minus_inv(a.gp((2, 2))),
    "gmatmul": lambda a: cp.gmatmul(np.abs(a.const((2, 3))), a.gp(3)),
    "pf_eigenvalue": lambda a: cp.pf_eigenvalue(a.gp((3, 3))),
    "one_minus_pos": lambda a: cp.one_minus_pos(a.gp(3)),
    "diff_pos": lambda a: cp.diff_pos(a.gp(3), a.gp(3)),
    "resolvent": lambda a: cp.resolvent(a.gp((2, 2)), 3.0),
}


def _scalar_variable(args: Args, **attributes) -> cp.Variable:
    """perspective needs variables (its function's argument, and s), whatever the provider."""
    args.count += 1
    return cp.Variable(name=f"v{args.count}", **attributes)


# ---------------------------------------------------------------- evaluation

def leaves_of(expr) -> list:
    return sorted(expr.variables() + expr.parameters(), key=lambda leaf: leaf.id)


def set_values(values: dict) -> None:
    for leaf, value in values.items():
        leaf.value = value


def cvxpy_value(expr, values: dict) -> np.ndarray:
    set_values(values)
    return np.asarray(expr.value, dtype=float)


def atom_names(expr) -> set[str]:
    found = {type(expr).__name__} if isinstance(expr, Atom) else set()
    for arg in expr.args:
        found |= atom_names(arg)
    return found


def check_translation(expr, rng, h: float = 1e-6) -> None:
    """The torch value equals cvxpy's, its gradient central differences of cvxpy's; or a cbo error names an atom."""
    try:
        f = to_torch(expr)
    except CboError as err:
        assert any(name in str(err) for name in atom_names(expr)), str(err)
        return
    values = {leaf: rng.uniform(0.05, 0.3, leaf.shape) if leaf.is_pos() else rng.standard_normal(leaf.shape)
              for leaf in leaves_of(expr)}
    weights = rng.standard_normal(expr.shape)
    expected = cvxpy_value(expr, values)
    env = Env({leaf.id: torch.tensor(v, requires_grad=True) for leaf, v in values.items()})
    got = f(env)
    assert tuple(got.shape) == expr.shape, (tuple(got.shape), expr.shape)
    assert expected.size == got.numel()  # cvxpy's value of upper_tri drops the trailing 1 of its shape
    np.testing.assert_allclose(got.detach().numpy(), expected.reshape(expr.shape), rtol=1e-10, atol=1e-10)
    if got.requires_grad:  # not where the expression is constant in its leaves (imag, a wrapped constant)
        (got * torch.as_tensor(weights)).sum().backward()
    for leaf, value in values.items():
        grad = env.values[leaf.id].grad
        grad = np.zeros(value.shape) if grad is None else grad.numpy()
        np.testing.assert_allclose(grad, _central_difference(expr, values, leaf, weights, h), rtol=1e-5, atol=1e-5,
                                   err_msg=f"gradient w.r.t. {leaf.name()} of {expr}")


def _central_difference(expr, values: dict, leaf, weights: np.ndarray, h: float) -> np.ndarray:
    base, grad = values[leaf], np.zeros(values[leaf].shape)
    for i in np.ndindex(base.shape):
        step = np.zeros(base.shape)
        step[i] = h
        up = np.sum(weights * cvxpy_value(expr, {**values, leaf: base + step}).reshape(weights.shape))
        down = np.sum(weights * cvxpy_value(expr, {**values, leaf: base - step}).reshape(weights.shape))
        grad[i] = (up - down) / (2 * h)
    return grad


def fuzz_cases(count: int, seed: int) -> list:
    """``count`` (atom name, seed) pairs cycling through every recipe, then random ones."""
    names = sorted(RECIPES)
    rng = np.random.default_rng(seed)
    picks = names[:count] if count <= len(names) else names + [str(n) for n in rng.choice(names, count - len(names))]
    return [pytest.param(name, seed + i, id=f"{name}-{seed + i}") for i, name in enumerate(picks)]


# ---------------------------------------------------------------- tests

def test_every_exported_atom_has_a_recipe():
    """A new cvxpy atom fails here until it gets a recipe (and a row in docs/atoms.md)."""
    missing = [name for name in exported_atoms() if name not in RECIPES]
    assert not missing, f"no recipe for {missing}: add one to RECIPES"
    stale = [name for name in RECIPES if name not in exported_atoms()]
    assert not stale


@pytest.mark.parametrize("name, seed", fuzz_cases(len(RECIPES), 0))
def test_atom_on_random_affine_arguments(name, seed):
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cvxpy's deprecation of conv
        expr = RECIPES[name](Args(rng, fuzz=True, depth=1))
    check_translation(expr, rng)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("shape", [(), (4,), (3, 2)], ids=["scalar", "vector", "matrix"])
def test_random_affine_expression(shape, seed):
    rng = np.random.default_rng(1000 + seed)
    check_translation(Args(rng, fuzz=True, depth=3).affine(shape, 3), rng)


@pytest.mark.slow
@pytest.mark.parametrize("name, seed", fuzz_cases(2000, 10_000))
def test_atom_on_random_affine_arguments_sweep(name, seed):
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expr = RECIPES[name](Args(rng, fuzz=True, depth=3))
    check_translation(expr, rng)


# ---------------------------------------------------------------- coverage table

ROUTE_TEXT = {
    "smooth": "translated to torch (`cbo.translate`); the KKT system of the inner problem is differentiated",
    "epigraph": "piecewise linear: rewritten in epigraph form by `cbo.reformulate` where it sits in a monotone "
                "position, then smooth (elsewhere: conic)",
    "conic": "cvxpy's cone program is differentiated (`cbo.conic`)",
    "refused": "`cbo.BilevelProblem` raises a cbo error that says why (e.g. not DCP: quasiconvex and geometric "
               "atoms)",
}


@functools.lru_cache(maxsize=None)
def classify(name: str) -> tuple[str, str]:
    """(route, how) of the inner problem that minimises (maximises) the recipe's convex (concave) expression.

    The route is what :class:`cbo.BilevelProblem` takes ("smooth", "epigraph" where it rewrote atoms, "conic"
    where cbo.conic also compiles the cone program), or "refused" where cbo raises one of its errors; any other
    exception propagates (a bug).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expr = RECIPES[name](Args(np.random.default_rng(0), fuzz=False))
        x = cp.Parameter(name="x")
        y = expr.variables()[0]
        tilt = x * cp.sum(y)
        if expr.is_concave() and not expr.is_convex():
            inner = cp.Problem(cp.Maximize(cp.sum(expr) - tilt))
        else:
            inner = cp.Problem(cp.Minimize(cp.sum(expr) + tilt))
        atoms = ", ".join(sorted(atom_names(expr)))
        try:
            problem = cbo.BilevelProblem(inner, [x])
            if problem.route == "conic":
                compiled(problem).conic
        except CboError as err:
            return "refused", re.split(r"[,:(.]", str(err))[0].strip()
    if problem.route == "conic":
        return "conic", atoms
    return ("epigraph" if problem.reformulation.changed else "smooth"), atoms


def coverage_table() -> str:
    """docs/atoms.md: one row per exported cvxpy atom, its route in cbo and the atoms cvxpy builds for it."""
    rows = []
    for name in exported_atoms():
        route, how = classify(name)
        kind = "class" if inspect.isclass(getattr(cvxpy.atoms, name)) else "function"
        rows.append(f"| `cp.{name}` | {kind} | {route} | {how} |")
    legend = "\n".join(f"* **{route}**: {text}." for route, text in ROUTE_TEXT.items())
    return "\n".join([
        "# Which cvxpy atoms cbo differentiates, and how",
        "",
        "Every atom class and atom function that `cvxpy.atoms` exports, with the route",
        "`cbo.BilevelProblem` takes for an inner problem that minimises it (maximises it",
        "where it is concave). This page is generated by `python tests/test_atoms_fuzz.py`",
        "from what the code does (`tests/test_atoms_fuzz.py::test_docs_table_is_current`",
        "checks that it is current); the same test module compares the torch translation",
        "of every smooth atom with cvxpy's values and finite differences.",
        "",
        legend,
        "",
        "A smooth atom at a point where it has no second derivative (a norm at 0, `sqrt`,",
        "`power` or `entr` on the boundary of their domain) hands the call over to the",
        "conic route; `info.route` says so ([methods](methods.md)). The last column of",
        "the table lists the cvxpy atoms the expression is built from (for the refused",
        "ones, the start of cbo's error).",
        "",
        "| atom | kind | route | atoms / reason |",
        "|---|---|---|---|",
        *rows,
        "",
    ])


@pytest.mark.parametrize("name", exported_atoms())
def test_atom_takes_a_route_or_is_refused_with_a_cbo_error(name):
    """BilevelProblem on each atom: smooth, epigraph or conic (the cone program compiles), or a cbo error;
    never an internal error (cvxpy's perspective once broke the sign substitution of cbo.reformulate)."""
    route, how = classify(name)
    assert route in ROUTE_TEXT and how


def test_docs_table_is_current():
    """docs/atoms.md is what coverage_table() writes now: every row is what BilevelProblem does today."""
    assert DOCS_PAGE.read_text() == coverage_table(), "run `python tests/test_atoms_fuzz.py` to regenerate"


if __name__ == "__main__":
    DOCS_PAGE.write_text(coverage_table())
    print(f"wrote {DOCS_PAGE}", file=sys.stderr)
