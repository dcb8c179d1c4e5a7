r"""`ArgminLayer`: y*(x) = argmin_y g(x, y) s.t. p(x, y) <= 0, q(x, y) = 0 as a batched torch layer.

Forward solves the inner problems of a batch with cvxpy, in parallel
(:class:`~cbo.inner.BatchSolver`), and Newton-polishes them on their KKT
systems. Backward solves one batched adjoint system with the KKT operators of
all items stacked (:class:`~cbo.kkt.KKTOperator`),

    K_b v_b = (dL/dy_b, 0),   dL/dx_b = -(dR_b/dx_b)^T v_b,

and sums the gradients of unbatched (broadcast) inputs over the batch.
"""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import cvxpy as cp
import numpy as np
import torch

from .compiled import compiled
from .conic import ConeStatus
from .hypergrad import (ConicRouteNeeded, check_kinks, qp_active_set, qp_licq, qp_polish_info, qp_solve_info,
                        select_route, uses_qp_path)
from .inputs import broadcast_inputs, item_names, layer_inputs, timed
from .inner import BatchSolver, InnerSolution
from .errors import InnerSolveError, ProblemDefinitionError, external_stacklevel, one_warning_per_category
from .kkt import ActiveSet, LICQInfo, PolishInfo, curvature_check, kkt_at_solutions, licq_check
from .linsolve import ADJOINT_SOLVERS, SolveInfo, adjoint_solve
from .options import OptionIgnoredWarning, Options, resolve_options, with_solver_args
from .problem import BilevelProblem
from .qp import GeneralPathNeeded
from .qp_batch import BatchedKKT, batched_forward, batched_vjp, uses_batched_path

__all__ = ["ArgminLayer", "LayerInfo"]


@dataclass
class LayerInfo:
    """Diagnostics of one :class:`ArgminLayer` call, per batch item (items in row-major batch order).

    ``linear_solve`` and the ``adjoint_solve`` timing are filled in by the backward pass.
    ``route`` says which route and why (as :attr:`HypergradInfo.route`); on the conic
    route ``active_sets``, ``licq`` and ``reduced_hessian_extremes`` are empty and
    ``cones`` holds each item's cone activity. ``path``: "compiled QP" (:mod:`cbo.qp`, item by item),
    "compiled QP, batched" (:mod:`cbo.qp_batch`, the batch as one stack of tensors) or "general".
    """

    batch_shape: tuple
    solver_status: list[str]
    active_sets: list[ActiveSet]
    polish: list[PolishInfo]
    licq: list[LICQInfo]
    reduced_hessian_extremes: list[tuple[float, float]]
    kkt_residual: list[float]
    linear_solve: SolveInfo | None = None
    timings: dict[str, float] = field(default_factory=dict)
    route: str = "smooth Lagrangian"
    cones: list[list[ConeStatus]] | None = None
    path: str = "general"
    solvers: list[str] | None = None


class ArgminLayer(torch.nn.Module):
    """A differentiable layer returning the solution of a convex cvxpy problem.

    A drop-in for ``cvxpylayers.torch.CvxpyLayer``: the same constructor
    (``CvxpyLayer(problem, parameters, variables, solver=..., solver_args=...)``)
    and call (``layer(*inputs, solver_args=...)``); docs/layer.md lists the
    differences and why.

    Notes
    -----
    Call ``layer(*inputs)`` with one tensor per parameter, each shaped like the
    parameter or with leading batch dimensions (unbatched inputs broadcast);
    it returns a tuple of tensors, one per variable, shaped
    ``batch_shape + variable.shape``. ``layer(*inputs, return_info=True)``
    returns ``(outputs, LayerInfo)``. A symmetric (``symmetric=True``,
    ``PSD=True``) matrix parameter takes the symmetric part (X + X^T) / 2 of
    its input, and its gradient is that of the symmetric function.
    """

    def __init__(self, inner: cp.Problem, parameters: Sequence[cp.Parameter],
                 variables: Sequence[cp.Variable] | None = None, method: str | None = None, *,
                 options: Options | None = None, executor=None, n_workers: int | None = None,
                 timeout: float | None = None, solver_args: dict | None = None, gp: bool = False,
                 verbose: bool = False, canon_backend: str | None = None, **settings):
        """Compile ``inner`` into a layer: parameters in, the solution's variables out.

        Parameters
        ----------
        inner : cvxpy.Problem
            The problem; its ``parameters`` are the layer's inputs.
        parameters : sequence of cvxpy.Parameter
            Inputs, in call order. Other parameters of ``inner`` are constants read from their ``.value``.
        variables : sequence of cvxpy.Variable, optional
            Outputs, in order (default: all variables of ``inner``).
        method : str, optional
            Adjoint solver of the backward pass, one of ``cbo.ADJOINT_METHODS``. Default:
            on an inner QP the compiled fast path of :mod:`cbo.qp` (one
            factorization per item serves forward and backward), elsewhere "cg".
        options : Options, optional
            Settings (:class:`cbo.Options`); keyword ``settings`` override its fields.
        executor : concurrent.futures.Executor, optional
            Runs the forward solves (e.g. ``distributed.Client(...).get_executor()``);
            default: a pool of ``n_workers`` local processes. Not used on the QP fast
            path, which solves in this process unless an executor or ``n_workers > 1``
            is given.
        n_workers : int, optional
            Size of the default pool (default: the number of CPUs; 1 solves in this process).
        timeout : float, optional
            Seconds to wait for a batch's forward solves.
        solver_args : dict, optional
            cvxpylayers' solver settings, for every call (a call's own ``solver_args``
            override them): ``solve_method``, ``eps``, ``max_iters`` and the named
            solver's own keys (:func:`cbo.options.with_solver_args`).
        gp, verbose, canon_backend
            cvxpylayers' arguments: ``gp=True`` (geometric programs) is refused,
            ``verbose=True`` is ``solver_args={"verbose": True}``, ``canon_backend``
            is ignored with an :class:`cbo.OptionIgnoredWarning`.
        **settings
            Any field of :class:`cbo.Options` but the unrolled and penalty ones:
            ``tol``, ``maxiter``, ``on_nonconvergence``, ``solver``,
            ``solver_options``, ``active_tol``, ``polish_solution``, ``warm_start``,
            ``route`` (the conic route solves the batch's cone programs in this process).

        Raises
        ------
        ProblemDefinitionError
            As :class:`cbo.BilevelProblem` (e.g. a parameter that is neither an input nor given a
            value), and for ``gp=True``.
        """
        super().__init__()
        _refuse_geometric_program(gp)
        if canon_backend is not None:
            warnings.warn(f"canon_backend={canon_backend!r} ignored: cbo compiles the problem with cvxpy's "
                          "default backend.", OptionIgnoredWarning, stacklevel=external_stacklevel())
        self.problem = BilevelProblem(inner, parameters, variables)
        self._executor, self._n_workers, self._timeout = executor, n_workers, timeout
        self._variants: dict[str, ArgminLayer] = {}
        options = resolve_options(options, method=method, **settings)
        self._configure(with_solver_args(options, {**({"verbose": True} if verbose else {}), **(solver_args or {})}))

    def _configure(self, options: Options) -> None:
        """Route, path, adjoint method and forward solver for ``options``."""
        if options.method is not None and options.method not in ADJOINT_SOLVERS:
            raise ValueError(f"Unknown method {options.method!r}. The layer's methods: {', '.join(ADJOINT_SOLVERS)} "
                             "(the unrolled and penalty methods are cbo.hypergrad's only).")
        self.options = options
        self.route, self.route_reason = select_route(self.problem, options.route)
        # The QP fast path solves in this process; an executor or a pool asked for takes the general path.
        self.fast = (self.route == "smooth"
                     and uses_qp_path(self.problem, options.method, options.solver, options.polish_solution)
                     and self._executor is None and (self._n_workers or 1) == 1)
        self.method = options.method or "cg"
        if self.route == "conic":
            options.warn_ignored(("solver", "active_tol"), "the conic route solves the cone program with Clarabel")
        self.batch_solver = BatchSolver(self.problem, options.solver, options.solver_options, self._executor,
                                        self._n_workers, self._timeout)

    def _with_solver_args(self, solver_args: dict | None) -> ArgminLayer:
        """This layer, or for a call's ``solver_args`` that change its options a copy configured with them
        (built on first use and kept, with its own forward solver, for later calls with the same arguments)."""
        options = with_solver_args(self.options, solver_args)
        if options == self.options:
            return self
        key = repr(options)
        if key not in self._variants:
            variant = copy.copy(self)
            variant._variants = {}
            variant._configure(options)
            self._variants[key] = variant
        return self._variants[key]

    @one_warning_per_category()
    def forward(self, *inputs: torch.Tensor, solver_args: dict | None = None, return_info: bool = False):
        """Solve the inner problems of a batch: ``y_1, ..., y_k = layer(*inputs)``.

        The warnings of the batch's items are issued once per category, naming the items
        (:func:`cbo.errors.one_warning_per_category`).

        Parameters
        ----------
        *inputs : tensors
            One per parameter, shaped like it or with leading batch dimensions
            (numpy arrays are accepted; integer and bool inputs give float64 outputs).
        solver_args : dict, optional
            cvxpylayers' solver settings for this call, on top of the layer's (see ``__init__``).
        return_info : bool
            Also return a :class:`LayerInfo` (its ``linear_solve`` is filled by the backward pass).

        Returns
        -------
        tuple of tensors, one per variable, shaped ``batch_shape + variable.shape``
        (and the LayerInfo if ``return_info``).
        """
        if len(inputs) != len(self.problem.parameters):
            raise ValueError(
                f"A tensor must be provided for each CVXPY parameter in `parameters`: this ArgminLayer takes "
                f"{len(self.problem.parameters)} input(s) {[p.name() for p in self.problem.parameters]}, got "
                f"{len(inputs)}."
            )
        layer = self._with_solver_args(solver_args)
        info_box: list[LayerInfo] = []
        inputs = layer_inputs(self.problem.parameters, inputs)
        outputs = None
        if layer.fast:
            try:
                outputs = _QPArgminFunction.apply(layer, info_box, *inputs)
            except GeneralPathNeeded:  # a degenerate item: the general route diagnoses the batch
                info_box.clear()
        if outputs is None:
            function = _ConicArgminFunction if layer.route == "conic" else _ArgminFunction
            try:
                outputs = function.apply(layer, info_box, *inputs)
            except ConicRouteNeeded as handover:  # an item at a kink: the conic route takes the batch
                reason = str(handover)
        if outputs is None:  # outside the handler: the conic route's errors do not chain to the hand-over
            outputs = _ConicArgminFunction.apply(layer, info_box, *inputs)
            info_box[0].route = reason
        return (outputs, info_box[0]) if return_info else outputs

    def close(self) -> None:
        """Shut down the layer's worker processes (they also stop when the layer is garbage collected)."""
        self.batch_solver.close()
        for variant in self._variants.values():
            variant.close()


def _refuse_geometric_program(gp: bool) -> None:
    """cvxpylayers' ``gp=True``: cbo has no log-log (DGP) reformulation; say how to write the problem instead."""
    if gp:
        raise ProblemDefinitionError(
            "gp=True: cbo does not differentiate geometric programs. Write the problem in log-log form as a "
            "DCP problem (variables u = log y, parameters a = log x, posynomials as log_sum_exp of affine "
            "terms) and pass the parameters' logarithms, or use cvxpylayers.torch.CvxpyLayer(..., gp=True)."
        )


class _ArgminFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer: ArgminLayer, info_box: list, *inputs):
        problem = layer.problem
        timings: dict[str, float] = {}
        x, batch_shape = broadcast_inputs(problem, inputs)
        with timed(timings, "inner_solve"):
            values = [[t[b].cpu().numpy() for t in x] for b in range(x[0].shape[0])]
            solutions: list[InnerSolution] = layer.batch_solver.solve(values)
        where = item_names(batch_shape)
        for b, solution in enumerate(solutions):
            check_kinks(problem, [t[b] for t in x], solution.y, layer.options.active_tol)
        with timed(timings, "polish"):
            op, actives, polish_infos = kkt_at_solutions(problem, x, solutions, layer.method,
                                                         layer.options.active_tol, layer.options.polish_solution,
                                                         where)
        with timed(timings, "kkt_checks"):
            licq = licq_check(op, where=where)
            curvature = curvature_check(op, where=where)
        info = LayerInfo(batch_shape, [s.status for s in solutions], actives, polish_infos, licq, curvature,
                         [p.residual_after for p in polish_infos], timings=timings, route=layer.route_reason)
        info_box.append(info)
        ctx.layer, ctx.op, ctx.info, ctx.batch_shape = layer, op, info, batch_shape
        ctx.input_meta = [(tuple(t.shape), t.dtype, t.device) for t in inputs]
        return problem.output_values(op.w.detach(), batch_shape, inputs[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outputs):
        layer, op, problem = ctx.layer, ctx.op, ctx.layer.problem
        start = time.perf_counter()
        batch = op.batch_size
        b = problem.output_cotangent(grad_outputs, batch, op.w.dtype, op.w.device)
        v, solve_info = adjoint_solve(op, b, layer.method, tol=layer.options.tol, maxiter=layer.options.maxiter,
                                      on_nonconvergence=layer.options.on_nonconvergence)
        grads = _input_gradients([-g for g in op.vjp_x(v)], ctx)
        ctx.info.linear_solve = solve_info
        ctx.info.timings["adjoint_solve"] = time.perf_counter() - start
        return (None, None, *grads)


class _QPArgminFunction(torch.autograd.Function):
    """The batch on the compiled QP (:mod:`cbo.qp`): each item solved (or its previous active set reused)
    and factored once in the forward pass; the backward pass is one solve with each item's factorization.
    A batch whose items all keep their active sets is factored and solved as one stack of tensors
    (:mod:`cbo.qp_batch`) where that pays: on a GPU, or from BATCH_MIN_ITEMS items."""

    @staticmethod
    def forward(ctx, layer: ArgminLayer, info_box: list, *inputs):
        problem, program = layer.problem, compiled(layer.problem).qp
        x, batch_shape = broadcast_inputs(problem, inputs)
        ctx.layer, ctx.batch_shape, ctx.kkt = layer, batch_shape, None
        ctx.input_meta = [(tuple(t.shape), t.dtype, t.device) for t in inputs]
        if uses_batched_path(program, x[0].shape[0], x[0].device, layer.options.warm_start):
            start = time.perf_counter()
            kkt = batched_forward(program, x, layer.options.active_tol)
            if kkt is not None:
                ctx.kkt, ctx.info = kkt, _batched_info(program, kkt, batch_shape, layer.route_reason,
                                                       time.perf_counter() - start)
                info_box.append(ctx.info)
                w = torch.cat([kkt.z[:, program.y_index], kkt.lam[:, program.mu_index], kkt.lam[:, program.nu_index]], 1)
                return problem.output_values(w, batch_shape, inputs[0])
        values = [[t[b].cpu().numpy() for t in x] for b in range(x[0].shape[0])]
        points = []
        for b, item in enumerate(values):
            try:
                points.append(program.solve(item, item=b, solver=layer.options.solver,
                                            solver_options=layer.options.solver_options,
                                            active_tol=layer.options.active_tol, warm_start=layer.options.warm_start,
                                            where=item_names(batch_shape)(b)))
            except InnerSolveError as err:
                raise type(err)(f"{item_names(batch_shape)(b)}{err}") from err
        timings = {phase: sum(p.timings[phase] for p in points) for phase in ("inner_solve", "polish")}
        info = LayerInfo(batch_shape, [p.status for p in points], [qp_active_set(program, p.active, p.weak) for p in points],
                         [qp_polish_info(p) for p in points], [qp_licq(p) for p in points], [],
                         [p.kkt_residual for p in points],
                         timings=timings, route=layer.route_reason, path="compiled QP",
                         solvers=[p.how for p in points])
        info_box.append(info)
        ctx.points, ctx.info = points, info
        w = torch.as_tensor(np.stack([np.concatenate([p.y, p.mu, p.nu]) for p in points]), device=x[0].device)
        return problem.output_values(w, batch_shape, inputs[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outputs):
        problem, program = ctx.layer.problem, compiled(ctx.layer.problem).qp
        start = time.perf_counter()
        if ctx.kkt is not None:
            dw = problem.output_cotangent(grad_outputs, ctx.kkt.z.shape[0], torch.float64, ctx.kkt.z.device)
            grads = _input_gradients(batched_vjp(program, ctx.kkt, dw), ctx)
            ctx.info.linear_solve = SolveInfo("direct", True, 1, float(ctx.kkt.adjoint_residual.max()), 0.0,
                                              {"factorization": "batched dense LU (torch)"})
            ctx.info.timings["adjoint_solve"] = time.perf_counter() - start
            return (None, None, *grads)
        dw = problem.output_cotangent(grad_outputs, len(ctx.points), torch.float64, "cpu").numpy()
        per_item = [program.vjp(point, dw[b]) for b, point in enumerate(ctx.points)]
        grads = _input_gradients(_stacked_items(per_item), ctx)
        ctx.info.linear_solve = qp_solve_info(ctx.points)
        ctx.info.timings["adjoint_solve"] = time.perf_counter() - start
        return (None, None, *grads)


class _ConicArgminFunction(torch.autograd.Function):
    r""":class:`cbo.ArgminLayer` on the conic route: a batch of cone programs forward, their VJPs backward.

    Backward: dL/dx_b = (dy_b/dx_b)^T dL/dy_b for every item b, the items' reduced adjoint systems
    solved as one batch with the layer's ``method`` (:meth:`ConicProgram.vjp`); gradients of broadcast
    (unbatched) inputs are summed over the batch.
    """

    @staticmethod
    def forward(ctx, layer, info_box: list, *inputs):
        problem, program = layer.problem, compiled(layer.problem).conic
        start = time.perf_counter()
        x, batch_shape = broadcast_inputs(problem, inputs)
        where = item_names(batch_shape)
        points = [program.solve([t[b].cpu().numpy() for t in x], layer.options.solver_options,
                                layer.options.polish_solution,
                                where(b)) for b in range(x[0].shape[0])]
        w = torch.as_tensor(np.stack([np.concatenate([*program.variable_values(p), program.multiplier_values(p)])
                                      for p in points]), dtype=torch.float64, device=x[0].device)
        polish = [PolishInfo(p.polish_steps, p.residual_before, p.residual_after, True) for p in points]
        info = LayerInfo(batch_shape, [p.status for p in points], [], polish, [], [],
                         [p.residual_after for p in points], timings={"inner_solve": time.perf_counter() - start},
                         route=layer.route_reason, cones=[p.cones for p in points])
        info_box.append(info)
        ctx.layer, ctx.points, ctx.info, ctx.batch_shape = layer, points, info, batch_shape
        ctx.input_meta = [(tuple(t.shape), t.dtype, t.device) for t in inputs]
        return problem.output_values(w, batch_shape, inputs[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outputs):
        layer = ctx.layer
        problem, program = layer.problem, compiled(layer.problem).conic
        start = time.perf_counter()
        batch = len(ctx.points)
        dw = problem.output_cotangent(grad_outputs, batch, torch.float64, "cpu")
        grads_y = [[g.numpy() for g in problem.split_y(dw[b, :problem.n_y])] for b in range(batch)]
        like = next(g for g in grad_outputs if g is not None)
        per_item, ctx.info.linear_solve = program.vjp(
            ctx.points, grads_y, layer.method, tol=layer.options.tol, maxiter=layer.options.maxiter,
            on_nonconvergence=layer.options.on_nonconvergence, like=like.to(torch.float64),
            grads_multipliers=list(dw[:, problem.n_y:].numpy()))
        ctx.info.timings["adjoint_solve"] = time.perf_counter() - start
        return (None, None, *_input_gradients(_stacked_items(per_item), ctx))


def _batched_info(program, kkt: BatchedKKT, batch_shape: tuple, route: str, seconds: float) -> LayerInfo:
    """The LayerInfo of a batch on the batched path (:mod:`cbo.qp_batch`): every item kept its active set.
    LICQ's ``conditioning`` there is min/max |U_ii| of the item's LU factors (the active set's full rank
    was checked when the QP solver found it)."""
    n_eq, batch = program.n_eq, kkt.z.shape[0]
    active = kkt.a[:, n_eq:].bool().cpu().numpy()
    pivots = kkt.lu.diagonal(dim1=1, dim2=2).abs()
    conditioning = (pivots.amin(dim=1) / pivots.amax(dim=1)).tolist()
    residuals = kkt.kkt_residual.tolist()
    rows = [n_eq + int(a.sum()) for a in active]
    return LayerInfo(batch_shape, [cp.OPTIMAL] * batch,
                     [qp_active_set(program, a) for a in active],
                     [PolishInfo(1, float("nan"), r, True, "one batched solve on the kept active set") for r in residuals],
                     [LICQInfo(k, k, c) for k, c in zip(rows, conditioning)], [], residuals,
                     timings={"inner_solve": 0.0, "polish": seconds}, route=route, path="compiled QP, batched",
                     solvers=["active set reused"] * batch)


def _input_gradients(batched: Sequence[torch.Tensor], ctx) -> list[torch.Tensor]:
    """Gradients stacked over the flat batch, (B, *parameter shape) per input, as tensors shaped, typed
    and placed like the inputs; a broadcast (unbatched) input gets the sum over the batch."""
    grads = []
    for g, (shape, dtype, device) in zip(batched, ctx.input_meta):
        g = g.reshape(torch.Size([*ctx.batch_shape, *g.shape[1:]])).sum_to_size(shape)
        grads.append(g.to(dtype=dtype if dtype.is_floating_point else torch.float64, device=device))
    return grads


def _stacked_items(per_item: list[list[np.ndarray]]) -> list[torch.Tensor]:
    """Per-item gradients (one numpy array per input) stacked over the batch, one tensor per input."""
    return [torch.as_tensor(np.stack(items)) for items in zip(*per_item)]

