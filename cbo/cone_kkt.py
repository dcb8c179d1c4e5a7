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

    def hessian(self, A: sp.csr_array) -> np.ndarray:
        """H = A^T C A = A^T diag(c) A + B diag(f) B^T with B = A^T F, in sparse products (n x n, dense)."""
        B = sp.csr_array(A.T @ self.curvature_factor)
        H = A.T @ (self.curvature_diagonal[:, None] * A) + B @ (self.curvature_weights[:, None] * B.T)
        return H.toarray() if sp.issparse(H) else np.asarray(H)


def active_pieces(blocks: Sequence, y: np.ndarray, s: np.ndarray, tol: float) -> ActivePieces:
    """The active pieces of each cone block at the solution (s, y); ``tol`` decides what is zero.

    Strict complementarity is assumed (checked by :meth:`cbo.conic.ConicProgram.solve`).
    """
    rows, columns, values, mu = [], [], [], []
    diagonal, factor_rows, factor_columns, factor_values, weights = np.zeros(s.size), [], [], [], []
    sizes = {"linear": 0, "soc": 0, "exp": 0, "pow": 0, "psd": 0}
    count = rank = 0  # pieces so far, columns of F so far

    def linear(indices: np.ndarray) -> None:
        nonlocal count
        rows.append(count + np.arange(indices.size))
        columns.append(indices)
        values.append(-np.ones(indices.size))
        mu.append(y[indices])
        sizes["linear"] += indices.size
        count += indices.size

    def curved(block, gradient: np.ndarray, multipliers, curvature: tuple) -> None:
        """Pieces with rows ``gradient`` of G; ``curvature`` = (c, F, f) of the block (c, F: None for none)."""
        nonlocal count, rank
        gradient = np.atleast_2d(gradient)
        piece, entry = np.nonzero(gradient)
        rows.append(count + piece)
        columns.append(block.start + entry)
        values.append(gradient[piece, entry])
        mu.append(np.atleast_1d(multipliers))
        count += gradient.shape[0]
        block_diagonal, factor, factor_weights = curvature
        if block_diagonal is not None:
            diagonal[block.rows] = block_diagonal
        if factor is not None:
            entry, column = np.nonzero(factor)
            factor_rows.append(block.start + entry)
            factor_columns.append(rank + column)
            factor_values.append(factor[entry, column])
            weights.append(np.asarray(factor_weights, dtype=float))
            rank += factor.shape[1]

    for block in blocks:
        indices = np.arange(block.start, block.start + block.size)
        sb, yb = s[block.rows], y[block.rows]
        if block.kind == "zero":
            linear(indices)
        elif block.kind == "nonneg":
            linear(indices[sb <= yb])
        elif block.kind == "soc":
            if np.abs(sb).max() <= tol:
                linear(indices)
            elif sb[0] - np.linalg.norm(sb[1:]) <= tol:
                gradient, curvature = _soc_piece(sb, yb)
                curved(block, gradient, _multiplier(yb, gradient), curvature)
                sizes["soc"] += 1
        elif block.kind in ("exp", "pow"):
            if np.abs(yb).max() <= tol:
                continue
            if np.abs(sb).max() <= tol:
                linear(indices)
                continue
            smooth = sb[1] > tol and sb[2] > tol if block.kind == "exp" else \
                sb[0] > tol and sb[1] > tol and abs(sb[2]) > tol
            if not smooth:
                raise StrictComplementarityError(
                    f"{block.label} is active on a face of the {'exponential' if block.kind == 'exp' else 'power'} "
                    "cone where its boundary is not smooth: cbo cannot differentiate the solution there. Move x, "
                    "or keep the cone's arguments away from zero.")
            _, gradient, hessian = exp_h(sb) if block.kind == "exp" else pow_g(sb, block.alpha)
            multiplier = _multiplier(yb, gradient)
            eigenvalues, eigenvectors = np.linalg.eigh(multiplier * hessian)
            curved(block, gradient, multiplier, (None, eigenvectors, eigenvalues))
            sizes[block.kind] += 1
        else:
            piece = _psd_piece(sb, yb)
            if piece is not None:
                gradient, multipliers, factor, factor_weights = piece
                curved(block, gradient, multipliers, (None, factor, factor_weights))
                sizes["psd"] += len(multipliers)
    join = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)  # noqa: E731
    G = sp.csr_array((join(values, float), (join(rows, int), join(columns, int))), shape=(count, s.size))
    weights = join(weights, float)
    F = sp.csc_array((join(factor_values, float), (join(factor_rows, int), join(factor_columns, int))),
                     shape=(s.size, weights.size))
    return ActivePieces(G, diagonal, F, weights, join(mu, float), sizes)


def _multiplier(y: np.ndarray, gradient: np.ndarray) -> float:
    """mu >= 0 with y = -mu grad g (least squares)."""
    return max(0.0, -float(y @ gradient) / float(gradient @ gradient))


def _soc_piece(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, tuple]:
    """g(s) = ||u|| - t for s = (t, u): gradient (-1, u'), u' = u / ||u||, and the curvature
    mu hess g = (mu / ||u||) (diag(0, 1, ..., 1) - (0, u')(0, u')^T) as (diagonal, factor, weights)."""
    u = s[1:]
    norm = np.linalg.norm(u)
    gradient = np.concatenate([[-1.0], u / norm])
    scale = _multiplier(y, gradient) / norm
    direction = np.concatenate([[0.0], u / norm])[:, None]
    return gradient, (scale * (np.arange(s.size) > 0), direction, [-scale])


def _psd_piece(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    r"""(G rows, mu, W^T, weights) of a PSD block, C = W^T diag(weights) W; None if the multiplier is
    zero (S in the interior).

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
    return gradient, multipliers, W.T, (2 * weights[:, None] / l[None, :]).reshape(-1)


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
        self.H = as_tensor(np.stack([p.hessian(sp.csr_array(a)) for a, p in zip(A, pieces)]))
        J = np.zeros((batch, self.n_dual, self.n_y))
        mask = np.zeros((batch, self.n_dual))
        w = np.zeros((batch, self.n_y + self.n_dual))
        for b, (a, p) in enumerate(zip(A, pieces)):
            J[b, : p.mu.size] = -(p.G @ a).toarray()
            mask[b, : p.mu.size] = 1.0
            w[b, : self.n_y], w[b, self.n_y: self.n_y + p.mu.size] = z[b], p.mu
        self.J, self.dual_mask, self.w = as_tensor(J), as_tensor(mask), as_tensor(w)
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
