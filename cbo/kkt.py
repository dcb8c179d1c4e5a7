r"""The KKT system of the active set, as a matrix-free torch operator.

With w = (y, mu_A, nu) and the Lagrangian of the active constraints

    L(w, x) = g(x, y) + mu_A . p_A(x, y) + nu . q(x, y),

the KKT residual is R(w, x) = grad_w L = (grad_y L, p_A, q), which vanishes at
the inner solution. Its Jacobian in w is the symmetric, indefinite KKT matrix

    K = hess_ww L = [[H, J^T], [J, 0]],   H = hess_yy L,   J = d(p_A, q)/dy,

so every product K v is one Hessian-vector product of L, and every
(dR/dx)^T v one mixed second derivative: both come from torch autograd on the
graph of R, built once per point w.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import DegenerateKKTWarning
from .problem import BilevelProblem

__all__ = ["ActiveSet", "active_set", "KKTOperator", "polish", "PolishInfo", "licq_check", "LICQInfo"]


# ---------------------------------------------------------------- active set

@dataclass
class ActiveSet:
    """Which stacked inequality entries are active at the inner solution.

    Attributes
    ----------
    active : LongTensor
        Entries with mu_i > tol_mu (strongly active): kept as equalities.
    weakly_active : list[int]
        Entries with mu_i <= tol_mu but |p_i| <= tol_p: strict
        complementarity fails, the derivative is one-sided there. They are
        treated as inactive.
    labels : dict[int, str]
        Human-readable names of the weakly active entries.
    tol_mu, tol_p : float
        The thresholds used.
    """

    active: torch.Tensor
    weakly_active: list[int] = field(default_factory=list)
    labels: dict[int, str] = field(default_factory=dict)
    tol_mu: float = 0.0
    tol_p: float = 0.0

    @property
    def signature(self) -> tuple:
        return tuple(self.active.tolist())


def active_set(problem: BilevelProblem, mu: np.ndarray, slack: np.ndarray, tol: float = 1e-6) -> ActiveSet:
    r"""Classify inequality entries from the multipliers mu and constraint values p = slack.

    With scales s_mu = max(1, ||mu||_inf) and s_p = max(1, ||p||_inf):

    * *weakly active* when mu_i <= tol_p s_mu and |p_i| <= tol_p s_p, with
      tol_p = sqrt(tol) / 10: the constraint touches its bound with a (near)
      zero multiplier. Strict complementarity fails, y*(x) has only one-sided
      derivatives there, and an interior-point solver returns mu_i and |p_i|
      both of order sqrt(its gap tolerance). Treated as inactive, and named in
      a :class:`DegenerateKKTWarning`.
    * *active* otherwise when mu_i > tol_mu = tol s_mu (seed 003: entries
      with mu_i = 0 are dropped from the KKT system);
    * *inactive* otherwise.
    """
    scale_mu = max(1.0, float(np.abs(mu).max(initial=0.0)))
    scale_p = max(1.0, float(np.abs(slack).max(initial=0.0)))
    tol_mu, tol_p = tol * scale_mu, np.sqrt(tol) / 10 * scale_p
    weak_mask = (mu <= np.sqrt(tol) / 10 * scale_mu) & (np.abs(slack) <= tol_p)
    is_active = (mu > tol_mu) & ~weak_mask
    weak = np.flatnonzero(weak_mask)
    labels = {int(i): problem.constraint_label(int(i)) for i in weak}
    if labels:
        warnings.warn(
            "Strict complementarity fails at the inner solution: "
            + problem.describe_entries(weak)
            + " touch(es) the bound with a zero multiplier (weakly active). y*(x) is not "
            "differentiable there; cbo returns the one-sided derivative that keeps these "
            "constraints inactive. Move x slightly, or check info.active_set.",
            DegenerateKKTWarning,
            stacklevel=4,
        )
    return ActiveSet(torch.as_tensor(np.flatnonzero(is_active), dtype=torch.long), list(map(int, weak)), labels, tol_mu, tol_p)


# ---------------------------------------------------------------- operator

class KKTOperator:
    r"""Products with K = hess_ww L and with (dR/dx)^T at one point (w, x).

    Parameters
    ----------
    problem : BilevelProblem
    x : list of tensors
        Parameter values (device and dtype of the whole computation).
    w : tensor, shape (n_y + n_A + n_eq,)
        Stacked (y, mu_A, nu).
    active : LongTensor
        Active entries of the stacked inequalities.
    """

    def __init__(self, problem: BilevelProblem, x: Sequence[torch.Tensor], w: torch.Tensor, active: torch.Tensor):
        self.problem = problem
        self.active = active.to(w.device)
        self.n_y = problem.n_y
        self.n_dual = w.numel() - self.n_y
        self.x = [t.detach().requires_grad_(True) for t in x]
        self.w = w.detach().requires_grad_(True)
        y, mu_active, nu = torch.split(self.w, [self.n_y, self.active.numel(), problem.n_eq])
        with torch.enable_grad():
            L = problem.lagrangian(self.x, y, mu_active, self.active, nu)
            (self.R,) = torch.autograd.grad(L, self.w, create_graph=True)

    @property
    def size(self) -> int:
        return self.w.numel()

    @property
    def residual(self) -> torch.Tensor:
        """R(w, x) = (grad_y L, p_A, q)."""
        return self.R.detach()

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """K v for v of shape (N,) or (B, N) (a batch of vectors)."""
        batched = v.dim() == 2
        (Kv,) = torch.autograd.grad(self.R, self.w, v, retain_graph=True, is_grads_batched=batched, allow_unused=True)
        return torch.zeros_like(v) if Kv is None else Kv

    def vjp_x(self, v: torch.Tensor) -> list[torch.Tensor]:
        """(dR/dx)^T v, one tensor per parameter."""
        grads = torch.autograd.grad(self.R, self.x, v, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for t, g in zip(self.x, grads)]

    def dense(self) -> torch.Tensor:
        """K as a dense (N, N) matrix: N Hessian-vector products at once."""
        return self.matvec(torch.eye(self.size, dtype=self.w.dtype, device=self.w.device))

    def constraint_jacobian(self) -> torch.Tensor:
        """J = d(p_A, q)/dy as a dense (n_dual, n_y) matrix, from K e_j for the dual unit vectors."""
        if self.n_dual == 0:
            return torch.zeros(0, self.n_y, dtype=self.w.dtype, device=self.w.device)
        E = torch.zeros(self.n_dual, self.size, dtype=self.w.dtype, device=self.w.device)
        E[:, self.n_y:] = torch.eye(self.n_dual, dtype=self.w.dtype, device=self.w.device)
        return self.matvec(E)[:, : self.n_y]


# ---------------------------------------------------------------- LICQ

@dataclass
class LICQInfo:
    """Linear independence of the active constraint gradients (the rows of J)."""

    rank: int
    n_constraints: int
    smallest_singular_value: float

    @property
    def holds(self) -> bool:
        return self.rank == self.n_constraints


def licq_check(op: KKTOperator, tol: float = 1e-9) -> LICQInfo:
    """Rank of J by SVD; warn with :class:`DegenerateKKTWarning` when LICQ fails."""
    J = op.constraint_jacobian()
    if J.shape[0] == 0:
        return LICQInfo(0, 0, float("inf"))
    s = torch.linalg.svdvals(J)
    rank = int((s > tol * max(1.0, float(s[0]))).sum())
    info = LICQInfo(rank, J.shape[0], float(s[-1]) if J.shape[0] <= J.shape[1] else 0.0)
    if not info.holds:
        warnings.warn(
            f"LICQ fails at the inner solution: the {info.n_constraints} active constraints "
            f"(active inequalities and equalities) have gradients of rank {rank} only. The multipliers are "
            "not unique; the hypergradient uses a least-squares / minimum-residual solution. Remove "
            "redundant constraints for a well-posed problem.",
            DegenerateKKTWarning,
            stacklevel=3,
        )
    return info


# ---------------------------------------------------------------- polish

@dataclass
class PolishInfo:
    """Newton polish of w on R(w, x) = 0."""

    steps: int
    residual_before: float
    residual_after: float
    accepted: bool
    reason: str = ""


def polish(
    problem: BilevelProblem,
    x: Sequence[torch.Tensor],
    w: torch.Tensor,
    active: ActiveSet,
    slack_inactive_ok: Callable[[torch.Tensor], bool],
    linear_solve: Callable[[KKTOperator, torch.Tensor], torch.Tensor],
    tol: float = 1e-12,
    max_steps: int = 5,
) -> tuple[KKTOperator, PolishInfo]:
    r"""Newton steps w <- w - K^{-1} R(w) on the active-set KKT system.

    Interior-point solutions are accurate to ~1e-8 on QPs but only to 1e-5..1e-7
    on exponential and second-order cone problems; a few Newton steps bring
    ||R||_inf to ~1e-14 (one step on a QP). The step is rejected (the cvxpy
    solution kept) if it makes an active multiplier negative or an inactive
    constraint infeasible: that means the active set was misjudged.

    ``slack_inactive_ok(y) -> bool`` checks the inactive constraints;
    ``linear_solve(op, rhs)`` solves K d = rhs (one of the adjoint solvers: the
    step needs only a modest relative accuracy, as rhs = -R is already small).
    Returns the operator at the final point and a :class:`PolishInfo`.
    """
    op = KKTOperator(problem, x, w, active.active)
    before = _residual_norm(op)
    best_op, best = op, before
    steps = 0
    n_y, n_A = problem.n_y, active.active.numel()
    while steps < max_steps and best > tol * _residual_scale(best_op):
        step = linear_solve(op, -op.residual)
        candidate = op.w.detach() + step
        if n_A and (candidate[n_y:n_y + n_A] < 0).any():
            return best_op, PolishInfo(steps, before, best, steps > 0, "an active multiplier turned negative")
        if not slack_inactive_ok(candidate[:n_y]):
            return best_op, PolishInfo(steps, before, best, steps > 0, "an inactive constraint became violated")
        op = KKTOperator(problem, x, candidate, active.active)
        steps += 1
        residual = _residual_norm(op)
        if residual >= best:
            break
        best_op, best = op, residual
    return best_op, PolishInfo(steps, before, best, True)


def _residual_norm(op: KKTOperator) -> float:
    return float(op.residual.abs().max()) if op.size else 0.0


def _residual_scale(op: KKTOperator) -> float:
    return max(1.0, float(op.w.detach().abs().max())) if op.size else 1.0
