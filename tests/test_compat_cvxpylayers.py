"""cbo.ArgminLayer as a drop-in for cvxpylayers.torch.CvxpyLayer.

The cases of cvxpylayers' generic torch tests (tests/test_torch.py of
cvxpy/cvxpylayers), written anew, with ``from cbo import ArgminLayer as
CvxpyLayer``. References never call cbo: closed forms, cvxpy's own solve,
torch.autograd.gradcheck (central finite differences), and cvxpylayers itself.
Where cbo differs on purpose (errors it raises, broadcasting of batch shapes),
the test checks cbo's behaviour and docs/layer.md says why.
``python benchmarks/cvxpylayers_suite.py`` runs cvxpylayers' own test file
with the import swapped (the ``compat`` marker runs it from pytest).
"""
import warnings

import cvxpy as cp
import diffcp
import numpy as np
import pytest
import torch
from cvxpylayers.torch import CvxpyLayer as ReferenceLayer

import cbo
from cbo import ArgminLayer as CvxpyLayer

TIGHT_REFERENCE = dict(solve_method="Clarabel", tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)


@pytest.fixture
def rng():
    torch.manual_seed(0)
    return np.random.default_rng(0)


def cvxpy_solution(problem, assignments, variable):
    """The variable's value after cvxpy's own solve with the parameters set to ``assignments``."""
    for param, value in assignments.items():
        param.value = np.asarray(value.detach() if isinstance(value, torch.Tensor) else value, dtype=float)
    problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    return torch.as_tensor(variable.value)


def ridge(n):
    """min ||A x - b||^2 + ||x||^2 over x, parameters A (m x n) and b, and its closed form."""
    A, b, x = cp.Parameter((2 * n, n)), cp.Parameter(2 * n), cp.Variable(n)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b) + cp.sum_squares(x)))

    def closed_form(A_t, b_t):
        return torch.linalg.solve(A_t.T @ A_t + torch.eye(n, dtype=A_t.dtype), A_t.T @ b_t)

    return problem, A, b, x, closed_form


def l1_fit(m=3, n=2):
    """min 1/2 ||A x - b||_1 s.t. x >= 0: cvxpylayers' README example."""
    A, b, x = cp.Parameter((m, n)), cp.Parameter(m), cp.Variable(n)
    problem = cp.Problem(cp.Minimize(0.5 * cp.pnorm(A @ x - b, p=1)), [x >= 0])
    return problem, A, b, x


def test_example_matches_cvxpy_and_cvxpylayers(rng):
    problem, A, b, x = l1_fit()
    assert problem.is_dpp()
    A_t = torch.tensor(rng.standard_normal((3, 2)), requires_grad=True)
    b_t = torch.tensor(rng.standard_normal(3), requires_grad=True)
    (solution,) = CvxpyLayer(problem, parameters=[A, b], variables=[x])(A_t, b_t)
    assert torch.allclose(solution, cvxpy_solution(problem, {A: A_t, b: b_t}, x), atol=1e-7)
    grads = torch.autograd.grad(solution.sum(), [A_t, b_t])
    (reference,) = ReferenceLayer(problem, parameters=[A, b], variables=[x])(A_t, b_t, solver_args=TIGHT_REFERENCE)
    for g, g_ref in zip(grads, torch.autograd.grad(reference.sum(), [A_t, b_t])):
        assert torch.allclose(g, g_ref, atol=1e-5)


def test_least_squares_gradients_match_the_closed_form(rng):
    problem, A, b, x, closed_form = ridge(10)
    layer = CvxpyLayer(problem, [A, b], [x])
    A_t = torch.tensor(rng.standard_normal((20, 10)), requires_grad=True)
    b_t = torch.tensor(rng.standard_normal(20), requires_grad=True)
    (solution,) = layer(A_t, b_t, solver_args={"solve_method": "Clarabel", "eps": 1e-10})
    expected = closed_form(A_t, b_t)
    assert torch.allclose(solution, expected, atol=1e-9)
    for g, g_ref in zip(torch.autograd.grad(solution.sum(), [A_t, b_t]),
                        torch.autograd.grad(expected.sum(), [A_t, b_t])):
        assert torch.allclose(g, g_ref, atol=1e-8)


def test_logistic_regression_gradcheck(rng):
    N, n = 5, 2
    X_np = rng.standard_normal((N, n))
    labels = np.round(1 / (1 + np.exp(-(X_np @ rng.standard_normal((n, 1)) + 0.5 * rng.standard_normal((N, 1))))))
    a, X, lam = cp.Variable((n, 1)), cp.Parameter((N, n)), cp.Parameter(1, nonneg=True)
    log_likelihood = cp.sum(cp.multiply(labels, X @ a)
                            - cp.log_sum_exp(cp.hstack([np.zeros((N, 1)), X @ a]).T, axis=0, keepdims=True).T)
    problem = cp.Problem(cp.Minimize(-log_likelihood + lam * cp.sum_squares(a)))
    layer = CvxpyLayer(problem, [X, lam], [a])
    inputs = (torch.tensor(X_np, requires_grad=True), torch.tensor([0.1], dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(layer, inputs, atol=1e-4)


def test_lml_gradcheck():
    x, y = cp.Parameter(4), cp.Variable(4)
    problem = cp.Problem(cp.Minimize(-x @ y - cp.sum(cp.entr(y)) - cp.sum(cp.entr(1.0 - y))), [cp.sum(y) == 2])
    layer = CvxpyLayer(problem, [x], [y])
    x_t = torch.tensor([1.0, -1.0, -1.0, -1.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x_t,), atol=1e-3)


@pytest.mark.parametrize("attribute", ["symmetric", "PSD"])
def test_sdp_with_a_symmetric_parameter_gradcheck(attribute):
    """gradcheck perturbs C[0, 1] alone: the layer sees sym(C) = (C + C^T) / 2 and returns the gradient of
    C -> y*(sym(C)), which is symmetric."""
    n = 3
    X, C = cp.Variable((n, n), symmetric=True), cp.Parameter((n, n), **{attribute: True})
    problem = cp.Problem(cp.Minimize(cp.trace(C @ X)), [X >> 0, cp.trace(X) == 1])
    layer = CvxpyLayer(problem, parameters=[C], variables=[X])
    C_t = torch.tensor([[2.0, 0.5, 0.1], [0.5, 3.0, 0.2], [0.1, 0.2, 1.5]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (C_t,), atol=1e-4, rtol=1e-3)
    weights = torch.tensor(np.random.default_rng(1).standard_normal((n, n)))
    (grad,) = torch.autograd.grad((layer(C_t)[0] * weights).sum(), [C_t])
    assert torch.allclose(grad, grad.T, atol=1e-12)


def test_symmetric_parameter_takes_the_symmetric_part_of_its_input():
    n = 3
    C, y = cp.Parameter((n, n), symmetric=True), cp.Variable((n, n))
    problem = cp.Problem(cp.Minimize(cp.sum_squares(y - C)))
    layer = CvxpyLayer(problem, [C], [y])
    C_t = torch.arange(9.0, dtype=torch.float64).reshape(n, n)
    (solution,) = layer(C_t)
    assert torch.allclose(solution, (C_t + C_t.T) / 2, atol=1e-8)


def test_a_parameter_that_is_neither_an_input_nor_given_a_value_is_named_at_construction():
    x = cp.Variable(1)
    lam, lam2 = cp.Parameter(1, nonneg=True, name="lam"), cp.Parameter(1, nonneg=True, name="lam2")
    problem = cp.Problem(cp.Minimize(lam * cp.norm(x, 1) + lam2 * cp.sum_squares(x)))
    with pytest.raises(cbo.ProblemDefinitionError, match="lam2 .*neither in `parameters` nor given a value.*"
                       "must exactly match problem.parameters"):  # a ValueError, with cvxpylayers' words
        CvxpyLayer(problem, [lam], [x])
    lam2.value = np.array([2.0])  # a constant: cbo takes it, cvxpylayers does not
    (solution,) = CvxpyLayer(problem, [lam], [x])(torch.tensor([0.5], dtype=torch.float64))
    assert torch.allclose(solution, torch.zeros(1, dtype=torch.float64), atol=1e-8)


def test_not_enough_inputs_at_call_time():
    x, lam, lam2 = cp.Variable(1), cp.Parameter(1, nonneg=True), cp.Parameter(1, nonneg=True)
    layer = CvxpyLayer(cp.Problem(cp.Minimize(lam * cp.norm(x, 1) + lam2 * cp.sum_squares(x))), [lam, lam2], [x])
    with pytest.raises(ValueError, match="A tensor must be provided for each CVXPY parameter.*takes 2 input"):
        layer(torch.ones(1))


def test_none_input_names_the_parameter():
    x = cp.Variable(1)
    lam, lam2 = cp.Parameter(1, nonneg=True), cp.Parameter(1, nonneg=True, name="lam2")
    layer = CvxpyLayer(cp.Problem(cp.Minimize(lam * cp.norm(x, 1) + lam2 * cp.sum_squares(x))), [lam, lam2], [x])
    with pytest.raises(AttributeError, match="parameter lam2 is None") as caught:  # what cvxpylayers raises
        layer(torch.ones(1), None)
    assert isinstance(caught.value, TypeError)


def test_a_variable_not_in_the_problem_is_refused():
    x, y, lam = cp.Variable(1), cp.Variable(1, name="stranger"), cp.Parameter(1, nonneg=True)
    with pytest.raises(cbo.ProblemDefinitionError, match="stranger.*must be a subset of problem.variables"):
        CvxpyLayer(cp.Problem(cp.Minimize(lam * cp.norm(x, 1))), [lam], [x, y])


def test_infeasible_and_unbounded_problems_raise():
    x, param = cp.Variable(1), cp.Parameter(1)
    infeasible = CvxpyLayer(cp.Problem(cp.Minimize(param), [x >= 1, x <= -1]), [param], [x])
    with pytest.raises(diffcp.SolverError, match="infeasible") as caught:  # what cvxpylayers raises
        infeasible(torch.ones(1))
    assert isinstance(caught.value, cbo.InnerSolveError)
    unbounded = CvxpyLayer(cp.Problem(cp.Minimize(x), [x <= param]), [param], [x])
    with pytest.raises(diffcp.SolverError, match="unbounded") as caught:
        unbounded(torch.ones(1))
    assert isinstance(caught.value, cbo.InnerSolveError)


def test_incorrect_parameter_shapes(rng):
    problem, A, b, x, closed_form = ridge(2)
    layer = CvxpyLayer(problem, [A, b], [x])
    with pytest.raises(ValueError, match="Inconsistent batch sizes: .*do not broadcast"):
        layer(torch.randn(5, 4, 2, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="Invalid parameter shape: .*expected \\(4,\\)"):
        layer(torch.randn(5, 4, 2, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="Invalid parameter shape: .*expected \\(4,\\)"):
        layer(torch.randn(4, 2, dtype=torch.float64), torch.randn(8, dtype=torch.float64))
    # cvxpylayers refuses batch shapes (3,) and (2, 3); cbo broadcasts them as torch does, to (2, 3).
    A_t, b_t = torch.randn(3, 4, 2, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    (solution,) = layer(A_t, b_t)
    assert solution.shape == (2, 3, 2)
    assert torch.allclose(solution[1, 2], closed_form(A_t[2], b_t[1, 2]), atol=1e-9)


def test_broadcasting_an_unbatched_input_sums_its_gradient(rng):
    problem, A, b, x, closed_form = ridge(5)
    layer = CvxpyLayer(problem, [A, b], [x])
    A_t = torch.tensor(rng.standard_normal((10, 5)), requires_grad=True)
    b_0 = torch.tensor(rng.standard_normal(10), requires_grad=True)
    b_t = torch.stack((b_0, b_0))
    (solution,) = layer(A_t, b_t)
    expected = closed_form(A_t, b_0)
    grad_A, grad_b = torch.autograd.grad(solution.sum(), [A_t, b_t])
    grad_A_ref, grad_b_ref = torch.autograd.grad(expected.sum(), [A_t, b_0])
    assert torch.allclose(grad_A / 2, grad_A_ref, atol=1e-8)
    assert torch.allclose(grad_b[0], grad_b_ref, atol=1e-8) and torch.allclose(grad_b[1], grad_b_ref, atol=1e-8)


def test_two_layers_share_a_parameter_gradcheck(rng):
    """Solver-specific keys pass through to the named solver (SCS here); cbo polishes its solution."""
    m, n = 10, 5
    A, x = cp.Parameter((m, n)), cp.Variable(n)
    b1, b2 = rng.standard_normal(m), rng.standard_normal(m)
    layer1 = CvxpyLayer(cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b1))), parameters=[A], variables=[x])
    layer2 = CvxpyLayer(cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b2))), parameters=[A], variables=[x])
    solver_args = {"solve_method": "SCS", "eps": 1e-10, "acceleration_lookback": 0, "max_iters": 10000}

    def both(A_t):
        return torch.cat((layer1(A_t, solver_args=solver_args)[0], layer2(A_t, solver_args=solver_args)[0]))

    A_t = torch.tensor(rng.standard_normal((m, n)), requires_grad=True)
    assert torch.autograd.gradcheck(both, (A_t,))


def test_equality_constrained_gradcheck():
    n = 10
    x, b = cp.Variable(n), cp.Parameter(n)
    layer = CvxpyLayer(cp.Problem(cp.Minimize(cp.sum_squares(x)), [np.eye(n) @ x == b]), parameters=[b], variables=[x])
    assert torch.autograd.gradcheck(layer, (torch.randn(n, dtype=torch.float64, requires_grad=True),))


def test_no_grad_context_and_inputs_without_grad_give_outputs_without_grad(rng):
    problem, A, b, x = l1_fit()
    layer = CvxpyLayer(problem, parameters=[A, b], variables=[x])
    A_t, b_t = torch.tensor(rng.standard_normal((3, 2))), torch.tensor(rng.standard_normal(3))
    with torch.no_grad():
        (solution,) = layer(A_t.requires_grad_(True), b_t)
    assert torch.is_tensor(solution) and not solution.requires_grad
    (solution,) = layer(A_t.detach(), b_t)
    assert torch.is_tensor(solution) and not solution.requires_grad


def test_batch_of_one_keeps_its_batch_dimension():
    n = 3
    x, b = cp.Variable(n), cp.Parameter(n)
    layer = CvxpyLayer(cp.Problem(cp.Minimize(cp.sum_squares(x - b))), parameters=[b], variables=[x])
    b_t = torch.randn(1, n, dtype=torch.float64, requires_grad=True)
    (solution,) = layer(b_t)
    assert solution.shape == (1, n) and torch.allclose(solution, b_t, atol=1e-9)
    solution.sum().backward()
    assert b_t.grad.shape == (1, n) and torch.allclose(b_t.grad, torch.ones(1, n, dtype=torch.float64), atol=1e-8)


def test_matrix_variable_matches_cvxpy(rng):
    m, n, k = 12, 6, 3
    A, b, x = cp.Parameter((m, n)), cp.Parameter((m, k)), cp.Variable((n, k))
    problem = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b) + 0.01 * cp.sum_squares(x)))
    A_t, b_t = torch.tensor(rng.standard_normal((m, n))), torch.tensor(rng.standard_normal((m, k)))
    (solution,) = CvxpyLayer(problem, [A, b], [x])(A_t, b_t)
    assert torch.allclose(solution, cvxpy_solution(problem, {A: A_t, b: b_t}, x), atol=1e-7)


# ---------------------------------------------------------------- solver_args

def small_qp(n=4):
    q, y = cp.Parameter(n), cp.Variable(n)
    return cp.Problem(cp.Minimize(cp.sum_squares(y) + q @ y), [y <= 0.3, cp.sum(y) == 1]), q, y


def test_moreau_gets_only_its_own_settings():
    """cvxpylayers' Moreau interface drops keys that are not Moreau settings (their tests pass tol=...);
    cbo drops them with a warning instead of letting Moreau's validation fail the solve."""
    pytest.importorskip("moreau")
    problem, q, y = small_qp()
    layer = CvxpyLayer(problem, [q], [y], solver="MOREAU", n_workers=1)
    q_t = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=torch.float64)
    with pytest.warns(cbo.OptionIgnoredWarning, match="tol"):
        (ours,) = layer(q_t, solver_args={"tol": 1e-12, "max_iters": 500})
    q.value = q_t.numpy()
    problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    np.testing.assert_allclose(ours.numpy(), y.value, atol=1e-5)  # the reference is Clarabel-accurate


def test_call_time_solver_args_reach_the_named_solver():
    problem, q, y = small_qp()
    layer = CvxpyLayer(problem, [q], [y], n_workers=1, warm_start=False)
    q_t = torch.randn(3, 4, dtype=torch.float64)
    _, info = layer(q_t, solver_args={"solve_method": "PIQP"}, return_info=True)
    assert info.solvers == ["PIQP"] * 3
    with pytest.raises(cbo.InnerSolveError, match="CLARABEL stopped"):  # max_iters -> Clarabel's max_iter
        layer(q_t, solver_args={"solve_method": "Clarabel", "max_iters": 1})
    _, info = layer(q_t, return_info=True)  # the layer's own settings again
    assert info.solvers == ["DAQP"] * 3


def test_construction_solver_args_apply_to_every_call():
    problem, q, y = small_qp()
    layer = CvxpyLayer(problem, [q], [y], n_workers=1, warm_start=False, solver_args={"solve_method": "PIQP"})
    _, info = layer(torch.randn(2, 4, dtype=torch.float64), return_info=True)
    assert info.solvers == ["PIQP"] * 2
    assert layer.options.solver == "PIQP"


def test_solver_keys_without_a_named_solver_warn():
    problem, q, y = small_qp()
    layer = CvxpyLayer(problem, [q], [y])
    with pytest.warns(cbo.OptionIgnoredWarning, match="eps=1e-10 ignored.*name one with solver="):
        layer(torch.randn(4, dtype=torch.float64), solver_args={"eps": 1e-10})
    with pytest.warns(cbo.OptionIgnoredWarning, match="mode='lsqr' ignored"):
        layer(torch.randn(4, dtype=torch.float64), solver_args={"mode": "lsqr"})


def test_with_solver_args_translates_generic_keys():
    options = cbo.options.with_solver_args(cbo.Options(), {"solve_method": "Clarabel", "eps": 1e-9, "max_iters": 50,
                                                           "verbose": False})
    assert options.solver == "CLARABEL"
    assert options.solver_options == {"tol_gap_abs": 1e-9, "tol_gap_rel": 1e-9, "tol_feas": 1e-9, "max_iter": 50,
                                      "verbose": False}
    with pytest.warns(cbo.OptionIgnoredWarning, match="does not know DAQP's name"):
        options = cbo.options.with_solver_args(cbo.Options(solver="DAQP"), {"eps": 1e-9})
    assert options == cbo.Options(solver="DAQP")


def test_cvxpylayers_constructor_arguments():
    problem, q, y = small_qp()
    with pytest.raises(cbo.ProblemDefinitionError, match="gp=True"):
        CvxpyLayer(problem, [q], [y], gp=True)
    with pytest.warns(cbo.OptionIgnoredWarning, match="canon_backend"):
        CvxpyLayer(problem, [q], [y], canon_backend="SCIPY")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer = CvxpyLayer(problem, [q], [y], solver=cp.CLARABEL, verbose=False)
    assert layer.options.solver == "CLARABEL"


# ---------------------------------------------------------------- cvxpylayers' own file

# Their tests whose expectations cbo shares: the 19 of a generic layer but test_incorrect_parameter_shape,
# whose last case refuses batch shapes that cbo broadcasts, and the Moreau tests on problems both take. The
# others test geometric programs, refusals of non-DPP problems that cbo takes, and a solver stopped early
# (docs/layer.md, "Differences from cvxpylayers").
SHARED_EXPECTATIONS = {
    "test_example", "test_least_squares", "test_logistic_regression", "test_lml", "test_sdp", "test_broadcasting",
    "test_shared_parameter", "test_equality", "test_no_grad_context", "test_requires_grad_false",
    "test_batch_size_one_preserves_batch_dimension", "test_nd_array_variable", "test_not_enough_parameters",
    "test_not_enough_parameters_at_call_time", "test_none_parameter_at_call_time", "test_too_many_variables",
    "test_infeasible", "test_unbounded", "test_quad_form_psd_forward", "test_quad_form_psd_gradcheck_Q",
    "test_quad_form_psd_batched", "test_quad_form_nsd_maximize_backward",
}


@pytest.mark.compat
def test_cvxpylayers_own_test_file_with_the_import_swapped():
    import importlib.util
    import os
    from pathlib import Path

    repo = os.environ.get("CVXPYLAYERS_REPO")
    if not repo:
        pytest.skip("set CVXPYLAYERS_REPO to a cvxpylayers work tree or git directory")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cvxpylayers_suite.py"
    spec = importlib.util.spec_from_file_location("cvxpylayers_suite", path)
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    results, _ = suite.run_suite(Path(repo))
    failing = {name: why for name, (outcome, why) in results.items()
               if name in SHARED_EXPECTATIONS and outcome != "passed"}
    assert not failing
