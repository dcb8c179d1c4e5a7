r"""Linear solvers for the adjoint KKT system K v = b, all in torch.

Two layers:

* Generic Krylov solvers on a ``matvec`` callable: :func:`minres` (symmetric,
  possibly indefinite) and :func:`cg` (symmetric positive definite). Vectors
  have shape (N,) or (B, N); a batch is solved at once, item by item to its
  own tolerance.
* Adjoint solvers on a batched :class:`~cbo.kkt.KKTOperator` (b of shape
  (B, N)), one per method, all with the signature
  ``solve(op, b, *, x0=None, tol, maxiter) -> (v, SolveInfo)``. They differ
  only in how they solve the same system; :data:`ADJOINT_SOLVERS` maps method
  names to them.

K = [[H, J^T], [J, 0]] is indefinite (it has n_A + n_eq negative eigenvalues),
so plain CG on K is unsound: "cg" is CG on the null space of J, where the
reduced Hessian P H P is positive definite, and "fixed_point"/"neumann" iterate
the linearised projected-gradient map there, not the literal w - grad_w L
(whose Jacobian I - K has spectral radius > 1 as soon as K has a negative
eigenvalue).

:func:`adjoint_solve` runs them on the equilibrated system D K D of an
operator that carries a scaling (:func:`cbo.kkt.equilibration`), see
:func:`equilibrated_solve`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import ConvergenceError, ConvergenceWarning, warn

__all__ = [
    "SolveInfo", "minres", "cg", "ADJOINT_SOLVERS", "adjoint_solve", "equilibrated_solve",
    "solve_direct", "solve_minres", "solve_projected_cg", "solve_fixed_point", "solve_neumann",
]

Matvec = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SolveInfo:
    """Diagnostics of one linear solve.

    ``residual`` is the true relative residual ||b - K v|| / ||b|| (the
    largest over a batch), recomputed after the solve, not an estimate. For a
    solve on the equilibrated system (:func:`equilibrated_solve`),
    ``converged`` refers to that system's relative residual,
    ``extra["equilibrated_residual"]``.
    """

    method: str
    converged: bool
    iterations: int
    residual: float
    tol: float
    extra: dict = field(default_factory=dict)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1, keepdim=True)


def _norm(a: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(a, dim=-1, keepdim=True)


def _relative_residual(matvec: Matvec, b: torch.Tensor, x: torch.Tensor) -> float:
    bnorm = _norm(b).clamp_min(torch.finfo(b.dtype).tiny)
    return float((_norm(b - matvec(x)) / bnorm).max()) if b.numel() else 0.0


# ---------------------------------------------------------------- generic Krylov

def minres(matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None = None, *, tol: float = 1e-10,
           maxiter: int | None = None) -> tuple[torch.Tensor, int]:
    r"""MINRES (Paige & Saunders 1975) for A x = b with A symmetric, possibly indefinite.

    Minimises ||b - A x_k|| over the Krylov space K_k(A, r_0); stops when the
    recurrence's residual estimate is <= tol * ||b||. Returns (x, iterations).
    """
    maxiter = maxiter or 10 * b.shape[-1]
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r1 = b.clone() if x0 is None else b - matvec(x)
    bnorm = _norm(b)
    beta1 = _norm(r1)
    y, r2 = r1, r1
    zeros = torch.zeros_like(beta1)
    oldb, beta, dbar, epsln, phibar = zeros, beta1, zeros, zeros, beta1
    cs, sn = -torch.ones_like(beta1), zeros
    w = w2 = torch.zeros_like(b)
    done = beta1 <= tol * bnorm
    tiny = torch.finfo(b.dtype).tiny
    iterations = 0
    while iterations < maxiter and not bool(done.all()):
        iterations += 1
        beta_safe = torch.where(beta > 0, beta, torch.ones_like(beta))
        v = y / beta_safe
        y = matvec(v)
        if iterations >= 2:
            y = y - (beta / torch.where(oldb > 0, oldb, torch.ones_like(oldb))) * r1
        alfa = _dot(v, y)
        y = y - (alfa / beta_safe) * r2
        r1, r2 = r2, y
        oldb, beta = beta, _norm(y)
        # Apply the previous Givens rotation, then make the next one.
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = torch.sqrt(gbar ** 2 + beta ** 2).clamp_min(tiny)
        cs, sn = gbar / gamma, beta / gamma
        phi, phibar = cs * phibar, sn * phibar
        w1, w2 = w2, w
        w = (v - oldeps * w1 - delta * w2) / gamma
        x = torch.where(done, x, x + phi * w)
        done = done | (phibar <= tol * bnorm) | (beta <= tiny)
    return x, iterations


class NegativeCurvature(ArithmeticError):
    """CG met a direction p with p^T A p <= 0: A is not positive definite."""


def cg(matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None = None, *, tol: float = 1e-10,
       maxiter: int | None = None, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    r"""Conjugate gradients for A x = b with A symmetric positive definite.

    Stops when ||b - A x_k|| <= tol * scale (default scale: ||b||). Raises
    :class:`NegativeCurvature` if a search direction has p^T A p <= 0 (A not
    positive definite). Returns (x, iterations).
    """
    maxiter = maxiter or 10 * b.shape[-1]
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - matvec(x) if x0 is not None else b.clone()
    p, rs = r, _dot(r, r)
    threshold = (tol * (_norm(b) if scale is None else scale)) ** 2
    done = rs <= threshold
    iterations = 0
    while iterations < maxiter and not bool(done.all()):
        iterations += 1
        Ap = matvec(p)
        pAp = _dot(p, Ap)
        if bool(((pAp <= 0) & ~done).any()):
            curvature = pAp / _dot(p, p).clamp_min(torch.finfo(p.dtype).tiny)  # a Rayleigh quotient: scale-free
            raise NegativeCurvature(f"a direction p with p^T A p / p^T p = {float(curvature.min()):.2e} "
                                    f"at iteration {iterations}")
        alpha = torch.where(done, torch.zeros_like(rs), rs / torch.where(done, torch.ones_like(pAp), pAp))
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = _dot(r, r)
        done = done | (rs_new <= threshold)
        p = r + (rs_new / torch.where(rs > 0, rs, torch.ones_like(rs))) * p
        rs = rs_new
    return x, iterations


# ---------------------------------------------------------------- adjoint solvers

def solve_direct(op, b, *, x0=None, tol=1e-10, maxiter=None) -> tuple[torch.Tensor, SolveInfo]:
    r"""Dense solve of K v = b, item by item of the batch. Materializes K (N Hessian-vector products).

    Uses an LU solve; where K is singular (LICQ fails), the minimum-norm
    least-squares solution by a symmetric pseudo-inverse.
    """
    K = op.dense()
    v, status = torch.linalg.solve_ex(K, b.unsqueeze(-1))
    singular = (status != 0) | ~torch.isfinite(v).all(-1).all(-1)
    extra = {"factorization": "lu"}
    if bool(singular.any()):
        v = torch.where(singular[:, None, None], torch.linalg.pinv(K, hermitian=True) @ b.unsqueeze(-1), v)
        extra = {"factorization": "pinv (K singular)", "singular_items": torch.nonzero(singular).flatten().tolist()}
    return _finish(op, b, v.squeeze(-1), "direct", 1, tol, **extra)


def solve_minres(op, b, *, x0=None, tol=1e-10, maxiter=None) -> tuple[torch.Tensor, SolveInfo]:
    r"""MINRES on the symmetric indefinite K v = b (Paige & Saunders): sound without any assumption
    beyond symmetry; converges in at most N steps in exact arithmetic."""
    v, iterations = minres(op.matvec, b, x0, tol=tol, maxiter=maxiter)
    return _finish(op, b, v, "minres", iterations, tol)


class NullSpaceSystem:
    r"""K v = (b_y, c) reduced to the null space of J, where K is positive definite.

    With P = I - J_A^T G^{-1} J_A the projector onto null(J_A), G = J_A J_A^T
    (J_A: the active rows of J), and the particular solution
    v_p = J_A^T G^{-1} c_A of J_A v_p = c_A:

        v_y = v_p + z,   (P H P) z = P (b_y - H v_p),   v_A = G^{-1} J_A (b_y - H v_y),

    and v_l = c on the padded inactive rows (where K has a unit diagonal).
    P H P is positive definite on null(J_A) exactly when the second-order
    sufficient condition holds (H positive definite on the tangent space of
    the active constraints), so CG and Richardson iterations are sound there
    although K itself is indefinite. Uses the operator's packed J_A and
    Gram factorization (:class:`cbo.kkt.ConstraintGram`); never forms H.
    """

    def __init__(self, op, b: torch.Tensor):
        self.op, self.n_y = op, op.n_y
        self.gram = op.constraint_gram()
        self.b = b
        self.b_y, self.c = b[..., : self.n_y], b[..., self.n_y:]
        self.v_p = self._range_part(self.gram.pack(self.c))
        self.rhs = self.project(self.b_y - self.hess(self.v_p))

    def hess(self, z: torch.Tensor) -> torch.Tensor:
        """H z: the y-block of K (z, 0)."""
        zeros = torch.zeros(*z.shape[:-1], self.op.n_dual, dtype=z.dtype, device=z.device)
        return self.op.matvec(torch.cat([z, zeros], -1))[..., : self.n_y]

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """P z = z - J_A^T G^{-1} J_A z."""
        return z - self._range_part(self.gram.apply(z))

    def matvec(self, z: torch.Tensor) -> torch.Tensor:
        """P H z, which equals P H P z for the z in null(J_A) that the iterations produce
        (their starting point and right-hand side are projected): one projection per product."""
        return self.project(self.hess(z))

    def initial(self, x0: torch.Tensor | None) -> torch.Tensor | None:
        """Reduced starting point from a full-space guess (v_y, v_l)."""
        return None if x0 is None else self.project(x0[..., : self.n_y] - self.v_p)

    def recover(self, z: torch.Tensor) -> torch.Tensor:
        """Full solution (v_y, v_l) from the reduced one."""
        v_y = self.v_p + z
        v_active = self.gram.solve(self.gram.apply(self.b_y - self.hess(v_y)))
        v_l = self.gram.unpack(v_active) + (1 - self.op.dual_mask) * self.c
        return torch.cat([v_y, v_l], -1)

    def _range_part(self, u: torch.Tensor) -> torch.Tensor:
        """J_A^T G^{-1} u for packed dual vectors u."""
        return self.gram.apply_transpose(self.gram.solve(u))


def _finish(op, b, v, method, iterations, tol, **extra) -> tuple[torch.Tensor, SolveInfo]:
    residual = _relative_residual(op.matvec, b, v)
    return v, SolveInfo(method, residual <= 10 * tol, iterations, residual, tol, extra)


def solve_projected_cg(op, b, *, x0=None, tol=1e-10, maxiter=None) -> tuple[torch.Tensor, SolveInfo]:
    r"""Projected CG: conjugate gradients on (P H P) z = P (b_y - H v_p) in the null space of J
    (see :class:`NullSpaceSystem`). Sound for the indefinite K whenever the second-order
    sufficient condition holds; raises :class:`ConvergenceError` on negative curvature."""
    system = NullSpaceSystem(op, b)
    try:
        z, iterations = cg(system.matvec, system.rhs, system.initial(x0), tol=tol, maxiter=maxiter, scale=_norm(b))
    except NegativeCurvature as err:
        raise ConvergenceError(
            f"cg: the Hessian of the Lagrangian is not positive definite on the null space of the "
            f"active constraints ({err}); the second-order sufficient condition fails and the inner "
            "solution may not be unique (y*(x) is then not differentiable). Add a strongly convex term "
            "to the inner objective, or use method='minres' or 'direct' for a least-squares answer."
        ) from err
    null_space_dim = (system.n_y - op.dual_mask.sum(-1)).round().long().clamp_min(0).tolist()
    return _finish(op, b, system.recover(z), "cg", iterations, tol, null_space_dim=null_space_dim)


# ---------------------------------------------------------------- fixed point and Neumann

def _step_size(system: NullSpaceSystem, iterations: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    r"""alpha = 1 / lambda_max(P H P) per item, lambda_max estimated by power iteration.

    Returns (alpha, lambda_max), each (B, 1). With alpha below 2 / lambda_max
    the map z -> z + alpha (r - P H P z) contracts at rate 1 - alpha lambda_min
    on null(J); the iterations halve alpha if the residual grows anyway.
    """
    generator = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(system.rhs.shape, generator=generator, dtype=system.rhs.dtype).to(system.rhs.device)
    z = system.project(z)
    lam = torch.zeros_like(z[..., :1])
    for _ in range(iterations):
        z = z / _norm(z).clamp_min(torch.finfo(z.dtype).tiny)
        z = system.matvec(z)
        lam = torch.maximum(lam, _norm(z))
    alpha = torch.where(lam > 0, 1 / (1.05 * lam), torch.ones_like(lam))
    return alpha, lam


def _richardson(system: NullSpaceSystem, z0, tol, maxiter, restart_from_best: bool):
    r"""Iterate z <- z + alpha (r - P H P z); stop at ||r - P H P z|| <= tol ||b||.

    Halves alpha (restarting from the best iterate when ``restart_from_best``,
    else from zero) whenever the residual grows 10-fold.
    Returns (z, iterations, extras).
    """
    alpha, lam_max = _step_size(system)
    r = system.rhs
    target = tol * float(_norm(system.b).max())
    z = torch.zeros_like(r) if z0 is None else z0.clone()
    best_z, best = z, math.inf
    history: list[float] = []
    halvings = iteration = 0
    while iteration < maxiter:
        iteration += 1
        residual = r - system.matvec(z)
        rnorm = float(_norm(residual).max())
        history.append(rnorm)
        if rnorm < best:
            best_z, best = z, rnorm
        if rnorm <= target:
            break
        if not math.isfinite(rnorm) or rnorm > 10 * best:
            halvings += 1
            alpha, history = alpha / 2, []
            z = best_z if restart_from_best else torch.zeros_like(r)
            best = math.inf if not restart_from_best else best
            continue
        z = z + alpha * residual
    window = history[-50:]
    rate = (window[-1] / window[0]) ** (1 / (len(window) - 1)) if len(window) > 1 and window[0] > 0 else 0.0
    return best_z, iteration, {"step_size": alpha.flatten().tolist(), "lambda_max": lam_max.flatten().tolist(),
                               "step_halvings": halvings, "contraction_factor": rate}


def solve_fixed_point(op, b, *, x0=None, tol=1e-10, maxiter=None) -> tuple[torch.Tensor, SolveInfo]:
    r"""Fixed-point iteration of the linearised projected-gradient map of the inner problem.

    The inner map Phi(y) = Proj(y - alpha grad_y L) (a projected gradient step on
    the active constraints) has Jacobian P (I - alpha H) P at y*, so the adjoint
    fixed-point iteration is Richardson's iteration

        z <- z + alpha (P (b_y - H v_p) - P H P z)     on null(J)

    (see :class:`NullSpaceSystem`), with alpha = 1/lambda_max(P H P) from a
    power-iteration estimate: it contracts at rate 1 - lambda_min/lambda_max.
    The literal map w - grad_w L of the seed has iteration matrix I - K, whose
    spectral radius exceeds 1 as soon as K has a negative eigenvalue (always,
    with constraints), so it diverges. ``info.extra`` reports alpha and the
    observed contraction factor. Warm-started from ``x0``.
    """
    system = NullSpaceSystem(op, b)
    z, iterations, extra = _richardson(system, system.initial(x0), tol, maxiter or max(2000, 100 * op.size), True)
    return _finish(op, b, system.recover(z), "fixed_point", iterations, tol, **extra)


def solve_neumann(op, b, *, x0=None, tol=1e-10, maxiter=None) -> tuple[torch.Tensor, SolveInfo]:
    r"""Truncated Neumann series of the same map (see :func:`solve_fixed_point`):

        z = sum_{k=0}^{T-1} (I - alpha P H P)^k alpha P (b_y - H v_p),

    with T the number of terms needed for tol (at most maxiter). It is the
    fixed-point iteration started from zero, term for term, and equals T-step
    truncated back-propagation through the inner map at the solution. Never
    warm-started.
    """
    system = NullSpaceSystem(op, b)
    z, iterations, extra = _richardson(system, None, tol, maxiter or max(2000, 100 * op.size), False)
    return _finish(op, b, system.recover(z), "neumann", iterations, tol, **extra)


ADJOINT_SOLVERS: dict[str, Callable] = {
    "direct": solve_direct,
    "minres": solve_minres,
    "cg": solve_projected_cg,
    "fixed_point": solve_fixed_point,
    "neumann": solve_neumann,
}


def equilibrated_solve(op, b: torch.Tensor, method: str, *, x0=None, tol: float = 1e-10,
                       maxiter: int | None = None) -> tuple[torch.Tensor, SolveInfo]:
    r"""Solve K v = b with ``method`` as (D K D) u = D b, v = D u, with D = diag(op.scale).

    The equilibrated system D K D (:meth:`cbo.kkt.KKTOperator.equilibrated`)
    has rows of about unit norm, so its relative residual is a sound stopping
    test where that of K stalls (an objective scaled by 1e6, constraints by
    1e-6). ``tol`` and ``info.converged`` refer to
    ||D b - D K D u|| / ||D b|| (reported as
    ``info.extra["equilibrated_residual"]``); ``info.residual`` is
    ||b - K v|| / ||b||. Without a scale (None or no such attribute), a plain
    solve of K v = b.
    """
    d = getattr(op, "scale", None)
    if d is None:
        return ADJOINT_SOLVERS[method](op, b, x0=x0, tol=tol, maxiter=maxiter)
    u, info = ADJOINT_SOLVERS[method](op.equilibrated(), d * b, x0=None if x0 is None else x0 / d, tol=tol,
                                      maxiter=maxiter)
    v = d * u
    info.extra["equilibrated_residual"] = info.residual
    info.residual = _relative_residual(op.matvec, b, v)
    return v, info


_SINGULAR_CAUSE = ("a DegenerateKKTWarning of this call, if any, names the cause (a non-unique inner solution, "
                   "dependent or weakly active constraints)")


def nonconvergence_message(method: str, info: SolveInfo) -> str:
    """What a failed adjoint solve says: the residual it reached and only the remedies that apply to ``method``
    (an iterative method: more iterations, a looser tol, the other sound methods; "direct": K itself is singular
    or badly conditioned, which no other method repairs)."""
    head = (f"The adjoint solve with method={method!r} did not converge: relative residual "
            f"{info.extra.get('equilibrated_residual', info.residual):.3e}")
    if method == "direct":
        kind = ("singular (the pseudo-inverse gave a least-squares answer)" if "singular_items" in info.extra
                else "badly conditioned")
        return (f"{head} (tol={info.tol:.1e}). A dense solve falls short of tol only where K is {kind}, which no "
                f"iterative method repairs: loosen tol if this residual is good enough; {_SINGULAR_CAUSE}.")
    others = " or ".join(repr(m) for m in ("cg", "minres", "direct") if m != method)
    return (f"{head} after {info.iterations} iterations (tol={info.tol:.1e}). Raise maxiter, loosen tol, or use "
            f"method={others}. If no method converges, K is singular or nearly so: {_SINGULAR_CAUSE}.")


def adjoint_solve(op, b: torch.Tensor, method: str, *, x0=None, tol: float = 1e-10, maxiter: int | None = None,
                  on_nonconvergence: str = "raise") -> tuple[torch.Tensor, SolveInfo]:
    """Solve K v = b with ``method`` (on the equilibrated system, :func:`equilibrated_solve`); raise (or warn)
    if it does not reach ``tol``."""
    if method not in ADJOINT_SOLVERS:
        raise ValueError(f"Unknown method {method!r}. Known methods: {', '.join(ADJOINT_SOLVERS)}.")
    if on_nonconvergence not in ("raise", "warn"):
        raise ValueError(f"on_nonconvergence must be 'raise' or 'warn', got {on_nonconvergence!r}.")
    if x0 is not None:  # b = 0 has the solution 0; a relative test cannot end an iteration from x0 towards it
        x0 = torch.where(_norm(b) == 0, torch.zeros_like(x0), x0)
    v, info = equilibrated_solve(op, b, method, x0=x0, tol=tol, maxiter=maxiter)
    if not info.converged:
        message = nonconvergence_message(method, info)
        if on_nonconvergence == "raise" or not bool(torch.isfinite(v).all()):
            raise ConvergenceError(message, info)
        warn(message, ConvergenceWarning)
    return v, info
