r"""The KKT system of a cone program reduced to the active part of each cone.

At a strictly complementary solution (z, s, y) of

    min_z c^T z   s.t.  A z + s = b,  s in K,          (dual: c + A^T y = 0, y in K^*, s^T y = 0)

each cone is, near s, described by a few smooth constraints g(s) <= 0 that
hold with equality ("active pieces"), and y = -dg(s)^T mu with mu > 0:

* zero-cone rows, active nonnegative rows (s_i = 0 < y_i) and a second-order,
  exponential or power cone at its apex (s = 0, y interior): g(s) = -s_i, mu_i = y_i;
* an SOC (t, u) on its boundary, s != 0: g(s) = ||u|| - t, mu = y_t;
* an exponential cone on its boundary: g(s) = h(s) = s_1 - s_2 log(s_3 / s_2);
  a 3-d power cone: g(s) = |s_3| - s_1^a s_2^(1-a) (where s_1, s_2, s_3 != 0);
* a PSD slack S of rank r < n, with U (n x r) spanning its range and V
  (n x k) that of the multiplier Y: the Schur complement
  E(S) = V^T S V - V^T S U (U^T S U)^{-1} U^T S V, for which S >= 0 iff
  E(S) >= 0 near S, gives k(k+1)/2 constraints g(S) = -E(S) with multiplier
  M = V^T Y V (Y = V M V^T). Only the range of the multiplier enters.

Inactive pieces (a nonnegative row with s_i > 0, a cone with s in its
interior) have y = 0 and drop out. With G = dg/ds (p x m, the stacked active
pieces) and C = sum_j mu_j hess g_j(s) (m x m, block diagonal, positive
semidefinite: the cones' curvature), the conditions

    R(z, mu) = ( c - A^T G^T mu,  g(b - A z) ) = 0

have the symmetric, indefinite Jacobian

    K = [[H, J^T], [J, 0]],   H = A^T C A,   J = -G A,

the structure of the smooth route's KKT matrix (:mod:`cbo.kkt`), so the same
adjoint solvers (:mod:`cbo.linsolve`) apply. The curvature of the PSD piece
is C[dS] = Y dS S^+ + S^+ dS Y (the second derivative of -<M, E(S)>). For an
outer gradient d = dF/dz, the adjoint K (w_z, w_mu) = (d, 0) gives the
gradient in the cone data (c, A, b)

    dF/dc = -w_z,   dF/db = w_b = C A w_z - G^T w_mu,   dF/dA = -(y w_z^T + w_b z^T).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from .cones import exp_h, pow_g, smat, svec
from .errors import StrictComplementarityError
from .kkt import _KKTSystem, equilibration

__all__ = ["ActivePieces", "active_pieces", "ConeKKT"]


@dataclass
class ActivePieces:
    r"""The active smooth pieces of a cone program's cones at one solution.

    The cones' curvature C = sum_j mu_j hess g_j(s) (m x m, block diagonal) is
    kept as a diagonal plus a low-rank part, C = diag(c) + F diag(f) F^T: an
    SOC's is diag(0, 1, ..., 1) mu / ||u|| minus a rank-one term, a PSD
    block's has rank k r, an exponential or power cone's 3 x 3 block is its
    eigendecomposition. Products and H = A^T C A never form C densely.

    Attributes
    ----------
    G : sparse (p, m)
        dg/ds of the p active pieces, in the cone program's rows.
    curvature_diagonal : array (m,)
        c.
    curvature_factor : sparse (m, R)
        F.
    curvature_weights : array (R,)
        f.
    mu : array (p,)
        The pieces' multipliers.
    sizes : dict[str, int]
        Number of pieces of each kind: "linear" rows, "soc", "exp", "pow", "psd" (multiplier entries).
    """

    G: sp.csr_array
    curvature_diagonal: np.ndarray
    curvature_factor: sp.csc_array
    curvature_weights: np.ndarray
    mu: np.ndarray
    sizes: dict

    def curvature_times(self, u: np.ndarray) -> np.ndarray:
        """C u for u of length m."""
        F = self.curvature_factor
        return self.curvature_diagonal * u + F @ (self.curvature_weights * (F.T @ u))

    def kkt_blocks(self, A: sp.csr_array) -> tuple[np.ndarray, np.ndarray]:
        """(H, J) = (A^T C A, -G A), dense; H = A^T diag(c) A + B diag(f) B^T with B = A^T F, the first
        term over the rows with c != 0 only, each product sparse or, for dense operands, dense."""
        curved = np.flatnonzero(self.curvature_diagonal)
        H = _gram(A[curved], self.curvature_diagonal[curved])
        B = sp.csr_array(self.curvature_factor.T @ A)
        return H + _gram(B, self.curvature_weights), -(self.G @ A).toarray()


def _gram(M: sp.csr_array, weights: np.ndarray) -> np.ndarray:
    """M^T diag(weights) M as a dense array: a sparse product, or a dense one where M is over 10 % full."""
    if M.nnz > 0.1 * M.shape[0] * M.shape[1]:
        dense = M.toarray()
        return dense.T @ (weights[:, None] * dense)
    product = M.T @ (weights[:, None] * M)
    return product.toarray() if sp.issparse(product) else np.asarray(product)


@dataclass
class _Piece:
    """The active pieces of one cone block: rows of G (dg/ds, one per piece, over the block's
    rows), their multipliers, and the block's curvature diag(diagonal) + factor diag(weights) factor^T
    (None: no such part)."""

    kind: str
    gradient: np.ndarray
    multipliers: np.ndarray
    diagonal: np.ndarray | None = None
    factor: np.ndarray | None = None
    weights: np.ndarray | None = None


def active_pieces(blocks: Sequence, y: np.ndarray, s: np.ndarray, tol: float) -> ActivePieces:
    """The active pieces of each cone block at the solution (s, y), assembled; ``tol`` decides what is zero.

    Strict complementarity is assumed (checked by :meth:`cbo.conic.ConicProgram.solve`).
    """
    sizes = {"linear": 0, "soc": 0, "exp": 0, "pow": 0, "psd": 0}
    G_entries, F_entries, mu, weights = [], [], [], []
    diagonal = np.zeros(s.size)
    pieces = rank = 0  # rows of G, columns of F so far
    for block in blocks:
        piece = _block_piece(block, s[block.rows], y[block.rows], tol)
        if piece is None:
            continue
        sizes[piece.kind] += len(piece.multipliers) if piece.kind in ("linear", "psd") else 1
        G_entries.append(_entries(piece.gradient, pieces, block.start))
        mu.append(piece.multipliers)
        pieces += len(piece.multipliers)
        if piece.diagonal is not None:
            diagonal[block.rows] = piece.diagonal
        if piece.factor is not None:
            F_entries.append(_entries(piece.factor, block.start, rank))
            weights.append(piece.weights)
            rank += len(piece.weights)
    mu, weights = (np.concatenate(parts) if parts else np.zeros(0) for parts in (mu, weights))
    G = sp.csr_array(_assembled(G_entries), shape=(mu.size, s.size))
    F = sp.csc_array(_assembled(F_entries), shape=(s.size, weights.size))
    return ActivePieces(G, diagonal, F, weights, mu, sizes)


def _entries(block_matrix, row_offset: int, column_offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, columns, values) of the nonzeros of a block (dense or sparse), shifted by the offsets."""
    if sp.issparse(block_matrix):
        coo = block_matrix.tocoo()
        rows, columns, values = coo.row, coo.col, coo.data
    else:
        rows, columns = np.nonzero(block_matrix)
        values = block_matrix[rows, columns]
    return rows + row_offset, columns + column_offset, values


def _assembled(entries: list) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """(values, (rows, columns)) of a list of :func:`_entries`, for a scipy COO-style constructor."""
    if not entries:
        return np.zeros(0), (np.zeros(0, int), np.zeros(0, int))
    rows, columns, values = (np.concatenate(part) for part in zip(*entries))
    return values.astype(float), (rows.astype(int), columns.astype(int))


def _block_piece(block, s: np.ndarray, y: np.ndarray, tol: float) -> _Piece | None:
    """The active pieces of one block (None: inactive, s in the cone's interior)."""
    if block.kind == "zero":
        return _linear(y, np.ones(block.size, dtype=bool))
    if block.kind == "nonneg":
        return _linear(y, s <= y)
    if block.kind == "psd":
        return _psd_piece(s, y)
    if block.kind == "soc":
        if np.abs(s).max() <= tol:  # at the apex, the multiplier in the interior: every row is active
            return _linear(y, np.ones(block.size, dtype=bool))
        return _soc_piece(s, y) if s[0] - np.linalg.norm(s[1:]) <= tol else None
    if np.abs(y).max() <= tol:  # exponential or power cone with a zero multiplier
        return None
    if np.abs(s).max() <= tol:
        return _linear(y, np.ones(block.size, dtype=bool))
    return _exp_or_pow_piece(block, s, y, tol)


def _linear(y: np.ndarray, active: np.ndarray) -> _Piece:
    """Rows g(s) = -s_i for the ``active`` rows of a block, multipliers y_i."""
    rows = np.flatnonzero(active)
    gradient = sp.csr_array((-np.ones(rows.size), (np.arange(rows.size), rows)), shape=(rows.size, active.size))
    return _Piece("linear", gradient, y[active])


def _multiplier(y: np.ndarray, gradient: np.ndarray) -> float:
    """mu >= 0 with y = -mu grad g (least squares)."""
    return max(0.0, -float(y @ gradient) / float(gradient @ gradient))


def _soc_piece(s: np.ndarray, y: np.ndarray) -> _Piece:
    """g(s) = ||u|| - t for s = (t, u): gradient (-1, u'), u' = u / ||u||, curvature
    mu hess g = (mu / ||u||) (diag(0, 1, ..., 1) - (0, u')(0, u')^T)."""
    u = s[1:]
    norm = np.linalg.norm(u)
    gradient = np.concatenate([[-1.0], u / norm])
    mu = _multiplier(y, gradient)
    direction = np.concatenate([[0.0], u / norm])[:, None]
    return _Piece("soc", gradient[None, :], np.array([mu]), mu / norm * (np.arange(s.size) > 0), direction,
                  np.array([-mu / norm]))


def _exp_or_pow_piece(block, s: np.ndarray, y: np.ndarray, tol: float) -> _Piece:
    """g = h (exponential) or |s_3| - s_1^a s_2^(1-a) (power) on the smooth part of the boundary; the
    3 x 3 curvature mu hess g by its eigendecomposition."""
    smooth = s[1] > tol and s[2] > tol if block.kind == "exp" else s[0] > tol and s[1] > tol and abs(s[2]) > tol
    if not smooth:
        raise StrictComplementarityError(
            f"{block.label} is active on a face of the {'exponential' if block.kind == 'exp' else 'power'} "
            "cone where its boundary is not smooth: cbo cannot differentiate the solution there. Move x, "
            "or keep the cone's arguments away from zero.")
    _, gradient, hessian = exp_h(s) if block.kind == "exp" else pow_g(s, block.alpha)
    mu = _multiplier(y, gradient)
    weights, factor = np.linalg.eigh(mu * hessian)
    return _Piece(block.kind, gradient[None, :], np.array([mu]), None, factor, weights)


def _psd_piece(s: np.ndarray, y: np.ndarray) -> _Piece | None:
    r"""The pieces of a PSD block; None if the multiplier is zero (S in the interior).

    S - Y has the eigenvectors of both (they commute at a complementary solution): positive
    eigenvalues span range(S) (U, eigenvalues l of S), negative ones range(Y) (V). In the
    orthonormal basis smat(e_i) of the k x k symmetric matrices, mu = svec(M), M = V^T Y V, and the
    rows of G are -svec(V smat(e_i) V^T). With M = Q diag(m) Q^T and v_a the columns of V Q,

        <dS, C dS> = 2 tr(Y dS S^+ dS) = sum_ab 2 (m_a / l_b) (v_a^T dS u_b)^2,

    so C = W^T diag(2 m_a / l_b) W with rows w_ab = svec(sym(v_a u_b^T)): rank k r, formed without
    the n^2 x n^2 Kronecker products.
    """
    S, Y = smat(s), smat(y)
    values, Q = np.linalg.eigh(S - Y)
    U, V = Q[:, values > 0], Q[:, values <= 0]
    k = V.shape[1]
    if k == 0:
        return None
    basis = np.stack([smat(e) for e in np.eye(k * (k + 1) // 2)])
    gradient = -svec(V @ basis @ V.T)
    M = V.T @ Y @ V
    multipliers = svec(M)
    weights, rotation = np.linalg.eigh(M)
    V, l = V @ rotation, np.einsum("ij,ij->j", U, S @ U)
    outer = np.einsum("ia,jb->abij", V, U)
    W = svec((outer + np.swapaxes(outer, -1, -2)) / 2).reshape(k * U.shape[1], -1)
    return _Piece("psd", gradient, multipliers, None, W.T, (2 * weights[:, None] / l[None, :]).reshape(-1))


class ConeKKT(_KKTSystem):
    r"""The reduced KKT matrices K = [[A^T C A, -(G A)^T], [-G A, 0]] of a batch of cone-program solutions.

    Items have different numbers of active pieces; they are padded to the
    largest, with a unit diagonal on the padded rows (``dual_mask`` 0), as the
    smooth route pads inactive multipliers. H and J are dense torch tensors on
    the device and in the dtype of ``like``; products are batched matmuls.

    Parameters
    ----------
    A : list of sparse (m, n)
        Each item's constraint matrix.
    pieces : list of ActivePieces
    z : list of arrays (n,)
        Each item's solution.
    like : tensor
        Device and dtype of the computation.
    """

    def __init__(self, A: Sequence[sp.csc_array], pieces: Sequence[ActivePieces], z: Sequence[np.ndarray],
                 like: torch.Tensor):
        self.pieces, self.A = list(pieces), list(A)
        as_tensor = lambda a: torch.as_tensor(np.asarray(a), dtype=like.dtype, device=like.device)  # noqa: E731
        self.n_y = A[0].shape[1]
        self.n_dual = max((p.mu.size for p in pieces), default=0)
        batch = len(pieces)
        H = np.zeros((batch, self.n_y, self.n_y))
        J = np.zeros((batch, self.n_dual, self.n_y))
        mask = np.zeros((batch, self.n_dual))
        w = np.zeros((batch, self.n_y + self.n_dual))
        for b, (a, p) in enumerate(zip(A, pieces)):
            H[b], J[b, : p.mu.size] = p.kkt_blocks(sp.csr_array(a))
            mask[b, : p.mu.size] = 1.0
            w[b, : self.n_y], w[b, self.n_y: self.n_y + p.mu.size] = z[b], p.mu
        self.H, self.J, self.dual_mask, self.w = as_tensor(H), as_tensor(J), as_tensor(mask), as_tensor(w)
        self.scale = equilibration(self)  # computed with the class default scale None: on K itself

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """K v for v of shape (B, N) or (k, B, N)."""
        v_z, v_mu = v[..., : self.n_y], v[..., self.n_y:]
        top = torch.einsum("bij,...bj->...bi", self.H, v_z) + torch.einsum("bpi,...bp->...bi", self.J, v_mu)
        bottom = torch.einsum("bpi,...bi->...bp", self.J, v_z) + (1 - self.dual_mask) * v_mu
        return torch.cat([top, bottom], -1)

    def dense(self) -> torch.Tensor:
        """K as dense (B, N, N) matrices."""
        return torch.cat([torch.cat([self.H, self.J.mT], -1),
                          torch.cat([self.J, torch.diag_embed(1 - self.dual_mask)], -1)], -2)

    def constraint_jacobian(self) -> torch.Tensor:
        """J = -G A, shape (B, n_dual, n_y), zero on padded rows."""
        return self.J

    def data_adjoint(self, v: np.ndarray, item: int) -> np.ndarray:
        """(w_z, w_b) of item ``item`` from its adjoint solution v = (w_z, w_mu): w_b = C A w_z - G^T w_mu."""
        pieces, A = self.pieces[item], self.A[item]
        w_z, w_mu = v[: self.n_y], v[self.n_y: self.n_y + pieces.mu.size]
        return np.concatenate([w_z, pieces.curvature_times(A @ w_z) - pieces.G.T @ w_mu])
