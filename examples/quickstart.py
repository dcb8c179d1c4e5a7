"""Quickstart: learn the prices of a constrained allocation so that it hits a target.

Inner problem (cvxpy): a budget of 1 is split over n items,

    y*(x) = argmin_y  1/2 y^T P y - x^T y   s.t.  sum(y) = 1,  0 <= y <= cap,

where x are per-item prices (the outer variables). Outer problem:

    min_x  F(x) = ||y*(x) - y_target||^2 + 1e-5 ||x||^2,

with y_target the allocation that hidden prices produce.

cbo.hypergrad gives dF/dx through the KKT conditions of the inner problem (the
box constraints switch on and off as x moves). The script checks the
hypergradient of every method against finite differences, runs Adam on x
with cbo.minimize (progress bar with F, the gradient norm and the inner KKT
residual), and saves plots to examples/output/quickstart.png and
quickstart_history.png.
"""
from pathlib import Path

import cvxpy as cp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import cbo  # noqa: E402

OUTPUT = Path(__file__).parent / "output"


def build(n: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((n, n))
    P = 0.3 * M @ M.T / n + np.eye(n)
    cap = 0.25
    x, y = cp.Parameter(n), cp.Variable(n)
    inner = cp.Problem(cp.Minimize(0.5 * cp.quad_form(y, P) - x @ y),
                       [cp.sum(y) == 1, y >= 0, y <= cap])
    # The target is the allocation produced by hidden prices: reachable, with
    # some items at 0 and some at the cap.
    x.value = 0.1 * rng.standard_normal(n)
    inner.solve(solver="CLARABEL")
    y_target = y.value.copy()
    target = torch.as_tensor(y_target)

    def outer(x, y):
        return ((y - target) ** 2).sum() + 1e-5 * (x ** 2).sum()

    return cbo.BilevelProblem(inner, parameters=[x], variables=[y], outer=outer), y_target


def check_methods(problem, x0):
    """Every adjoint method against central finite differences through cvxpy."""
    rng = np.random.default_rng(1)
    d = torch.as_tensor(rng.standard_normal(x0.shape))
    h = 1e-4
    F = lambda x: cbo.hypergrad(problem, x, return_info=True)[1].outer_value  # noqa: E731
    fd = (F(x0 + h * d) - F(x0 - h * d)) / (2 * h)
    print(f"{'method':<12} {'dF/dx . d':>14} {'rel. error vs FD':>17} {'iterations':>11}")
    for method in cbo.ADJOINT_METHODS:
        g, info = cbo.hypergrad(problem, x0, method=method, return_info=True)
        directional = float(g @ d)
        print(f"{method:<12} {directional:>14.8f} {abs(directional - fd) / abs(fd):>17.2e} "
              f"{info.linear_solve.iterations:>11}")


def descend(problem, x0, steps: int = 300, lr: float = 0.02):
    """Adam on the outer objective, fed with cbo hypergradients: cbo.minimize's outer loop."""
    result = cbo.minimize(problem, x0, optimizer="adam", lr=lr, steps=steps, tol=0.0)
    return result.x, result.history, result.info


def plot(history, y_final, y_target, path: Path):
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.semilogy(history)
    ax1.set(xlabel="outer step", ylabel="F(x, y*(x))", title="Outer objective")
    ax1.grid(True, which="both", alpha=0.3)
    idx = np.arange(len(y_target))
    ax2.bar(idx - 0.2, y_target, width=0.4, label="target")
    ax2.bar(idx + 0.2, y_final, width=0.4, label="y*(x) learned")
    ax2.axhline(0.25, color="gray", ls="--", lw=1, label="cap")
    ax2.set(xlabel="item", ylabel="allocation", title="Allocation after learning the prices x")
    ax2.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def main():
    torch.manual_seed(0)
    problem, y_target = build()
    x0 = torch.zeros(len(y_target), dtype=torch.float64)
    check_methods(problem, x0)
    x, history, info = descend(problem, x0)
    y_final = info.y[0].numpy()
    print(f"\nF: {history.f[0]:.3e} -> {history.f[-1]:.3e}; max |y* - y_target| = "
          f"{np.abs(y_final - y_target).max():.2e}")
    print(f"last call: KKT residual {info.kkt_residual:.1e}, adjoint residual {info.linear_solve.residual:.1e}, "
          f"phases (s): " + ", ".join(f"{k} {v:.4f}" for k, v in info.timings.items()))
    print(f"plots saved to {plot(history.f, y_final, y_target, OUTPUT / 'quickstart.png')} and "
          f"{OUTPUT / 'quickstart_history.png'}")
    cbo.plot_history(history, path=OUTPUT / "quickstart_history.png", title="quickstart: cbo.minimize history")


if __name__ == "__main__":
    main()
