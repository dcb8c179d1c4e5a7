"""cbo.ArgminLayer against cvxpylayers, torch.autograd.gradcheck and per-item hypergrad calls."""
import dataclasses
import os
import pickle

import cvxpy as cp
import numpy as np
import pytest
import torch
from cvxpylayers.torch import CvxpyLayer

import cbo

# cvxpylayers is accurate to ~1e-6 only with Clarabel at tight tolerances (its
# default backend is off by up to 1e-4 on these problems).
CVXPYLAYERS_ARGS = dict(solve_method="Clarabel", tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def qp(rng, n=8, m=5, p=2):
    """min 1/2 y^T P y + q^T y  s.t.  G y <= h,  C y == d; parameters q and h."""
    M = rng.standard_normal((n, n))
    P = M @ M.T / n + np.eye(n)
    G, C, d = rng.standard_normal((m, n)), rng.standard_normal((p, n)), rng.standard_normal(p)
    q, h, y = cp.Parameter(n), cp.Parameter(m), cp.Variable(n)
    problem = cp.Problem(cp.Minimize(0.5 * cp.quad_form(y, P) + q @ y), [G @ y <= h, C @ y == d])
    inputs = [torch.tensor(rng.standard_normal((4, n))), torch.tensor(0.3 * rng.random(m))]
    return problem, [q, h], [y], inputs


def constrained_least_squares(rng, n=6, k=10):
    """min ||A y - b||^2  s.t.  y >= 0,  sum(y) == 1; parameters A and b."""
    A, b, y = cp.Parameter((k, n)), cp.Parameter(k), cp.Variable(n)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(A @ y - b)), [y >= 0, cp.sum(y) == 1])
    inputs = [torch.tensor(rng.standard_normal((3, k, n))), torch.tensor(rng.standard_normal((3, k)))]
    return problem, [A, b], [y], inputs


def logistic_norm_ball(rng, n=5, samples=20):
    """min sum logistic(-l * (X y)) + 0.1 ||y||^2  s.t.  ||y||_2 <= r; parameters X and r."""
    labels = np.sign(rng.standard_normal(samples))
    X, r, y = cp.Parameter((samples, n)), cp.Parameter(nonneg=True), cp.Variable(n)
    loss = cp.sum(cp.logistic(-cp.multiply(labels, X @ y))) + 0.1 * cp.sum_squares(y)
    problem = cp.Problem(cp.Minimize(loss), [cp.norm(y, 2) <= r])
    features = rng.standard_normal((2, samples, n)) + 0.5 * labels[None, :, None]
    inputs = [torch.tensor(features), torch.tensor([0.5, 0.8], dtype=torch.float64)]
    return problem, [X, r], [y], inputs


PROBLEMS = {"qp": qp, "least_squares": constrained_least_squares, "logistic_ball": logistic_norm_ball}


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_layer_agrees_with_cvxpylayers(rng, name):
    problem, params, variables, inputs = PROBLEMS[name](rng)
    assert problem.is_dpp()
    inputs = [t.requires_grad_(True) for t in inputs]
    layer = cbo.ArgminLayer(problem, params, variables, n_workers=1)
    reference = CvxpyLayer(problem, parameters=params, variables=variables)
    (y,), (y_ref,) = layer(*inputs), reference(*inputs, solver_args=CVXPYLAYERS_ARGS)
    assert rel(y, y_ref) <= 1e-5
    weights = torch.tensor(rng.standard_normal(tuple(y.shape)))
    grads = torch.autograd.grad((y * weights).sum(), inputs)
    grads_ref = torch.autograd.grad((y_ref * weights).sum(), inputs)
    for g, g_ref in zip(grads, grads_ref):
        assert rel(g, g_ref) <= 1e-5


@pytest.mark.parametrize("name", ["qp", "logistic_ball"])
def test_gradcheck(rng, name):
    problem, params, variables, inputs = PROBLEMS[name](rng)
    layer = cbo.ArgminLayer(problem, params, variables, n_workers=1)
    inputs = [t[:2].clone().requires_grad_(True) if t.dim() > len(p.shape) else t.clone().requires_grad_(True)
              for t, p in zip(inputs, params)]
    assert torch.autograd.gradcheck(lambda *a: layer(*a)[0], inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", cbo.ADJOINT_METHODS)
def test_every_method_matches_hypergrad_item_by_item(rng, method):
    """The batched backward equals one cbo.hypergrad call per item (outer F = w . y)."""
    problem, params, variables, inputs = qp(rng)
    layer = cbo.ArgminLayer(problem, params, variables, method=method, n_workers=1)
    q, h = inputs[0].clone().requires_grad_(True), inputs[1].clone().requires_grad_(True)
    weights = torch.tensor(rng.standard_normal((4, 8)))
    (y,) = layer(q, h)
    gq, gh = torch.autograd.grad((y * weights).sum(), [q, h])
    expected_h = torch.zeros_like(h)
    for b in range(4):
        single = cbo.BilevelProblem(problem, params, variables, outer=lambda q_, h_, y_, w=weights[b]: (y_ * w).sum())
        g_q, g_h = cbo.hypergrad(single, [q[b].detach(), h.detach()], method="direct")
        assert rel(gq[b], g_q) <= 1e-6
        expected_h += g_h
    assert rel(gh, expected_h) <= 1e-6  # h is broadcast: its gradient sums over the batch


def test_several_batch_dimensions_and_outputs(rng):
    n = 4
    a, y, z = cp.Parameter(n), cp.Variable(n), cp.Variable(n)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(y - a) + cp.sum_squares(z - 2 * a)), [cp.sum(y) == 1, z <= 1])
    layer = cbo.ArgminLayer(problem, [a], [z, y], n_workers=1)
    values = torch.tensor(rng.standard_normal((2, 3, n)))
    z_out, y_out = layer(values)
    assert z_out.shape == (2, 3, n) and y_out.shape == (2, 3, n)
    expected_y = values - (values.sum(-1, keepdim=True) - 1) / n  # projection on sum(y) = 1
    assert torch.allclose(y_out, expected_y, atol=1e-9)
    assert torch.allclose(z_out, torch.clamp(2 * values, max=1), atol=1e-9)


def test_inside_a_training_loop(rng):
    """Gradients reach the parameters of the layers before it; the loss goes down."""
    problem, params, variables, _ = qp(rng)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8, dtype=torch.float64))
    layer = cbo.ArgminLayer(problem, params, variables, n_workers=1)
    h = torch.full((5,), 0.3, dtype=torch.float64)
    features = torch.tensor(rng.standard_normal((6, 3)))
    target = torch.tensor(rng.standard_normal((6, 8))) * 0.1
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        (y,) = layer(model(features), h)
        loss = ((y - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        assert model[0].weight.grad is not None and torch.isfinite(model[0].weight.grad).all()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_info_per_item(rng):
    problem, params, variables, inputs = qp(rng)
    layer = cbo.ArgminLayer(problem, params, variables, n_workers=1)
    q = inputs[0].clone().requires_grad_(True)
    (y,), info = layer(q, inputs[1], return_info=True)
    assert info.batch_shape == (4,) and len(info.active_sets) == 4 and len(info.kkt_residual) == 4
    assert all(status == "optimal" for status in info.solver_status)
    assert max(info.kkt_residual) < 1e-10
    y.sum().backward()
    assert info.linear_solve.converged and "adjoint_solve" in info.timings


def test_float32_inputs_give_float32_outputs_and_grads(rng):
    problem, params, variables, inputs = qp(rng)
    layer = cbo.ArgminLayer(problem, params, variables, n_workers=1)
    q = inputs[0].float().requires_grad_(True)
    (y,) = layer(q, inputs[1].float())
    y.sum().backward()
    assert y.dtype == torch.float32 and q.grad.dtype == torch.float32


@pytest.mark.parametrize("to_input", [lambda t: t.round().long(), lambda t: t.round().int(),
                                      lambda t: t.round().long().numpy(), lambda t: t > 0])
def test_integer_and_bool_inputs_give_float64_outputs(rng, to_input):
    problem, params, variables, inputs = qp(rng)
    layer = cbo.ArgminLayer(problem, params, variables, n_workers=1)
    q = to_input(3 * inputs[0])
    (y,) = layer(q, inputs[1])
    (y_ref,) = layer(torch.as_tensor(np.asarray(q), dtype=torch.float64), inputs[1])
    assert y.dtype == torch.float64 and torch.allclose(y, y_ref, atol=1e-12)


def test_init_documents_its_own_parameters():
    import inspect

    doc = inspect.getdoc(cbo.ArgminLayer.__init__)
    assert "solver_args" in doc and "parameters : sequence of cvxpy.Parameter" in doc
    assert "Initialize internal Module state" not in doc
    assert list(inspect.signature(cbo.ArgminLayer.__init__).parameters)[1:4] == ["inner", "parameters", "variables"]


# ---------------------------------------------------------------- parallel forward

def test_worker_pool_matches_in_process(rng):
    problem, params, variables, inputs = qp(rng)
    in_process = cbo.ArgminLayer(problem, params, variables, n_workers=1)
    pooled = cbo.ArgminLayer(problem, params, variables, n_workers=2)
    try:
        assert torch.allclose(pooled(*inputs)[0], in_process(*inputs)[0], atol=1e-10)
    finally:
        pooled.close()


class _ExitOnUnpickle:
    """Unpickling this kills the process: a worker that dies mid-batch."""

    def __reduce__(self):
        return (os._exit, (13,))


def test_dead_worker_is_reported_and_the_next_call_works(rng):
    problem, params, variables, inputs = qp(rng)
    layer = cbo.ArgminLayer(problem, params, variables, n_workers=2)
    try:
        good_task = layer.batch_solver._task
        layer.batch_solver._task = dataclasses.replace(good_task, key="dies", blob=pickle.dumps(_ExitOnUnpickle()))
        with pytest.raises(cbo.InnerSolveError, match=r"worker process died while solving batch items \[0, 1"):
            layer(*inputs)
        layer.batch_solver._task = good_task
        (y,) = layer(*inputs)
        assert torch.isfinite(y).all()
    finally:
        layer.close()


def test_dask_executor(rng):
    distributed = pytest.importorskip("distributed")
    problem, params, variables, inputs = qp(rng)
    expected = cbo.ArgminLayer(problem, params, variables, n_workers=1)(*inputs)[0]
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        layer = cbo.ArgminLayer(problem, params, variables, executor=client.get_executor())
        q = inputs[0].clone().requires_grad_(True)
        (y,) = layer(q, inputs[1])
        y.sum().backward()
    assert torch.allclose(y, expected, atol=1e-10) and torch.isfinite(q.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(rng):
    problem, params, variables, inputs = qp(rng)
    layer = cbo.ArgminLayer(problem, params, variables, n_workers=1)
    q_cpu = inputs[0].clone().requires_grad_(True)
    q_gpu = inputs[0].cuda().requires_grad_(True)
    (y_cpu,), (y_gpu,) = layer(q_cpu, inputs[1]), layer(q_gpu, inputs[1].cuda())
    y_cpu.sum().backward()
    y_gpu.sum().backward()
    assert y_gpu.device.type == "cuda" and q_gpu.grad.device.type == "cuda"
    assert torch.allclose(y_gpu.cpu(), y_cpu, atol=1e-9) and torch.allclose(q_gpu.grad.cpu(), q_cpu.grad, atol=1e-8)


# ---------------------------------------------------------------- bad input

def test_batch_shapes_that_do_not_broadcast(rng):
    problem, params, variables, inputs = qp(rng)
    layer = cbo.ArgminLayer(problem, params, variables, n_workers=1)
    with pytest.raises(ValueError, match="do not broadcast"):
        layer(inputs[0], torch.zeros(3, 5, dtype=torch.float64))


def test_wrong_trailing_shape(rng):
    problem, params, variables, inputs = qp(rng)
    layer = cbo.ArgminLayer(problem, params, variables, n_workers=1)
    with pytest.raises(ValueError, match=r"expected \(8,\)"):
        layer(torch.zeros(4, 7, dtype=torch.float64), inputs[1])


@pytest.mark.parametrize("n_workers", [1, 2])
def test_infeasible_item_is_named(rng, n_workers):
    n = 3
    a, b, y = cp.Parameter(n), cp.Parameter(), cp.Variable(n)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(y - a)), [y >= 0, cp.sum(y) <= b])
    layer = cbo.ArgminLayer(problem, [a, b], [y], n_workers=n_workers)
    try:
        with pytest.raises(cbo.InnerSolveError, match="batch item 2: .*infeasible"):
            layer(torch.zeros(4, n, dtype=torch.float64), torch.tensor([1.0, 1.0, -1.0, 1.0], dtype=torch.float64))
    finally:
        layer.close()


def test_nan_input(rng):
    problem, params, variables, inputs = qp(rng)
    layer = cbo.ArgminLayer(problem, params, variables, n_workers=1)
    bad = inputs[0].clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        layer(bad, inputs[1])


def test_items_warm_start_from_their_own_previous_solution(rng):
    """With OSQP each item keeps its own solver state; warm results equal Clarabel's."""
    problem, params, variables, inputs = qp(rng)
    osqp = cbo.ArgminLayer(problem, params, variables, n_workers=1, solver="OSQP",
                           solver_options=dict(eps_abs=1e-10, eps_rel=1e-10, max_iter=100000))
    clarabel = cbo.ArgminLayer(problem, params, variables, n_workers=1)
    osqp(*inputs)
    states = osqp.batch_solver._item_states
    assert sorted(states) == [0, 1, 2, 3] and all("OSQP" in s["solver_cache"] for s in states.values())
    first_solver_of_item_0 = states[0]["solver_cache"]["OSQP"][0]
    (y_warm,) = osqp(*inputs)
    assert states[0]["solver_cache"]["OSQP"][0] is first_solver_of_item_0  # reused, not rebuilt
    assert torch.allclose(y_warm, clarabel(*inputs)[0], atol=1e-8)


def _gone(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` has exited (absent, or a zombie) within ``timeout`` seconds."""
    import time
    from pathlib import Path

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status")
        try:
            if "State:\tZ" in status.read_text():
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.05)
    return False


def test_keyboard_interrupt_during_a_batch_cleans_up(rng, monkeypatch):
    problem, params, variables, inputs = qp(rng)
    layer = cbo.ArgminLayer(problem, params, variables, n_workers=2)
    try:
        layer(*inputs)  # start the pool
        pool = layer.batch_solver._pool
        processes = list(pool._processes.values())

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(cbo.inner.cf, "wait", interrupted)
        with pytest.raises(KeyboardInterrupt):
            layer(*inputs)
        assert layer.batch_solver._pool is None
        for process in processes:  # Process.is_alive() races with the executor's own reaping: ask the OS
            assert _gone(process.pid, timeout=10)
        monkeypatch.undo()
        assert torch.isfinite(layer(*inputs)[0]).all()  # a fresh pool
    finally:
        layer.close()


@pytest.mark.parametrize("n_workers", [1, 2])
def test_failing_solver_names_the_item(rng, n_workers):
    problem, params, variables, inputs = qp(rng)
    layer = cbo.ArgminLayer(problem, params, variables, n_workers=n_workers, solver="NOT_A_SOLVER")
    try:
        with pytest.raises(cbo.InnerSolveError, match="batch item 0: The inner solver NOT_A_SOLVER failed"):
            layer(*inputs)
    finally:
        layer.close()


def test_thread_executor_gives_the_same_solutions(rng):
    """Threads of one process share the worker's problem: solves are serialized, results exact."""
    from concurrent.futures import ThreadPoolExecutor

    problem, params, variables, inputs = qp(rng)
    batch = [torch.tensor(rng.standard_normal((16, 8))), inputs[1]]
    expected = cbo.ArgminLayer(problem, params, variables, n_workers=1)(*batch)[0]
    with ThreadPoolExecutor(4) as pool:
        (y,) = cbo.ArgminLayer(problem, params, variables, executor=pool, n_workers=4)(*batch)
    assert torch.allclose(y, expected, atol=1e-9)


def test_numpy_inputs_are_accepted():
    x, y = cp.Parameter(2), cp.Variable(2)
    layer = cbo.ArgminLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y <= 1]), [x], [y], n_workers=1)
    (out,) = layer(np.array([0.5, 3.0]))
    assert torch.allclose(out, torch.tensor([0.5, 1.0], dtype=torch.float64), atol=1e-9)


def test_warnings_point_at_the_users_line():
    """A degenerate-point warning raised deep inside the layer (under torch.autograd.Function) names this file."""
    x, y = cp.Parameter(2), cp.Variable(2)
    layer = cbo.ArgminLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y <= 1]), [x], [y], n_workers=1)
    x_weak = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)  # y_0 = 1 with mu_0 = 0
    with pytest.warns(cbo.DegenerateKKTWarning) as record:
        (y_star,) = layer(x_weak)
        y_star.sum().backward()
    assert {w.filename for w in record} == {__file__}
    layer.close()
