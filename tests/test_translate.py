"""Tests of cbo.translate: cvxpy expression trees evaluated in torch.

The reference is always cvxpy's own numeric evaluation (``expr.value`` after
setting the leaves' ``.value``), never a number produced by the code under test.
"""
from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import scipy.sparse
import torch

from cbo import translate
from cbo.errors import NonSmoothAtomError, UnsupportedAtomError
from cbo.translate import Env, to_torch

RTOL = 1e-12
ATOL = 1e-12

# ---------------------------------------------------------------- symbols
# Leaves are shared by the expression cases below; every test sets all the
# leaves its expression uses, so no value leaks from one test to another.
# The leaf attributes (pos, PSD) tell `sample` which domain to draw from.

y = cp.Variable(4, name="y")
z = cp.Variable(4, name="z")
yp = cp.Variable(4, pos=True, name="yp")
yn = cp.Variable(4, nonneg=True, name="yn")
zp = cp.Variable(4, pos=True, name="zp")
t = cp.Variable(name="t")
X = cp.Variable((3, 4), name="X")
W = cp.Variable((2, 4), name="W")
V = cp.Variable((3, 2), name="V")
S = cp.Variable((4, 4), name="S")
T3 = cp.Variable((2, 3, 4), name="T3")
x = cp.Parameter(name="x")
xv = cp.Parameter(4, name="xv")
sp_ = cp.Parameter(pos=True, name="sp")
Pm = cp.Parameter((3, 4), name="Pm")
Ppsd = cp.Parameter((4, 4), PSD=True, name="Ppsd")
M = cp.Parameter(nonneg=True, name="M")
Pexp = cp.Parameter(pos=True, name="p")

_CONST = np.random.default_rng(20240601)
A24 = _CONST.standard_normal((2, 3))
A34 = _CONST.standard_normal((3, 4))
b3 = _CONST.standard_normal(3)
c4 = _CONST.standard_normal(4)
_B = _CONST.standard_normal((4, 4))
P_CONST = _B @ _B.T + np.eye(4)
MASK1 = np.array([True, False, True, True])
MASK2 = _CONST.random((3, 4)) > 0.5


# ---------------------------------------------------------------- helpers

@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def sample(leaf, rng) -> np.ndarray:
    """A random value in the leaf's domain (PSD, positive, or any real)."""
    if leaf.attributes.get("PSD"):
        B = rng.standard_normal(leaf.shape)
        return B @ B.T + np.eye(leaf.shape[0])
    if leaf.attributes.get("pos") or leaf.attributes.get("nonneg"):
        return rng.uniform(0.5, 2.0, leaf.shape)
    return 2.0 * rng.standard_normal(leaf.shape)


def leaves(expr):
    return expr.variables() + expr.parameters()


def cvxpy_value(expr, values) -> np.ndarray:
    """cvxpy's own evaluation of expr at {leaf: value}."""
    for leaf, v in values.items():
        leaf.value = v
    return np.asarray(expr.value, dtype=float)


def make_env(values, dtype=torch.float64) -> Env:
    return Env(values={leaf.id: torch.as_tensor(v, dtype=dtype) for leaf, v in values.items()}, dtype=dtype)


def torch_value(expr, values, dtype=torch.float64) -> torch.Tensor:
    return to_torch(expr)(make_env(values, dtype))


def assert_matches_cvxpy(expr, values, rtol=RTOL, atol=ATOL):
    expected = cvxpy_value(expr, values)
    got = torch_value(expr, values)
    assert tuple(got.shape) == expr.shape == expected.shape
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=rtol, atol=atol)


def random_values(expr, rng):
    return {leaf: sample(leaf, rng) for leaf in leaves(expr)}


def atom_types(expr) -> set[type]:
    found = {type(expr)}
    for a in expr.args:
        found |= atom_types(a)
    return found


def cases(**exprs):
    """pytest params with the keyword as the test id; a value (expr, mark) adds the mark."""
    params = []
    for name, e in exprs.items():
        e, marks = e if isinstance(e, tuple) else (e, ())
        params.append(pytest.param(e, id=name, marks=marks))
    return params


# ---------------------------------------------------------------- 1. values

SCALAR_INDEX = dict(index_int=y[1], index_negative_int=y[-1], index_entry=X[1, 2], index_negative_entry=X[-1, -2])

AFFINE = cases(
    add=y + z,
    add_three=y + z + c4,
    sub=y - z,
    neg=-y,
    matmul_mat_mat=A24 @ X,
    matmul_mat_vec=A34 @ y,
    matmul_vec_vec=c4 @ y,
    matmul_param_var=Pm @ y,
    matmul_sparse_const=scipy.sparse.csr_matrix(A34) @ y,
    matmul_var_var=X @ y,
    scalar_times_vector=2.5 * y,
    scalar_param_times_vector=x * y,
    multiply_const=cp.multiply(c4, y),
    multiply_var_var=cp.multiply(y, z),
    multiply_matrix=cp.multiply(A34, X),
    div_const=y / 3.0,
    div_param=y / sp_,
    **SCALAR_INDEX,
    index_slice=y[1:3],
    index_reverse=y[::-1],
    index_negative_step=y[3:0:-2],
    index_last_row=X[-1],
    index_row=X[0, :],
    index_column=X[:, 1],
    index_block_reversed=X[1:, ::-2],
    special_index_list=y[[0, 2, 3]],
    special_index_repeated=y[[3, 0, 0]],
    special_index_bool_mask=y[MASK1],
    special_index_rows=X[[0, 2]],
    special_index_columns=X[:, [0, 3]],
    special_index_pairs=X[[0, 2], [1, 3]],
    special_index_bool_mask_2d=X[MASK2],
    reshape_F=cp.reshape(X, (4, 3), order="F"),
    reshape_C=cp.reshape(X, (4, 3), order="C"),
    reshape_F_to_vector=cp.reshape(X, (12,), order="F"),
    reshape_C_to_vector=cp.reshape(X, (12,), order="C"),
    reshape_vector_to_F=cp.reshape(y, (2, 2), order="F"),
    vec_F=cp.vec(X, order="F"),
    vec_C=cp.vec(X, order="C"),
    sum_all=cp.sum(X),
    sum_axis0=cp.sum(X, axis=0),
    sum_axis1=cp.sum(X, axis=1),
    sum_axis0_keepdims=cp.sum(X, axis=0, keepdims=True),
    sum_axis1_keepdims=cp.sum(X, axis=1, keepdims=True),
    sum_all_keepdims=cp.sum(X, keepdims=True),
    transpose=X.T,
    transpose_axes_3d=cp.transpose(T3, axes=(1, 2, 0)),
    hstack_1d=cp.hstack([y, z, c4]),
    hstack_2d=cp.hstack([X, V]),
    vstack_1d=cp.vstack([y, z]),
    vstack_2d=cp.vstack([X, W]),
    trace=cp.trace(S),
    promote_scalar_plus_vector=t + y,
    promote_param_plus_vector=x + y,
    broadcast_row=X + y,
    broadcast_column=X + cp.reshape(b3, (3, 1), order="F"),
    diag_vec=cp.diag(y),
    diag_vec_offset=cp.diag(y, 1),
    diag_mat=cp.diag(S),
    diag_mat_offset=cp.diag(S, -1),
    cumsum_vector=cp.cumsum(y),
    cumsum_axis0=cp.cumsum(X, axis=0),
    cumsum_axis1=cp.cumsum(X, axis=1),
    cumsum_flat=cp.cumsum(X, axis=None),
    kron_const_left=cp.kron(A24, X),
    kron_of_transpose=cp.kron(A24, X.T),  # torch.kron fails on a non-contiguous (transposed) tensor
    concatenate_axis0=cp.concatenate([X, W], axis=0),
    concatenate_flat=cp.concatenate([X, y], axis=None),
    convolve=cp.convolve(c4, y),
    conv_deprecated=cp.conv(c4, y),
    cumprod_vector=cp.cumprod(y),
    cumprod_axis1=cp.cumprod(X, axis=1),
    real_of_real=cp.real(y),
    imag_of_real=cp.imag(y) + y,
    conj_of_real=cp.conj(y),
)

NONLINEAR = cases(
    sum_squares=cp.sum_squares(y),
    sum_squares_matrix=cp.sum_squares(X),
    sum_squares_affine=cp.sum_squares(A34 @ y - b3),
    square=cp.square(y),
    quad_form_const=cp.quad_form(y, P_CONST),
    quad_form_psd_param=cp.quad_form(y, Ppsd),
    quad_form_psd_wrap=cp.quad_form(y, cp.psd_wrap(P_CONST)),
    power_3=cp.power(y, 3),
    power_half=cp.power(yp, 0.5),
    power_1_5=cp.power(yp, 1.5),
    power_minus_2=cp.power(yp, -2),
    power_param_exponent=cp.power(yp, Pexp),
    inv_pos=cp.inv_pos(yp),
    sqrt=cp.sqrt(yp),
    quad_over_lin=cp.quad_over_lin(y, sp_),
    quad_over_lin_matrix=cp.quad_over_lin(X, sp_),
    quad_over_lin_axis0=cp.quad_over_lin(X, sp_, axis=0),
    quad_over_lin_axis1_keepdims=cp.quad_over_lin(X, sp_, axis=1, keepdims=True),
    exp=cp.exp(y),
    log=cp.log(yp),
    log1p=cp.log1p(yp),
    log_sum_exp=cp.log_sum_exp(y),
    log_sum_exp_matrix=cp.log_sum_exp(X),
    log_sum_exp_axis0=cp.log_sum_exp(X, axis=0),
    log_sum_exp_axis1_keepdims=cp.log_sum_exp(X, axis=1, keepdims=True),
    log_sum_exp_keepdims=cp.log_sum_exp(X, keepdims=True),
    logistic=cp.logistic(y),
    entr=cp.entr(yp),
    huber=cp.huber(y),
    huber_M2=cp.huber(y, 2),
    huber_M_param=cp.huber(y, M),
    norm2=cp.norm2(y),
    norm_2=cp.norm(y, 2),
    norm_fro=cp.norm(X, "fro"),
    pnorm_3=cp.pnorm(y, 3),
    pnorm_axis0=cp.pnorm(X, 2, axis=0),
    kl_div=cp.kl_div(yp, zp),
    rel_entr=cp.rel_entr(yp, zp),
    xexp=cp.xexp(yp),
    prod=cp.prod(yp),
    prod_axis1_keepdims=cp.prod(X, axis=1, keepdims=True),
    non_dpp_param_times_square=x * cp.square(y),
    non_dpp_param_vector=cp.sum(cp.multiply(xv, cp.exp(y))) + x * cp.sum_squares(y),
    composite=cp.log_sum_exp(Pm @ y + b3) + 0.5 * cp.quad_form(y, Ppsd) - xv @ y,
)

CONCAVE = cp.sum(cp.entr(yp)) + cp.sum(cp.log(zp)) - cp.quad_form(y, Ppsd) + cp.sum(cp.sqrt(yp))


@pytest.mark.parametrize("expr", AFFINE)
def test_affine_atom_matches_cvxpy(expr, rng):
    assert_matches_cvxpy(expr, random_values(expr, rng))


@pytest.mark.parametrize("expr", NONLINEAR)
def test_nonlinear_atom_matches_cvxpy(expr, rng):
    assert_matches_cvxpy(expr, random_values(expr, rng))


def test_concave_objective_matches_cvxpy(rng):
    assert CONCAVE.is_concave()
    assert cp.Problem(cp.Maximize(CONCAVE)).is_dcp()
    assert_matches_cvxpy(CONCAVE, random_values(CONCAVE, rng))


def test_every_handler_is_exercised():
    """The parametrized cases above reach every atom of translate's handler table."""
    used = set().union(*(atom_types(p.values[0]) for p in AFFINE + NONLINEAR), atom_types(cp.upper_tri(S)))
    missing = [cls.__name__ for cls in translate._HANDLERS if not any(issubclass(u, cls) for u in used)]
    assert not missing


@pytest.mark.parametrize("expr", cases(**SCALAR_INDEX))
def test_scalar_index_value(expr, rng):
    """A scalar index picks the right entry as a 0-d tensor."""
    vals = random_values(expr, rng)
    expected = cvxpy_value(expr, vals)
    got = torch_value(expr, vals)
    assert got.shape == ()
    np.testing.assert_allclose(got.numpy(), expected, rtol=RTOL, atol=0)


BOUNDARY = cases(
    entr=cp.entr(yn),
    kl_div=cp.kl_div(yn, zp),
    rel_entr=cp.rel_entr(yn, zp),
    xexp=cp.xexp(yn),
    sqrt=cp.sqrt(yn),
    power_1_5=cp.power(yn, 1.5),
    log1p=cp.log1p(yn),
)


@pytest.mark.parametrize("expr", BOUNDARY)
def test_value_at_domain_boundary_zero(expr, rng):
    vals = random_values(expr, rng)
    vals[yn] = np.array([0.0, 0.5, 1.0, 2.0])
    assert_matches_cvxpy(expr, vals)


@pytest.mark.parametrize("value", [-800.0, -50.0, -1.0, 0.0, 1.0, 50.0, 800.0])
def test_logistic_stable_at_large_arguments(value):
    expr = cp.logistic(y)
    vals = {y: np.full(4, value)}
    got = torch_value(expr, vals)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), cvxpy_value(expr, vals), rtol=RTOL, atol=0)


@pytest.mark.parametrize("M_value", [0.5, 1.0, 3.0])
def test_huber_covers_both_branches(M_value):
    expr = cp.huber(y, M_value)
    vals = {y: np.array([-4.0, -M_value, 0.3 * M_value, 2.5])}
    assert_matches_cvxpy(expr, vals)


# ---------------------------------------------------------------- 2. parameters

def test_parameter_missing_from_env_is_read_from_its_value(rng):
    expr = x * cp.sum_squares(y) + xv @ y
    vals = random_values(expr, rng)
    expected = cvxpy_value(expr, vals)
    got = to_torch(expr)(make_env({y: vals[y]}))
    np.testing.assert_allclose(got.numpy(), expected, rtol=RTOL)


def _env_overrides_value(expr, param, env_value, stale_value, rng):
    """(torch, cvxpy) values of expr with param = env_value given in env, while
    param.value holds stale_value both at translation and at evaluation."""
    param.value = stale_value
    f = to_torch(expr)
    vals = random_values(expr, rng)
    vals[param] = env_value
    expected = cvxpy_value(expr, vals)
    param.value = stale_value
    return f(make_env(vals)), expected


@pytest.mark.parametrize(
    "expr, param, stale_value",
    [
        pytest.param(x * cp.sum_squares(y), x, 0.7, id="scalar_factor"),
        pytest.param(x * cp.sum_squares(y), x, None, id="scalar_factor_unset"),
        pytest.param(cp.quad_form(y, Ppsd), Ppsd, np.eye(4), id="quad_form_matrix"),
        pytest.param(cp.quad_over_lin(y, sp_), sp_, 0.7, id="quad_over_lin_denominator"),
        pytest.param(cp.huber(y, M), M, 0.7, id="huber_M"),
        pytest.param(cp.huber(y, M), M, None, id="huber_M_unset"),
        pytest.param(cp.power(yp, Pexp), Pexp, 2.0, id="power_exponent"),
    ],
)
def test_parameter_in_env_overrides_its_value(expr, param, stale_value, rng):
    env_value = sample(param, rng) if param.ndim else 1.5
    got, expected = _env_overrides_value(expr, param, env_value, stale_value, rng)
    np.testing.assert_allclose(got.numpy(), expected, rtol=RTOL)


@pytest.mark.parametrize(
    "expr, param",
    [
        pytest.param(x * cp.sum_squares(y), x, id="scalar_factor"),
        pytest.param(cp.huber(y, M), M, id="huber_M"),
        pytest.param(cp.power(yp, Pexp), Pexp, id="power_exponent"),
    ],
)
def test_parameter_value_read_at_evaluation_time(expr, param, rng):
    """A parameter absent from env uses its .value at call time, not at translation."""
    vals = random_values(expr, rng)
    vals[param] = 2.0
    cvxpy_value(expr, vals)
    f = to_torch(expr)
    vals[param] = 3.0
    expected = cvxpy_value(expr, vals)
    env_vals = {leaf: v for leaf, v in vals.items() if leaf is not param}
    np.testing.assert_allclose(f(make_env(env_vals)).numpy(), expected, rtol=RTOL)


def test_parameter_gradient_flows_through_env(rng):
    expr = x * cp.sum_squares(y) + xv @ y
    vals = random_values(expr, rng)
    env = make_env(vals)
    env.values[x.id].requires_grad_(True)
    env.values[xv.id].requires_grad_(True)
    to_torch(expr)(env).backward()
    np.testing.assert_allclose(env.values[x.id].grad.numpy(), cvxpy_value(cp.sum_squares(y), vals), rtol=RTOL)
    np.testing.assert_allclose(env.values[xv.id].grad.numpy(), vals[y], rtol=RTOL)


def test_parameter_without_value_raises_naming_it(rng):
    theta = cp.Parameter(4, name="theta_unset")
    f = to_torch(theta @ y)
    with pytest.raises(ValueError, match="theta_unset"):
        f(make_env({y: sample(y, rng)}))


# ---------------------------------------------------------------- 3. gradients

def finite_difference_gradient(expr, values, leaf, h=1e-5) -> np.ndarray:
    """Central differences of cvxpy's numeric value w.r.t. leaf."""
    base = values[leaf]
    grad = np.zeros(base.shape)
    for i in np.ndindex(base.shape):
        step = np.zeros(base.shape)
        step[i] = h
        up = cvxpy_value(expr, {**values, leaf: base + step})
        down = cvxpy_value(expr, {**values, leaf: base - step})
        grad[i] = (up - down) / (2 * h)
    cvxpy_value(expr, values)
    return grad


SMOOTH = cases(
    least_squares_plus_linear=0.5 * cp.sum_squares(A34 @ y - b3) + xv @ y,
    log_sum_exp=cp.log_sum_exp(A34 @ y),
    logistic_loss=cp.sum(cp.logistic(A34 @ y)),
    norm2=cp.norm(y, 2),
    quad_form_param=cp.quad_form(y, Ppsd) + x * cp.sum(cp.exp(y / 4)),
    huber=cp.sum(cp.huber(y, 1.5)),
    entropy=cp.sum(cp.entr(yp)) + cp.sum(cp.kl_div(yp, zp)),
)


@pytest.mark.parametrize("expr", SMOOTH)
def test_autograd_matches_finite_differences(expr, rng):
    vals = random_values(expr, rng)
    var = expr.variables()[0]
    env = make_env(vals)
    env.values[var.id].requires_grad_(True)
    to_torch(expr)(env).backward()
    expected = finite_difference_gradient(expr, vals, var)
    np.testing.assert_allclose(env.values[var.id].grad.numpy(), expected, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------- 4. dtype

DTYPE_EXPR = A34 @ y + b3 + x * cp.exp(y[:3]) + cp.sum(cp.multiply(c4, y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_result_has_env_dtype(dtype, rng):
    vals = random_values(DTYPE_EXPR, rng)
    expected = cvxpy_value(DTYPE_EXPR, vals)
    got = to_torch(DTYPE_EXPR)(make_env({y: vals[y]}, dtype))  # x read from .value
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else RTOL
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=tol, atol=tol)


def test_constants_cached_per_dtype(rng):
    f = to_torch(DTYPE_EXPR)
    vals = random_values(DTYPE_EXPR, rng)
    expected = cvxpy_value(DTYPE_EXPR, vals)
    for dtype, tol in [(torch.float64, RTOL), (torch.float32, 1e-5), (torch.float64, RTOL)]:
        got = f(make_env(vals, dtype))
        assert got.dtype == dtype
        np.testing.assert_allclose(got.double().numpy(), expected, rtol=tol, atol=tol)


# ---------------------------------------------------------------- 5. refused atoms

NONSMOOTH = [
    pytest.param(cp.abs(y), "abs", id="abs"),
    pytest.param(cp.pos(y), "maximum", id="pos"),
    pytest.param(cp.neg(y), "minimum", id="neg"),
    pytest.param(cp.maximum(y, z), "maximum", id="maximum"),
    pytest.param(cp.minimum(y, z), "minimum", id="minimum"),
    pytest.param(cp.max(y), "max", id="max"),
    pytest.param(cp.min(y), "min", id="min"),
    pytest.param(cp.norm1(y), "norm1", id="norm1"),
    pytest.param(cp.norm_inf(y), "norm_inf", id="norm_inf"),
    pytest.param(cp.norm(y, 1), "norm1", id="norm_p1"),
    pytest.param(cp.norm(y, "inf"), "norm_inf", id="norm_pinf"),
    pytest.param(cp.sum_squares(y) + cp.sum(cp.abs(A34 @ y)), "abs", id="nested_abs"),
]


@pytest.mark.parametrize("expr, atom", NONSMOOTH)
def test_nonsmooth_atom_refused_with_epigraph_hint(expr, atom):
    with pytest.raises(NonSmoothAtomError, match="epigraph") as info:
        to_torch(expr)
    assert isinstance(info.value, UnsupportedAtomError)
    assert f"atom {atom} " in str(info.value)


UNSUPPORTED = cases(
    lambda_max=cp.lambda_max(S),
    sigma_max=cp.sigma_max(X),
    matrix_frac=cp.matrix_frac(y, S),
    geo_mean=cp.geo_mean(yp),
)


@pytest.mark.parametrize("expr", UNSUPPORTED)
def test_untranslatable_atom_lists_supported_atoms(expr):
    with pytest.raises(UnsupportedAtomError, match="Supported atoms") as info:
        to_torch(expr)
    assert not isinstance(info.value, NonSmoothAtomError)
    message = str(info.value)
    assert type(expr).__name__ in message
    for name in ["Power", "QuadForm", "log_sum_exp", "huber", "reshape"]:
        assert name in message


# ---------------------------------------------------------------- 6. scalars among arrays

def test_hstack_of_scalar_expressions_matches_cvxpy(rng):
    """cvxpy lifts each scalar of hstack to shape (1,) by an F-order reshape of a 0-d expression."""
    xs = cp.Parameter(2, name="xs")
    expr = cp.hstack([1 - 3 * xs[0], 1 + xs[1], 0.0])
    assert_matches_cvxpy(expr, {xs: rng.standard_normal(2)})


def test_upper_tri_has_cvxpy_shape_and_entries(rng):
    """cvxpy declares upper_tri's shape (k, 1) but its value has shape (k,): the translation keeps the declared one."""
    expr = cp.upper_tri(S)
    vals = random_values(expr, rng)
    got = torch_value(expr, vals)
    assert tuple(got.shape) == expr.shape == (6, 1)
    np.testing.assert_allclose(got.numpy().ravel(), cvxpy_value(expr, vals).ravel(), rtol=RTOL, atol=ATOL)


def test_transpose_of_scalar_matches_cvxpy():
    assert_matches_cvxpy(cp.transpose(t) + 2 * t, {t: np.array(1.5)})


def cvxpy_hypergradient(inner, param, value, outer, h=1e-4) -> np.ndarray:
    """Central differences of outer(y*(x)) with y* from cvxpy's own solve (Clarabel, tight tolerances)."""
    variable = inner.variables()[0]

    def F(v):
        param.value = v
        inner.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
        return outer(variable.value)

    grad = np.zeros(value.shape)
    for i in range(value.size):
        step = np.zeros(value.shape)
        step[i] = h
        grad[i] = (F(value + step) - F(value - step)) / (2 * h)
    return grad


def test_hypergradient_through_hstack_of_scalars():
    import cbo

    xs, ys = cp.Parameter(2, name="xs"), cp.Variable(3, name="ys")
    inner = cp.Problem(cp.Minimize(cp.sum_squares(ys - cp.hstack([1 - 3 * xs[0], 1 + xs[1], 0.0]))),
                       [ys >= -0.5, cp.sum(ys) <= 1.0])
    weights = np.array([1.0, -2.0, 0.5])
    problem = cbo.BilevelProblem(inner, [xs], [ys], outer=lambda x, y: (y ** 2) @ torch.as_tensor(weights))
    value = np.array([0.2, 0.3])
    expected = cvxpy_hypergradient(inner, xs, value, lambda y: (y ** 2) @ weights)
    for method in ("cg", "direct", None):
        got = cbo.hypergrad(problem, torch.as_tensor(value), method=method)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- 7. kinks: the conic route takes over

LAM = 1.0
C_AT_KINK = np.array([0.1, 0.2, -0.1, 0.05])  # ||c|| < LAM: y* = 0, and y* = 0 near c too
C_AWAY = np.array([0.9, 1.2, -0.4, 0.3])  # ||c|| > LAM: y* = (1 - LAM / ||c||) c
OUTER_WEIGHTS = np.array([1.0, -0.5, 2.0, 0.3])


def prox_of_norm():
    """min_y 0.5 ||y - c||^2 + LAM ||y||_2: the prox of the 2-norm, at its kink y* = 0 when ||c|| < LAM."""
    c, yk = cp.Parameter(4, name="c"), cp.Variable(4, name="yk")
    inner = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(yk - c) + LAM * cp.norm(yk, 2)))
    return inner, c, yk


def outer_numpy_kink(y):
    return float(y @ OUTER_WEIGHTS + (y ** 2).sum())


def block_soft_threshold(c):
    """The prox of LAM ||.||_2 in closed form (Parikh & Boyd, Proximal Algorithms, 6.5.1)."""
    return max(0.0, 1 - LAM / np.linalg.norm(c)) * c


def closed_form_hypergradient(solution, value, outer, h=1e-6) -> np.ndarray:
    """Central differences of outer(solution(x)), the inner solution in closed form."""
    steps = h * np.eye(value.size)
    return np.array([(outer(solution(value + e)) - outer(solution(value - e))) / (2 * h) for e in steps])


def outer_torch_kink(c, y):
    return y @ torch.as_tensor(OUTER_WEIGHTS) + (y ** 2).sum()


@pytest.mark.parametrize("method", [None, "cg", "minres", "direct"])
@pytest.mark.parametrize("on_nonconvergence", ["raise", "warn"])
def test_norm_at_its_kink_hands_over_to_the_conic_route(method, on_nonconvergence):
    import cbo

    inner, c, yk = prox_of_norm()
    problem = cbo.BilevelProblem(inner, [c], [yk], outer=outer_torch_kink)
    expected = closed_form_hypergradient(block_soft_threshold, C_AT_KINK, outer_numpy_kink)
    np.testing.assert_allclose(expected, 0.0, atol=1e-8)  # y* = 0 on a neighbourhood of c
    got, info = cbo.hypergrad(problem, torch.as_tensor(C_AT_KINK), method=method, return_info=True,
                              on_nonconvergence=on_nonconvergence)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-8)
    assert info.route.startswith("conic:") and "kink" in info.route and "Pnorm" in info.route


def test_norm_away_from_its_kink_stays_smooth_and_matches_finite_differences():
    import cbo

    inner, c, yk = prox_of_norm()
    problem = cbo.BilevelProblem(inner, [c], [yk], outer=outer_torch_kink)
    expected = closed_form_hypergradient(block_soft_threshold, C_AWAY, outer_numpy_kink)
    for method in (None, "minres", "direct"):
        got, info = cbo.hypergrad(problem, torch.as_tensor(C_AWAY), method=method, return_info=True)
        assert info.route == "smooth Lagrangian"
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("value", [C_AT_KINK, C_AWAY], ids=["kink", "away"])
def test_layer_at_and_away_from_the_kink(value):
    import cbo

    inner, c, yk = prox_of_norm()
    layer = cbo.ArgminLayer(inner, [c], [yk], n_workers=1)
    c_in = torch.as_tensor(value).requires_grad_(True)
    (y_out,), info = layer(c_in, return_info=True)
    outer_torch_kink(c_in, y_out).backward()
    expected = closed_form_hypergradient(block_soft_threshold, value, outer_numpy_kink)
    np.testing.assert_allclose(c_in.grad.numpy(), expected, rtol=1e-6, atol=1e-8)
    assert info.route.startswith("conic:") == (value is C_AT_KINK)


def test_power_on_its_domain_boundary_hands_over():
    """min sum(y^3) - c.y over cvxpy's domain y >= 0: y_i = sqrt(c_i / 3) where c_i > 0, else y_i = 0 on the
    domain's boundary, where the formula's KKT condition 3 y^2 = c does not hold."""
    import cbo

    c, yk = cp.Parameter(3, name="c"), cp.Variable(3, name="yk")
    inner = cp.Problem(cp.Minimize(cp.sum(cp.power(yk, 3)) - c @ yk))
    problem = cbo.BilevelProblem(inner, [c], [yk], outer=lambda c, y: y @ torch.tensor([1.0, 2.0, 3.0]).double())
    value = np.array([0.5, -0.3, 1.2])
    expected = closed_form_hypergradient(lambda c: np.sqrt(np.maximum(c, 0) / 3), value,
                                        lambda y: y @ np.array([1.0, 2.0, 3.0]))
    got, info = cbo.hypergrad(problem, torch.as_tensor(value), return_info=True)
    assert "domain" in info.route
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("expr, inside, kink", [
    pytest.param(cp.norm(y, 2), np.array([1.0, 0.0, 0.0, 0.0]), np.zeros(4), id="norm2_origin"),
    pytest.param(cp.pnorm(y, 1.5), np.ones(4), np.array([1.0, 0.0, 1.0, 1.0]), id="pnorm_1.5_zero_entry"),
    pytest.param(cp.pnorm(X, 2, axis=0), np.ones((3, 4)), np.hstack([np.ones((3, 3)), np.zeros((3, 1))]),
                 id="pnorm_axis_zero_slice"),
    pytest.param(cp.sqrt(yn), np.ones(4), np.array([1.0, 1.0, 0.0, 1.0]), id="sqrt_domain"),
    pytest.param(cp.entr(yn), np.ones(4), np.array([0.0, 1.0, 1.0, 1.0]), id="entr_domain"),
    pytest.param(cp.xexp(yn), np.ones(4), np.zeros(4), id="xexp_domain"),
])
def test_kink_found_where_the_atom_has_no_second_derivative(expr, inside, kink):
    var = expr.variables()[0]
    found = translate.kinks(expr)
    assert found
    assert translate.kink_at(found, make_env({var: inside}), 1e-6) is None
    assert translate.kink_at(found, make_env({var: kink}), 1e-6) is not None


@pytest.mark.parametrize("expr", [cp.sum_squares(y), cp.square(y), cp.power(y, 4), cp.exp(y), cp.huber(y),
                                  cp.log_sum_exp(y), cp.quad_form(y, P_CONST), cp.quad_over_lin(y, 2.0)],
                         ids=["sum_squares", "square", "power_4", "exp", "huber", "log_sum_exp", "quad_form",
                              "quad_over_lin_constant"])
def test_atoms_smooth_everywhere_have_no_kinks(expr):
    assert translate.kinks(expr) == []


@pytest.mark.parametrize("method", ["cg", "minres", "fixed_point", "neumann", "direct"])
def test_nonconvergence_advice_never_names_the_method_used(method):
    from cbo.linsolve import SolveInfo, nonconvergence_message

    extra = {"factorization": "lu"} if method == "direct" else {}
    message = nonconvergence_message(method, SolveInfo(method, False, 7, 1e-3, 1e-10, extra))
    advice = message.split("tol=1.0e-10).")[1]
    assert f"'{method}'" not in advice
    assert "strongly convex" not in message  # the cause is named by the diagnostics that know it
    assert ("maxiter" in advice) == (method != "direct")


def test_kinks_of_a_power_whose_exponent_has_no_value_yet():
    """A layer's worker processes set the parameters; the main process may not have the exponent's value."""
    exponent = cp.Parameter(pos=True, name="exponent_unset")
    assert translate.kinks(cp.power(yp, exponent)) == []
