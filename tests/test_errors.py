"""Bad input and degenerate problems: each gets a clear exception or warning, never NaN."""
import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import cbo
from builders import random_qp


def simple_problem(constraints=lambda y, x: [y <= 1], objective=None, n=3, **kwargs):
    x, y = cp.Parameter(n), cp.Variable(n)
    objective = objective or (lambda y, x: cp.Minimize(cp.sum_squares(y - x)))
    inner = cp.Problem(objective(y, x), constraints(y, x))
    return cbo.BilevelProblem(inner, [x], [y], outer=lambda x, y: (y ** 2).sum(), **kwargs)


# ---------------------------------------------------------------- inner solve failures

def test_infeasible_inner_problem_raises():
    problem = simple_problem(lambda y, x: [y <= x, y >= x + 1])
    with pytest.raises(cbo.InnerSolveError, match="infeasible"):
        cbo.hypergrad(problem, torch.zeros(3))


def test_unbounded_inner_problem_raises():
    problem = simple_problem(lambda y, x: [y <= 1], objective=lambda y, x: cp.Minimize(x @ y))
    with pytest.raises(cbo.InnerSolveError, match="unbounded"):
        cbo.hypergrad(problem, torch.ones(3))


def test_infeasible_only_for_some_x():
    problem = simple_problem(lambda y, x: [y >= 0, cp.sum(y) <= x[0]])
    assert torch.isfinite(cbo.hypergrad(problem, torch.ones(3))).all()
    with pytest.raises(cbo.InnerSolveError, match="infeasible for this x"):
        cbo.hypergrad(problem, -torch.ones(3))


# ---------------------------------------------------------------- problem definition

def test_non_dcp_problem_names_the_culprit():
    with pytest.raises(cbo.ProblemDefinitionError, match="not DCP.*objective"):
        simple_problem(objective=lambda y, x: cp.Maximize(cp.sum_squares(y - x)))


def test_non_dcp_constraint_is_named():
    with pytest.raises(cbo.ProblemDefinitionError, match="not DCP.*constraint"):
        simple_problem(lambda y, x: [cp.sum_squares(y) >= 1])


@pytest.mark.parametrize("atom, name", [
    (lambda y: cp.norm1(y), "norm1"),
    (lambda y: cp.sum(cp.abs(y)), "abs"),
    (lambda y: cp.sum(cp.pos(y)), "maximum"),
    (lambda y: cp.norm_inf(y), "norm_inf"),
    (lambda y: cp.max(y), "max"),
])
def test_nonsmooth_atom_is_rewritten_and_the_route_says_so(atom, name):
    problem = simple_problem(objective=lambda y, x: cp.Minimize(cp.sum_squares(y - x) + atom(y)))
    assert problem.route == "smooth" and f"epigraph reformulation of {name}" in problem.route_reason


def test_nonsmooth_atom_that_cannot_be_rewritten_goes_conic_and_says_why():
    problem = simple_problem(objective=lambda y, x: cp.Minimize(cp.sum_squares(y) + cp.abs(x) @ y))
    assert problem.route == "conic"
    assert "abs" in problem.route_reason and "not DPP: re-canonicalized" in problem.route_reason


def test_parameter_not_in_problem():
    x, y, z = cp.Parameter(2), cp.Variable(2), cp.Parameter(2)
    inner = cp.Problem(cp.Minimize(cp.sum_squares(y - x)))
    with pytest.raises(cbo.ProblemDefinitionError, match="does not appear"):
        cbo.BilevelProblem(inner, [z], [y])


def test_variable_not_in_problem():
    x, y = cp.Parameter(2), cp.Variable(2)
    inner = cp.Problem(cp.Minimize(cp.sum_squares(y - x)))
    with pytest.raises(cbo.ProblemDefinitionError, match="Variable stranger .*inner problem"):
        cbo.BilevelProblem(inner, [x], [cp.Variable(2, name="stranger")])


def test_a_constant_parameter_needs_a_value():
    x, c, y = cp.Parameter(2), cp.Parameter(2, name="c"), cp.Variable(2)
    inner = cp.Problem(cp.Minimize(cp.sum_squares(y - x) + c @ y))
    with pytest.raises(cbo.ProblemDefinitionError, match="c of the inner problem are neither in `parameters` nor"):
        cbo.BilevelProblem(inner, [x], [y])
    c.value = np.ones(2)
    assert cbo.BilevelProblem(inner, [x], [y]).parameters == [x]


@pytest.mark.parametrize("outer", [lambda x: x.sum(), lambda x, y, z: y.sum(), lambda x, y, *, scale: y.sum()])
def test_outer_with_the_wrong_arguments_is_refused_at_construction(outer):
    x, y = cp.Parameter(2), cp.Variable(2)
    with pytest.raises(cbo.ProblemDefinitionError, match="2 positional argument.*signature is <lambda>"):
        cbo.BilevelProblem(cp.Problem(cp.Minimize(cp.sum_squares(y - x))), [x], [y], outer=outer)


@pytest.mark.parametrize("outer", [lambda *a: a[1].sum(), lambda x, y, z=1.0: z * y.sum(), lambda x, *rest: x.sum()])
def test_outer_with_varargs_or_defaults_is_accepted(outer):
    x, y = cp.Parameter(2), cp.Variable(2)
    cbo.BilevelProblem(cp.Problem(cp.Minimize(cp.sum_squares(y - x))), [x], [y], outer=outer)


def test_other_variable_attributes_go_conic():
    x, y = cp.Parameter((2, 2)), cp.Variable((2, 2), symmetric=True)
    problem = cbo.BilevelProblem(cp.Problem(cp.Minimize(cp.sum_squares(y - x))), [x], [y])
    assert problem.route == "conic" and "symmetric" in problem.route_reason
    non_dpp = cbo.BilevelProblem(cp.Problem(cp.Minimize(cp.sum_squares(y - cp.exp(x)))), [x], [y])
    assert non_dpp.route == "conic" and "not DPP" in non_dpp.route_reason


def test_non_dpp_conic_problem_with_a_symmetric_parameter_is_refused():
    x, y = cp.Parameter((2, 2), symmetric=True), cp.Variable((2, 2), symmetric=True)
    problem = cbo.BilevelProblem(cp.Problem(cp.Minimize(cp.sum_squares(y - cp.exp(x)))), [x], [y],
                                 outer=lambda x, y: y.sum())
    with pytest.raises(cbo.ProblemDefinitionError, match="symmetric parameters"):
        cbo.hypergrad(problem, torch.eye(2, dtype=torch.float64))


def test_outer_not_callable():
    x, y = cp.Parameter(2), cp.Variable(2)
    with pytest.raises(cbo.ProblemDefinitionError, match="callable"):
        cbo.BilevelProblem(cp.Problem(cp.Minimize(cp.sum_squares(y - x))), [x], outer=3.0)


def test_outer_must_return_scalar():
    x, y = cp.Parameter(3), cp.Variable(3)
    problem = cbo.BilevelProblem(cp.Problem(cp.Minimize(cp.sum_squares(y - x))), [x], outer=lambda x, y: y)
    with pytest.raises(cbo.ProblemDefinitionError, match="scalar"):
        cbo.hypergrad(problem, torch.ones(3))


def test_missing_outer():
    x, y = cp.Parameter(3), cp.Variable(3)
    problem = cbo.BilevelProblem(cp.Problem(cp.Minimize(cp.sum_squares(y - x))), [x])
    with pytest.raises(cbo.ProblemDefinitionError, match="no outer objective"):
        cbo.hypergrad(problem, torch.ones(3))


# ---------------------------------------------------------------- parameter values

def test_wrong_shape_names_parameter_and_shapes():
    problem = simple_problem()
    with pytest.raises(ValueError, match=r"shape \(3,\).*shape \(4,\)"):
        cbo.hypergrad(problem, torch.ones(4))


def test_wrong_number_of_parameters():
    problem = simple_problem()
    with pytest.raises(ValueError, match="1 parameter"):
        cbo.hypergrad(problem, [torch.ones(3), torch.ones(3)])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_x_raises(bad):
    problem = simple_problem()
    x = torch.ones(3)
    x[1] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        cbo.hypergrad(problem, x)


def integer_problem():
    """F = 0.37 ||y*||^2, y* = min(x, 1.5) entrywise: dF/dx = 0.74 x where x < 1.5, 0 above."""
    x, y = cp.Parameter(4), cp.Variable(4)
    inner = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y <= 1.5])
    return cbo.BilevelProblem(inner, [x], [y], outer=lambda x, y: 0.37 * (y ** 2).sum())


@pytest.mark.parametrize("value", [torch.tensor([1, 2, 0, -1]), torch.tensor([1, 2, 0, -1], dtype=torch.int32),
                                   np.array([1, 2, 0, -1]), [torch.tensor([True, False, True, True])]])
def test_integer_and_bool_input_give_float64_gradients(value):
    problem = integer_problem()
    reference_x = torch.as_tensor(np.asarray(value[0] if isinstance(value, list) else value), dtype=torch.float64)
    reference = cbo.hypergrad(problem, reference_x)
    g = cbo.hypergrad(problem, value)
    g = g[0] if isinstance(value, list) else g
    assert g.dtype == torch.float64 and torch.equal(g, reference)
    assert torch.allclose(reference, 0.74 * reference_x.clamp(max=1.5) * (reference_x < 1.5), atol=1e-9)


def test_minimize_from_an_integer_start_returns_float64():
    problem = integer_problem()
    result = cbo.minimize(problem, torch.tensor([1, 2, 0, -1]), steps=3)
    reference = cbo.minimize(problem, torch.tensor([1.0, 2.0, 0.0, -1.0], dtype=torch.float64), steps=3)
    assert result.x.dtype == result.grad.dtype == torch.float64
    assert torch.allclose(result.x, reference.x, atol=1e-12)


def test_bfloat16_input_is_checked_and_differentiated():
    """bfloat16 (which numpy does not have): NaN is refused, and the gradient is the closed form at the
    rounded input, returned in bfloat16."""
    problem = integer_problem()
    x = torch.tensor([0.3, 2.0, -0.7, 1.1], dtype=torch.bfloat16)
    g = cbo.hypergrad(problem, x)
    exact = x.double()
    assert g.dtype == torch.bfloat16
    assert torch.allclose(g.double(), 0.74 * exact.clamp(max=1.5) * (exact < 1.5), rtol=1e-2)
    with pytest.raises(ValueError, match="NaN or infinite"):
        cbo.hypergrad(problem, torch.tensor([0.3, float("nan"), 0.0, 1.0], dtype=torch.bfloat16))


def test_complex_input_is_refused():
    with pytest.raises(TypeError, match="expected a real tensor"):
        cbo.hypergrad(integer_problem(), torch.ones(4, dtype=torch.complex128))


def test_symmetric_parameter_gradient_is_that_of_the_symmetric_function():
    """y* = sym(C) for min ||y - C||^2 with C symmetric=True, F = <W, y*>: dF/dC = sym(W), for any C."""
    C, y = cp.Parameter((3, 3), symmetric=True), cp.Variable((3, 3))
    W = torch.tensor(np.random.default_rng(0).standard_normal((3, 3)))
    problem = cbo.BilevelProblem(cp.Problem(cp.Minimize(cp.sum_squares(y - C))), [C], [y],
                                 outer=lambda C, y: (W * y).sum())
    C_t = torch.arange(9.0, dtype=torch.float64).reshape(3, 3)  # not symmetric
    g, info = cbo.hypergrad(problem, C_t, return_info=True)
    assert torch.allclose(info.y[0], (C_t + C_t.T) / 2, atol=1e-8)
    assert torch.allclose(g, (W + W.T) / 2, atol=1e-8)


def test_unknown_method_lists_known_ones():
    with pytest.raises(ValueError, match="minres"):
        cbo.hypergrad(simple_problem(), torch.ones(3), method="gmress")


# ---------------------------------------------------------------- linear solve

@pytest.mark.parametrize("method", ["minres", "cg", "fixed_point", "neumann"])
def test_tiny_maxiter_raises_with_residual(method):
    case = random_qp(40, seed=11)
    with pytest.raises(cbo.ConvergenceError, match="did not converge: relative residual") as err:
        cbo.hypergrad(case.problem, case.x_tensors, method=method, maxiter=2, warm_start=False)
    assert err.value.info.iterations <= 2 and err.value.info.residual > 1e-10


def test_nonconvergence_can_warn_instead():
    case = random_qp(40, seed=11)
    with pytest.warns(cbo.ConvergenceWarning, match="did not converge"):
        g = cbo.hypergrad(case.problem, case.x_tensors, method="minres", maxiter=2,
                          warm_start=False, on_nonconvergence="warn")
    assert all(torch.isfinite(t).all() for t in g)


# ---------------------------------------------------------------- degenerate KKT systems

def test_weakly_active_constraint_is_named():
    # min (y - x)^2 s.t. y <= 1 at x = 1: the bound is touched with zero multiplier.
    problem = simple_problem(lambda y, x: [y <= 1])
    with pytest.warns(cbo.DegenerateKKTWarning, match="weakly active") as record:
        g, info = cbo.hypergrad(problem, torch.ones(3), return_info=True)
    message = str(record[0].message)
    assert "constraint 0, entries 0, 1, 2: var" in message and "<= 1.0 touch" in message
    assert torch.equal(info.active_set.weakly_active, torch.tensor([0, 1, 2]))
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("method", [None, "minres"])  # the QP fast path and the general route
def test_active_set_entries_are_tensors_on_every_path(method):
    problem = simple_problem(lambda y, x: [y <= 1])
    with pytest.warns(cbo.DegenerateKKTWarning):
        _, info = cbo.hypergrad(problem, torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64), method=method,
                                warm_start=False, return_info=True)
    assert info.active_set.active.dtype == info.active_set.weakly_active.dtype == torch.long
    assert info.active_set.active.tolist() == [1] and info.active_set.weakly_active.tolist() == [0]


def test_labels_show_the_constraint_expression():
    x, y = cp.Parameter(3, name="x"), cp.Variable(6, name="y")
    inner = cp.Problem(cp.Minimize(cp.sum_squares(y)), [y >= -5, y[0:3] <= x, cp.sum(y) == 1])
    problem = cbo.BilevelProblem(inner, [x], [y])
    assert problem.constraint_label(6 + 1) == "constraint 1, entry 1: y[0:3] <= x"
    assert problem.describe_entries([6, 8]) == "constraint 1, entries 0, 2: y[0:3] <= x"
    long = cp.Problem(cp.Minimize(cp.sum_squares(y)), [np.arange(60.0).reshape(10, 6) @ y <= x[0]])
    label = cbo.BilevelProblem(long, [x], [y]).constraint_label(3)
    assert label.startswith("constraint 0, entry 3: [[") and label.endswith("<= x[0]")
    assert " ... " in label and "\n" not in label and len(label.split(": ", 1)[1]) <= 60


def test_dependent_active_constraints_warn_licq():
    # The same active constraint twice: J has rank 1 for 2 rows.
    problem = simple_problem(lambda y, x: [cp.sum(y) >= 3, 2 * cp.sum(y) >= 6])
    with pytest.warns(cbo.DegenerateKKTWarning, match="LICQ fails"):
        g, info = cbo.hypergrad(problem, torch.zeros(3), method="minres", return_info=True)
    assert not info.licq.holds
    # y* = (1, 1, 1) for every x near 0: dy*/dx projects out the all-ones direction.
    expected = 2 * torch.ones(3) @ (torch.eye(3) - torch.ones(3, 3) / 3)
    assert torch.allclose(g.float(), expected, atol=1e-5)


def test_no_nan_on_degenerate_direct_solve():
    problem = simple_problem(lambda y, x: [cp.sum(y) >= 3, 2 * cp.sum(y) >= 6])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cbo.DegenerateKKTWarning)
        g = cbo.hypergrad(problem, np.zeros(3), method="direct")
    assert torch.isfinite(g).all()


def test_active_set_compares_multiplier_with_slack():
    """A multiplier above the threshold but far smaller than its slack is an inactive entry
    (an interior-point solution can leave mu_i = 3.5e-6 on a row with slack -3.3e-3)."""
    from cbo.kkt import active_set

    problem = simple_problem(lambda y, x: [y <= 1])
    mu = np.array([3.5e-6, 2.0, 1e-9])
    slack = np.array([-3.3e-3, -1e-10, -0.5])
    assert active_set(problem, mu, slack).active.tolist() == [1]


def test_linear_program_is_reported():
    problem = simple_problem(lambda y, x: [y >= 0, cp.sum(y) <= 1, y <= 0.7],
                             objective=lambda y, x: cp.Minimize(x @ y))
    assert problem.is_linear
    with pytest.warns(cbo.DegenerateKKTWarning, match="linear program.*piecewise constant"):
        g = cbo.hypergrad(problem, torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64), method="minres")
    assert torch.equal(g, torch.zeros(3, dtype=torch.float64))  # y* is a vertex: locally constant in x


def test_non_unique_inner_solution_is_reported():
    # min (y0 + y1 + y2 - x0)^2: a plane of solutions, zero curvature along it.
    problem = simple_problem(lambda y, x: [y >= -5], objective=lambda y, x: cp.Minimize(cp.square(cp.sum(y) - x[0])))
    with pytest.warns(cbo.DegenerateKKTWarning, match="not unique.*zero curvature"):
        g, info = cbo.hypergrad(problem, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), return_info=True)
    assert abs(info.reduced_hessian_extremes[0]) < 1e-9 < info.reduced_hessian_extremes[1]
    assert torch.isfinite(g).all()
