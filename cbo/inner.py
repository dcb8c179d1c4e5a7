"""Solve the inner problem with cvxpy and read y*, mu and nu in cvxpy's sign convention.

A DPP inner problem is canonicalized once by cvxpy and re-solved for each new
x from its cached parameter map; a non-DPP one is canonicalized per x.

:class:`BatchSolver` solves a batch of inner problems in parallel: in worker
processes that each hold a compiled copy of the problem, or through any
``concurrent.futures.Executor`` (a Dask ``Client.get_executor()``, a Ray-backed
executor, ...) that spreads them over a cluster.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import pickle
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import cvxpy as cp
import numpy as np
from cvxpy.lin_ops import lin_utils

from .errors import InnerSolveError, check_status

if TYPE_CHECKING:
    from .problem import BilevelProblem

__all__ = ["InnerSolution", "solve_inner", "BatchSolver", "DEFAULT_SOLVER", "DEFAULT_SOLVER_OPTIONS"]

DEFAULT_SOLVER = "CLARABEL"
# Tight tolerances: the hypergradient is no more accurate than y*. cbo's
# Newton polish on the active-set KKT system (cbo.kkt.polish) tightens further.
DEFAULT_SOLVER_OPTIONS = {
    "CLARABEL": {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10, "tol_ktratio": 1e-8, "max_iter": 200},
}


@dataclass
class InnerSolution:
    """The inner solution as cvxpy returned it.

    ``y`` is the stacked vector of all variables (C order), ``mu`` the stacked
    inequality multipliers (>= 0), ``nu`` the stacked equality multipliers.
    """

    y: np.ndarray
    mu: np.ndarray
    nu: np.ndarray
    status: str
    solver: str
    solve_time: float


@dataclass
class _Layout:
    """Where the BilevelProblem's pieces sit in a cvxpy problem: what a worker needs besides the problem."""

    parameters: list
    variables: list
    inequalities: list
    equalities: list


def _layout(problem: BilevelProblem) -> _Layout:
    return _Layout(problem.parameters, problem.all_variables,
                   [b.constraint for b in problem.inequalities], [b.constraint for b in problem.equalities])


def solve_inner(
    problem: BilevelProblem,
    x: Sequence[np.ndarray],
    solver: str | None = None,
    solver_options: dict | None = None,
) -> InnerSolution:
    """Set the parameters to ``x``, solve the inner problem and read y*, mu, nu.

    Raises
    ------
    InnerSolveError
        If the problem is infeasible, unbounded, or the solver fails.
    """
    return _solve(problem.inner, _layout(problem), x, solver, solver_options)


def _solve(inner: cp.Problem, layout: _Layout, x, solver, solver_options, item_state: dict | None = None
           ) -> InnerSolution:
    """Solve at parameter values ``x``. ``item_state`` (a dict kept per batch item) holds that
    item's solver state, so that solvers that warm-start (OSQP, SCS) start from the item's
    previous solution and reuse its factorization; cvxpy keeps that state in ``_solver_cache``."""
    for param, value in zip(layout.parameters, x):
        try:
            param.value = value
        except ValueError as err:  # cvxpy checks sign attributes (nonneg=True, ...)
            raise ValueError(f"Cannot set parameter {param.name()} to this value: {err}") from err
    solver = (solver or DEFAULT_SOLVER).upper()
    options = {**DEFAULT_SOLVER_OPTIONS.get(solver, {}), **(solver_options or {})}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # cbo re-canonicalizes non-DPP problems on purpose, and polishes inaccurate
            # solutions (warning if that fails): cvxpy's notices are noise here.
            warnings.filterwarnings("ignore", message=".*not DPP.*")
            warnings.filterwarnings("ignore", message="Solution may be inaccurate.*")
            if item_state is not None:
                inner._solver_cache = item_state.setdefault("solver_cache", {})
            inner.solve(solver=solver, **options)
            if item_state is not None:
                item_state["solver_cache"] = inner._solver_cache
    except cp.error.SolverError as err:
        raise InnerSolveError(
            f"The inner solver {solver} failed: {err}. Try another solver "
            "(solver='SCS', 'ECOS' or 'OSQP') or looser solver_options."
        ) from err
    elapsed = time.perf_counter() - start
    check_status(inner.status, solver)
    return InnerSolution(
        y=np.concatenate([np.asarray(v.value, dtype=float).reshape(-1) for v in layout.variables]),
        mu=_stacked_duals(layout.inequalities),
        nu=_stacked_duals(layout.equalities),
        status=inner.status,
        solver=solver,
        solve_time=elapsed,
    )


def _stacked_duals(constraints) -> np.ndarray:
    if not constraints:
        return np.zeros(0)
    return np.concatenate([np.asarray(c.dual_value, dtype=float).reshape(-1) for c in constraints])


# ---------------------------------------------------------------- batches

@dataclass(frozen=True)
class _WorkerTask:
    """What a worker needs to solve items of one problem: the pickled cvxpy problem and its layout.

    ``id_floor`` is cvxpy's id counter in the parent when the problem was
    pickled: a worker raises its own counter above it, so that variables cvxpy
    creates while canonicalizing never reuse an id of the unpickled problem.
    """

    key: str
    blob: bytes
    id_floor: int
    solver: str | None
    solver_options: dict | None


_WORKER_PROBLEMS: dict[str, tuple[cp.Problem, _Layout]] = {}
_WORKER_LOCK = threading.Lock()  # a thread-based executor shares one problem per process
_WORKER_ITEM_STATES: dict[int, dict] = {}  # per batch item, for the worker's current problem
_MAX_ITEM_STATES = 1024


def _solve_items(task: _WorkerTask, items: list[tuple[int, list[np.ndarray]]]):
    """Worker entry point: solve ``items`` = [(batch index, parameter values)], one result each.

    A result is an InnerSolution or the exception the item raised, so that one
    failing item does not hide the others. Solves in one process are serialized:
    cvxpy problems hold their parameter values, so threads must not share one at once.
    """
    with _WORKER_LOCK:
        return _solve_items_locked(task, items)


def _solve_items_locked(task: _WorkerTask, items):
    if task.key not in _WORKER_PROBLEMS:
        lin_utils.ID_COUNTER.count = max(lin_utils.ID_COUNTER.count, task.id_floor)
        _WORKER_PROBLEMS.clear()  # one problem per worker at a time: bounded memory
        _WORKER_ITEM_STATES.clear()
        _WORKER_PROBLEMS[task.key] = pickle.loads(task.blob)
    inner, layout = _WORKER_PROBLEMS[task.key]
    results = []
    for index, values in items:
        state = _item_state(_WORKER_ITEM_STATES, index)
        try:
            results.append((index, _solve(inner, layout, values, task.solver, task.solver_options, state)))
        except Exception as err:  # reported per item by the parent
            results.append((index, err))
    return results


def _item_state(states: dict[int, dict], index: int) -> dict:
    """The solver state of batch item ``index`` (at most _MAX_ITEM_STATES kept)."""
    if index not in states and len(states) >= _MAX_ITEM_STATES:
        states.clear()
    return states.setdefault(index, {})


def _named_item(error: Exception, index: int) -> Exception:
    """``error`` of batch item ``index``, its message prefixed with "batch item i: " (same type); an error
    whose constructor takes other arguments (a solver's own, such as a pydantic ValidationError) becomes an
    InnerSolveError that names its type."""
    try:
        return type(error)(f"batch item {index}: {error}")
    except TypeError:
        return InnerSolveError(f"batch item {index}: the solver raised {type(error).__name__}: {error}")


class BatchSolver:
    """Solve the inner problem for a batch of parameter values, in parallel.

    Parameters
    ----------
    problem : BilevelProblem
    solver, solver_options : cvxpy solver and its options.
    executor : concurrent.futures.Executor, optional
        Where to run the solves, e.g. ``distributed.Client(...).get_executor()``.
        Default: a pool of ``n_workers`` processes of this machine, started on
        first use and kept; each worker compiles the problem once.
    n_workers : int, optional
        Processes of the default pool (default: the number of CPUs). With 1,
        or for a batch of one, the solves run in this process.
    timeout : float, optional
        Seconds to wait for a batch before raising :class:`InnerSolveError`.

    Each item keeps its own solver state between calls, so solvers that
    warm-start (OSQP, SCS; not Clarabel) start from that item's previous
    solution: always in this process; in a pool, when the same worker picks
    the item's chunk up again (the pool does not pin chunks to workers).
    """

    def __init__(self, problem: BilevelProblem, solver: str | None = None, solver_options: dict | None = None,
                 executor: cf.Executor | None = None, n_workers: int | None = None, timeout: float | None = None):
        self.problem, self.solver, self.solver_options = problem, solver, solver_options
        self.executor, self.timeout = executor, timeout
        self.n_workers = n_workers or os.cpu_count() or 1
        self._pool: cf.ProcessPoolExecutor | None = None
        self._item_states: dict[int, dict] = {}
        fresh = cp.Problem(problem.inner.objective, problem.inner.constraints)  # no solver cache: picklable
        layout = _layout(problem)
        blob = pickle.dumps((fresh, layout))
        self._task = _WorkerTask(uuid.uuid4().hex, blob, lin_utils.ID_COUNTER.count, solver, solver_options)

    def solve(self, values: Sequence[list[np.ndarray]]) -> list[InnerSolution]:
        """Solutions for each item's parameter values; raises InnerSolveError naming a failing item."""
        if self.executor is None and (len(values) == 1 or self.n_workers == 1):
            results = [(i, self._solve_here(i, v)) for i, v in enumerate(values)]
        else:
            results = self._solve_parallel(values)
        solutions = []
        for index, result in sorted(results, key=lambda r: r[0]):
            if isinstance(result, Exception):
                raise _named_item(result, index) from result
            solutions.append(result)
        return solutions

    def _solve_here(self, index, values):
        try:
            return _solve(self.problem.inner, _layout(self.problem), values, self.solver, self.solver_options,
                          _item_state(self._item_states, index))
        except (InnerSolveError, ValueError) as err:
            return err

    def _solve_parallel(self, values):
        executor = self.executor or self._default_pool()
        chunks = [c for c in np.array_split(np.arange(len(values)), min(len(values), self.n_workers)) if c.size]
        with _main_module_hidden():  # the default pool may start processes during submit
            futures = [executor.submit(_solve_items, self._task, [(int(i), values[i]) for i in chunk])
                       for chunk in chunks]
        try:
            done, pending = cf.wait(futures, timeout=self.timeout)
            if pending:
                raise InnerSolveError(
                    f"The inner solves of {len(pending)} chunk(s) of the batch did not finish within "
                    f"timeout={self.timeout} s. Raise the timeout or check the solver options."
                )
            return [item for future in futures for item in future.result()]
        except cf.process.BrokenProcessPool as err:
            lost = [int(i) for chunk, f in zip(chunks, futures) if f.exception() is not None for i in chunk]
            self.close()
            raise InnerSolveError(
                f"A worker process died while solving batch items {lost} ({err}). The worker pool was "
                "shut down; the next call starts a new one. If this repeats, the solver may be crashing "
                "on these items: try solving one of them in this process (n_workers=1)."
            ) from err
        except BaseException:  # KeyboardInterrupt, timeout, ...: leave no work running behind
            for future in futures:
                future.cancel()
            self.close()
            raise

    def _default_pool(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(self.n_workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def close(self) -> None:
        """Shut the default worker pool down, stopping its processes (a user-given executor is left alone)."""
        if self._pool is not None:
            processes = list(getattr(self._pool, "_processes", {}).values())
            self._pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:  # a worker busy with a long solve would outlive shutdown()
                if process.is_alive():
                    process.terminate()
            self._pool = None

    def __del__(self):
        self.close()


@contextlib.contextmanager
def _main_module_hidden():
    """Hide ``__main__.__file__`` while worker processes start.

    A 'spawn' worker re-runs the parent's main script unless it is guarded by
    ``if __name__ == "__main__":``; the workers need nothing from it (they
    import cbo and unpickle cvxpy objects), so cbo keeps them from running it.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None:
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path
