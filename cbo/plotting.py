"""Plots of a :class:`cbo.History`; matplotlib is imported only when a plot is asked for.

``import cbo`` does not need matplotlib: :func:`plot_history` imports it on its
first call and raises ImportError (with how to install it) where it is missing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .driver import History

__all__ = ["plot_history"]

PHASES = ("inner_solve", "polish", "kkt_checks", "adjoint_solve", "projection")
_FLOOR = 1e-300  # zeros drawn on a log axis


def plot_history(history: History, path: str | None = None, title: str | None = None) -> Figure:
    """Draw a :class:`History`: F, ||G(x)|| and ||dF/dx||, the inner KKT residual, and time per phase.

    Returns the matplotlib Figure; saves it as ``path`` (PNG, ...) if given.
    Needs matplotlib (imported here, not by ``import cbo``).
    """
    plt = _pyplot(headless=path is not None)
    steps = np.arange(len(history))
    fig, ((ax_f, ax_g), (ax_kkt, ax_t)) = plt.subplots(2, 2, figsize=(10, 7))
    _plot_objective(ax_f, steps, np.asarray(history.f))
    _plot_gradient_norms(ax_g, steps, history.grad_norm, history.stationarity)
    _plot_inner_accuracy(ax_kkt, steps, history.kkt_residual, history.adjoint_iterations)
    _plot_timings(ax_t, steps, history.timings)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def _pyplot(headless: bool) -> Any:
    """matplotlib.pyplot, on the Agg backend when ``headless`` and no backend was chosen yet."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("cbo.plot_history needs matplotlib: pip install matplotlib") from err
    if headless:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _spans_decades(f: np.ndarray) -> bool:
    """F is positive and max F > 100 min F: drawn on a log axis."""
    return len(f) > 1 and f.min() > 0 and f.max() > 100 * f.min()


def _plot_objective(ax: Axes, steps: np.ndarray, f: np.ndarray) -> None:
    """F(x_k, y*(x_k)) against k."""
    (ax.semilogy if _spans_decades(f) else ax.plot)(steps, f, color="C0")
    ax.set(title="outer objective F(x, y*(x))", xlabel="step", ylabel="F")


def _plot_gradient_norms(ax: Axes, steps: np.ndarray, grad_norm: list[float], stationarity: list[float]) -> None:
    """||dF/dx|| and the gradient-mapping norm ||G(x_k)|| against k, on a log axis."""
    ax.semilogy(steps, np.maximum(grad_norm, _FLOOR), label="||dF/dx||", color="C1")
    ax.semilogy(steps, np.maximum(stationarity, _FLOOR), label="||G(x)|| (projected)", color="C2", ls="--")
    ax.set(title="hypergradient norm", xlabel="step")
    ax.legend()


def _plot_inner_accuracy(ax: Axes, steps: np.ndarray, kkt_residual: list[float],
                         adjoint_iterations: list[int]) -> None:
    """The inner KKT residual after polishing (log axis) and the adjoint iterations (right axis) against k."""
    ax.semilogy(steps, np.maximum(kkt_residual, _FLOOR), color="C3", label="KKT residual")
    ax.set(title="inner KKT residual after polish", xlabel="step")
    ax_it = ax.twinx()
    ax_it.plot(steps, adjoint_iterations, color="C4", alpha=0.6, label="adjoint iterations")
    ax_it.set_ylabel("adjoint iterations")
    ax.legend(handles=ax.get_lines() + ax_it.get_lines(), loc="upper right")


def _plot_timings(ax: Axes, steps: np.ndarray, timings: list[dict[str, float]]) -> None:
    """Milliseconds per step, stacked by phase (a phase missing from a step counts 0)."""
    per_phase = [[t.get(p, 0.0) * 1e3 for t in timings] for p in PHASES]
    ax.stackplot(steps, per_phase, labels=PHASES, alpha=0.8)
    ax.set(title="time per step by phase", xlabel="step", ylabel="ms")
    ax.legend(loc="upper right", fontsize="small")
