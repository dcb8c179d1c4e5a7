"""The linear solvers on explicit matrices, independent of cvxpy: references by numpy.linalg."""
import numpy as np
import pytest
import torch

import cbo
from cbo.kkt import ConstraintGram
from cbo.linsolve import ADJOINT_SOLVERS, NegativeCurvature, cg, minres


def random_spd(n, rng, shift=0.5):
    M = rng.standard_normal((n, n))
    return M @ M.T / n + shift * np.eye(n)


class DenseKKT:
    """The batched KKTOperator interface over explicit K_b = [[H_b, J_b^T], [J_b, 0]].

    Rows of J marked inactive in ``active`` are padded as the operator pads
    them: zero in J, unit diagonal in K.
    """

    def __init__(self, H, J, active=None):
        H, J = (H if H.ndim == 3 else H[None]), (J if J.ndim == 3 else J[None])
        batch, n_y, n_dual = H.shape[0], H.shape[1], J.shape[1]
        active = np.ones((batch, n_dual)) if active is None else np.asarray(active, dtype=float)
        J = J * active[:, :, None]
        K = np.zeros((batch, n_y + n_dual, n_y + n_dual))
        K[:, :n_y, :n_y], K[:, :n_y, n_y:], K[:, n_y:, :n_y] = H, J.transpose(0, 2, 1), J
        K[:, n_y:, n_y:] = np.stack([np.diag(1 - a) for a in active])
        self.K, self.J = torch.as_tensor(K), torch.as_tensor(J)
        self.n_y, self.n_dual, self.size = n_y, n_dual, n_y + n_dual
        self.dual_mask = torch.as_tensor(active)

    def matvec(self, v):
        return (self.K @ v.unsqueeze(-1)).squeeze(-1)  # (B, N) or (k, B, N)

    def dense(self):
        return self.K

    def constraint_jacobian(self):
        return self.J

    def constraint_gram(self):
        return ConstraintGram(self.J, self.dual_mask)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_minres_solves_indefinite_systems_in_a_batch(rng):
    n = 30
    A = rng.standard_normal((n, n))
    A = A + A.T  # symmetric indefinite
    B = rng.standard_normal((4, n))
    X, iterations = minres(lambda v: v @ torch.as_tensor(A), torch.as_tensor(B), tol=1e-12, maxiter=500)
    reference = np.linalg.solve(A, B.T).T
    assert np.allclose(X.numpy(), reference, rtol=1e-7, atol=1e-8)
    assert iterations <= 500


def test_cg_matches_numpy_and_detects_negative_curvature(rng):
    n = 25
    A = torch.as_tensor(random_spd(n, rng))
    b = torch.as_tensor(rng.standard_normal(n))
    x, _ = cg(lambda v: A @ v, b, tol=1e-12)
    assert np.allclose(x.numpy(), np.linalg.solve(A.numpy(), b.numpy()), rtol=1e-9)
    indefinite = A - 2 * torch.eye(n) * float(torch.linalg.eigvalsh(A).max())
    with pytest.raises(NegativeCurvature):
        cg(lambda v: indefinite @ v, b, tol=1e-12)


@pytest.mark.parametrize("method", list(ADJOINT_SOLVERS))
@pytest.mark.parametrize("n_dual", [0, 4])
def test_adjoint_solvers_on_explicit_kkt(rng, method, n_dual):
    n = 20
    op = DenseKKT(random_spd(n, rng), rng.standard_normal((n_dual, n)))
    b = torch.as_tensor(np.concatenate([rng.standard_normal(n), rng.standard_normal(n_dual)]))[None]
    v, info = cbo.linsolve.adjoint_solve(op, b, method, tol=1e-11)
    reference = np.linalg.solve(op.K[0].numpy(), b[0].numpy())
    assert np.allclose(v[0].numpy(), reference, rtol=1e-7, atol=1e-8)
    assert info.converged and info.residual <= 1e-10


@pytest.mark.parametrize("method", list(ADJOINT_SOLVERS))
def test_adjoint_solvers_on_a_batch_with_different_active_sets(rng, method):
    """Each item has its own H, J and active rows; all are solved at once."""
    n, d, batch = 15, 6, 3
    H = np.stack([random_spd(n, rng) for _ in range(batch)])
    active = rng.random((batch, d)) < 0.6
    op = DenseKKT(H, rng.standard_normal((batch, d, n)), active)
    b = torch.as_tensor(rng.standard_normal((batch, n + d)))
    v, info = cbo.linsolve.adjoint_solve(op, b, method, tol=1e-11)
    reference = np.linalg.solve(op.K.numpy(), b.numpy()[..., None])[..., 0]
    assert np.allclose(v.numpy(), reference, rtol=1e-7, atol=1e-8)
    assert info.converged


def test_fixed_point_reports_contraction_and_literal_map_diverges(rng):
    """Our map contracts; the literal w - grad L map (iteration matrix I - K) does not."""
    n = 20
    op = DenseKKT(random_spd(n, rng), rng.standard_normal((5, n)))
    b = torch.as_tensor(np.concatenate([rng.standard_normal(n), np.zeros(5)]))[None]
    _, info = cbo.linsolve.adjoint_solve(op, b, "fixed_point", tol=1e-10)
    assert 0 < info.extra["contraction_factor"] < 1
    literal = np.eye(n + 5) - op.K[0].numpy()
    assert np.abs(np.linalg.eigvals(literal)).max() > 1


def test_projected_cg_refuses_negative_curvature_on_null_space(rng):
    n = 10
    H = -np.eye(n)  # concave: the second-order condition fails
    op = DenseKKT(H, rng.standard_normal((2, n)))
    b = torch.as_tensor(rng.standard_normal(n + 2))[None]
    with pytest.raises(cbo.ConvergenceError, match="not positive definite on the null space"):
        cbo.linsolve.adjoint_solve(op, b, "cg")


def test_direct_falls_back_to_pseudo_inverse_when_licq_fails(rng):
    n = 8
    row = rng.standard_normal((1, n))
    op = DenseKKT(random_spd(n, rng), np.vstack([row, 2 * row]))
    b = torch.as_tensor(np.concatenate([rng.standard_normal(n), np.zeros(2)]))[None]
    v, info = cbo.linsolve.adjoint_solve(op, b, "direct")
    assert info.extra["factorization"].startswith("pinv") and info.residual < 1e-10
