r"""The conic route: differentiate cvxpy's canonical cone program when no smooth Lagrangian exists.

cvxpy compiles a DPP inner problem once into the cone program

    min_z c^T z   s.t.  A z + s = b,  s in K = K_1 x ... x K_p        (dual: y in K^*)

with (A, b, c) affine in the parameters (``param_prob.apply_parameters``) and
z linear in the user's variables (``param_prob.split_solution`` and the
reductions' ``var_forward``). K is a product of zero, nonnegative, second-order
(SOC), positive semidefinite (PSD, Clarabel's scaled upper-triangular vector),
exponential and 3-d power cones.

Solve and polish. Clarabel solves the cone program; solutions on
exponential, power and second-order cones are only ~1e-6 to 1e-8 accurate
from the interior-point solver, so Newton steps polish them, judged on the
residual map (Busseti, Moursi & Boyd 2019; Agrawal et al. 2019): with
v = y - s, Moreau's decomposition gives y = Pi(v) and s = Pi(v) - v (Pi: the
projection onto K^*, :mod:`cbo.cones`), and

    N(z, v) = ( c + A^T Pi(v),  A z + Pi(v) - v - b ) = 0.

The steps are those of the conditions reduced to the active pieces (below;
size n + p), one or two of them reaching ||N|| ~ 1e-15; if they stall, those
of N itself, dN/d(z, v) = [[0, A^T D], [A, D - I]] with D = dPi(v) (dense,
size n + m), which also correct a wrong active set.

Differentiate. At the polished solution each cone is reduced to its active
part (active linear rows, the boundary of an SOC or exponential cone, the
range of a PSD multiplier: :mod:`cbo.cone_kkt`), which gives a symmetric
indefinite KKT matrix K = [[A^T C A, J^T], [J, 0]] of the same structure as
the smooth route's. For an outer gradient g = dF/dz, the adjoint
K (w_z, w_mu) = (g, 0) is solved by the same solvers (``method``: "cg",
"minres", "direct", "fixed_point", "neumann", :mod:`cbo.linsolve`) and gives
the gradient in the cone data

    dF/dc = -w_z,   dF/dA = -(y w_z^T + w_b z^T),   dF/db = w_b,

which ``param_prob.apply_param_jac`` and the reductions' ``param_backward``
carry to the user's parameters.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Sequence

import clarabel
import cvxpy as cp
import numpy as np
import scipy.sparse as sp
import torch

from .cone_kkt import ActivePieces, ConeKKT, active_pieces
from .cones import exp_h, pow_g, project_dual, projection_jacobian, smat
from .errors import (ConvergenceError, DegenerateKKTWarning, InaccurateSolutionWarning, InnerSolveError,
                     ProblemDefinitionError, StrictComplementarityError, suppressed, warn)
from .inner import DEFAULT_SOLVER_OPTIONS
from .inputs import is_symmetric
from .kkt import curvature_check, licq_check
from .linsolve import SolveInfo, _relative_residual, adjoint_solve

__all__ = ["ConicProgram", "ConicPoint", "ConeStatus", "StrictComplementarityError"]

_SOLVED = ("Solved", "AlmostSolved")
_KINDS = {"Zero": "zero", "NonNeg": "nonneg", "SOC": "soc", "SvecPSD": "psd", "PSD": "psd", "ExpCone": "exp",
          "PowCone3D": "pow"}
# Relative thresholds (times max(1, |y|, |s|)): a slack entry at most _TIGHT_TOL is on its bound. A cone
# fails strict complementarity where slack and multiplier are both (nearly) on the boundary: in the
# polished solution (KKT residual ~1e-15) "both at most _ZERO_TOL" is an error, "within _WEAK_TOL" a
# warning that the derivative changes abruptly nearby (sqrt of the 1e-6 active-set tolerance / 10, as in
# cbo.kkt.active_set: an interior-point method approaches a weakly active point at the square root of its
# tolerance). Unpolished, the two cannot be told apart and _WEAK_TOL is the error threshold.
_TIGHT_TOL, _WEAK_TOL, _ZERO_TOL = 1e-7, 1e-4, 1e-9
# The reduced K counts as singular where its equilibrated form has a singular value below _SINGULAR of its
# largest; systems up to _DENSE_CHECK_SIZE are checked densely (an SVD), larger ones by Lanczos.
_SINGULAR, _DENSE_CHECK_SIZE = 1e-9, 300


@dataclass
class ConeStatus:
    """Activity of one cone constraint at the solution.

    ``tight``: the slack s is on the cone's boundary (an SOC ``||u|| <= t``
    with equality, a singular PSD matrix, a nonnegative entry at 0).
    ``rank``: rank of the PSD slack matrix (None for other cones);
    ``active``: number of tight entries of a nonnegative block.
    """

    label: str
    kind: str
    tight: bool
    rank: int | None = None
    active: int | None = None
    detail: str = ""


@dataclass
class ConicPoint:
    """A (polished) primal-dual solution of the cone program at one parameter value."""

    z: np.ndarray
    y: np.ndarray
    s: np.ndarray
    A: sp.csc_array
    pieces: ActivePieces
    status: str
    residual_before: float
    residual_after: float
    polish_steps: int
    cones: list[ConeStatus] = field(default_factory=list)
    solve_time: float = 0.0
    x: list = field(default_factory=list)


@dataclass
class _Block:
    kind: str
    start: int
    size: int
    label: str
    alpha: float | None = None  # a power cone's exponent

    @property
    def rows(self) -> slice:
        return slice(self.start, self.start + self.size)


class ConicProgram:
    r"""cvxpy's cone program of ``problem.inner``, compiled once, with its derivative.

    Parameters
    ----------
    problem : BilevelProblem
        If its ``inner`` is DPP, (A, b, c) are affine in the parameters and
        cvxpy's parameter maps carry the derivative back; otherwise the problem
        is re-canonicalized at every x and the derivative of the data is taken
        by central differences (2 canonicalizations per entry of x).

    Raises
    ------
    ProblemDefinitionError
        For cones cbo cannot differentiate (n-dimensional power cones, cp.PowConeND), or a non-DPP problem with
        symmetric matrix parameters.
    """

    def __init__(self, problem):
        self.problem = problem
        self.dpp = problem.inner.is_dpp()
        symmetric = [p.name() for p in problem.parameters if p.attributes.get("symmetric") or p.attributes.get("PSD")]
        if not self.dpp and symmetric:
            raise ProblemDefinitionError(
                f"The conic route differentiates a non-DPP problem by finite differences of its cone data, entry "
                f"by entry of the parameters, which symmetric parameters ({', '.join(symmetric)}) do not allow. "
                "Make the problem DPP (https://www.cvxpy.org/tutorial/dpp/).")
        if self.dpp or all(p.value is not None for p in problem.parameters):
            self._compile()

    def _compile(self) -> None:
        """cvxpy's cone program: once for a DPP problem (affine in the parameters), else at the current values."""
        data, chain, inverse_data = self._canonicalize()
        shape = data["A"].shape
        if hasattr(self, "data") and shape != self.data["A"].shape:
            raise ProblemDefinitionError(
                f"The inner problem's cone program changed shape with x ({self.data['A'].shape} -> {shape}): cvxpy "
                "canonicalizes this non-DPP problem differently at different x. Make it DPP.")
        self.data, self.chain = data, chain
        self.param_prob = data["param_prob"]
        self._entries = None  # of A that depend on the parameters: cached by _parametric_entries
        self.blocks = _blocks(self.param_prob, _user_constraint_names(self.problem.inner, inverse_data), shape[0])
        self.inverse_data, self._multiplier_map = inverse_data, None

    def _canonicalize(self) -> tuple[dict, object, list]:
        """cvxpy's (data, chain, inverse_data) for ``problem.inner`` at the parameters' current values."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)  # cvxpy's notice on non-DPP problems
            return self.problem.inner.get_problem_data(cp.CLARABEL, solver_opts={"use_quad_obj": False})

    def _set_parameters(self, x: Sequence[np.ndarray]) -> None:
        for param, value in zip(self.problem.parameters, x):
            param.value = value

    @property
    def size(self) -> tuple[int, int]:
        """(n, m): number of cone-program variables z and of cone rows."""
        return self.data["A"].shape[1], self.data["A"].shape[0]

    # ------------------------------------------------------------ data and solve

    def program_data(self, x: Sequence[np.ndarray]) -> tuple[np.ndarray, sp.csc_array, np.ndarray]:
        """(c, A, b) of the cone program at parameter values ``x`` (Clarabel's A z + s = b form)."""
        self._set_parameters(x)
        if not self.dpp:  # re-canonicalized at every x
            self._compile()
            return _cone_data(self.data)
        for reduction in self.chain.reductions:
            reduction.update_parameters(self.problem.inner)
        c, _, minus_A, b = self.param_prob.apply_parameters(keep_zeros=True)
        return np.asarray(c, dtype=float), sp.csc_array(-minus_A), np.asarray(b, dtype=float)

    def solve(self, x: Sequence[np.ndarray], solver_options: dict | None = None, polish: bool = True,
              where: str = "") -> ConicPoint:
        """Solve the cone program at ``x`` with Clarabel, Newton-polish N(z, v) = 0, check the cones.

        Raises
        ------
        InnerSolveError
            If Clarabel finds no solution.
        StrictComplementarityError
            If strict complementarity fails in an SOC, PSD or exponential cone.
        """
        c, A, b = self.program_data(x)
        options = {**DEFAULT_SOLVER_OPTIONS["CLARABEL"], **(solver_options or {})}
        start = time.perf_counter()
        data = {**self.data, "c": c, "A": A, "b": b}
        result = self.chain.solver.solve_via_data(data, False, False, options)
        elapsed = time.perf_counter() - start
        status = str(result.status).split(".")[-1]
        if status not in _SOLVED:
            raise InnerSolveError(
                f"Clarabel could not solve the inner problem's cone program (status '{status}'): it is "
                "infeasible, unbounded, or badly scaled for this x. Check the constraints at this x."
            )
        z, y, s = (np.asarray(t, dtype=float) for t in (result.x, result.z, result.s))
        v = y - s
        exp_guess = s.copy()
        before = after = _residual_norm(c, A, b, z, v, self.blocks, exp_guess)
        steps = 0
        if polish:
            z, v, after, steps = self._polish(c, A, b, z, v, exp_guess, before)
        y = project_dual(v, self.blocks, exp_guess)
        s = y - v
        scale = _point_scale(z, v)
        cones = self._check_cones(y, s, where, polished=after <= 1e-12 * scale)
        if after > 1e-6 * scale:
            warn(
                f"{where}The cone program's optimality residual at the inner solution is {after:.2e} "
                f"(Clarabel status '{status}'): the hypergradient will be inaccurate. Tighten the solver "
                "tolerances.", InaccurateSolutionWarning)
        return ConicPoint(z, y, s, A, self._active_pieces(y, s), status, before, after, steps, cones, elapsed,
                          x=[np.array(value, dtype=float) for value in x])

    def _polish(self, c, A, b, z, v, exp_guess, before):
        r"""Newton steps on N(z, v) = 0, each kept only if it reduces ||N||_inf: on the KKT system reduced to
        the active pieces (size n + p, :meth:`_reduced_step`) and, if those stall above the target, on N's
        full Jacobian (size n + m, :meth:`_full_step`), which also corrects a wrong active set."""
        best, steps = before, 0
        for newton_step in (self._reduced_step, self._full_step):
            z, v, best, taken = self._newton(newton_step, c, A, b, z, v, exp_guess, best)
            steps += taken
            if best <= _polish_target(z, v):
                break
        return z, v, best, steps

    def _newton(self, newton_step, c, A, b, z, v, exp_guess, best):
        """Up to 5 steps (z, v) += ``newton_step``(...), each kept only if it reduces ||N||_inf."""
        taken = 0
        for _ in range(5):
            if best <= _polish_target(z, v):
                break
            y = project_dual(v, self.blocks, exp_guess)
            try:
                dz, dv = newton_step(c, A, b, z, v, y)
            except (np.linalg.LinAlgError, StrictComplementarityError):
                break
            trial_guess = exp_guess.copy()
            trial = _residual_norm(c, A, b, z + dz, v + dv, self.blocks, trial_guess)
            if not trial < best:
                break
            z, v, best, taken = z + dz, v + dv, trial, taken + 1
            exp_guess[:] = trial_guess
        return z, v, best, taken

    def _full_step(self, c, A, b, z, v, y):
        r"""-J^{-1} N(z, v) with J = dN/d(z, v) = [[0, A^T D], [A, D - I]] (dense, size n + m)."""
        step = np.linalg.solve(_jacobian(A, projection_jacobian(v, y, self.blocks)), _residual(c, A, b, z, v, y))
        return -step[: z.size], -step[z.size:]

    def _reduced_step(self, c, A, b, z, v, y):
        r"""The Newton step of the conditions reduced to the active pieces of (s, y) = (y - v, y).

        With the dual residual r_d = c + A^T y, the primal one r_p = A z + s - b (s is on each active
        piece's boundary, g(s) = 0) and the pieces' K = [[H, J^T], [J, 0]] (:mod:`cbo.cone_kkt`):

            K (dz, dmu) = (-r_d - A^T C r_p,  G r_p),   dy = -G^T dmu + C (A dz + r_p),

        so that c + A^T (y + dy) = 0 and g(b - A (z + dz)) = 0 to first order; v = y - s moves by
        dv = dy + A dz + r_p.
        """
        s = y - v
        pieces = self._active_pieces(y, s)
        H, J = pieces.kkt_blocks(sp.csr_array(A))
        r_d, r_p = c + A.T @ y, A @ z + s - b
        K = np.block([[H, J.T], [J, np.zeros((J.shape[0], J.shape[0]))]])
        step = np.linalg.solve(K, np.concatenate([-r_d - A.T @ pieces.curvature_times(r_p), pieces.G @ r_p]))
        dz, dmu = step[: z.size], step[z.size:]
        dy = -pieces.G.T @ dmu + pieces.curvature_times(A @ dz + r_p)
        return dz, dy + A @ dz + r_p

    def _active_pieces(self, y: np.ndarray, s: np.ndarray) -> ActivePieces:
        """The active pieces of every cone at (s, y), what is zero judged relative to the solution's scale."""
        return active_pieces(self.blocks, y, s, _TIGHT_TOL * _solution_scale(y, s))

    # ------------------------------------------------------------ variables

    def variable_values(self, point: ConicPoint) -> list[np.ndarray]:
        """Values of ``problem.all_variables`` at ``point``, flattened in C order."""
        values = self.param_prob.split_solution(point.z, active_vars=self._lowered_ids())
        for reduction in reversed(self.chain.reductions):
            values = reduction.var_forward(values)
        return [np.asarray(values[v.id], dtype=float).reshape(v.shape).reshape(-1)
                for v in self.problem.all_variables]

    def _lowered_ids(self) -> list[int]:
        return list(self.param_prob.var_id_to_col)

    # ------------------------------------------------------------ multipliers

    def multiplier_values(self, point: ConicPoint) -> np.ndarray:
        """The multipliers asked for as outputs (``problem.outputs``), stacked: M y (:meth:`multiplier_map`)."""
        return self.multiplier_map() @ point.y

    def multiplier_map(self) -> sp.csr_array:
        r"""The linear map M from the cone program's dual y to the multiplier outputs, stacked in output order.

        cvxpy recovers each constraint's ``dual_value`` from y linearly (a selection, signs, the scaling of a
        PSD cone's vectorization); M is that recovery, probed once: one probe per cone block finds the
        blocks that feed a requested constraint, then one unit vector per row of those blocks."""
        if self._multiplier_map is None:
            requested = [o for o in self.problem.outputs if o.multiplier]
            n_rows = self.size[1]
            M = np.zeros((sum(o.size for o in requested), n_rows))
            for row in self._multiplier_rows(requested):
                M[:, row] = self._output_duals(self._recover_duals(_unit(n_rows, [row])), requested)
            self._multiplier_map = sp.csr_array(M)
        return self._multiplier_map

    def _multiplier_rows(self, requested) -> list[int]:
        """The rows of y that reach the requested constraints' dual values (whole cone blocks); none, without
        probing, where no multiplier is requested (a non-DPP program is recompiled, and its map rebuilt, per x)."""
        if not requested:
            return []
        ids = {self.problem.inner.constraints[o.constraint].id for o in requested}
        rows, start = [], 0
        for constraint in self.param_prob.constraints:
            block = list(range(start, start + constraint.size))
            duals = self._recover_duals(_unit(self.size[1], block))
            if any(np.any(np.asarray(duals[i]) != 0) for i in ids if i in duals):
                rows += block
            start += constraint.size
        return rows

    def _recover_duals(self, y: np.ndarray) -> dict:
        """cvxpy's dual values of ``problem.inner``'s constraints (by id) for the cone program's dual ``y``: the
        solver's and the reductions' own inversions, as ``Problem.solve`` runs them."""
        raw = SimpleNamespace(status=clarabel.SolverStatus.Solved, x=np.zeros(self.size[0]), z=y,
                              s=np.zeros_like(y), solve_time=0.0, iterations=0, obj_val=0.0)
        solution = self.chain.solver.invert(raw, self.inverse_data[-1])
        for reduction, data in reversed(list(zip(self.chain.reductions[:-1], self.inverse_data[:-1]))):
            solution = reduction.invert(solution, data)
        return solution.dual_vars

    def _output_duals(self, duals: dict, requested) -> np.ndarray:
        """The requested outputs' entries of recovered dual values, stacked, each flattened in C order; a
        constraint with several dual variables (an SOC's t and X) is split by cvxpy's ``save_dual_value``
        (the constraint's own dual values are restored after)."""
        parts = []
        for o in requested:
            constraint = self.problem.inner.constraints[o.constraint]
            saved = [d.value for d in constraint.dual_variables]
            constraint.save_dual_value(np.asarray(duals.get(constraint.id, np.zeros(constraint.size)), dtype=float))
            parts.append(np.asarray(constraint.dual_variables[o.part].value, dtype=float).reshape(-1))
            for d, value in zip(constraint.dual_variables, saved):
                d.save_value(value)
        return np.concatenate(parts)

    # ------------------------------------------------------------ derivative

    def vjp(self, points: Sequence[ConicPoint], grads_y: Sequence[Sequence[np.ndarray]], method: str = "cg", *,
            tol: float = 1e-10, maxiter: int | None = None, on_nonconvergence: str = "raise",
            like: torch.Tensor | None = None, grads_multipliers: Sequence[np.ndarray] | None = None
            ) -> tuple[list[list[np.ndarray]], SolveInfo]:
        r"""(dy*/dx)^T g at each of a batch of solutions: per item, one array per parameter; and the solve's info.

        Carries each g = ``grads_y[b]`` (one array per ``problem.all_variables``) to d = dF/dz, solves
        the reduced adjoint systems K (w_z, w_mu) = (d, 0) of all items at once with ``method`` (any of
        :data:`cbo.linsolve.ADJOINT_SOLVERS`) in torch, on the device and in the dtype of ``like``
        (default float64 on the CPU), then maps (dc, dA, db) to the parameters. With gradients of
        multiplier outputs (``grads_multipliers[b]``, stacked like :meth:`multiplier_values`), the adjoint
        of the residual map itself (:meth:`_residual_map_vjp`).

        Raises
        ------
        ConvergenceError
            If the adjoint solve does not converge (``on_nonconvergence="raise"``).
        StrictComplementarityError
            If K is singular along a direction that changes the derivative.
        """
        if grads_multipliers is not None and any(np.any(g) for g in grads_multipliers):
            return self._residual_map_vjp(points, grads_y, grads_multipliers)
        like = torch.zeros((), dtype=torch.float64) if like is None else like
        op = ConeKKT([p.A for p in points], [p.pieces for p in points], [p.z for p in points], like)
        d = torch.as_tensor(np.stack([self._variable_adjoint(g) for g in grads_y])).to(op.w)
        rhs = torch.cat([d, torch.zeros_like(op.w[:, self.size[0]:])], -1)
        try:
            v, info = adjoint_solve(op, rhs, method, tol=tol, maxiter=maxiter, on_nonconvergence=on_nonconvergence)
            failed = None
        except ConvergenceError as error:
            v, info, failed = None, error.info, error
        suspects = self._degenerate_items(op, info, failed is not None)
        if suspects:
            v = self._minimum_norm_adjoint(points, op, rhs, v, suspects, failed)
            info.residual = _relative_residual(op.matvec, rhs, v)
            info.converged, info.extra["minimum_norm_items"] = True, suspects
        info.extra["active_pieces"] = [p.pieces.sizes for p in points]
        v = v.detach().cpu().double().numpy()
        return [self._parameter_gradients(p, op.data_adjoint(v[b], b)) for b, p in enumerate(points)], info

    def _residual_map_vjp(self, points: Sequence[ConicPoint], grads_y, grads_multipliers
                          ) -> tuple[list[list[np.ndarray]], SolveInfo]:
        r"""dF/dx where F takes multipliers: the adjoint of the residual map N(z, v) (dense, size n + m).

        The multiplier outputs are M y with y = Pi(v) (:meth:`multiplier_map`), so with D = dPi(v),
        dF = g_z . dz + (D^T M^T g_mu) . dv and the adjoint of N(z, v; c, A, b) = 0 is

            J^T lam = (g_z, D^T M^T g_mu),   J = dN/d(z, v) = [[0, A^T D], [A, D - I]],

        whose lam = (w_z, w_b) gives dF/dx as the reduced adjoint does (:meth:`_parameter_gradients`).
        J is singular where a variable of cvxpy's canonicalization is not unique: its least-squares
        (minimum-norm) solution then, which must solve the system (else the derivative does not exist).
        """
        M = self.multiplier_map()
        grads, residual = [], 0.0
        for point, g_y, g_mu in zip(points, grads_y, grads_multipliers):
            D = projection_jacobian(point.y - point.s, point.y, self.blocks)
            J = _jacobian(point.A, D)
            rhs = np.concatenate([self._variable_adjoint(g_y), D.T @ (M.T @ np.asarray(g_mu, dtype=float))])
            lam = np.linalg.lstsq(J.T, rhs, rcond=None)[0]
            item_residual = float(np.linalg.norm(J.T @ lam - rhs) / max(np.linalg.norm(rhs), 1e-300))
            if item_residual > 1e-8:
                raise StrictComplementarityError(
                    "The derivative of the multipliers does not exist at this x: the cone program's optimality "
                    f"conditions are singular and inconsistent with the outer gradient (relative residual "
                    f"{item_residual:.1e}), so strict complementarity or uniqueness fails. Move x, or add a "
                    "strongly convex term to the inner objective.")
            residual = max(residual, item_residual)
            grads.append(self._parameter_gradients(point, lam))
        return grads, SolveInfo("direct", True, 1, residual, 0.0, {"system": "residual map N(z, v), dense"})

    def _variable_adjoint(self, grad_y: Sequence[np.ndarray]) -> np.ndarray:
        """dF/dz from dF/d(user variables) (one array per ``problem.all_variables``)."""
        del_vars = {v.id: np.asarray(g, dtype=float).reshape(v.shape)
                    for v, g in zip(self.problem.all_variables, grad_y)}
        for reduction in self.chain.reductions:
            del_vars = reduction.var_backward(del_vars)
        return np.asarray(self.param_prob.split_adjoint(del_vars), dtype=float).reshape(-1)

    @staticmethod
    def _degenerate_items(op: ConeKKT, info: SolveInfo, failed: bool) -> list[int]:
        """Items whose K may be singular: all if the solve failed; those where the dense solve needed a
        pseudo-inverse. For the iterative methods, also those whose equilibrated K has a singular value
        below _SINGULAR of its largest (dense, for systems of size at most _DENSE_CHECK_SIZE), or else
        whose active pieces have dependent gradients (from the Gram factorization the solvers made) or
        whose reduced Hessian has a (near) zero eigenvalue (Lanczos; skipped where the active pieces
        leave no null space)."""
        if failed:
            return list(range(op.batch_size))
        if info.method == "direct":
            return sorted(info.extra.get("singular_items", []))
        if op.size <= _DENSE_CHECK_SIZE:
            sigma = torch.linalg.svdvals(op.equilibrated().dense())
            return [b for b in range(op.batch_size) if float(sigma[b, -1]) <= _SINGULAR * float(sigma[b, 0])]
        with suppressed(DegenerateKKTWarning):  # their wording is the smooth route's: the analysis below words its own
            suspects = {b for b, licq in enumerate(licq_check(op)) if not licq.holds}
            if bool((op.dual_mask.sum(-1) < op.n_y).any()):
                suspects |= {b for b, (low, high) in enumerate(curvature_check(op))
                             if high > 0 and low <= _SINGULAR * high and op.n_y > int(op.dual_mask[b].sum())}
        return sorted(suspects)

    def _minimum_norm_adjoint(self, points, op: ConeKKT, rhs: torch.Tensor, v: torch.Tensor | None,
                              suspects: list[int], failed: ConvergenceError | None) -> torch.Tensor:
        r"""Dense adjoint solutions of the ``suspects``: minimum-norm where K is singular but the derivative
        exists, exact elsewhere (the iterative solve failed on the batch).

        K is singular where a variable of cvxpy's canonicalization is not unique (the hypograph variable
        of a slack geo_mean constraint, say) while the user's solution is; then the system is consistent,
        every null vector u of K carries no parameter gradient, and the minimum-norm solution gives the
        derivative. A null vector that does carry one (strict complementarity or uniqueness failing)
        means the derivative does not exist: error. A failed iterative solve on a nonsingular K is
        re-raised. Null vectors are those of the equilibrated D K D (singular values below _SINGULAR of
        the largest), mapped back by D, so that the scales the problem is written in do not matter.
        """
        v = torch.zeros_like(rhs) if v is None else v.clone()
        dense, d = op.equilibrated().dense(), op.scale
        singular_any = False
        for b in suspects:
            real = torch.cat([torch.ones(op.n_y, dtype=torch.bool, device=rhs.device), op.dual_mask[b] > 0])
            K, scale, target = dense[b][real][:, real], d[b, real], d[b, real] * rhs[b, real]
            U, sigma, _ = torch.linalg.svd(K)
            null = scale[:, None] * U[:, sigma <= _SINGULAR * sigma.max()]
            v[b] = 0.0
            v[b, real] = scale * (torch.linalg.pinv(K, hermitian=True, rtol=_SINGULAR) @ target)
            if not null.shape[1]:
                continue
            singular_any = True
            residual = float((K @ (v[b, real] / scale) - target).norm() / target.norm().clamp_min(1e-300))
            full = torch.zeros(null.shape[1], rhs.shape[-1], dtype=rhs.dtype, device=rhs.device)
            full[:, real] = null.T
            largest = lambda adjoint: max(float(np.abs(g).max(initial=0.0)) for g in  # noqa: E731
                                          self._parameter_gradients(points[b], op.data_adjoint(adjoint, b)))
            size = max(largest(v[b].cpu().numpy()), 1.0)
            leaking = max(largest((u / u.norm()).cpu().numpy()) for u in full)
            if residual > 1e-8 or leaking > 1e-8 * size:
                raise StrictComplementarityError(
                    "The derivative of the cone program's solution does not exist at this x: its optimality "
                    f"conditions are singular (relative residual of the adjoint solve {residual:.1e}, "
                    f"parameter sensitivity along their null space {leaking:.1e}), so strict complementarity or "
                    "uniqueness of the solution fails. Add a strongly convex term (e.g. 1e-3 * "
                    "cp.sum_squares(y)), or move x.")
        if failed is not None and not singular_any:
            raise failed
        if singular_any:
            warn(
                "The cone program's optimality conditions are singular at this x: an auxiliary variable of "
                "cvxpy's canonicalization is not unique (the user's solution is). cbo used the minimum-norm "
                "solution of the consistent adjoint system.", DegenerateKKTWarning)
        return v

    def _parameter_gradients(self, point: ConicPoint, w: np.ndarray) -> list[np.ndarray]:
        """dF/dx from the adjoint w = (w_z, w_b): dc = -w_z, dA = -(y w_z^T + w_b z^T), db = w_b, mapped
        to the user's parameters by cvxpy's parameter maps. For a DPP problem dA is needed only where
        A depends on the parameters (:meth:`_parametric_entries`): formed there alone, in O(nnz)."""
        n = point.z.size
        w_z, w_b = w[:n], w[n:]
        if not self.dpp:
            dA = -(np.outer(point.y, w_z) + np.outer(w_b, point.z))
            return self._finite_difference_gradients(point, -w_z, dA, w_b)
        rows, columns = self._parametric_entries()
        minus_dA = sp.csc_array((point.y[rows] * w_z[columns] + w_b[rows] * point.z[columns], (rows, columns)),
                                shape=point.A.shape)  # cvxpy's parameter map holds -A
        dparams = self.param_prob.apply_param_jac(-w_z, minus_dA, w_b)
        for reduction in reversed(self.chain.reductions):
            dparams = reduction.param_backward(dparams)
        return [_symmetric_gradient(p, np.asarray(dparams.get(p.id, np.zeros(p.shape)), dtype=float).reshape(p.shape))
                for p in self.problem.parameters]

    def _parametric_entries(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, columns) of the entries of A that cvxpy's parameter map can change (or set), computed once:
        the nonzero rows of ``param_prob.A``, whose row r < m n is entry (r mod m, r div m) of A."""
        if self._entries is None:
            n, m = self.size
            flat = np.unique(sp.coo_array(self.param_prob.A).row)
            flat = flat[flat < m * n]
            self._entries = (flat % m, flat // m)
        return self._entries

    def _finite_difference_gradients(self, point: ConicPoint, dc: np.ndarray, dA: np.ndarray, db: np.ndarray
                                     ) -> list[np.ndarray]:
        r"""dF/dx_k = <dc, dc/dx_k> + <dA, dA/dx_k> + <db, db/dx_k> for a non-DPP problem, whose cone data
        (c, A, b) cvxpy gives only at a point: central differences of the data, re-canonicalized at
        x +- h e_k (one-sided, second order, where a nonneg parameter sits at 0), h = 1e-6 max(1, |x_k|).
        Costs 2 canonicalizations per entry of x."""
        def pairing_at(xs) -> float:
            self._set_parameters(xs)
            c, A, b = _cone_data(self._canonicalize()[0])
            return float(dc @ c + (A.multiply(dA)).sum() + db @ b)

        at_point = None  # the pairing at x itself, for one-sided differences: computed once, if needed
        grads = []
        for index, param in enumerate(self.problem.parameters):
            grad = np.zeros(param.size)
            for k in range(param.size):
                h = 1e-6 * max(1.0, abs(float(point.x[index].flat[k])))
                one_sided = param.is_nonneg() and point.x[index].flat[k] < h

                def shifted(steps):
                    xs = [value.copy() for value in point.x]
                    xs[index].flat[k] += steps * h
                    return pairing_at(xs)

                if one_sided:
                    at_point = pairing_at(point.x) if at_point is None else at_point
                    grad[k] = (-3 * at_point + 4 * shifted(1) - shifted(2)) / (2 * h)
                else:
                    grad[k] = (shifted(1) - shifted(-1)) / (2 * h)
            grads.append(grad.reshape(param.shape))
        self._set_parameters(point.x)  # leave the parameters at the point
        return grads

    # ------------------------------------------------------------ cones

    def _check_cones(self, y: np.ndarray, s: np.ndarray, where: str, polished: bool) -> list[ConeStatus]:
        """Activity of each cone, and strict complementarity (y + s in the interior of the cone).

        Raises StrictComplementarityError where an SOC, PSD, exponential or power cone fails it (slack and
        multiplier both on the boundary, to ``_ZERO_TOL`` in a ``polished`` solution), warns where one
        nearly does (``_WEAK_TOL``) or where nonnegative entries are weakly active.
        """
        statuses, weak, nearly = [], [], []
        scale = _solution_scale(y, s)
        tol, weak_tol = _TIGHT_TOL * scale, _WEAK_TOL * scale
        zero_tol = (_ZERO_TOL if polished else _WEAK_TOL) * scale
        for block in self.blocks:
            yb, sb = y[block.rows], s[block.rows]
            if block.kind == "zero":
                continue
            if block.kind == "nonneg":
                tight = sb <= yb
                weak += [block.label] if bool(((sb <= weak_tol) & (yb <= weak_tol)).any()) else []
                statuses.append(ConeStatus(block.label, "nonneg", bool(tight.any()), active=int(tight.sum())))
                continue
            status, (degeneracy, what) = _CONE_STATUS[block.kind](block, yb, sb, tol)
            if degeneracy <= zero_tol:
                raise StrictComplementarityError(
                    f"Strict complementarity fails in {block.label}: {what} {degeneracy:.1e}. The solution map "
                    "y*(x) is not differentiable at this x (the cone constraint is weakly active). Move x "
                    "slightly, or drop or loosen the constraint if it should not bind.")
            if degeneracy <= weak_tol:
                nearly.append(f"{block.label} ({what} {degeneracy:.1e})")
            statuses.append(status)
        if weak:
            warn(
                f"{where}Strict complementarity fails at the inner solution: {'; '.join(dict.fromkeys(weak))} "
                "touch(es) the bound with a zero multiplier (weakly active). y*(x) is not differentiable "
                "there; cbo returns the one-sided derivative that keeps these entries inactive.",
                DegenerateKKTWarning)
        if nearly:
            warn(
                f"{where}Nearly weakly active cone constraint(s): {'; '.join(nearly)}, relative to the solution's "
                f"scale {scale:.1e}. The derivative exists but changes abruptly within about that distance of "
                "x.", DegenerateKKTWarning)
        return statuses


def _symmetric_gradient(param: cp.Parameter, grad: np.ndarray) -> np.ndarray:
    """The gradient of a symmetric matrix parameter as that of X -> f((X + X^T) / 2).

    cvxpy keeps only the upper triangle of such a parameter, and its
    ``param_backward`` copies the gradient of each upper entry to both (i, j) and
    (j, i): halving the off-diagonal entries makes <grad, dX> the directional
    derivative along any symmetric dX.
    """
    if not is_symmetric(param):
        return grad
    return np.where(np.eye(grad.shape[-1], dtype=bool), grad, grad / 2)


# ---------------------------------------------------------------- cone layout

def _user_constraint_names(inner: cp.Problem, inverse_data) -> dict[int, str]:
    """Id of each constraint of the final cone program -> the user's constraint it comes from."""
    names = {}
    for index, constraint in enumerate(inner.constraints):
        text = " ".join(str(constraint).split())  # one line
        text = text if len(text) <= 60 else text[:57] + "..."
        names[constraint.id] = f"{type(constraint).__name__} constraint {index} (`{text}`)"
    for data in inverse_data:
        mapping = getattr(data, "cons_id_map", None)
        if mapping is None and isinstance(data, tuple) and len(data) == 3:
            mapping = data[2]
        for old, new in (mapping or {}).items():
            if old in names and new != old:
                names[new] = names[old]
    return names


def _blocks(param_prob, names: dict[int, str], m: int) -> list[_Block]:
    """The cone blocks of the cone program's rows, in Clarabel's order, labelled."""
    blocks, start, counts = [], 0, {}
    for constraint in param_prob.constraints:
        kind = _KINDS.get(type(constraint).__name__)
        if kind is None:
            raise ProblemDefinitionError(
                f"cvxpy compiles the inner problem to a {type(constraint).__name__} cone, which cbo's conic "
                "route cannot differentiate yet (zero, nonnegative, second-order, PSD, exponential and 3-d "
                "power cones are supported). Write an n-dimensional power cone as a chain of cp.PowCone3D "
                "constraints.")
        counts[kind] = counts.get(kind, 0) + 1
        label = names.get(constraint.id, f"{kind} cone {counts[kind] - 1} of cvxpy's canonicalization (from an atom)")
        if kind == "soc":  # one constraint object may stack several cones
            sizes = constraint.cone_sizes()
            offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
            blocks += [_Block(kind, start + int(o), int(n), label) for o, n in zip(offsets, sizes)]
        elif kind in ("exp", "pow"):
            count = constraint.size // 3
            alphas = [None] * count if kind == "exp" else _power_exponents(constraint, count, label)
            blocks += [_Block(kind, start + 3 * k, 3, label, alpha) for k, alpha in enumerate(alphas)]
        else:
            blocks.append(_Block(kind, start, constraint.size, label))
        start += constraint.size
    if start != m:
        raise ProblemDefinitionError(f"cbo could not match cvxpy's cone program rows ({m}) to its constraints "
                                     f"({start}); please report this problem.")
    return blocks


def _power_exponents(constraint, count: int, label: str) -> list[float]:
    """The exponent of each of the ``count`` 3-d power cones that ``constraint`` stacks."""
    if constraint.alpha.parameters():
        raise ProblemDefinitionError(f"The exponent of {label} depends on a parameter: the cone itself changes "
                                     "with x, which cbo cannot differentiate. Make the exponent a constant.")
    return [float(a) for a in np.broadcast_to(np.asarray(constraint.alpha.value, dtype=float).ravel(), (count,))]


# ---------------------------------------------------------------- residual map

def _unit(size: int, rows: Sequence[int]) -> np.ndarray:
    """A vector of ``size`` zeros with ones at ``rows``."""
    e = np.zeros(size)
    e[list(rows)] = 1.0
    return e


def _cone_data(data: dict) -> tuple[np.ndarray, sp.csc_array, np.ndarray]:
    """(c, A, b) of cvxpy's problem data for Clarabel (A z + s = b form), at the values it was made with."""
    return np.asarray(data["c"], dtype=float), sp.csc_array(data["A"]), np.asarray(data["b"], dtype=float)


def _solution_scale(y: np.ndarray, s: np.ndarray) -> float:
    """max(1, |y|_inf, |s|_inf): the unit of the relative thresholds on slacks and multipliers."""
    return max(1.0, float(np.abs(y).max(initial=0.0)), float(np.abs(s).max(initial=0.0)))


def _residual(c, A, b, z, v, y) -> np.ndarray:
    """N(z, v) = (c + A^T y, A z + y - v - b) with y = Pi_{K^*}(v)."""
    return np.concatenate([c + A.T @ y, A @ z + y - v - b])


def _point_scale(z: np.ndarray, v: np.ndarray) -> float:
    """max(1, |(z, v)|_inf): the unit of the residual thresholds on N."""
    return max(1.0, float(np.abs(np.concatenate([z, v])).max(initial=0.0)))


def _polish_target(z: np.ndarray, v: np.ndarray) -> float:
    """||N||_inf at which the polish stops: 1e-14 relative to the size of the point."""
    return 1e-14 * _point_scale(z, v)


def _residual_norm(c, A, b, z, v, blocks, exp_guess) -> float:
    return float(np.abs(_residual(c, A, b, z, v, project_dual(v, blocks, exp_guess))).max(initial=0.0))


def _jacobian(A: sp.csc_array, D: np.ndarray) -> np.ndarray:
    """J = [[0, A^T D], [A, D - I]], dense."""
    A = A.toarray()
    n, m = A.shape[1], A.shape[0]
    return np.block([[np.zeros((n, n)), A.T @ D], [A, D - np.eye(m)]])


# ---------------------------------------------------------------- cone activity

def _soc_status(block: _Block, y: np.ndarray, s: np.ndarray, tol: float) -> tuple[ConeStatus, tuple[float, str]]:
    """s = (t, u) in the SOC: tight when ||u|| = t. Strict complementarity fails when one of y, s is zero
    and the other on the boundary: the degeneracy is the smaller of max(|y|, margin(s)) and
    max(|s|, margin(y)), margin(u) = u_0 - ||u_1:||."""
    margin = lambda u: u[0] - np.linalg.norm(u[1:])  # noqa: E731
    zero_multiplier = max(np.abs(y).max(), margin(s))
    zero_slack = max(np.abs(s).max(), margin(y))
    what = ("the slack is on the cone's boundary and the multiplier has size" if zero_multiplier <= zero_slack
            else "the multiplier is on the dual cone's boundary and the slack has size")
    tight = margin(s) <= tol or np.abs(s).max() <= tol
    detail = "at the apex" if np.abs(s).max() <= tol else ("on the boundary" if tight else "interior")
    return ConeStatus(block.label, "soc", bool(tight), detail=detail), (min(zero_multiplier, zero_slack), what)


def _psd_status(block: _Block, y: np.ndarray, s: np.ndarray, tol: float) -> tuple[ConeStatus, tuple[float, str]]:
    """Rank of the PSD slack S; strict complementarity: rank S + rank Y = n, the degeneracy is
    lambda_min(S + Y)."""
    S, Y = smat(s), smat(y)
    rank = int((np.linalg.eigvalsh(S) > tol).sum())
    what = (f"rank(S) + rank(Y) = {rank} + {int((np.linalg.eigvalsh(Y) > tol).sum())} of {S.shape[0]} for the "
            "slack S and the multiplier Y, lambda_min(S + Y)")
    status = ConeStatus(block.label, "psd", rank < S.shape[0], rank=rank, detail=f"rank {rank} of {S.shape[0]}")
    return status, (float(np.linalg.eigvalsh(S + Y).min()), what)


def _exp_or_pow_status(block: _Block, y: np.ndarray, s: np.ndarray, tol: float
                       ) -> tuple[ConeStatus, tuple[float, str]]:
    """An exponential or power cone: tight where the multiplier is nonzero. Strict complementarity fails
    where the multiplier is zero and the slack zero or on the boundary: degeneracy
    max(|y|, min(|s|, margin(s)))."""
    degeneracy = max(np.abs(y).max(), min(np.abs(s).max(), _boundary_margin(block, s)))
    tight = bool(np.abs(y).max() > tol)
    status = ConeStatus(block.label, block.kind, tight, detail="on the boundary" if tight else "interior")
    return status, (degeneracy, "the slack is on the cone's boundary or zero and the multiplier has size")


def _boundary_margin(block: _Block, s: np.ndarray) -> float:
    """-g(s): how far s lies inside its exponential or power cone (0 on the faces where g is undefined)."""
    if block.kind == "exp":
        return -exp_h(s)[0] if s[1] > 0 and s[2] > 0 else 0.0
    return -pow_g(s, block.alpha)[0] if s[0] > 0 and s[1] > 0 else 0.0


_CONE_STATUS = {"soc": _soc_status, "psd": _psd_status, "exp": _exp_or_pow_status, "pow": _exp_or_pow_status}


# ---------------------------------------------------------------- layer
