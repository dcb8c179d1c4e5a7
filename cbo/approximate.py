r"""Approximate hypergradients of a :class:`BilevelProblem`: the unrolled and the penalty methods.

Unrolled methods ("reverse", "truncated", "forward": reverse- and forward-mode
differentiation through the iterations, as in LDS-GNN's derivation, and
truncated back-propagation, Shaban et al., AISTATS 2018) differentiate T steps of an inner iteration map derived from the Lagrangian of
the active set, started from the (polished) cvxpy solution w* = (y*, mu, nu):
the descent-ascent map

    Phi(w, x) = w - alpha S grad_w L(w, x),   S = diag(I_y, -I_active, +I_padded, -I_eq),

(y descends, the multipliers of active constraints and equalities ascend; the
padded inactive multipliers descend to 0). Its Jacobian at w* is I - alpha S K;
alpha is the step among 2/rho(S K), 1/rho, 1/(2 rho), ... with the smallest
power-iteration estimate of the spectral radius of I - alpha S K (below 1),
which is reported as the contraction factor. As T grows, reverse and forward mode tend to the implicit
hypergradient; the truncated method's bias decays like the contraction factor
to the power K.

Penalty methods ("penalty", "augmented_lagrangian") replace the
constraints by the quadratic penalty rho/2 (||max(p, 0)||^2 + ||q||^2), or by
the augmented Lagrangian with cvxpy's multipliers held fixed, solve that
smooth unconstrained problem with cvxpy, and differentiate its stationarity
condition implicitly (CG on its Hessian). Their error shrinks as rho grows.
"""
from __future__ import annotations

import math

import cvxpy as cp
import numpy as np
import torch

from .errors import ConvergenceError
from .kkt import KKTOperator
from .problem import BilevelProblem
from .unroll import fixed_point_hypergrad

__all__ = ["UNROLLED_METHODS", "PENALTY_METHODS", "descent_ascent_map", "iterative_hypergrad", "penalty_hypergrad"]

UNROLLED_METHODS = ("reverse", "truncated", "forward")
PENALTY_METHODS = ("penalty", "augmented_lagrangian")


def _ascent_sign(op: KKTOperator) -> torch.Tensor:
    """S: +1 on y and padded inactive multipliers (descent), -1 on active ones and equalities (ascent)."""
    return torch.cat([torch.ones_like(op.w[0, : op.n_y]), 1 - 2 * op.dual_mask[0]]).detach()


def _spectral_radius(matvec, size: int, like: torch.Tensor, iterations: int = 200) -> float:
    """Power-iteration estimate of the spectral radius of a (possibly nonsymmetric) operator."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(size, generator=generator, dtype=like.dtype).to(like.device)
    rates = []
    for _ in range(iterations):
        v = v / v.norm()
        v = matvec(v)
        rates.append(float(v.norm()))
    return float(np.exp(np.mean(np.log(np.maximum(rates[iterations // 2:], 1e-300)))))


def descent_ascent_map(problem: BilevelProblem, op: KKTOperator, max_halvings: int = 30):
    """The map Phi(w, x) = w - alpha S grad_w L(w, x) at the operator's active set, with its step.

    Returns (phi, alpha, contraction factor). Raises :class:`ConvergenceError`
    if no step makes the map contract (H not positive definite on null(J)).
    """
    sign = _ascent_sign(op)
    active = op.active[0]

    def sk(v):
        return sign * op.matvec(v[None])[0]

    rho = max(_spectral_radius(sk, op.size, sign), 1e-300)
    candidates = [2.0 ** (1 - k) / rho for k in range(max_halvings)]  # 2/rho, 1/rho, 1/(2 rho), ...
    contraction, alpha = math.inf, candidates[-1]
    for step in candidates:
        estimate = _spectral_radius(lambda v: v - step * sk(v), op.size, sign)
        if estimate < min(contraction, 1 - 1e-9):
            contraction, alpha = estimate, step
        elif contraction < 1:
            break  # past the best step: smaller ones contract more slowly
    if contraction >= 1:
        raise ConvergenceError(
            "No step size makes the descent-ascent map of the Lagrangian contract at this solution "
            f"(spectral radius of I - alpha S K >= 1 down to alpha = {alpha:.1e}): the Hessian of the "
            "Lagrangian is not positive definite on the active constraints' null space. Use an implicit method."
        )
    residual = torch.func.grad(problem.lagrangian, argnums=1)

    def phi(w, x):
        return w - alpha * sign * residual(x, w, active)

    return phi, alpha, contraction


def _outer(problem: BilevelProblem):
    return lambda w, x: problem.outer_value(x, w[: problem.n_y])


def iterative_hypergrad(problem: BilevelProblem, xs: list[torch.Tensor], op: KKTOperator, method: str,
                        steps: int, truncate: int | None):
    """RMD / K-RMD / FMD through ``steps`` descent-ascent steps from the solution (see module doc)."""
    phi, alpha, contraction = descent_ascent_map(problem, op)
    grads, info = fixed_point_hypergrad(phi, op.w.detach()[0], xs, _outer(problem), method, steps=steps,
                                        truncate=truncate, return_info=True)
    info.extra.update(step_size=alpha, contraction_factor=contraction)
    return grads, info


# ---------------------------------------------------------------- penalty methods

def _penalized_cvxpy(problem: BilevelProblem, rho: float, mu: np.ndarray | None, nu: np.ndarray | None):
    """The inner objective plus the quadratic penalty (mu is None) or the augmented Lagrangian terms."""
    objective = problem.inner.objective
    g = objective.expr if isinstance(objective, cp.Minimize) else -objective.expr
    terms = [g]
    for block in problem.inequalities:
        p = cp.reshape(block.sign * _constraint_expression(block.constraint), (block.size,), order="C")
        if mu is None:
            terms.append(rho / 2 * cp.sum_squares(cp.pos(p)))
        else:
            m = mu[block.offset: block.offset + block.size]
            terms.append(cp.sum_squares(cp.pos(m + rho * p)) / (2 * rho))
    for block in problem.equalities:
        q = cp.reshape(_constraint_expression(block.constraint), (block.size,), order="C")
        terms.append(rho / 2 * cp.sum_squares(q))
        if nu is not None:
            terms.append(nu[block.offset: block.offset + block.size] @ q)
    return cp.Problem(cp.Minimize(cp.sum(cp.hstack([cp.reshape(t, (1,), order="C") for t in terms]))))


def _constraint_expression(constraint) -> cp.Expression:
    """p (or q) in cvxpy's form p <= 0 (q == 0), before any sign flip."""
    if isinstance(constraint, (cp.constraints.Inequality, cp.constraints.Equality)):
        return constraint.args[0] - constraint.args[1]
    return constraint.args[0]


def _penalized_torch(problem: BilevelProblem, rho: float, mu, nu):
    """The same penalized objective as a torch function of (x, y_flat)."""
    mu_t = None if mu is None else torch.as_tensor(mu)
    nu_t = None if nu is None else torch.as_tensor(nu)

    def g(x, y_flat):
        env = problem.env(x, problem.split_y(y_flat))
        value = problem.objective(env)
        p, q = problem.stack(problem.inequalities, env), problem.stack(problem.equalities, env)
        if mu_t is None:
            value = value + rho / 2 * (torch.relu(p) ** 2).sum()
        else:
            value = value + (torch.relu(mu_t.to(p) + rho * p) ** 2).sum() / (2 * rho)
        value = value + rho / 2 * (q ** 2).sum()
        return value + (nu_t.to(q) @ q if nu_t is not None else 0)

    return g


def penalty_hypergrad(problem: BilevelProblem, xs: list[torch.Tensor], method: str, rho: float,
                      mu: np.ndarray | None = None, nu: np.ndarray | None = None, tol: float = 1e-10,
                      maxiter: int = 10000):
    r"""Hypergradient of the penalized problem y_rho(x) = argmin_y g_rho(x, y).

    g_rho is g + rho/2 (||max(p, 0)||^2 + ||q||^2) ("penalty") or the augmented
    Lagrangian g + nu.q + rho/2 ||q||^2 + 1/(2 rho) ||max(mu + rho p, 0)||^2
    with the constrained problem's multipliers held fixed
    ("augmented_lagrangian"). Implicit differentiation of grad_y g_rho = 0:
    dF/dx = d_x F - (d_x grad_y g_rho)^T H_rho^{-1} d_y F, by CG, through the
    gradient-step map y - grad_y g_rho (:func:`fixed_point_hypergrad`).
    Returns (grads, UnrollInfo, y_rho).
    """
    augmented = method == "augmented_lagrangian"
    penalized = _penalized_cvxpy(problem, rho, mu if augmented else None, nu if augmented else None)
    penalized.solve(solver="CLARABEL")
    if penalized.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
        raise ConvergenceError(f"The {method} problem with rho={rho:g} could not be solved (status {penalized.status}).")
    y = torch.as_tensor(np.concatenate([np.ravel(v.value) for v in problem.all_variables]), dtype=xs[0].dtype,
                        device=xs[0].device)
    g = _penalized_torch(problem, rho, mu if augmented else None, nu if augmented else None)
    gradient = torch.func.grad(g, argnums=1)
    y = _newton_polish(g, xs, y)

    def phi(w, x):
        return w - gradient(x, w)

    grads, info = fixed_point_hypergrad(phi, y, xs, _outer(problem), "cg", tol=tol, maxiter=maxiter,
                                        return_info=True)
    info.method = method
    info.extra["penalty"] = rho
    return grads, info, y


def _newton_polish(g, xs, y, steps: int = 3):
    """A few Newton steps on grad_y g(x, y) = 0 (dense Hessian: the penalty methods are for studies)."""
    for _ in range(steps):
        gradient = torch.func.grad(g, argnums=1)(xs, y)
        if float(gradient.abs().max()) < 1e-13:
            break
        hessian = torch.func.hessian(g, argnums=1)(xs, y)
        y = y - torch.linalg.lstsq(hessian, gradient.unsqueeze(-1)).solution.squeeze(-1)
    return y

