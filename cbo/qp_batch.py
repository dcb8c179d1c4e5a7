r"""A batch of the compiled QP's items as tensors: one batched factorization for all of them (torch, any device).

While P and A are constant, the KKT matrix of every item's active set S is a principal part of one
fixed-size matrix (as in :class:`cbo.qp._PatternLDL`)

    K(a) = [[P, A^T diag(a)], [diag(a) A, -diag(1 - a)]],   a_i = 1 on the equalities and the rows of S, else 0,

whose solution of K(a) (z, omega) = (-q, -a * b) has omega_i = -lam_i on the rows of S and omega_i = 0 on the
others. When every item of a batch keeps its previous call's active set (an outer loop's small steps), the
forward pass is one ``torch.linalg.lu_factor`` of the (B, n + m, n + m) stack and one ``lu_solve``, the
backward pass one more ``lu_solve`` with the same factors (K(a) is symmetric): no Python loop over the items,
and the tensors stay on the inputs' device (GPU-ready).

The kept active sets are checked as :meth:`cbo.qp.QPProgram.solve` checks a reused one: positive multipliers
and strictly feasible inactive rows, in the units of :func:`cbo.qp.normalized_complementarity`. If one item
fails (its active set moved), :func:`batched_forward` returns None and the layer solves the batch item by item.
K(a) needs no new singularity check: with P and A constant it depends on the active set only, and each kept
active set was factored and checked when the QP solver found it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from .qp import SIGN_TOL, QPProgram

__all__ = ["BatchedKKT", "batched_forward", "batched_vjp", "uses_batched_path", "BATCH_MIN_ITEMS"]

# On the CPU, batches of at least BATCH_MIN_ITEMS items of programs with n + m <= CPU_MAX_SIZE take the
# batched path; smaller batches and larger programs are faster item by item there (numpy, range-space factors
# kept per active set). On a GPU every batch with n + m <= BATCH_MAX_SIZE does (K(a) is dense, (n + m)^2 per item).
BATCH_MIN_ITEMS, CPU_MAX_SIZE, BATCH_MAX_SIZE = 32, 100, 600


def uses_batched_path(program: QPProgram, batch_size: int, device: torch.device, warm_start: bool) -> bool:
    """Whether a layer call takes the batched path: constant P and A (dense), no lifted parameters, every
    item with a kept active set, and a batch on a GPU (or a large batch of a small program on the CPU)."""
    on_cpu, size = device.type == "cpu", program.n + program.m
    return (warm_start and program.dense and size <= (CPU_MAX_SIZE if on_cpu else BATCH_MAX_SIZE)
            and (batch_size >= BATCH_MIN_ITEMS or not on_cpu)
            and program._constant_matrices and not program.lifted
            and isinstance(program._q.matrix, np.ndarray) and isinstance(program._b.matrix, np.ndarray)
            and all(b in program._last_active for b in range(batch_size)))


@dataclass
class BatchedKKT:
    """The batch's solution and factorization: z (B, n), lam (B, m), a (B, m), the LU factors of K(a),
    the largest KKT residual per item, and the adjoint residuals (after :func:`batched_vjp`)."""

    z: torch.Tensor
    lam: torch.Tensor
    a: torch.Tensor
    lu: torch.Tensor
    pivots: torch.Tensor
    kkt_residual: torch.Tensor
    adjoint_residual: torch.Tensor | None = None


class _Constants:
    """P, A, the maps theta -> q, b, the equilibration and the index maps of a program, as tensors on one device."""

    def __init__(self, program: QPProgram, device: torch.device):
        def tensor(array, dtype=torch.float64):
            return torch.as_tensor(np.asarray(array), dtype=dtype, device=device)

        self.P, self.A = tensor(program._P_const), tensor(program._A_const)
        self.q_map, self.b_map = tensor(program._q.matrix), tensor(program._b.matrix)
        self.d_z, self.d_rows = (tensor(s) for s in program._scales_cache)
        self.y_index = tensor(program.y_index, torch.long)
        self.mu_index, self.nu_index = tensor(program.mu_index, torch.long), tensor(program.nu_index, torch.long)
        self.factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # the last batch's (a, LU)


def _constants(program: QPProgram, device: torch.device) -> _Constants:
    """The program's constants on ``device``, built once per device."""
    if device not in program.batch_constants:
        program.batch_constants[device] = _Constants(program, device)
    return program.batch_constants[device]


def _theta(program: QPProgram, x: list[torch.Tensor]) -> torch.Tensor:
    """theta (B, T + 1) of the batch, as :meth:`cbo.qp.QPProgram.theta` for one item: each parameter's entries
    in Fortran order (cvxpy's), then a 1."""
    batch, like = x[0].shape[0], x[0]
    theta = like.new_empty(batch, program._theta_slices[-1][1] + 1, dtype=torch.float64)
    for param, start, size in program._theta_slices[:-1]:
        index = program._listed.get(param.id)
        if index is None:
            value = torch.as_tensor(np.asarray(param.value, dtype=float), device=like.device).expand(batch, *param.shape)
        else:
            value = x[index]
        theta[:, start:start + size] = value.permute(0, *range(value.dim() - 1, 0, -1)).reshape(batch, size)
    theta[:, -1] = 1.0
    return theta


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """One torch thread for the batched work on the CPU: its small batched LAPACK calls ran 60x slower with
    two OpenMP threads on a 2-core machine with another busy process (6 ms against 0.09 ms for 8 LUs of
    48 x 48), and gain nothing from a second thread at these sizes."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def batched_forward(program: QPProgram, x: list[torch.Tensor], active_tol: float) -> BatchedKKT | None:
    """Polish every item of the batch on its kept active set at once; None if one of them fails its checks.

    ``x``: one tensor (B, *shape) per listed parameter, float64, on one device.
    """
    with _one_cpu_thread(x[0].device):
        return _batched_forward(program, x, active_tol)


def _batched_forward(program: QPProgram, x: list[torch.Tensor], active_tol: float) -> BatchedKKT | None:
    c = _constants(program, x[0].device)
    n, m, n_eq, batch = program.n, program.m, program.n_eq, x[0].shape[0]
    theta = _theta(program, x)
    q, b = theta @ c.q_map.T, theta @ c.b_map.T
    kept = torch.as_tensor(np.stack([program._last_active[i] for i in range(batch)]), device=theta.device)
    a = torch.cat([theta.new_ones(batch, n_eq), kept.to(theta.dtype)], dim=1)
    if c.factors is not None and c.factors[0].shape == a.shape:
        changed = (c.factors[0] != a).any(dim=1)  # items whose active set moved since the last batch
        lu, pivots = c.factors[1:]
    else:
        changed = torch.ones(batch, dtype=torch.bool, device=a.device)
        lu, pivots = theta.new_empty(batch, n + m, n + m), torch.empty(batch, n + m, dtype=torch.int32, device=a.device)
    if bool(changed.any()):
        lu, pivots = lu.clone(), pivots.clone()  # an earlier batch's backward pass may still need the old factors
        lu[changed], pivots[changed], info = torch.linalg.lu_factor_ex(_kkt_matrices(c, a[changed], n, m))
        if bool((info != 0).any()):
            return None
    c.factors = (a, lu, pivots)
    solution = torch.linalg.lu_solve(lu, pivots, torch.cat([-q, -a * b], dim=1)[:, :, None])[:, :, 0]
    z, lam = solution[:, :n], -solution[:, n:] * a
    force, slack = _normalized_complementarity(c, z, lam, q, b, n_eq)
    tol_w = float(np.sqrt(active_tol)) / 10
    weak = (force <= tol_w) & (slack.abs() <= tol_w)  # cbo.qp.weakly_active
    if bool(((force < -SIGN_TOL) | (slack < -SIGN_TOL) | weak).any()) or not bool(torch.isfinite(solution).all()):
        return None
    stationarity = z @ c.P + q - lam @ c.A
    rows = (z @ c.A.T + b) * a
    residual = torch.maximum(_abs_max(stationarity), _abs_max(rows))
    return BatchedKKT(z, lam, a, lu, pivots, residual)


def _kkt_matrices(c: _Constants, a: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """K(a) (B, n + m, n + m) for the rows' indicators ``a`` (B, m)."""
    K = a.new_zeros(a.shape[0], n + m, n + m)
    K[:, :n, :n] = c.P
    K[:, n:, :n] = a[:, :, None] * c.A
    K[:, :n, n:] = K[:, n:, :n].transpose(1, 2)
    K[:, n:, n:] = torch.diag_embed(a - 1.0)
    return K


def _normalized_complementarity(c: _Constants, z, lam, q, b, n_eq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cbo.qp.normalized_complementarity` for a batch (rows of the inequalities, per item)."""
    tiny = torch.finfo(z.dtype).tiny
    d = c.d_rows[n_eq:]
    slack = d * (z @ c.A[n_eq:].T + b[:, n_eq:])
    force = lam[:, n_eq:] / d
    slack_scale = torch.clamp(torch.maximum(_abs_max(z / c.d_z), _abs_max(slack)), min=tiny)
    force_scale = torch.clamp(torch.maximum(_abs_max(c.d_z * q), _abs_max(force)), min=tiny)
    return force / force_scale[:, None], slack / slack_scale[:, None]


def _abs_max(t: torch.Tensor) -> torch.Tensor:
    """max |t| over the last dimension, per item (0 for an empty one)."""
    return t.abs().amax(dim=1) if t.shape[1] else t.new_zeros(t.shape[0])


def batched_vjp(program: QPProgram, point: BatchedKKT, dF_dw: torch.Tensor) -> list[torch.Tensor]:
    r"""dF/dx (B, *shape) for each listed parameter from dF/dw (B, n_w), w = (y, mu, nu), as
    :meth:`cbo.qp.QPProgram.vjp` for every item at once: K(a) v = (dF/dz, -a * dF/dlam) with the forward
    pass's factors, dF/dtheta = -v_z Q - v_omega B for the maps theta -> q = Q theta, b = B theta.
    Sets ``point.adjoint_residual`` (B,), ||K(a) v - rhs|| / ||rhs||."""
    with _one_cpu_thread(dF_dw.device):
        return _batched_vjp(program, point, dF_dw)


def _batched_vjp(program: QPProgram, point: BatchedKKT, dF_dw: torch.Tensor) -> list[torch.Tensor]:
    c = _constants(program, dF_dw.device)
    n, n_y = program.n, program.y_index.size
    rhs = dF_dw.new_zeros(dF_dw.shape[0], n + program.m)
    rhs[:, c.y_index] = dF_dw[:, :n_y]
    if dF_dw.shape[1] > n_y:
        dF_dlam = dF_dw.new_zeros(dF_dw.shape[0], program.m)
        dF_dlam[:, torch.cat([c.mu_index, c.nu_index])] = dF_dw[:, n_y:]
        rhs[:, n:] = -dF_dlam * point.a
    v = torch.linalg.lu_solve(point.lu, point.pivots, rhs[:, :, None])[:, :, 0]
    v_z, v_omega = v[:, :n], v[:, n:]
    matvec = torch.cat([v_z @ c.P + (point.a * v_omega) @ c.A, point.a * (v_z @ c.A.T) - (1 - point.a) * v_omega], 1)
    norm = rhs.norm(dim=1)
    point.adjoint_residual = torch.where(norm > 0, (matvec - rhs).norm(dim=1) / norm.clamp(min=1e-300), 0 * norm)
    d_theta = -v_z @ c.q_map - v_omega @ c.b_map
    grads = []
    for param in program.problem.parameters:
        start, size = next((s, k) for p, s, k in program._theta_slices if p.id == param.id)
        flat = d_theta[:, start:start + size]
        grads.append(flat.reshape(-1, *reversed(param.shape)).permute(0, *range(len(param.shape), 0, -1))
                     if param.shape else flat.reshape(-1))
    return grads
