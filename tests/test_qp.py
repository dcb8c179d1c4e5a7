"""The QP fast path (cbo/qp.py): compiled once, the previous active set reused, one factorization.

References never call cbo: the dense numpy KKT solve of builders.dense_kkt_hypergrad and central
finite differences through cvxpy (builders.finite_difference, central_jacobian).
"""
from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch

import cbo
import cbo.qp
from builders import (SOLVER_OPTIONS, Case, central_jacobian, dense_kkt_hypergrad, non_dpp, outer_torch,
                      qp_matrix_parameter, random_qp, relative_error)


def fast(case: Case, **options):
    grad, info = cbo.hypergrad(case.problem, case.x_tensors, return_info=True, **options)
    assert info.path == "compiled QP", info.path
    return [g.numpy() for g in grad], info


@pytest.mark.parametrize("build", [lambda: random_qp(12), lambda: random_qp(40, seed=3), qp_matrix_parameter,
                                   non_dpp], ids=["qp12", "qp40", "matrix_parameter", "lifted_exp"])
def test_matches_dense_kkt_reference(build):
    case = build()
    grad, info = fast(case)
    assert relative_error(grad, dense_kkt_hypergrad(case)) < 1e-7
    assert info.kkt_residual < 1e-10 and info.linear_solve.residual < 1e-10


@pytest.mark.parametrize("solver", ["DAQP", "PIQP", "CLARABEL"])
def test_every_qp_solver_gives_the_same_gradient(solver):
    case = random_qp(20, seed=5)
    grad, info = fast(case, solver=solver, warm_start=False)
    assert info.solver == solver
    assert relative_error(grad, dense_kkt_hypergrad(case)) < 1e-7


def test_sparse_factorization(monkeypatch):
    monkeypatch.setattr(cbo.qp, "DENSE_LIMIT", 0)
    monkeypatch.setattr(cbo.qp, "DENSE_FILL_LIMIT", 0)
    case = random_qp(30, seed=6)
    problem = cbo.BilevelProblem(case.problem.inner, case.problem.parameters, case.problem.variables,
                                 outer=case.problem.outer)
    assert not cbo.compiled.compiled(problem).qp.dense
    case.problem = problem
    grad, info = fast(case)
    assert info.linear_solve.extra["factorization"].startswith("sparse")
    assert relative_error(grad, dense_kkt_hypergrad(case)) < 1e-7


def test_sparse_layer_batch_shares_one_analysed_pattern(monkeypatch):
    """The sparse LDL^T analyses K_S's pattern once and refactors per active set; a layer's backward pass
    solves with each batch item's factorization in turn (each refactored before use): its gradients must
    equal those of the dense factorization, item by item."""
    case = random_qp(30, seed=9)
    dense = cbo.ArgminLayer(case.problem.inner, case.problem.parameters, case.problem.variables)
    monkeypatch.setattr(cbo.qp, "DENSE_LIMIT", 0)
    monkeypatch.setattr(cbo.qp, "DENSE_FILL_LIMIT", 0)
    sparse = cbo.ArgminLayer(case.problem.inner, case.problem.parameters, case.problem.variables)
    assert cbo.compiled.compiled(dense.problem).qp.dense and not cbo.compiled.compiled(sparse.problem).qp.dense
    rng = np.random.default_rng(3)
    x = torch.as_tensor(np.stack([case.x[0] + s * rng.standard_normal(30) for s in (0.0, 1.0, 3.0)]))
    r = torch.as_tensor(case.x[1])
    weights = torch.as_tensor(rng.standard_normal((3, 30)))
    grads = []
    for layer in (dense, sparse):
        inputs = [x.clone().requires_grad_(True), r.clone().requires_grad_(True)]
        (y,), info = layer(*inputs, return_info=True)
        (weights * y).sum().backward()
        grads.append([t.grad.numpy() for t in inputs])
    assert len({tuple(a.active.tolist()) for a in info.active_sets}) == 3, "the items must differ in active set"
    assert info.linear_solve.extra["factorization"].startswith("sparse LDL")
    for a, b in zip(*grads):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-11)


def test_range_space_factorization(monkeypatch):
    """P positive definite and constant: K_S solved through the Cholesky factors of P and of A_S P^-1 A_S^T."""
    monkeypatch.setattr(cbo.qp, "RANGE_SPACE_MIN", 0)
    case = random_qp(24, seed=14)
    problem = cbo.BilevelProblem(case.problem.inner, case.problem.parameters, case.problem.variables,
                                 outer=case.problem.outer)
    case.problem = problem
    grad, info = fast(case)
    assert info.linear_solve.extra["factorization"].startswith("range space")
    assert info.linear_solve.residual < 1e-12 and info.kkt_residual < 1e-10
    assert relative_error(grad, dense_kkt_hypergrad(case)) < 1e-7
    case.x = [case.x[0] + 3.0 * np.sign(case.x[0]), case.x[1]]  # a new active set: a new Schur complement
    grad, info = fast(case)
    assert relative_error(grad, dense_kkt_hypergrad(case)) < 1e-7


def test_reused_active_set_is_exact_and_a_changed_one_is_solved():
    case = random_qp(16, seed=7)
    fast(case)
    case.x = [case.x[0] + 1e-4, case.x[1]]  # a small step keeps the active set
    grad, info = fast(case)
    assert info.solver == "active set reused"
    assert relative_error(grad, dense_kkt_hypergrad(case)) < 1e-7
    case.x = [case.x[0] + 3.0 * np.sign(case.x[0]), case.x[1]]  # a large one changes it
    grad, info = fast(case)
    assert info.solver != "active set reused"
    assert relative_error(grad, dense_kkt_hypergrad(case)) < 1e-7


def test_a_wrong_active_set_from_the_solver_is_corrected(monkeypatch):
    """The solver's answer with its largest inequality multiplier dropped: that row looks inactive, the polish
    without it violates it, and the active-set correction brings it back."""
    case = random_qp(30, seed=13)
    real = cbo.qp.solve_qp
    polishes = []

    def wrong(name, P, q, A, b, n_eq, options=None, state=None):
        z, lam, status = real(name, P, q, A, b, n_eq, options, state)
        lam = lam.copy()
        lam[n_eq + np.argmax(lam[n_eq:])] = 0.0
        return z, lam, status

    real_polished = cbo.qp.QPProgram._polished
    monkeypatch.setattr(cbo.qp, "solve_qp", wrong)
    monkeypatch.setattr(cbo.qp.QPProgram, "_polished", lambda self, *a: polishes.append(1) or real_polished(self, *a))
    grad, info = fast(case, warm_start=False)
    assert len(polishes) >= 2 and info.kkt_residual < 1e-10
    assert relative_error(grad, dense_kkt_hypergrad(case)) < 1e-7


def test_matrix_shaped_variable_and_constraint_orders():
    """A 3 x 4 variable and a 3 x 4 constraint: cvxpy's QP rows are Fortran-ordered, cbo's C-ordered."""
    rng = np.random.default_rng(8)
    C = rng.standard_normal((3, 4))
    X, Y, U = cp.Parameter((3, 4)), cp.Variable((3, 4)), cp.Parameter((3, 4))
    inner = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Y - C) + cp.sum(cp.multiply(X, Y))), [Y <= U, cp.sum(Y) == -3])
    target = torch.as_tensor(rng.standard_normal((3, 4)))
    problem = cbo.BilevelProblem(inner, [X, U], [Y], outer=lambda X, U, Y: ((Y - target) ** 2 * torch.arange(1.0, 13.0).reshape(3, 4)).sum())
    x0 = [0.3 * rng.standard_normal((3, 4)), C + np.where(rng.random((3, 4)) < 0.5, -0.5, 0.7)]
    grad, info = cbo.hypergrad(problem, [torch.tensor(v) for v in x0], return_info=True)
    assert info.path == "compiled QP"
    weights = np.arange(1.0, 13.0).reshape(3, 4)

    def F(flat):
        X.value, U.value = flat[:12].reshape(3, 4), flat[12:].reshape(3, 4)
        inner.solve(**SOLVER_OPTIONS)
        return np.array([((Y.value - target.numpy()) ** 2 * weights).sum()])

    reference = central_jacobian(F, np.concatenate([v.ravel() for v in x0]), h=1e-6)[0]
    assert relative_error([g.numpy() for g in grad], [reference]) < 1e-6
    # mu in cbo's order is the constraint's dual_value, C-ordered
    X.value, U.value = x0
    inner.solve(**SOLVER_OPTIONS)
    assert np.allclose(info.mu.numpy(), inner.constraints[0].dual_value.ravel(), atol=1e-7)


def test_parameter_in_the_quadratic_term():
    """min 1/2 sum(c * y^2) - a^T y s.t. y <= 1 with c a (DPP, nonneg) parameter: dF/dc through P."""
    rng = np.random.default_rng(9)
    n = 6
    c, y = cp.Parameter(n, nonneg=True), cp.Variable(n)
    a = rng.random(n) * 3
    inner = cp.Problem(cp.Minimize(0.5 * cp.sum(cp.multiply(c, cp.square(y))) - a @ y), [y <= 1])
    problem = cbo.BilevelProblem(inner, [c], [y], outer=lambda c, y: (y ** 3).sum())
    c0 = 1.0 + 2 * rng.random(n)
    grad, info = cbo.hypergrad(problem, torch.tensor(c0), return_info=True)
    assert info.path == "compiled QP"
    y_star = np.minimum(a / c0, 1.0)  # closed form
    reference = np.where(a / c0 < 1, -3 * y_star ** 2 * a / c0 ** 2, 0.0)
    assert np.allclose(grad.numpy(), reference, rtol=1e-8, atol=1e-10)


def test_weakly_active_point_is_kept_inactive_with_a_warning():
    """y* = clip(x, -1, 1) at x = 1: the bound holds with a zero multiplier; the one-sided derivative
    that keeps it inactive is dy/dx = 1, as on the general route."""
    x, y = cp.Parameter(3), cp.Variable(3)
    problem = cbo.BilevelProblem(cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y <= 1]), [x], [y],
                                 outer=lambda x, y: y.sum())
    point = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    with pytest.warns(cbo.DegenerateKKTWarning, match=r"weakly active"):
        grad, info = cbo.hypergrad(problem, point, return_info=True)
    assert info.path == "compiled QP" and info.active_set.weakly_active.tolist() == [0]
    assert "constraint 0" in info.active_set.labels[0]
    with pytest.warns(cbo.DegenerateKKTWarning):
        general = cbo.hypergrad(problem, point, method="cg")
    for g in (grad, general):
        assert torch.allclose(g, torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64), atol=1e-8)


def test_dependent_active_constraints():
    """The same bound written twice. Clarabel splits the multiplier over both rows: K_S is singular and the
    general route reports the LICQ failure. DAQP's active-set answer puts it on one row: the other one is
    weakly active. Both warn, and both give dy*/dx = diag(0, 1)."""
    x, y = cp.Parameter(2), cp.Variable(2)
    inner = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y[0] <= 0, 2 * y[0] <= 0])
    problem = cbo.BilevelProblem(inner, [x], [y], outer=lambda x, y: y.sum())
    point = torch.tensor([1.0, 0.5], dtype=torch.float64)
    for solver, path in (("CLARABEL", "general"), ("DAQP", "compiled QP")):
        cbo.forget_warm_starts(problem)
        with pytest.warns(cbo.DegenerateKKTWarning):
            grad, info = cbo.hypergrad(problem, point, solver=solver, return_info=True)
        assert info.path == path
        assert torch.allclose(grad, torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-7)


def test_sparse_factorization_of_a_singular_kkt_matrix_hands_over(monkeypatch):
    """The duplicated bound of test_dependent_active_constraints with the sparse factorization forced: the
    refined LDL^T cannot solve the singular K_S, SuperLU finds it singular, and the general route reports it."""
    monkeypatch.setattr(cbo.qp, "DENSE_LIMIT", 0)
    monkeypatch.setattr(cbo.qp, "DENSE_FILL_LIMIT", 0)
    x, y = cp.Parameter(2), cp.Variable(2)
    inner = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y[0] <= 0, 2 * y[0] <= 0])
    problem = cbo.BilevelProblem(inner, [x], [y], outer=lambda x, y: y.sum())
    assert not cbo.compiled.compiled(problem).qp.dense
    with pytest.warns(cbo.DegenerateKKTWarning):
        grad, info = cbo.hypergrad(problem, torch.tensor([1.0, 0.5], dtype=torch.float64), solver="CLARABEL",
                                   return_info=True)
    assert info.path == "general"
    assert torch.allclose(grad, torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-7)


def test_infeasible_inner_problem_raises_on_the_fast_path():
    x, y = cp.Parameter(2), cp.Variable(2)
    inner = cp.Problem(cp.Minimize(cp.sum_squares(y)), [y >= x, y <= 0])
    problem = cbo.BilevelProblem(inner, [x], [y], outer=lambda x, y: y.sum())
    assert cbo.compiled.compiled(problem).qp is not None
    with pytest.raises(cbo.InnerSolveError, match="infeasible"):
        cbo.hypergrad(problem, torch.tensor([1.0, 1.0]))


def test_iterative_methods_keep_the_general_route():
    case = random_qp(12, seed=10)
    grad, info = cbo.hypergrad(case.problem, case.x_tensors, method="minres", return_info=True)
    assert info.path == "general" and info.method == "minres"
    assert relative_error([g.numpy() for g in grad], dense_kkt_hypergrad(case)) < 1e-7


def test_non_qp_problems_are_not_compiled():
    x, y = cp.Parameter(3), cp.Variable(3)
    logistic = cp.Problem(cp.Minimize(cp.sum(cp.logistic(y)) + cp.sum_squares(y - x)))
    problem = cbo.BilevelProblem(logistic, [x], [y])
    compiled = cbo.compiled.compiled(problem)
    assert compiled.qp is None and "quadratic" in compiled.qp_reason


def test_the_compiled_problem_is_shared_and_freed_with_its_problem():
    """BilevelProblem is a description: its compiled QP (compiled at construction) and the warm starts live in
    cbo.compiled, shared by hypergrad and the layer's calls, dropped by forget_warm_starts, and freed with the
    problem (the registry holds it weakly)."""
    import gc
    import weakref

    x, y = cp.Parameter(3), cp.Variable(3)
    inner = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y >= 0])
    problem = cbo.BilevelProblem(inner, [x], [y], outer=lambda x, y: y.sum())
    compiled = cbo.compiled.compiled(problem)
    assert compiled.qp is not None and cbo.compiled.compiled(problem) is compiled
    assert not any(isinstance(value, cbo.compiled.CompiledProblem) for value in vars(problem).values())
    cbo.hypergrad(problem, torch.tensor([1.0, -1.0, 2.0]))
    assert compiled.qp._last_active  # the active set is kept for the next call
    cbo.forget_warm_starts(problem)
    assert not compiled.qp._last_active
    alive = weakref.ref(problem)
    del problem, compiled
    gc.collect()
    assert alive() is None


def test_layer_on_the_fast_path_passes_gradcheck():
    rng = np.random.default_rng(11)
    n, m = 5, 3
    M = rng.standard_normal((n, n))
    P, G = M @ M.T / n + np.eye(n), rng.standard_normal((m, n))
    q, h, y = cp.Parameter(n), cp.Parameter(m), cp.Variable(n)
    layer = cbo.ArgminLayer(cp.Problem(cp.Minimize(0.5 * cp.quad_form(y, P) + q @ y), [G @ y <= h, cp.sum(y) == 1]),
                            [q, h], [y])
    assert layer.fast
    qs = torch.tensor(rng.standard_normal((3, n)), requires_grad=True)
    hs = torch.tensor(0.2 * rng.random(m), requires_grad=True)  # broadcast over the batch
    (out,), info = layer(qs, hs, return_info=True)
    assert info.path == "compiled QP" and len(info.solvers) == 3
    assert torch.autograd.gradcheck(lambda a, b: layer(a, b)[0], (qs, hs), eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------- options

def test_options_object_and_keywords():
    case = random_qp(10, seed=12)
    options = cbo.Options(method="minres", tol=1e-12)
    _, info = cbo.hypergrad(case.problem, case.x_tensors, options=options, return_info=True)
    assert info.method == "minres" and info.linear_solve.tol == 1e-12
    _, info = cbo.hypergrad(case.problem, case.x_tensors, "cg", options=options, tol=1e-9, return_info=True)
    assert info.method == "cg" and info.linear_solve.tol == 1e-9  # keywords override the object
    with pytest.raises(TypeError, match="Unknown setting.*tolerance.*Settings are the fields of cbo.Options"):
        cbo.hypergrad(case.problem, case.x_tensors, tolerance=1e-9)
    with pytest.raises(ValueError, match="on_nonconvergence"):
        cbo.Options(on_nonconvergence="ignore")


def test_an_option_the_route_cannot_honour_warns():
    x, y, t = cp.Parameter(3), cp.Variable(3), cp.Variable()
    socp = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [cp.SOC(t, y), t <= 1])
    problem = cbo.BilevelProblem(socp, [x], [y], outer=lambda x, y: y.sum())
    assert problem.route == "conic"
    with pytest.warns(cbo.OptionIgnoredWarning, match="solver='OSQP' ignored: the conic route"):
        cbo.hypergrad(problem, torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64), solver="OSQP")
    with pytest.warns(cbo.OptionIgnoredWarning, match="active_tol"):
        cbo.ArgminLayer(socp, [x], [y], active_tol=1e-4)


def test_daqp_kept_model_without_constraint_rows():
    """DAQP's model update fails on empty bounds: a QP without rows is solved afresh each time (no state)."""
    from cbo.qp_solvers import solve_qp

    state = {}
    for q in (np.array([1.0, -2.0]), np.array([3.0, 0.5])):
        z, lam, status = solve_qp("DAQP", np.eye(2), q, np.zeros((0, 2)), np.zeros(0), 0, None, state)
        assert status == cp.OPTIMAL and np.allclose(z, -q) and lam.size == 0


def test_failed_try_of_the_kept_active_set_is_skipped_once():
    """After the kept active set failed at a far x, the next call goes to the solver directly; the try resumes
    once the solver's active set is the kept one again. Gradients match the general route throughout."""
    rng = np.random.default_rng(4)
    n = 6
    x, y = cp.Parameter(n), cp.Variable(n)
    G = rng.standard_normal((4, n))
    inner = cp.Problem(cp.Minimize(cp.sum_squares(y) + x @ y), [G @ y <= 0.5])
    problem = cbo.BilevelProblem(inner, [x], [y], outer=lambda x, y: (y ** 2).sum() + y[0])
    program = cbo.compiled.compiled(problem).qp
    points = [torch.as_tensor(3 * rng.standard_normal(n)) for _ in range(6)]
    tried = []
    for k, value in enumerate([points[0], points[1], points[1] + 1e-4, points[1] + 2e-4, points[2]]):
        tried.append(program._try_kept_set.get(0, True))
        g, info = cbo.hypergrad(problem, value, return_info=True)
        reference = cbo.hypergrad(problem, value, method="cg", tol=1e-12)
        assert torch.allclose(g, reference, rtol=1e-7, atol=1e-9), k
    # call 1 (a far x) tried the kept set and failed -> call 2 skips the try; its solver kept the active set
    # (a tiny step) -> call 3 tries again and reuses it
    assert tried[1] and not tried[2] and tried[3]
