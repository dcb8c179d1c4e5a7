"""Soak test: many consecutive hypergrad calls and layer passes on one problem.

Measures resident memory (VmRSS) and time per call over windows of calls; they
must not grow. Also checks that warm-started adjoints stay correct when x
jumps far between calls (against a cold solve).

    python benchmarks/soak.py [--hypergrad-calls 5000] [--layer-calls 1000]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from builders import random_qp  # noqa: E402

import cbo  # noqa: E402

OUTPUT = Path(__file__).parent / "output"


def resident_mib() -> float:
    """This process's resident memory in MiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def soak(calls: int, step, windows: int = 5, label: str = "") -> list[tuple[int, float, float]]:
    """Run ``step(i)`` ``calls`` times; per window: (calls so far, mean ms per call, RSS MiB at its end)."""
    edges = np.linspace(0, calls, windows + 1).astype(int)
    rows = []
    with tqdm(total=calls, desc=label, mininterval=1.0) as bar:
        for start, stop in zip(edges[:-1], edges[1:]):
            t0 = time.perf_counter()
            for i in range(start, stop):
                step(i)
                bar.update()
            rows.append((int(stop), 1e3 * (time.perf_counter() - t0) / max(1, stop - start), resident_mib()))
    return rows


def warm_start_check(case, jumps: int = 20, seed: int = 0) -> float:
    """Largest relative difference between warm-started and cold hypergradients when x jumps far."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    for _ in range(jumps):
        x = [t * float(rng.choice([-1.0, 1.0])) * 10 ** rng.uniform(-1, 1) for t in case.x_tensors]
        warm = cbo.hypergrad(case.problem, x, method="cg", warm_start=True)
        cold = cbo.hypergrad(case.problem, x, method="cg", warm_start=False)
        for w, c in zip(warm, cold):
            worst = max(worst, float((w - c).norm() / c.norm().clamp_min(1e-12)))
    return worst


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hypergrad-calls", type=int, default=5000)
    parser.add_argument("--layer-calls", type=int, default=1000)
    parser.add_argument("--n", type=int, default=20)
    args = parser.parse_args()

    case = random_qp(args.n, seed=0)
    rng = np.random.default_rng(1)
    perturbations = [[torch.as_tensor(0.01 * rng.standard_normal(t.shape)) for t in case.x_tensors] for _ in range(50)]

    def hypergrad_step(i):
        cbo.hypergrad(case.problem, [t + d for t, d in zip(case.x_tensors, perturbations[i % 50])])

    layer = cbo.ArgminLayer(case.problem.inner, case.problem.parameters, case.problem.variables, n_workers=1)
    batch = [torch.stack([t + d for d in (p[j] for p in perturbations[:4])]).requires_grad_(True)
             for j, t in enumerate(case.x_tensors)]

    def layer_step(i):
        (y,) = layer(*batch)
        y.square().sum().backward()

    results = {
        "hypergrad": soak(args.hypergrad_calls, hypergrad_step, label="hypergrad"),
        "layer fwd+bwd": soak(args.layer_calls, layer_step, label="layer"),
    }
    lines = ["| loop | calls so far | ms per call (window) | RSS [MiB] |", "| --- | --: | --: | --: |"]
    for name, rows in results.items():
        lines += [f"| {name} | {c} | {ms:.2f} | {rss:.1f} |" for c, ms, rss in rows]
        first, last = rows[0], rows[-1]
        lines.append(f"| {name}: last/first window | | {last[1] / first[1]:.2f}x | {last[2] - first[2]:+.1f} MiB |")
    worst = warm_start_check(case)
    lines.append(f"\nwarm-started vs cold adjoint after far jumps of x (20 jumps): max relative difference {worst:.1e}")
    report = "\n".join(lines)
    print(report)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    (OUTPUT / "soak.md").write_text("# Soak\n\n" + report + "\n")


if __name__ == "__main__":
    main()
