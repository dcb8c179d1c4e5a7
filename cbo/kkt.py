r"""The KKT system of the active set, as a matrix-free, batched torch operator.

With w = (y, mu, nu) and the Lagrangian of the active constraints (inactive
multipliers padded with the trivial equation mu_i = 0, see
:meth:`BilevelProblem.lagrangian`)

    L(w, x) = g(x, y) + mu_A . p_A(x, y) + nu . q(x, y),

the KKT residual is R(w, x) = grad_w L = (grad_y L, p_A, q), which vanishes at
the inner solution. Its Jacobian in w is the symmetric, indefinite KKT matrix

    K = hess_ww L = [[H, J^T], [J, 0]],   H = hess_yy L,   J = d(p_A, q)/dy

(with a unit diagonal on the padded inactive rows), so every product K v is
one Hessian-vector product of L, and every (dR/dx)^T v one mixed second
derivative: both come from torch autograd on the graph of R, built once per
point w. A batch of B items is one graph (the items' Lagrangians evaluated by
``torch.func.vmap`` and summed), so one backward pass applies all B operators.
J, needed by the null-space solvers and the LICQ check, is the Jacobian of
the constraints alone (not of R), computed once per operator.

Objectives and constraints written at very different scales (a Hessian of
1e6 next to constraint rows of 1e-6, variables of 1e-3 next to 1e3) make K
badly conditioned, although the derivative itself is not: every solver works
on the equilibrated system D K D (:func:`equilibration`), and the active
set and the polish's residual tests are judged in the same scaled units.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from torch.func import vmap

from .errors import DegenerateKKTWarning, InaccurateSolutionWarning, warn, warn_weakly_active
from .linsolve import NullSpaceSystem, equilibrated_solve

if TYPE_CHECKING:
    from .problem import BilevelProblem

__all__ = [
    "ActiveSet", "active_set", "KKTOperator", "EquilibratedKKT", "equilibration", "ConstraintGram", "curvature_check",
    "polish", "PolishInfo", "licq_check", "LICQInfo", "kkt_at_solutions",
]


# ---------------------------------------------------------------- active set

_NO_ENTRIES = torch.zeros(0, dtype=torch.long)  # the default of ActiveSet.weakly_active (empty: never written)


@dataclass
class ActiveSet:
    """Which stacked inequality entries are active at one inner solution.

    Attributes
    ----------
    active : LongTensor
        Entries kept as equalities in the KKT system.
    weakly_active : LongTensor
        Entries touching their bound with a (near) zero multiplier: strict
        complementarity fails, the derivative is one-sided there. Treated as
        inactive. (A sequence of ints given here is stored as a LongTensor.)
    labels : dict[int, str]
        Human-readable names of the weakly active entries.
    tol_mu, tol_p : float
        The thresholds used, in the units of the equilibrated KKT system (see
        :func:`active_set`).
    """

    active: torch.Tensor
    weakly_active: torch.Tensor = field(default_factory=lambda: _NO_ENTRIES)
    labels: dict[int, str] = field(default_factory=dict)
    tol_mu: float = 0.0
    tol_p: float = 0.0

    def __post_init__(self):
        self.active = torch.as_tensor(self.active, dtype=torch.long)
        self.weakly_active = torch.as_tensor(self.weakly_active, dtype=torch.long)

    @property
    def signature(self) -> tuple:
        return tuple(self.active.tolist())

    def mask(self, n_ineq: int) -> torch.Tensor:
        """The active set as a {0, 1} float64 vector over all inequality entries."""
        mask = torch.zeros(n_ineq, dtype=torch.float64)
        mask[self.active] = 1.0
        return mask


def active_set(problem: BilevelProblem, mu: np.ndarray, slack: np.ndarray, tol: float = 1e-6,
               where: str = "", scale: np.ndarray | None = None, unit: float = 1.0) -> ActiveSet:
    r"""Classify inequality entries from the multipliers mu and constraint values p = slack.

    Complementarity says mu_i p_i = 0, and an interior-point solver returns
    both mu_i and |p_i| small but nonzero; which of the two is *relatively*
    larger tells an active entry from an inactive one. Both are compared in
    the units of the equilibrated KKT system (:func:`equilibration`, row
    scales d_i = ``scale``, default 1): mu~_i = mu_i / d_i and
    p~_i = d_i |p_i|, so that the objective's and each constraint's own
    scales drop out (mu~_i p~_i = mu_i |p_i|). With the scales
    s_mu = max(u, ||mu~||_inf) and s_p = max(u, ||p~||_inf), u = ``unit``
    the magnitude of the equilibrated KKT point, and tol_w = sqrt(tol) / 10:

    * *weakly active* when mu~_i <= tol_w s_mu and p~_i <= tol_w s_p: the
      constraint touches its bound with a (near) zero multiplier. Strict
      complementarity fails and y*(x) has only one-sided derivatives there.
      Treated as inactive, and named in a :class:`DegenerateKKTWarning`
      (prefixed by ``where``, e.g. a batch item).
    * *active* otherwise when mu~_i / s_mu > p~_i / s_p (and mu~_i > tol s_mu);
    * *inactive* otherwise (entries with mu_i = 0 drop out of the KKT system).
    """
    scale = np.ones_like(mu) if scale is None else scale
    mu, slack = mu / scale, np.abs(slack) * scale
    unit = max(unit, np.finfo(float).tiny)
    scale_mu = max(unit, float(np.abs(mu).max(initial=0.0)))
    scale_p = max(unit, float(slack.max(initial=0.0)))
    tol_w = np.sqrt(tol) / 10
    weak_mask = (mu <= tol_w * scale_mu) & (slack <= tol_w * scale_p)
    is_active = (mu / scale_mu > slack / scale_p) & (mu > tol * scale_mu) & ~weak_mask
    weak = np.flatnonzero(weak_mask)
    labels = {int(i): problem.constraint_label(int(i)) for i in weak}
    if labels:
        warn_weakly_active(where, problem.describe_entries(weak))
    return ActiveSet(torch.as_tensor(np.flatnonzero(is_active), dtype=torch.long), torch.as_tensor(weak), labels,
                     tol * scale_mu, tol_w * scale_p)


# ---------------------------------------------------------------- operator

class _KKTSystem:
    """What the solvers use of a KKT operator besides its products: sizes, and the Gram factorization of J."""

    n_y: int
    n_dual: int
    dual_mask: torch.Tensor
    w: torch.Tensor
    scale: torch.Tensor | None = None
    _gram: ConstraintGram | None = None
    _equilibrated: EquilibratedKKT | None = None

    @property
    def size(self) -> int:
        return self.w.shape[-1]

    @property
    def batch_size(self) -> int:
        return self.w.shape[0]

    def constraint_jacobian(self) -> torch.Tensor:
        raise NotImplementedError

    def constraint_gram(self) -> ConstraintGram:
        """The active rows of J and the factorization of their Gram matrix. Computed once."""
        if self._gram is None:
            self._gram = ConstraintGram(self.constraint_jacobian(), self.dual_mask)
        return self._gram

    def equilibrated(self) -> _KKTSystem:
        """D K D (an :class:`EquilibratedKKT`, made once) if the operator has a ``scale``, else itself."""
        if self.scale is None:
            return self
        if self._equilibrated is None:
            self._equilibrated = EquilibratedKKT(self)
        return self._equilibrated


class KKTOperator(_KKTSystem):
    r"""Products with K = hess_ww L and with (dR/dx)^T at a batch of points (w, x).

    Parameters
    ----------
    problem : BilevelProblem
    x : list of tensors, each (B, *parameter.shape)
        Parameter values; their device and dtype are the computation's.
    w : tensor (B, n_y + n_ineq + n_eq)
        Stacked (y, mu, nu) per item; mu is zero off the active set.
    active : tensor (B, n_ineq)
        1.0 on active inequality entries, 0.0 elsewhere.
    scale : tensor (B, N), optional
        Diagonal of the equilibration D (:func:`equilibration`) that
        :meth:`equilibrated` applies; None: no equilibration.

    The dense matrices J and K, when asked for, come from ``torch.func``
    Jacobians (of the constraints alone for J).
    """

    def __init__(self, problem: BilevelProblem, x: Sequence[torch.Tensor], w: torch.Tensor, active: torch.Tensor,
                 scale: torch.Tensor | None = None):
        self.problem, self.scale = problem, scale
        self.n_y, self.n_dual = problem.n_y, problem.n_ineq + problem.n_eq
        self.active = active.to(w)
        self.dual_mask = torch.cat([self.active, torch.ones_like(w[:, :problem.n_eq])], -1)
        self.x = [t.detach().requires_grad_(True) for t in x]
        self.w = w.detach().requires_grad_(True)
        self._jacobian: torch.Tensor | None = None
        with torch.enable_grad():
            L = vmap(problem.lagrangian)(self.x, self.w, self.active).sum()
            (self.R,) = torch.autograd.grad(L, self.w, create_graph=True)

    @property
    def residual(self) -> torch.Tensor:
        """R(w, x) = (grad_y L, p_A, q), shape (B, N)."""
        return self.R.detach()

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """K v for v of shape (B, N), or (k, B, N) for k products in one vectorized backward pass."""
        (Kv,) = torch.autograd.grad(self.R, self.w, v, retain_graph=True, allow_unused=True,
                                    is_grads_batched=v.dim() == 3)
        return torch.zeros_like(v) if Kv is None else Kv

    def vjp_x(self, v: torch.Tensor) -> list[torch.Tensor]:
        """(dR/dx)^T v, one (B, *shape) tensor per parameter."""
        grads = torch.autograd.grad(self.R, self.x, v, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for t, g in zip(self.x, grads)]

    def dense(self) -> torch.Tensor:
        """K = hess_ww L as dense (B, N, N) matrices."""
        x, w = [t.detach() for t in self.x], self.w.detach()
        return vmap(torch.func.hessian(self.problem.lagrangian, argnums=1))(x, w, self.active)

    def constraint_jacobian(self) -> torch.Tensor:
        """J = d(a * p, q)/dy, shape (B, n_dual, n_y): zero rows for inactive entries. Computed once."""
        if self._jacobian is None:
            x, y = [t.detach() for t in self.x], self.w.detach()[:, : self.n_y]
            if self.n_dual == 0:
                self._jacobian = torch.zeros(self.batch_size, 0, self.n_y, dtype=y.dtype, device=y.device)
            else:
                jacobian = torch.func.jacrev(self.problem.active_constraints, argnums=1)
                self._jacobian = vmap(jacobian)(x, y, self.active)
        return self._jacobian

    def scaled_residual(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(||D R||_inf, ||D^{-1} w||_inf) per item: the residual and the size of the point in the units
        of the equilibrated system (D = I without a ``scale``)."""
        if not self.size:
            zeros = torch.zeros(self.batch_size, dtype=self.w.dtype, device=self.w.device)
            return zeros, zeros
        d = torch.ones_like(self.w) if self.scale is None else self.scale
        return (d * self.residual).abs().amax(-1), (self.w.detach() / d).abs().amax(-1)


class EquilibratedKKT(_KKTSystem):
    r"""The equilibrated operator K~ = D K D of a :class:`KKTOperator` with a ``scale`` d = diag(D).

    K v = b is solved as K~ u = D b, v = D u. K~ has the interface the
    solvers of :mod:`cbo.linsolve` use (products, dense form, J~ = D_l J D_y
    and its Gram factorization); its point is w~ = D^{-1} w.
    """

    def __init__(self, op: KKTOperator):
        # A proxy: op caches this object, and a strong reference back would make a cycle that only the
        # cyclic garbage collector frees (memory then grows between its rare full collections).
        self.op, self.d = weakref.proxy(op), op.scale
        self.n_y, self.n_dual, self.dual_mask = op.n_y, op.n_dual, op.dual_mask
        self.w = op.w.detach() / self.d

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """D K D v."""
        return self.d * self.op.matvec(self.d * v)

    def dense(self) -> torch.Tensor:
        """D K D as dense (B, N, N) matrices."""
        return self.d[:, :, None] * self.op.dense() * self.d[:, None, :]

    def constraint_jacobian(self) -> torch.Tensor:
        """J~ = D_l J D_y, shape (B, n_dual, n_y)."""
        d_y, d_dual = self.d[:, : self.n_y], self.d[:, self.n_y:]
        return d_dual[:, :, None] * self.op.constraint_jacobian() * d_y[:, None, :]


def equilibration(op: KKTOperator, probes: int = 8, rounds: int = 4, spread: float = 10.0) -> torch.Tensor:
    r"""Diagonal D = diag(d_y, d_l), shape (B, N), that balances K = [[H, J^T], [J, 0]].

    D K D = [[D_y H D_y, (D_l J D_y)^T], [D_l J D_y, 0]] gets Hessian rows and
    constraint rows of about unit norm, whatever the scales the objective,
    the constraints and the variables were written in:

    * d_y: the row norms r_j of D_y H D_y are estimated matrix-free from
      ``probes`` Rademacher vectors z, r_j^2 = E[(D_y H D_y z)_j^2]. If they
      are all within a factor ``spread`` of their median m, one scalar step
      d_y = 1 / sqrt(m): free of the estimates' noise, and the projected
      solvers' iterates are then those of the unscaled system (only their
      stopping test changes). Else ``rounds`` symmetric Ruiz steps
      d_y <- d_y / sqrt(r), each row by its own norm (rows without curvature,
      r_j <= 1e-12 max r, by m).
    * d_l: d_i = 1 / ||(J D_y)_i||, exact since J is formed (1 for zero rows,
      e.g. inactive ones).

    The probes use a fixed seed: the scaling, and so the solvers' iterates,
    are reproducible.
    """
    generator = torch.Generator().manual_seed(0)
    d_y = torch.ones(op.batch_size, op.n_y, dtype=op.w.dtype, device=op.w.device)
    for step in range(rounds):
        z = (2 * torch.randint(0, 2, (probes, *d_y.shape), generator=generator) - 1).to(d_y)
        products = op.matvec(torch.cat([d_y * z, z.new_zeros(probes, op.batch_size, op.n_dual)], -1))
        norms = (d_y * products[..., : op.n_y]).pow(2).mean(0).sqrt()
        curved = norms > 1e-12 * norms.amax(-1, keepdim=True)
        median = torch.nanmedian(torch.where(curved, norms, torch.nan), -1, keepdim=True).values  # NaN: no curvature
        if step == 0:  # items whose rows are of different scales: balance them row by row
            ruiz = (curved & ((norms > spread * median) | (norms < median / spread))).any(-1, keepdim=True)
        update = (median > 0) & (ruiz | (step == 0))
        d_y = torch.where(update, d_y / torch.where(ruiz & curved, norms, median).sqrt(), d_y)
        if not bool(ruiz.any()):
            break
    rows = torch.linalg.vector_norm(op.constraint_jacobian() * d_y[:, None, :], dim=-1)
    return torch.cat([d_y, torch.where(rows > 0, 1 / rows, torch.ones_like(rows))], -1)


class ConstraintGram:
    r"""Each item's active rows of J, packed, and a factorization of G = J_A J_A^T.

    Items have different numbers of active rows; they are packed into r =
    max_b (active rows of b) rows, the spare rows zero with a unit diagonal in
    G, so that one batched Cholesky factors all items. The rows are scaled to
    unit norm before factoring (the projector onto null(J_A) does not depend
    on row scales). If some G is singular (LICQ fails) its solves use the
    pseudo-inverse.

    Attributes
    ----------
    rows : LongTensor (B, r)
        Positions of the packed rows among the n_dual dual entries.
    valid : tensor (B, r)
        1.0 on real rows, 0.0 on spare ones.
    J : tensor (B, r, n_y)
        The packed rows.
    pivots : tensor (B, r)
        Diagonal of the Cholesky factor of the row-equilibrated G (all ones on
        spare rows; NaN if the factorization failed).
    """

    def __init__(self, jacobian: torch.Tensor, dual_mask: torch.Tensor):
        counts = dual_mask.sum(-1).round().long()
        r = int(counts.max()) if counts.numel() else 0
        order = torch.argsort(-dual_mask, dim=-1, stable=True)[:, :r]  # active rows first, in order
        self.rows = order
        self.valid = torch.gather(dual_mask, 1, order)
        self.J = torch.gather(jacobian, 1, order[..., None].expand(-1, -1, jacobian.shape[-1])) * self.valid[..., None]
        self.n_dual = dual_mask.shape[-1]
        # Equilibrate: G = D^{-1} G_s D^{-1} with G_s = (D J)(D J)^T, D = 1 / row norms, so that
        # constraints written at very different scales factor (and pass the LICQ test) alike.
        norms = self.J.norm(dim=-1)
        row_scale = torch.where((self.valid > 0) & (norms > 0), 1 / norms.clamp_min(1e-300), torch.ones_like(norms))
        scaled = self.J * row_scale[..., None]
        gram = scaled @ scaled.mT + torch.diag_embed(1 - self.valid)
        L, status = torch.linalg.cholesky_ex(gram)
        diagonal = torch.diagonal(L, dim1=-2, dim2=-1)
        self.pivots = torch.where((status == 0)[:, None], diagonal, torch.full_like(diagonal, float("nan")))
        healthy = (status == 0) & (diagonal.amin(-1) > 1e-7 * diagonal.amax(-1)) if r else status == 0
        if bool(healthy.all()):
            def scaled_solve(u):
                return torch.cholesky_solve(u.unsqueeze(-1), L).squeeze(-1)
        else:
            pinv = torch.linalg.pinv(gram, hermitian=True)

            def scaled_solve(u):
                return (pinv @ u.unsqueeze(-1)).squeeze(-1)
        self._row_scale, self._scaled_solve = row_scale, scaled_solve

    def solve(self, u: torch.Tensor) -> torch.Tensor:
        """G^{-1} u = D G_s^{-1} D u for packed dual vectors u (B, r)."""
        return self._row_scale * self._scaled_solve(self._row_scale * u)

    def pack(self, u: torch.Tensor) -> torch.Tensor:
        """The active entries of full dual vectors u (B, n_dual), packed to (B, r)."""
        return torch.gather(u, 1, self.rows) * self.valid

    def unpack(self, u: torch.Tensor) -> torch.Tensor:
        """Packed vectors (B, r) back to full dual vectors (B, n_dual), zero off the active rows."""
        return torch.zeros(u.shape[0], self.n_dual, dtype=u.dtype, device=u.device).scatter_add(
            1, self.rows, u * self.valid)

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """J_A z: (B, n_y) -> (B, r)."""
        return torch.einsum("brn,bn->br", self.J, z)

    def apply_transpose(self, u: torch.Tensor) -> torch.Tensor:
        """J_A^T u: (B, r) -> (B, n_y)."""
        return torch.einsum("brn,br->bn", self.J, u)


# ---------------------------------------------------------------- LICQ

@dataclass
class LICQInfo:
    """Linear independence of one item's active constraint gradients (the rows of J).

    ``conditioning`` is min/max of the Cholesky pivots of J_A J_A^T, the
    square root of its inverse condition number: near 0 (below the check's
    tolerance) when LICQ fails, 0 if the factorization broke down.
    """

    rank: int
    n_constraints: int
    conditioning: float

    @property
    def holds(self) -> bool:
        return self.rank == self.n_constraints


def licq_check(op: KKTOperator, tol: float = 1e-7, where: Callable[[int], str] = lambda b: "") -> list[LICQInfo]:
    """LICQ per item from the Cholesky pivots of J_A J_A^T (:meth:`KKTOperator.constraint_gram`), with the
    columns of J scaled as in the equilibrated system (:meth:`KKTOperator.equilibrated`).

    Pivots below ``tol`` times the largest flag rank deficiency; only then is
    the rank computed, by SVD. Warns with :class:`DegenerateKKTWarning` where LICQ fails.
    """
    gram = op.equilibrated().constraint_gram()
    counts = gram.valid.sum(-1).round().long().tolist()
    pivots = gram.pivots.abs()
    conditioning = (pivots.amin(-1) / pivots.amax(-1).clamp_min(1e-300)).nan_to_num(0.0) if pivots.shape[1] \
        else torch.ones(len(counts))
    infos = []
    for b, count in enumerate(counts):
        if float(conditioning[b]) > tol:
            infos.append(LICQInfo(count, count, float(conditioning[b])))
            continue
        values = torch.linalg.svdvals(gram.J[b, :count])
        rank = int((values > 1e-9 * max(1.0, float(values[0]))).sum())
        infos.append(LICQInfo(rank, count, float(conditioning[b])))
        if rank < count:
            warn(
                f"{where(b)}LICQ fails at the inner solution: the {count} active constraints "
                f"(active inequalities and equalities) have gradients of rank {rank} only. The multipliers "
                "are not unique; the hypergradient uses a least-squares / minimum-residual solution. Remove "
                "redundant constraints for a well-posed problem.",
                DegenerateKKTWarning,
            )
    return infos


# ---------------------------------------------------------------- polish

@dataclass
class PolishInfo:
    """Newton polish of one item's w on R(w, x) = 0."""

    steps: int
    residual_before: float
    residual_after: float
    accepted: bool
    reason: str = ""


def polish(
    problem: BilevelProblem,
    x: Sequence[torch.Tensor],
    w: torch.Tensor,
    active: torch.Tensor,
    linear_solve: Callable[[KKTOperator, torch.Tensor], torch.Tensor],
    tol_p: torch.Tensor,
    tol: float = 1e-12,
    max_steps: int = 5,
    scale: torch.Tensor | None = None,
    max_corrections: int = 3,
) -> tuple[KKTOperator, list[PolishInfo]]:
    r"""Newton steps w <- w - K^{-1} R(w) on the active-set KKT system, for a batch.

    Interior-point solutions are accurate to ~1e-8 on QPs but only to 1e-5..1e-7
    on exponential and second-order cone problems; a few Newton steps bring
    the residual to rounding level (one step on a QP). Residuals are measured
    in the units of the equilibrated system D K D (``scale`` = diag(D) with
    every inequality row, see :func:`equilibration`; D = I if None):
    ||D R||_inf, relative to ||D^{-1} w||_inf, steps stop below ``tol``.

    A step that makes an active multiplier negative, or an inactive
    constraint infeasible by more than ``tol_p`` (B,) in the same units
    (d_i p_i > tol_p), shows that the active set was misjudged (typically a
    weakly active constraint, met where an outer loop drives x to a kink):
    the item's active set is corrected as in a primal-dual active-set method
    — violated constraints join it with mu_i = 0, negative multipliers leave
    it — and Newton restarts from the same point, at most
    ``max_corrections`` times. A step that does not reduce the residual is
    rejected (the previous point kept).

    ``linear_solve(op, rhs)`` solves K d = rhs (one of the adjoint solvers: the
    step needs only modest relative accuracy, as rhs = -R is already small).
    Returns the operator at the final points (``op.active`` is the final
    active set) and one :class:`PolishInfo` per item, whose residuals are the
    unscaled ||R||_inf.
    """
    n_y, n_ineq = problem.n_y, problem.n_ineq
    rows = slice(n_y, n_y + n_ineq)
    row_scale = torch.ones_like(active) if scale is None else scale[:, rows]
    op = KKTOperator(problem, x, w, active, _padded_scale(scale, active, n_y))
    before = _residual_norms(op)
    best, size = op.scaled_residual()
    steps = torch.zeros_like(best, dtype=torch.long)
    corrections = torch.zeros_like(steps)
    reasons = [""] * op.batch_size
    pending = best > tol * size
    for _ in range(max_steps + max_corrections):
        if not bool(pending.any()):
            break
        candidate = torch.where(pending[:, None], op.w.detach() + linear_solve(op, -op.residual), op.w.detach())
        leaving = (active > 0) & (candidate[:, rows] < 0) & pending[:, None]
        slack = vmap(problem.inequality_values)(op.x, candidate[:, :n_y]).detach() if n_ineq else candidate[:, rows]
        joining = (active == 0) & (row_scale * slack > tol_p[:, None]) & pending[:, None]
        misjudged = (leaving | joining).any(-1)
        correct = misjudged & (corrections < max_corrections)
        for b in torch.nonzero(misjudged).flatten().tolist():
            reasons[b] = (f"active set corrected: {int(joining[b].sum())} constraint(s) joined, "
                          f"{int(leaving[b].sum())} left" if correct[b] else
                          "the active set kept changing (a multiplier turned negative or a constraint became violated)")
        if bool(correct.any()):
            active = torch.where(correct[:, None], (active + joining.double() - leaving.double()).clamp(0, 1), active)
            corrections += correct.long()
            w_kept = op.w.detach().clone()
            w_kept[:, rows] = w_kept[:, rows] * active  # joining rows start at mu_i = 0, leaving rows drop mu_i
            op = KKTOperator(problem, x, w_kept, active, _padded_scale(scale, active, n_y))
            best = torch.where(correct, op.scaled_residual()[0], best)
        trial_ok = pending & ~misjudged
        trial = KKTOperator(problem, x, torch.where(trial_ok[:, None], candidate, op.w.detach()), active,
                            op.scale)
        improved = trial_ok & (trial.scaled_residual()[0] < best)
        if not bool((improved | correct).any()):
            break
        accepted_w = torch.where(improved[:, None], trial.w.detach(), op.w.detach())
        op = trial if bool(improved.eq(trial_ok).all()) else KKTOperator(problem, x, accepted_w, active, op.scale)
        residual, size = op.scaled_residual()
        best = torch.where(improved, residual, best)
        steps += improved.long()
        pending = (improved | correct) & (best > tol * size)
    infos = [PolishInfo(int(s), float(r0), float(r1), not reason or int(s) > 0, reason)
             for s, r0, r1, reason in zip(steps, before, _residual_norms(op), reasons)]
    return op, infos


def _padded_scale(scale: torch.Tensor | None, active: torch.Tensor, n_y: int) -> torch.Tensor | None:
    """The equilibration with K_ii = 1 on the padded (inactive) multiplier rows."""
    if scale is None:
        return None
    padded = scale.clone()
    rows = padded[:, n_y:n_y + active.shape[-1]]
    padded[:, n_y:n_y + active.shape[-1]] = torch.where(active > 0, rows, torch.ones_like(rows))
    return padded


def _residual_norms(op: KKTOperator) -> torch.Tensor:
    return op.residual.abs().amax(-1) if op.size else torch.zeros(op.batch_size, dtype=op.w.dtype)


# ---------------------------------------------------------------- from cvxpy's solutions

def kkt_at_solutions(
    problem: BilevelProblem,
    x: Sequence[torch.Tensor],
    solutions: Sequence,
    method: str,
    active_tol: float = 1e-6,
    polish_solution: bool = True,
    where: Callable[[int], str] = lambda b: "",
) -> tuple[KKTOperator, list[ActiveSet], list[PolishInfo]]:
    """The (polished, equilibrated) KKT operator at a batch of cvxpy solutions.

    ``x`` are (B, *shape) parameter tensors and ``solutions`` B
    :class:`~cbo.inner.InnerSolution`. The equilibration D
    (:func:`equilibration`, the operator's ``scale``) is computed at cvxpy's
    point with every inequality kept; the active sets come from cvxpy's
    multipliers and constraint values in the units of D K D
    (:func:`active_set`); the Newton steps of the
    polish use ``method`` when it is "direct" or "minres", else projected CG
    (sound under the same assumption as "fixed_point" and "neumann", and
    faster). Warns with :class:`InaccurateSolutionWarning` for items whose
    equilibrated KKT residual stays above 1e-6 relative.
    """
    device = x[0].device
    as_tensor = lambda values: torch.as_tensor(np.stack(values), dtype=torch.float64, device=device)  # noqa: E731
    y = as_tensor([s.y for s in solutions])
    mu_all, nu = as_tensor([s.mu for s in solutions]), as_tensor([s.nu for s in solutions])
    w_all = torch.cat([y, mu_all, nu], -1)
    n_y, n_ineq = problem.n_y, problem.n_ineq
    scale = equilibration(KKTOperator(problem, x, w_all, torch.ones_like(mu_all)))
    unit = (w_all / scale).abs().amax(-1).tolist()
    slack = vmap(problem.inequality_values)(x, y).cpu().numpy()
    row_scale = scale[:, n_y:n_y + n_ineq].cpu().numpy()
    actives = []
    for b, (solution, values) in enumerate(zip(solutions, slack)):
        actives.append(active_set(problem, solution.mu, values, active_tol, where(b), row_scale[b], unit[b]))
    mask = torch.stack([a.mask(n_ineq) for a in actives]).to(device)
    w = torch.cat([y, mu_all * mask, nu], -1)
    if polish_solution:
        newton_method = method if method in ("direct", "minres") else "cg"
        tol_p = torch.tensor([a.tol_p for a in actives], dtype=w.dtype, device=device)
        newton_step = lambda op, rhs: equilibrated_solve(op, rhs, newton_method, tol=1e-6)[0]  # noqa: E731
        op, infos = polish(problem, x, w, mask, newton_step, tol_p, scale=scale)
        actives = [_corrected(a, final) for a, final in zip(actives, op.active)]
    else:
        op = KKTOperator(problem, x, w, mask, _padded_scale(scale, mask, n_y))
        infos = [PolishInfo(0, float(r), float(r), False, "disabled") for r in _residual_norms(op)]
    residuals, sizes = op.scaled_residual()
    for b, info in enumerate(infos):
        if float(residuals[b]) > 1e-6 * float(sizes[b]):
            warn(
                f"{where(b)}The KKT residual at the inner solution is {info.residual_after:.2e} "
                f"(solver status '{solutions[b].status}', polish: {info.reason or 'ran'}): the hypergradient "
                "will be inaccurate. Tighten the solver tolerances or try another solver.",
                InaccurateSolutionWarning,
            )
    return op, actives, infos


def _corrected(active: ActiveSet, final_mask: torch.Tensor) -> ActiveSet:
    """``active`` with the entries of the polish's final active set."""
    entries = torch.nonzero(final_mask > 0).flatten().cpu()
    if torch.equal(entries, active.active):
        return active
    return ActiveSet(entries, active.weakly_active, active.labels, active.tol_mu, active.tol_p)


# ---------------------------------------------------------------- curvature

def _variables_along(problem: BilevelProblem, direction: torch.Tensor, floor: float = 0.1) -> list[tuple[str, float]]:
    r"""The variables a direction d of y lies in: (name, ||d_v||^2 / ||d||^2) for the shares of at least ``floor``
    (the largest alone if none is), largest first."""
    sizes = [v.size for v in problem.all_variables]
    energy = torch.stack([part.square().sum() for part in torch.split(direction.detach(), sizes)])
    shares = (energy / energy.sum().clamp_min(1e-300)).tolist()
    ranked = sorted(zip((v.name() for v in problem.all_variables), shares), key=lambda item: -item[1])
    return [item for item in ranked if item[1] >= floor] or ranked[:1]


def curvature_check(op: KKTOperator, steps: int = 20, tol: float = 1e-9,
                    where: Callable[[int], str] = lambda b: "") -> list[tuple[float, float]]:
    r"""Extreme Ritz values of the reduced Hessian P H P on null(J_A), per item, by Lanczos.

    H and J are those of the equilibrated system D K D when the operator has a
    ``scale`` (:meth:`KKTOperator.equilibrated`): the ratio of the extremes
    does not depend on the scales of the variables. ``steps`` Lanczos steps
    (with full reorthogonalization) from a random vector of null(J_A)
    estimate lambda_min and lambda_max of P H P. A ratio
    lambda_min / lambda_max below ``tol`` means a direction of (near) zero
    curvature: the inner solution is not unique there, y*(x) is not
    differentiable, and the solvers return a minimum-norm answer. Warns with
    :class:`DegenerateKKTWarning`, naming the variables that the Ritz vector of
    lambda_min (mapped back to y's units) lies in. Returns [(lambda_min, lambda_max)] per item.
    """
    problem = getattr(op, "problem", None)  # the conic route's ConeKKT has no user variables to name
    op = op.equilibrated()
    system = NullSpaceSystem(op, torch.zeros_like(op.w.detach()))
    generator = torch.Generator(device="cpu").manual_seed(1)
    q = system.project(torch.randn(op.batch_size, op.n_y, generator=generator, dtype=op.w.dtype).to(op.w.device))
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    basis, alphas, betas = [q], [], []
    for k in range(min(steps, op.n_y)):
        z = system.matvec(basis[-1])
        alphas.append((z * basis[-1]).sum(-1))
        for _ in range(2):  # full reorthogonalization, twice, and back into null(J_A): k is small
            for v in basis:
                z = z - (z * v).sum(-1, keepdim=True) * v
            z = system.project(z)
        beta = z.norm(dim=-1)
        betas.append(beta)
        if k + 1 == min(steps, op.n_y):
            break
        basis.append(z / beta.clamp_min(1e-300)[:, None])
    alphas, betas = torch.stack(alphas, -1), torch.stack(betas, -1)
    extremes, lowest = [], []
    for b in range(op.batch_size):
        # An item's Krylov space is exhausted at its first (relatively) zero beta: Ritz values
        # of the leading block only, the rest would be noise.
        tiny = (betas[b] <= 1e-8 * alphas[b].abs().max().clamp_min(1e-300)).nonzero()
        length = int(tiny[0]) + 1 if len(tiny) else alphas.shape[-1]
        tridiagonal = torch.diag(alphas[b, :length]) + torch.diag(betas[b, : length - 1], 1) \
            + torch.diag(betas[b, : length - 1], -1)
        ritz, vectors = torch.linalg.eigh(tridiagonal)
        extremes.append((float(ritz[0]), float(ritz[-1])))
        lowest.append(torch.stack([v[b] for v in basis[:length]], -1) @ vectors[:, 0])
    for b, (low, high) in enumerate(extremes):
        if high > 0 and low <= tol * high and op.n_y > int(op.dual_mask[b].sum()):
            d_y = op.d[b, : op.n_y] if isinstance(op, EquilibratedKKT) else 1.0
            shares = _variables_along(problem, d_y * lowest[b]) if problem is not None else []
            where_free = ", in variable " + ", ".join(f"{name} ({share:.0%})" for name, share in shares) if shares else ""
            warn(
                f"{where(b)}The inner solution is not unique: the Lagrangian has (near) zero curvature "
                f"along a direction the active constraints leave free{where_free} (reduced "
                f"Hessian eigenvalue {low:.1e} vs {high:.1e}). y*(x) is not differentiable there; cbo returns "
                "the minimum-norm derivative. Add a strongly convex term to the inner objective, e.g. "
                f"eps / 2 * cp.sum_squares({shares[0][0] if shares else 'y'}) with a small eps.",
                DegenerateKKTWarning,
            )
    return extremes
