"""A suite of constrained bilevel tasks with reference answers.

Each module ``problems.<name>`` has ``build(size="small", seed=0) -> Instance``:
the :class:`cbo.BilevelProblem`, a starting point, the constraints on x, the
recommended :func:`cbo.minimize` settings, and a reference answer that a test
checks the driver reaches. ``size="small"`` is the fast test (seconds);
``size="large"`` is the setting used by the module's example in ``examples/``.
``problems.bolib`` holds published test problems instead: ``bolib.build(name)``
for each name of ``bolib.NAMES``. ``problems.figures`` is no task: it keeps the
figures that README.md and docs/ quote equal to what the examples and the
benchmarks printed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import cvxpy as cp
import numpy as np
import torch

import cbo

__all__ = ["Instance", "logistic_loss"]


@dataclass
class Instance:
    """One bilevel task, ready for ``cbo.minimize(instance.problem, instance.x0, ...)``.

    Attributes
    ----------
    problem : cbo.BilevelProblem
    x0 : tensor or list of tensors
        Starting point, one tensor per ``problem.parameters``.
    outer_constraints : list of cvxpy constraints
        Constraints on the parameters x (e.g. ``w >= 0``), for ``cbo.minimize``.
    settings : dict
        Keyword arguments of ``cbo.minimize`` that solve this task well
        (optimizer, lr, steps, method, ...).
    reference : dict
        The known answer: e.g. ``x_star`` and ``F_star`` for closed-form
        optima, or baseline metrics for the data tasks.
    evaluate : callable, optional
        ``evaluate(x) -> dict`` of task metrics (accuracy, F1, recovery...)
        at a point x.
    data : dict
        Anything else the example needs to draw its plots.
    """

    problem: cbo.BilevelProblem
    x0: torch.Tensor | list[torch.Tensor]
    outer_constraints: list[cp.Constraint] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)
    evaluate: Callable[..., dict] | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def minimize(self, x0=None, **options) -> cbo.driver.MinimizeResult:
        """``cbo.minimize`` on this task from ``x0`` (default ``self.x0``) with its outer constraints and
        settings; ``options`` add to or override the settings (``progress``, ``callback``, ``steps``, ...)."""
        return cbo.minimize(self.problem, self.x0 if x0 is None else x0, outer_constraints=self.outer_constraints,
                            **{**self.settings, **options})


def logistic_loss(A: np.ndarray, b: np.ndarray, theta: np.ndarray) -> float:
    """1/m sum_j log(1 + exp(-b_j a_j^T theta)), labels b in {-1, +1}: the data tasks' validation and test loss."""
    return float(np.mean(np.logaddexp(0.0, -b * (A @ theta))))
