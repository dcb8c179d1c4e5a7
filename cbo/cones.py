r"""Cone geometry for the conic route: projections onto the dual cone K^* and their derivatives.

Blocks are objects with ``kind`` ("zero", "nonneg", "soc", "psd", "exp",
"pow") and ``rows`` (a slice of the cone program's rows); a power cone's also
has ``alpha``. PSD blocks are Clarabel's scaled
upper-triangular vectors (off-diagonal entries times sqrt 2, so that
<svec A, svec B> = tr(AB)).

dPi per cone of K^*:

* zero cone rows (equalities): K^* is the whole space, D = I;
* nonnegative: D = diag(v > 0);
* SOC (self-dual), v = (t, u): I if ||u|| <= t, 0 if ||u|| <= -t, else
  1/2 [[1, u'^T], [u', (1 + t/||u||) I - t/||u|| u' u'^T]] with u' = u / ||u||;
* PSD (self-dual): with V = Q diag(l) Q^T, D[dV] = Q (G o Q^T dV Q) Q^T,
  G_ij = (l_i^+ - l_j^+) / (l_i - l_j) (1 if both > 0, 0 if both <= 0);
* exponential and 3-d power cones: Pi_{K^*}(v) = v + Pi_K(-v), so
  D = I - dPi_K(-v); on the smooth part of the boundary of K = {g(p) <= 0}
  (exponential: g = h(p) = p_1 - p_2 log(p_3 / p_2); power:
  g(p) = |p_3| - p_1^a p_2^(1 - a)), dPi_K is the top-left block of
  [[I + lam hess g, grad g], [grad g^T, 0]]^{-1} at the projection p, lam its
  multiplier. Pi_K for the power cone is Hien's (2015) one-dimensional root
  search.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

__all__ = ["project_dual", "projection_jacobian", "smat", "svec", "psd_order", "exp_h", "pow_g", "in_pow_cone"]


def project_dual(v: np.ndarray, blocks: Sequence, exp_guess: np.ndarray) -> np.ndarray:
    """Pi_{K^*}(v), block by block. ``exp_guess`` holds the exponential blocks' last projections
    Pi_K(-v) (warm starts of their Newton solves) and is updated in place."""
    y = np.empty_like(v)
    for block in blocks:
        vb = v[block.rows]
        if block.kind == "zero":
            y[block.rows] = vb
        elif block.kind == "nonneg":
            y[block.rows] = np.maximum(vb, 0.0)
        elif block.kind == "soc":
            y[block.rows] = _soc_project(vb)
        elif block.kind == "psd":
            y[block.rows] = _psd_project(vb)
        elif block.kind == "exp":
            p, _ = _exp_project(-vb, exp_guess[block.rows])
            exp_guess[block.rows] = p
            y[block.rows] = vb + p
        else:
            y[block.rows] = vb + _pow_project(-vb, block.alpha)
    return y


def projection_jacobian(v: np.ndarray, y: np.ndarray, blocks: Sequence) -> np.ndarray:
    """D = dPi_{K^*}(v), dense and block diagonal; ``y`` = Pi_{K^*}(v)."""
    D = np.zeros((v.size, v.size))
    for block in blocks:
        r, vb = block.rows, v[block.rows]
        if block.kind == "zero":
            D[r, r] = np.eye(block.size)
        elif block.kind == "nonneg":
            D[r, r] = np.diag((vb > 0).astype(float))
        elif block.kind == "soc":
            D[r, r] = _soc_derivative(vb)
        elif block.kind == "psd":
            D[r, r] = _psd_derivative(vb)
        elif block.kind == "exp":
            D[r, r] = np.eye(3) - _boundary_projection_derivative(-vb, y[r] - vb, exp_h)
        else:
            D[r, r] = np.eye(3) - _boundary_projection_derivative(-vb, y[r] - vb, _pow_boundary(block.alpha))
    return D


def _soc_project(v: np.ndarray) -> np.ndarray:
    t, u = v[0], v[1:]
    norm = np.linalg.norm(u)
    if norm <= t:
        return v.copy()
    if norm <= -t:
        return np.zeros_like(v)
    a = (t + norm) / 2
    return np.concatenate([[a], a * u / norm])


def _soc_derivative(v: np.ndarray) -> np.ndarray:
    t, u = v[0], v[1:]
    norm = np.linalg.norm(u)
    if norm <= t:
        return np.eye(v.size)
    if norm <= -t:
        return np.zeros((v.size, v.size))
    unit = u / norm
    D = np.empty((v.size, v.size))
    D[0, 0], D[0, 1:], D[1:, 0] = 1.0, unit, unit
    D[1:, 1:] = (1 + t / norm) * np.eye(u.size) - (t / norm) * np.outer(unit, unit)
    return D / 2


@functools.lru_cache(maxsize=64)
def _triangle(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, column, scale) of each entry of Clarabel's triangle vector of an n x n matrix (upper, by
    columns); scale is sqrt 2 off the diagonal. Cached: read only."""
    rows, cols = np.triu_indices(n)  # (i, j) with i <= j
    order = np.lexsort((rows, cols))  # by column, then row
    rows, cols = rows[order], cols[order]
    scale = np.where(rows == cols, 1.0, np.sqrt(2))
    for array in (rows, cols, scale):
        array.flags.writeable = False
    return rows, cols, scale


def psd_order(k: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Matrix size and (row, column) of each entry of Clarabel's triangle vector of length k."""
    n = int(round((np.sqrt(8 * k + 1) - 1) / 2))
    rows, cols, _ = _triangle(n)
    return n, rows, cols


def smat(v: np.ndarray) -> np.ndarray:
    """Symmetric matrix of a scaled triangle vector (off-diagonal entries carry sqrt 2)."""
    n, _, _ = psd_order(v.size)
    rows, cols, scale = _triangle(n)
    M = np.zeros((n, n))
    M[rows, cols] = v / scale
    M[cols, rows] = v / scale
    return M


def svec(M: np.ndarray) -> np.ndarray:
    """Scaled triangle vector(s) of symmetric matrices M (..., n, n): <svec A, svec B> = tr(AB)."""
    rows, cols, scale = _triangle(M.shape[-1])
    return M[..., rows, cols] * scale


def _psd_project(v: np.ndarray) -> np.ndarray:
    values, Q = np.linalg.eigh(smat(v))
    return svec((Q * np.maximum(values, 0)) @ Q.T)


def _psd_derivative(v: np.ndarray) -> np.ndarray:
    values, Q = np.linalg.eigh(smat(v))
    plus = np.maximum(values, 0)
    difference = values[:, None] - values[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        G = np.where(np.abs(difference) > 1e-14 * max(1.0, np.abs(values).max()),
                     (plus[:, None] - plus[None, :]) / difference, (values[:, None] > 0).astype(float))
    G = np.where((values[:, None] > 0) & (values[None, :] > 0), 1.0, G)
    columns = []
    for e in np.eye(v.size):
        dV = Q.T @ smat(e) @ Q
        columns.append(svec(Q @ (G * dV) @ Q.T))
    return np.stack(columns, axis=1)


def exp_h(p: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """h(p) = p_1 - p_2 log(p_3 / p_2) (K_exp = {h <= 0, p_2, p_3 > 0}), its gradient and Hessian."""
    p1, p2, p3 = p
    h = p1 - p2 * np.log(p3 / p2)
    grad = np.array([1.0, np.log(p2 / p3) + 1.0, -p2 / p3])
    hess = np.array([[0.0, 0.0, 0.0], [0.0, 1 / p2, -1 / p3], [0.0, -1 / p3, p2 / p3 ** 2]])
    return h, grad, hess


def _exp_project(w: np.ndarray, guess: np.ndarray) -> tuple[np.ndarray, float]:
    r"""Pi_K(w) onto the exponential cone and the multiplier lam of h(p) <= 0.

    w in K: itself; -w in K^*: 0; else Newton on p - w + lam grad h(p) = 0,
    h(p) = 0 from ``guess`` (the solver's slack, a close start).
    """
    if _in_exp_cone(w):
        return w.copy(), 0.0
    if _in_exp_dual(-w):
        return np.zeros(3), 0.0
    p = np.array(guess, dtype=float)
    if not (p[1] > 0 and p[2] > 0):
        p = np.array([min(w[0], -1e-3), max(w[1], 1e-3), max(w[2], 1e-3)])
    _, grad, _ = exp_h(p)
    lam = max(float(grad @ (w - p)) / float(grad @ grad), 0.0)
    for _ in range(50):
        h, grad, hess = exp_h(p)
        residual = np.concatenate([p - w + lam * grad, [h]])
        if np.abs(residual).max() <= 1e-15 * max(1.0, np.abs(w).max()):
            break
        M = np.block([[np.eye(3) + lam * hess, grad[:, None]], [grad[None, :], np.zeros((1, 1))]])
        step = np.linalg.solve(M, residual)
        t = 1.0
        while not (p[1] - t * step[1] > 0 and p[2] - t * step[2] > 0):
            t /= 2
        p, lam = p - t * step[:3], lam - t * step[3]
    return p, lam


def _boundary_projection_derivative(w: np.ndarray, p: np.ndarray, boundary) -> np.ndarray:
    """dPi_K(w) for a 3-d cone K = {g <= 0}, p = Pi_K(w); ``boundary(p)`` -> (g, grad g, hess g), or None
    where p is on a face of K whose boundary is not smooth (there: the clip's derivative)."""
    if np.allclose(p, w, rtol=0, atol=1e-13 * max(1.0, np.abs(w).max())):
        return np.eye(3)
    if not p.any():
        return np.zeros((3, 3))
    smooth = boundary(p)
    if smooth is None:
        return np.diag((p != 0).astype(float))
    _, grad, hess = smooth
    lam = float(grad @ (w - p)) / float(grad @ grad)
    M = np.block([[np.eye(3) + lam * hess, grad[:, None]], [grad[None, :], np.zeros((1, 1))]])
    return np.linalg.inv(M)[:3, :3]


def _pow_boundary(alpha: float):
    return lambda p: pow_g(p, alpha) if p[0] > 0 and p[1] > 0 and p[2] != 0 else None


def pow_g(p: np.ndarray, alpha: float) -> tuple[float, np.ndarray, np.ndarray]:
    r"""g(p) = |p_3| - p_1^a p_2^(1-a) (the power cone K_a = {g <= 0, p_1, p_2 >= 0}), its gradient and
    Hessian, where p_1, p_2 > 0 and p_3 != 0. With phi = p_1^a p_2^(1-a):
    grad g = (-a phi / p_1, -(1-a) phi / p_2, sign p_3), hess g = a (1-a) phi [[1/p_1^2, -1/(p_1 p_2)],
    [-1/(p_1 p_2), 1/p_2^2]] on (p_1, p_2)."""
    x, y, z = p
    phi = x ** alpha * y ** (1 - alpha)
    grad = np.array([-alpha * phi / x, -(1 - alpha) * phi / y, np.sign(z)])
    hess = np.zeros((3, 3))
    hess[:2, :2] = alpha * (1 - alpha) * phi * np.array([[1 / x ** 2, -1 / (x * y)], [-1 / (x * y), 1 / y ** 2]])
    return abs(z) - phi, grad, hess


def _pow_project(w: np.ndarray, alpha: float) -> np.ndarray:
    r"""Pi_K(w) onto the power cone K_a (Hien 2015).

    w in K: itself; -w in K^*: 0; w_3 = 0: the clip (w_1^+, w_2^+, 0). Else the projection is
    (x(r), y(r), sign(w_3) r) with x(r) = (w_1 + sqrt(w_1^2 + 4 a r (|w_3| - r))) / 2, y(r) likewise with
    1 - a, and r in (0, |w_3|) the root of x(r)^a y(r)^(1-a) = r (the multiplier of g is |w_3| - r), found
    by bisection to machine precision.
    """
    if in_pow_cone(w, alpha):
        return w.copy()
    if _in_pow_dual(-w, alpha):
        return np.zeros(3)
    x0, y0, z0 = w
    if z0 == 0:
        return np.array([max(x0, 0.0), max(y0, 0.0), 0.0])

    def point(r: float) -> tuple[float, float]:
        return (0.5 * (x0 + np.sqrt(x0 ** 2 + 4 * alpha * r * (abs(z0) - r))),
                0.5 * (y0 + np.sqrt(y0 ** 2 + 4 * (1 - alpha) * r * (abs(z0) - r))))

    low, high = 0.0, abs(z0)
    for _ in range(200):
        r = (low + high) / 2
        x, y = point(r)
        low, high = (r, high) if x ** alpha * y ** (1 - alpha) > r else (low, r)
        if high - low <= 4 * np.finfo(float).eps * abs(z0):
            break
    r = (low + high) / 2
    x, y = point(r)
    return np.array([x, y, np.sign(z0) * r])


def in_pow_cone(p: np.ndarray, alpha: float) -> bool:
    return bool(p[0] >= 0 and p[1] >= 0 and p[0] ** alpha * p[1] ** (1 - alpha) >= abs(p[2]))


def _in_pow_dual(q: np.ndarray, alpha: float) -> bool:
    """K_a^* = {(u, v, w): u, v >= 0, (u / a)^a (v / (1 - a))^(1-a) >= |w|}."""
    return bool(q[0] >= 0 and q[1] >= 0 and (q[0] / alpha) ** alpha * (q[1] / (1 - alpha)) ** (1 - alpha) >= abs(q[2]))


def _in_exp_cone(p: np.ndarray) -> bool:
    if p[1] > 0 and p[2] > 0:
        return p[0] - p[1] * np.log(p[2] / p[1]) <= 0
    return p[0] <= 0 and p[1] == 0 and p[2] >= 0


def _in_exp_dual(q: np.ndarray) -> bool:
    """K_exp^* = {(u, v, w): u < 0, -u exp(v / u) <= e w} U {(0, v, w): v, w >= 0}."""
    if q[0] < 0:
        return -q[0] * np.exp(q[1] / q[0]) <= np.e * q[2]
    return q[0] == 0 and q[1] >= 0 and q[2] >= 0
