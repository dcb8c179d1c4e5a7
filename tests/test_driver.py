"""cbo.minimize: reaches independently computed optima, projects onto outer constraints, reports failures."""
import subprocess
import sys
import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import cbo
from cbo.projection import OuterProjection

N, RIDGE = 6, 0.5


def hyperplane_problem(seed=0):
    """Inner: y*(x) = argmin 1/2||y - x||^2 s.t. sum(y) == 1, y >= -10 (inactive), i.e. y* = P x + 1/n.
    Outer: F = 1/2||y - t||^2 + r/2||x||^2, a strongly convex quadratic in x."""
    rng = np.random.default_rng(seed)
    t = rng.standard_normal(N)
    x, y = cp.Parameter(N), cp.Variable(N)
    inner = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - x)), [cp.sum(y) == 1, y >= -10])
    t_torch = torch.tensor(t)
    problem = cbo.BilevelProblem(
        inner, [x], [y], outer=lambda x, y: 0.5 * ((y - t_torch) ** 2).sum() + 0.5 * RIDGE * (x ** 2).sum())
    return problem, x, t


def reference_optimum(t, lower=None):
    """The outer problem written out in cvxpy (y* = P x + 1/n eliminated): an independent reference."""
    P = np.eye(N) - np.ones((N, N)) / N
    z = cp.Variable(N)
    objective = 0.5 * cp.sum_squares(P @ z + 1 / N - t) + 0.5 * RIDGE * cp.sum_squares(z)
    cp.Problem(cp.Minimize(objective), [] if lower is None else [z >= lower]).solve(
        solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    return z.value


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.5), ("adam", 0.05), ("lbfgs", 1.0)])
def test_reaches_the_unconstrained_optimum(optimizer, lr):
    problem, _, t = hyperplane_problem()
    result = cbo.minimize(problem, torch.zeros(N), optimizer=optimizer, lr=lr, steps=500, tol=1e-8, progress=False)
    assert result.converged, result.message
    np.testing.assert_allclose(result.x.numpy(), reference_optimum(t), atol=1e-6)
    assert len(result.history) == result.n_steps + 1 or optimizer == "lbfgs"
    assert result.fun == pytest.approx(result.history.f[-1])


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.5), ("adam", 0.05)])
def test_reaches_the_optimum_on_outer_constraints(optimizer, lr):
    problem, x, t = hyperplane_problem()
    lower = np.full(N, 0.1)
    expected = reference_optimum(t, lower)
    assert np.sum(expected <= lower + 1e-8) >= 2, "the bound should be active at the optimum for this test"
    result = cbo.minimize(problem, torch.ones(N), optimizer=optimizer, lr=lr, steps=800, tol=1e-8,
                          outer_constraints=[x >= lower], progress=False)
    assert result.converged, result.message
    np.testing.assert_allclose(result.x.numpy(), expected, atol=1e-6)
    assert all(bool((xk[0] >= torch.tensor(lower) - 1e-9).all()) for xk in result.history.x)


def reference_on(t, constraints):
    """The outer problem written out in cvxpy (y* = P x + 1/n eliminated) on the constraints(z)."""
    P = np.eye(N) - np.ones((N, N)) / N
    z = cp.Variable(N)
    objective = 0.5 * cp.sum_squares(P @ z + 1 / N - t) + 0.5 * RIDGE * cp.sum_squares(z)
    cp.Problem(cp.Minimize(objective), constraints(z)).solve(
        solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    return z.value


@pytest.mark.parametrize("constraints, chosen", [
    (lambda z: [], "lbfgsb"),
    (lambda z: [z >= 0.1, z <= 2.0], "lbfgsb"),
    (lambda z: [z >= 0, cp.sum(z) == 1], "spg"),
    (lambda z: [z <= 0.5, cp.sum(z) == 2], "spg"),
], ids=["free", "box", "simplex", "capped-budget"])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_default_optimizer_reaches_the_optimum_whatever_the_scale(constraints, chosen, scale):
    """optimizer='auto' (L-BFGS-B on bounds, SPG otherwise) with its default steps converges on F and on
    1000 F alike (tol scaled with F: it bounds the projected gradient)."""
    problem, x, t = hyperplane_problem()
    scaled = cbo.BilevelProblem(problem.inner, [x], problem.variables, outer=lambda x, y: scale * problem.outer(x, y))
    result = cbo.minimize(scaled, torch.ones(N), outer_constraints=constraints(x), tol=1e-10 * scale, progress=False)
    assert result.optimizer == chosen and result.converged, result.message
    np.testing.assert_allclose(result.x.numpy(), reference_on(t, constraints), atol=1e-6)
    assert result.n_steps <= 30 and len(result.history) <= 60


def henderson_quandt():
    """Henderson and Quandt (1958) as in BOLIB: F = x(0.5(x + y) - 95), y*(x) = argmin_{y >= 0} y^2 + (0.5x - 100)y,
    0 <= x <= 200; published optimum x = 93.33, y = 26.67, F = -3266.67."""
    x, y = cp.Parameter(), cp.Variable()
    inner = cp.Problem(cp.Minimize(cp.square(y) + (0.5 * x - 100) * y), [y >= 0])
    return cbo.BilevelProblem(inner, [x], [y], outer=lambda x, y: x * (0.5 * (x + y) - 95)), [x >= 0, x <= 200]


@pytest.mark.parametrize("box", [True, False], ids=["lbfgsb", "spg"])
def test_default_optimizer_solves_henderson_quandt_from_the_standard_start(box):
    """Projected Adam with lr = 1e-2 (the former default) stopped at x = 12.98, F = -845 after 300 steps."""
    problem, constraints = henderson_quandt()
    x = problem.parameters[0]
    if not box:
        constraints = [cp.abs(x - 100) <= 100]  # the same interval, not written as bounds
    result = cbo.minimize(problem, torch.tensor(10.0, dtype=torch.float64), outer_constraints=constraints,
                          progress=False)
    assert result.optimizer == ("lbfgsb" if box else "spg") and result.converged, result.message
    assert result.fun == pytest.approx(-9800 / 3, rel=1e-8) and float(result.x) == pytest.approx(280 / 3, rel=1e-8)
    assert result.n_steps <= 10


def kinked_problem():
    """y*(x) = max(x, 0) (the projection of x onto y >= 0), F = 2 y* - x = |x|: the minimum x = 0 is a kink,
    where the inner constraint switches from active to inactive."""
    x, y = cp.Parameter(1), cp.Variable(1)
    inner = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y >= 0])
    return cbo.BilevelProblem(inner, [x], [y], outer=lambda x, y: 2 * y.sum() - x.sum()), x


@pytest.mark.parametrize("constraints", [lambda x: [], lambda x: [cp.norm(x, 2) <= 5]], ids=["lbfgsb", "spg"])
def test_a_kink_at_the_solution_ends_the_line_search_with_a_reason(constraints):
    """No iterate can reach tol (|dF/dx| = 1 on both sides); the loop stops early and says why."""
    problem, x = kinked_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cbo.DegenerateKKTWarning)
        result = cbo.minimize(problem, torch.tensor([1.3], dtype=torch.float64), outer_constraints=constraints(x),
                              steps=100, progress=False)
    assert not result.converged and "not differentiable" in result.message
    assert result.n_steps < 100 and abs(float(result.x)) < 1e-8 and result.fun < 1e-8


def test_line_search_optimizers_refuse_a_step_size_and_lbfgsb_a_non_box():
    problem, x, _ = hyperplane_problem()
    with pytest.raises(ValueError, match="line search.*optimizer='adam'"):
        cbo.minimize(problem, torch.zeros(N), lr=0.1, progress=False)
    with pytest.raises(ValueError, match="optimizer='spg'"):
        cbo.minimize(problem, torch.zeros(N), optimizer="lbfgsb", outer_constraints=[cp.sum(x) == 1], progress=False)


def test_line_search_callback_sees_every_evaluation_and_can_stop():
    problem, x, _ = hyperplane_problem()
    for optimizer in ("lbfgsb", "spg"):
        seen = []
        result = cbo.minimize(problem, torch.ones(N), optimizer=optimizer, outer_constraints=[x >= 0.1], progress=False,
                              callback=lambda step, x, f, grad, info: seen.append(f) or step == 3)
        assert seen == result.history.f and len(seen) == 4 and "callback" in result.message
        assert result.fun == seen[-1] and not result.converged


def simplex_projection(v):
    """Euclidean projection onto the probability simplex by sorting (Held, Wolfe and Crowder)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1
    k = np.nonzero(u - css / np.arange(1, len(v) + 1) > 0)[0][-1]
    return np.maximum(v - css[k] / (k + 1), 0)


def test_adam_with_a_decaying_step_settles_on_the_constrained_optimum():
    """Constant-step Adam hovers near a bound; with lr_decay it converges. history.best() is the best point."""
    problem, x, t = hyperplane_problem()
    lower = np.full(N, 0.1)
    expected = reference_optimum(t, lower)
    result = cbo.minimize(problem, torch.ones(N), optimizer="adam", lr=0.05, lr_decay=0.05, steps=600,
                          outer_constraints=[x >= lower], progress=False)
    np.testing.assert_allclose(result.x.numpy(), expected, atol=1e-4)
    step, f, x_best = result.history.best()
    assert f == min(result.history.f) and torch.equal(x_best[0], result.history.x[step][0])


def test_projection_at_and_near_bounds():
    """Points of C come back unchanged (no solve); points just outside land on the bound exactly."""
    s = cp.Parameter(3)
    box = OuterProjection([s], [s >= -1, s <= 1])
    on_bound = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    assert torch.equal(box([on_bound])[0], on_bound)
    np.testing.assert_array_equal(box([torch.tensor([-1.5, 0.0, 1 + 1e-7], dtype=torch.float64)])[0].numpy(),
                                  [-1.0, 0.0, 1.0])


@pytest.mark.parametrize("constraints", [
    lambda s: [s >= 0, s <= 0.3, cp.sum(s) == 1.2],        # a box with a budget
    lambda s: [cp.sum(s) == -2.0],                        # a hyperplane
    lambda s: [s <= np.linspace(0, 1, N), cp.sum(s) == 0.5],  # upper bounds only
])
def test_box_and_sum_projection_matches_cvxpy(constraints):
    """The shifted-clip projection (no solver) against cvxpy solving the projection problem."""
    s = cp.Parameter(N)
    projection = OuterProjection([s], constraints(s))
    assert projection._box_and_sum is not None
    rng = np.random.default_rng(3)
    for _ in range(3):
        v = 2 * rng.standard_normal(N)
        z = cp.Variable(N)
        cp.Problem(cp.Minimize(cp.sum_squares(z - v)), constraints(z)).solve(
            solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
        np.testing.assert_allclose(projection([torch.tensor(v)])[0].numpy(), z.value, atol=1e-7)


def test_projection_matches_closed_forms():
    x = cp.Parameter(N)
    rng = np.random.default_rng(1)
    simplex = OuterProjection([x], [x >= 0, cp.sum(x) == 1])
    ball = OuterProjection([x], [cp.norm(x, 2) <= 2.0])
    for _ in range(3):
        v = 2 * rng.standard_normal(N)
        np.testing.assert_allclose(simplex([torch.tensor(v)])[0].numpy(), simplex_projection(v), atol=1e-9)
        np.testing.assert_allclose(ball([torch.tensor(v)])[0].numpy(), v * min(1, 2.0 / np.linalg.norm(v)), atol=1e-8)


def test_nonneg_parameters_are_kept_nonnegative():
    """A nonneg=True parameter is projected onto x >= 0 without being told (cvxpy would reject x < 0)."""
    w, y = cp.Parameter(3, nonneg=True), cp.Variable(3)
    inner = cp.Problem(cp.Minimize(cp.sum_squares(y - 1) + w @ cp.square(y)))  # y* = 1 / (1 + w)
    problem = cbo.BilevelProblem(inner, [w], [y], outer=lambda w, y: ((y - torch.tensor([0.5, 1.0, 2.0])) ** 2).sum())
    result = cbo.minimize(problem, torch.ones(3), optimizer="sgd", lr=0.5, steps=200, tol=1e-9, progress=False)
    # y* = 1/(1+w) in (0, 1]: the targets 1 and 2 need w = 0 (a bound), the target 0.5 needs w = 1.
    np.testing.assert_allclose(result.x.numpy(), [1.0, 0.0, 0.0], atol=1e-6)
    assert result.converged and min(float(xk[0].min()) for xk in result.history.x) >= 0


def test_several_parameters_and_float32():
    rng = np.random.default_rng(2)
    a, b, y = cp.Parameter(3), cp.Parameter(3), cp.Variable(3)
    inner = cp.Problem(cp.Minimize(cp.sum_squares(y - a - b)), [y <= 5])
    problem = cbo.BilevelProblem(inner, [a, b], [y], outer=lambda a, b, y: ((y - 1) ** 2).sum() + (a ** 2).sum())
    x0 = [torch.tensor(rng.standard_normal(3), dtype=torch.float32), torch.zeros(3, dtype=torch.float32)]
    result = cbo.minimize(problem, x0, optimizer="lbfgs", steps=50, progress=False)
    assert isinstance(result.x, list) and all(v.dtype == torch.float32 for v in result.x)
    # F = ||a + b - 1||^2 + ||a||^2 is minimal at a = 0, b = 1.
    np.testing.assert_allclose(result.x[0].numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(result.x[1].numpy(), 1, atol=1e-5)


def test_warm_start_gives_the_same_iterates():
    problem, x, _ = hyperplane_problem(seed=3)
    runs = [cbo.minimize(problem, torch.zeros(N), optimizer="adam", lr=0.05, steps=15, warm_start=warm,
                         solver="OSQP", solver_options={"eps_abs": 1e-10, "eps_rel": 1e-10, "max_iter": 100000},
                         outer_constraints=[x >= 0.05], progress=False)
            for warm in (True, False)]
    np.testing.assert_allclose(runs[0].history.f, runs[1].history.f, rtol=1e-8)
    np.testing.assert_allclose(runs[0].x.numpy(), runs[1].x.numpy(), atol=1e-7)


def test_callback_history_plot_and_progress(tmp_path, capsys):
    problem, _, _ = hyperplane_problem()
    seen = []

    def callback(step, x, f, grad, info):
        seen.append((step, f, info.kkt_residual))
        return step == 4

    result = cbo.minimize(problem, torch.zeros(N), optimizer="sgd", lr=0.1, steps=50, callback=callback)
    assert [s for s, _, _ in seen] == [0, 1, 2, 3, 4] and result.n_steps == 4 and not result.converged
    assert "callback" in result.message
    history = result.history
    assert len(history.f) == len(history.grad_norm) == len(history.stationarity) == len(history.timings) == 5
    assert all(b < a for a, b in zip(history.f, history.f[1:])), "sgd with a small step decreases F"
    assert {"inner_solve", "adjoint_solve", "projection", "total"} <= set(history.timings[0])
    assert "cbo.minimize" in capsys.readouterr().err
    path = tmp_path / "history.png"
    cbo.plot_history(history, path=str(path), title="test")
    assert path.stat().st_size > 10_000


def test_matplotlib_is_imported_only_to_plot():
    """``import cbo`` and a run leave matplotlib unimported; without matplotlib plot_history says what to install."""
    script = (
        "import sys, torch, cbo\n"
        "assert 'matplotlib' not in sys.modules\n"
        "assert cbo.driver.plot_history is cbo.plot_history and cbo.driver.OuterProjection is not None\n"
        "sys.modules['matplotlib'] = None  # as if it were not installed\n"
        "try:\n"
        "    cbo.plot_history(cbo.History())\n"
        "except ImportError as err:\n"
        "    assert 'pip install matplotlib' in str(err), err\n"
        "else:\n"
        "    raise AssertionError('plot_history ran without matplotlib')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_repeated_warnings_are_shown_once_and_recorded():
    x, y = cp.Parameter(2), cp.Variable(2)
    inner = cp.Problem(cp.Minimize(x @ y), [y >= 0, y <= 1])  # an LP: cbo warns at every hypergradient
    problem = cbo.BilevelProblem(inner, [x], [y], outer=lambda x, y: (x ** 2).sum())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = cbo.minimize(problem, torch.ones(2), optimizer="sgd", lr=0.1, steps=3, tol=-1.0, progress=False)
    shown = [w for w in caught if issubclass(w.category, cbo.DegenerateKKTWarning)]
    assert len(shown) == 1 and "linear program" in str(shown[0].message)
    assert shown[0].filename == __file__, "the warning points at the caller's line"
    assert len([w for w in result.history.warnings if w[1] == "DegenerateKKTWarning"]) == 4


# ---------------------------------------------------------------- bad input

def test_bad_outer_constraints_are_named():
    problem, x, _ = hyperplane_problem()
    other, z = cp.Parameter(N), cp.Variable(N)
    cases = [
        ([x >= 1, cp.sum(x) <= 0], "infeasible"),
        ([x >= 1, x <= 0], "infeasible"),
        ([x + z >= 0], "variable"),
        ([other >= 0], "none of the problem's parameters"),
        ([cp.square(x) >= 1], "not convex"),
    ]
    for constraints, text in cases:
        with pytest.raises(cbo.ProblemDefinitionError, match=text):
            cbo.minimize(problem, torch.zeros(N), outer_constraints=constraints, progress=False)
    with pytest.raises(ValueError, match="lbfgs"):
        cbo.minimize(problem, torch.zeros(N), optimizer="lbfgs", outer_constraints=[x >= 0], progress=False)
    w, y = cp.Parameter(2, nonneg=True), cp.Variable(2)
    signed = cbo.BilevelProblem(cp.Problem(cp.Minimize(cp.sum_squares(y - w))), [w], [y], outer=lambda w, y: y.sum())
    with pytest.raises(ValueError, match="lbfgs.*nonneg=True"):
        cbo.minimize(signed, torch.ones(2), optimizer="lbfgs", progress=False)
    with pytest.raises(ValueError, match="Known optimizers"):
        cbo.minimize(problem, torch.zeros(N), optimizer="newton", progress=False)
    with pytest.raises(ValueError, match="shape"):
        cbo.minimize(problem, torch.zeros(N + 1), progress=False)


def test_a_diverging_step_size_is_reported_not_nan():
    problem, _, _ = hyperplane_problem()
    with pytest.raises(cbo.DivergenceError, match=r"diverged at step \d+.*lower lr") as err:
        cbo.minimize(problem, torch.ones(N), optimizer="sgd", lr=50.0, steps=200, progress=False)
    assert all(np.isfinite(err.value.history.f))


def test_inner_problem_infeasible_at_an_iterate_names_step_and_x():
    x, y = cp.Parameter(2), cp.Variable(2)
    inner = cp.Problem(cp.Minimize(cp.sum_squares(y)), [y >= x, y <= 1])  # infeasible once x > 1
    problem = cbo.BilevelProblem(inner, [x], [y], outer=lambda x, y: -x.sum() + 0.0 * y.sum())
    with pytest.raises(cbo.InnerSolveError, match=r"outer step 4, x = \{param\d+ = \[1\.2, 1\.2\]\}.*infeasible") as caught:
        cbo.minimize(problem, torch.zeros(2), optimizer="sgd", lr=0.3, steps=10, progress=False)
    assert len(caught.value.history) == 4  # the iterates before the failing one


def test_non_differentiable_iterate_names_step_and_keeps_the_history():
    """y* = projection of (3, 4) onto the disk of radius r: at r = 5 the SOC is weakly active. Gradient steps
    on F = -sum(y*) (dF/dr = -7/5 below 5) from r = 4.3 reach it after sgd steps of 0.5 * 1.4 = 0.7."""
    r, y = cp.Parameter(), cp.Variable(2)
    inner = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - np.array([3.0, 4.0]))), [cp.SOC(r, y)])
    problem = cbo.BilevelProblem(inner, [r], [y], outer=lambda r, y: -y.sum())
    with pytest.raises(cbo.StrictComplementarityError, match=r"outer step 1, x = \{param\d+ = 5\.0*\}.*SOC constraint 0"
                       r".*lower lr") as caught:
        cbo.minimize(problem, torch.tensor(4.3, dtype=torch.float64), optimizer="sgd", lr=0.5, steps=5,
                     progress=False)
    assert len(caught.value.history) == 1


def test_a_trial_point_where_F_is_undefined_shrinks_the_step():
    """F = (y - 2)^2 + 1e-3 log(3 - y) with y*(x) = x is undefined (NaN) for x >= 3. From x = -2.5 the first
    trial step of L-BFGS-B lands at 6.5: the default optimizer must treat that point as a failed trial (SPG's
    line search shrinks the step) and reach the minimizer, found here by a root bracket on dF/dx = 0."""
    import scipy.optimize

    x, y = cp.Parameter(1), cp.Variable(1)
    inner = cp.Problem(cp.Minimize(cp.sum_squares(y - x)))
    problem = cbo.BilevelProblem(inner, [x], [y], outer=lambda x, y: ((y - 2) ** 2 + 1e-3 * torch.log(3 - y)).sum())
    result = cbo.minimize(problem, torch.tensor([-2.5], dtype=torch.float64), outer_constraints=[x >= -100, x <= 100],
                          progress=False)
    root = scipy.optimize.brentq(lambda t: 2 * (t - 2) - 1e-3 / (3 - t), 1.0, 2.999)
    assert result.converged, result.message
    assert abs(float(result.x[0]) - root) < 1e-6
