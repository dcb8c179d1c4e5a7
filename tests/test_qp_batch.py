"""The batched path of the layer on a compiled QP (cbo/qp_batch.py): one stack of K(a) for every item.

References: the per-item path (cbo/qp.py, itself checked against a dense KKT solve and cvxpylayers in
test_qp.py and test_layer.py), torch.autograd.gradcheck, and central finite differences of cvxpy's solution.
"""
import cvxpy as cp
import numpy as np
import pytest
import torch

import cbo
import cbo.qp_batch as qp_batch


@pytest.fixture
def batched_on_cpu(monkeypatch):
    """The batched path for every batch size and program size on the CPU (its own rule keeps it for large
    batches of small programs there)."""
    monkeypatch.setattr(qp_batch, "BATCH_MIN_ITEMS", 1)
    monkeypatch.setattr(qp_batch, "CPU_MAX_SIZE", 10**6)


def make_layer(seed=0, n=6, m=4, p=1, dual=False):
    """A QP in q, r and a scalar weight c: min 1/2 y'Py + c * 1'y + q'y s.t. G y <= h + r, C y == d,
    with half of the rows tight at q = 0, r = 0 (the layer's outputs: y, and the inequalities' mu with dual)."""
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((n, n))
    P, G, C = M.T @ M + np.eye(n), rng.standard_normal((m, n)), rng.standard_normal((p, n))
    y0 = rng.standard_normal(n)
    slack = np.where(np.arange(m) % 2 == 0, 0.0, 1.0)
    y, q, r, c = cp.Variable(n), cp.Parameter(n), cp.Parameter(m), cp.Parameter()
    inequality = G @ y <= G @ y0 + slack + r
    problem = cp.Problem(cp.Minimize(0.5 * cp.quad_form(y, cp.psd_wrap(P)) + c * cp.sum(y) + q @ y),
                         [inequality, C @ y == C @ y0])
    q0 = -(P @ y0 + G.T @ np.where(slack == 0, 1.0, 0.0))
    variables = [y, inequality.dual_variables[0]] if dual else [y]
    return cbo.ArgminLayer(problem, [q, r, c], variables), torch.as_tensor(q0), m


def call(layer, q, r, c, weights):
    q, r, c = (t.clone().requires_grad_(True) for t in (q, r, c))
    outputs, info = layer(q, r, c, return_info=True)
    sum((w * o).sum() for w, o in zip(weights, outputs)).backward()
    return [o.detach() for o in outputs], [q.grad, r.grad, c.grad], info


@pytest.mark.parametrize("dual", [False, True])
def test_batched_path_matches_the_per_item_path(batched_on_cpu, monkeypatch, dual):
    """Same outputs and gradients (y, and mu when it is an output) at outer-loop steps, to round-off."""
    batch = 5
    layers = [make_layer(dual=dual)[0] for _ in range(2)]
    _, q0, m = make_layer(dual=dual)
    gen = torch.Generator().manual_seed(1)
    q = q0 + 0.01 * torch.randn(batch, q0.numel(), dtype=torch.float64, generator=gen)
    r, c = torch.zeros(batch, m, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64)
    weights = [torch.randn(batch, 6, dtype=torch.float64, generator=gen),
               torch.randn(batch, m, dtype=torch.float64, generator=gen)]
    for layer in layers:  # the first call solves each item and keeps its active set
        call(layer, q, r, c, weights)
    for step in range(3):
        q = q + 1e-3 * torch.randn(q.shape, dtype=torch.float64, generator=gen)
        batched = call(layers[0], q, r, c, weights)
        monkeypatch.setattr(qp_batch, "BATCH_MIN_ITEMS", 10**9)
        per_item = call(layers[1], q, r, c, weights)
        monkeypatch.setattr(qp_batch, "BATCH_MIN_ITEMS", 1)
        assert batched[2].path == "compiled QP, batched" and per_item[2].path == "compiled QP"
        for a, b in zip(batched[0] + batched[1], per_item[0] + per_item[1]):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (step, (a - b).abs().max())
        assert batched[2].linear_solve.residual < 1e-12
        assert [s.active.tolist() for s in batched[2].active_sets] == [s.active.tolist() for s in per_item[2].active_sets]


def test_batched_path_against_finite_differences(batched_on_cpu):
    """dL/dq of the batched path against central differences of cvxpy's solution (Clarabel, tight tolerances)."""
    layer, q0, m = make_layer(seed=3)
    q, r, c = q0[None].repeat(2, 1), torch.zeros(2, m, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64)
    weights = [torch.arange(12, dtype=torch.float64).reshape(2, 6) / 10]
    call(layer, q, r, c, weights)
    _, (grad_q, _, grad_c), info = call(layer, q, r, c, weights)
    assert info.path == "compiled QP, batched"
    problem = layer.problem.inner
    q_param, r_param, c_param = layer.problem.parameters

    def loss(q_value, c_value, weight):
        q_param.value, r_param.value, c_param.value = q_value, np.zeros(m), c_value
        problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
        return float(weight @ problem.variables()[0].value)

    eps, w = 1e-6, weights[0].numpy()
    fd_q = np.array([(loss(q0.numpy() + eps * e, 0.1, w[0]) - loss(q0.numpy() - eps * e, 0.1, w[0])) / (2 * eps)
                     for e in np.eye(6)])
    # c is shared by both items (the same QP twice): its gradient is that of the sum of both items' losses
    fd_c = (loss(q0.numpy(), 0.1 + eps, w.sum(0)) - loss(q0.numpy(), 0.1 - eps, w.sum(0))) / (2 * eps)
    assert np.allclose(grad_q[0].numpy(), fd_q, rtol=1e-5, atol=1e-7)
    assert abs(float(grad_c) - fd_c) < 1e-5 * max(1.0, abs(fd_c))


def test_batched_path_gradcheck(batched_on_cpu):
    layer, q0, m = make_layer(seed=5)
    r, c = torch.zeros(3, m, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64)
    q = (q0[None] + 0.01 * torch.randn(3, 6, dtype=torch.float64)).requires_grad_(True)
    layer(q, r, c)  # keeps the active sets
    assert layer(q, r, c, return_info=True)[1].path == "compiled QP, batched"
    assert torch.autograd.gradcheck(lambda q, c: layer(q, r, c)[0], (q, c.clone().requires_grad_(True)))


def test_a_moved_active_set_sends_the_batch_item_by_item(batched_on_cpu):
    """An item whose kept active set no longer holds (a large step) is not polished on it: the batch is solved
    item by item, and the answer is the per-item path's at the same input (from scratch)."""
    layer, q0, m = make_layer(seed=7)
    fresh, _, _ = make_layer(seed=7)
    r, c = torch.zeros(2, m, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    q = q0[None].repeat(2, 1)
    layer(q, r, c)
    moved = q.clone()
    moved[1] += 5.0 * torch.linspace(-1, 1, 6, dtype=torch.float64)
    (y,), info = layer(moved, r, c, return_info=True)
    (y_fresh,), _ = fresh(moved, r, c, return_info=True)
    assert info.path == "compiled QP"
    assert torch.allclose(y, y_fresh, atol=1e-10)


def test_rule_keeps_small_cpu_batches_item_by_item():
    """Without the fixture: a batch of 3 on the CPU takes the per-item path (faster there)."""
    layer, q0, m = make_layer()
    r, c = torch.zeros(3, m, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64)
    layer(q0[None].repeat(3, 1), r, c)
    assert layer(q0[None].repeat(3, 1), r, c, return_info=True)[1].path == "compiled QP"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_path_on_cuda_matches_cpu():
    layer, q0, m = make_layer()
    q = q0[None].repeat(4, 1)
    r, c = torch.zeros(4, m, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64)
    weights = [torch.ones(4, 6, dtype=torch.float64)]
    call(layer, q.cuda(), r.cuda(), c.cuda(), [w.cuda() for w in weights])
    (y,), grads, info = call(layer, q.cuda(), r.cuda(), c.cuda(), [w.cuda() for w in weights])
    (y_cpu,), grads_cpu, _ = call(make_layer()[0], q, r, c, weights)
    assert info.path == "compiled QP, batched" and y.device.type == "cuda"
    assert torch.allclose(y.cpu(), y_cpu, atol=1e-10)
    assert all(torch.allclose(g.cpu(), h, atol=1e-10) for g, h in zip(grads, grads_cpu))


def test_an_earlier_batch_keeps_its_factors_until_its_backward_pass(batched_on_cpu):
    """Forward passes of later batches refactor the items whose active sets moved; a graph built before
    them still differentiates with its own factors (the per-item path's gradient as reference)."""
    layer, q0, m = make_layer(seed=7)
    reference, _, _ = make_layer(seed=7)
    r, c = torch.zeros(2, m, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    q = q0[None].repeat(2, 1)
    layer(q, r, c)
    early = q.clone().requires_grad_(True)
    (y_early,), info = layer(early, r, c, return_info=True)
    assert info.path == "compiled QP, batched"
    moved = q.clone()
    moved[1] += 5.0 * torch.linspace(-1, 1, 6, dtype=torch.float64)
    layer(moved, r, c)  # item 1's active set moves (solved item by item)
    (_,), info = layer(moved + 1e-6, r, c, return_info=True)
    assert info.path == "compiled QP, batched"  # item 1 refactored on its new active set
    y_early.sum().backward()
    q_ref = q.clone().requires_grad_(True)
    (y_ref,), _ = reference(q_ref, r, c, return_info=True)
    y_ref.sum().backward()
    assert torch.allclose(early.grad, q_ref.grad, atol=1e-12)
