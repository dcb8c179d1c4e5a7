"""cbo.kkt.polish corrects a misjudged active set (the primal-dual active-set step)."""
import cvxpy as cp
import pytest
import torch

import cbo
from cbo.kkt import polish
from cbo.linsolve import equilibrated_solve


def box_problem():
    """y*(x) = argmin 1/2||y - x||^2 s.t. y <= 1: y* = min(x, 1), mu* = max(x - 1, 0)."""
    x, y = cp.Parameter(2), cp.Variable(2)
    inner = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - x)), [y <= 1])
    return cbo.BilevelProblem(inner, [x], [y])


def run_polish(problem, x, y, mu, active):
    as_batch = lambda values: torch.tensor([values], dtype=torch.float64)  # noqa: E731
    w = torch.cat([as_batch(y), as_batch(mu)], -1)
    newton = lambda op, rhs: equilibrated_solve(op, rhs, "direct")[0]  # noqa: E731
    return polish(problem, [as_batch(x)], w, as_batch(active), newton, tol_p=torch.tensor([1e-9]))


@pytest.mark.parametrize("active, joined, left", [([0.0, 0.0], 1, 0),    # row 0 misjudged inactive: joins
                                                  ([1.0, 1.0], 0, 1)])   # row 1 misjudged active: leaves
def test_polish_corrects_the_active_set(active, joined, left):
    op, (info,) = run_polish(box_problem(), x=[2.0, 0.5], y=[1.0, 0.5], mu=[0.0, 0.0], active=active)
    assert op.active[0].tolist() == [1.0, 0.0]
    torch.testing.assert_close(op.w[0], torch.tensor([1.0, 0.5, 1.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)
    assert info.residual_after < 1e-12 and info.accepted
    assert f"{joined} constraint(s) joined, {left} left" in info.reason


def test_hypergrad_reports_the_corrected_active_set():
    """info.active_set is the set the gradient was computed on."""
    problem = box_problem()
    problem.outer = lambda x, y: (y ** 2).sum()
    g, info = cbo.hypergrad(problem, torch.tensor([2.0, 0.5], dtype=torch.float64), return_info=True)
    assert info.active_set.active.tolist() == [0]
    torch.testing.assert_close(g, torch.tensor([0.0, 1.0], dtype=torch.float64))  # dF/dx = 2 y* dy*/dx


def test_no_tensor_is_left_in_a_reference_cycle():
    """Cycles holding tensors are freed only by the cyclic garbage collector's rare full passes, so
    memory grows between them over thousands of calls (found by benchmarks/soak.py)."""
    import gc

    from builders import random_qp

    case = random_qp(10, seed=0)
    for method in cbo.ADJOINT_METHODS:
        cbo.hypergrad(case.problem, case.x_tensors, method=method)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for method in cbo.ADJOINT_METHODS:
            cbo.hypergrad(case.problem, case.x_tensors, method=method)
        gc.collect()
        cyclic = [type(o).__name__ for o in gc.garbage if isinstance(o, torch.Tensor) or type(o).__module__.startswith("cbo")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert cyclic == []
