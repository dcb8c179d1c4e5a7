r"""ArgminLayer's batched path (cbo/qp_batch.py) against its per-item path and cvxpylayers (MOREAU), CPU.

The sparse QP of benchmarks/vs_cvxpylayers.py (``make_qp(n, B)``; inputs q (B, n), r (B, m); loss
(y * W).sum()) at outer-loop steps (q += 1e-3 randn each call, so the items keep their active sets, the case
the batched path serves), for batches B = 8, 32, 64 and n = 30, 100. Three layers on the same inputs, in
alternating blocks of 10 calls: cbo with its default rule (the batched path on the CPU for B >= 32 and n + m <=
100), cbo forced item by item, and cvxpylayers with ``solver="MOREAU"``. Medians of forward + backward;
gradients of the two cbo paths against each other (max relative difference over the calls).

    python benchmarks/layer_batch.py            # ~1 minute; writes benchmarks/output/layer_batch.md
"""
from __future__ import annotations

import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cbo  # noqa: E402
import cbo.qp_batch as qp_batch  # noqa: E402
from cvxpylayers.torch import CvxpyLayer  # noqa: E402
from problems.figures import commit, save_figures  # noqa: E402
from vs_cvxpylayers import build_inner, make_qp  # noqa: E402

CASES = [(30, 8), (30, 32), (30, 64), (100, 8), (100, 64)]
CALLS, BLOCK, STEP = 60, 10, 1e-3
OUTPUT = Path(__file__).resolve().parent / "output" / "layer_batch.md"


def timed_call(layer, q, r, W, per_item: bool = False):
    """Forward + backward seconds, the gradient w.r.t. q, and cbo's info.path (None for the peer)."""
    q, r = q.clone().requires_grad_(True), r.clone().requires_grad_(True)
    saved = qp_batch.BATCH_MIN_ITEMS
    qp_batch.BATCH_MIN_ITEMS = 10**9 if per_item else saved
    try:
        start = time.perf_counter()
        out = layer(q, r, return_info=True) if isinstance(layer, cbo.ArgminLayer) else (layer(q, r), None)
        (y,), info = out
        (y * W).sum().backward()
        return time.perf_counter() - start, q.grad, info.path if info else None
    finally:
        qp_batch.BATCH_MIN_ITEMS = saved


def run_case(n: int, batch: int) -> dict:
    """The medians (ms) of the three layers on one (n, B) and the two cbo paths' largest gradient difference."""
    data = make_qp(n, batch, np.random.default_rng(n + batch))
    W, q0, r0 = torch.as_tensor(data.W), torch.as_tensor(data.q), torch.as_tensor(data.r)
    layers = {}
    for name in ("default", "per item", "MOREAU"):
        inner = build_inner(data)
        layers[name] = (CvxpyLayer(inner.problem, [inner.q, inner.r], [inner.y], solver="MOREAU") if name == "MOREAU"
                        else cbo.ArgminLayer(inner.problem, [inner.q, inner.r], [inner.y]))
    generator = torch.Generator().manual_seed(0)
    inputs = [q0]
    for _ in range(CALLS):
        inputs.append(inputs[-1] + STEP * torch.randn(q0.shape, dtype=torch.float64, generator=generator))
    for name, layer in layers.items():  # warm-up: the first call solves every item
        timed_call(layer, inputs[0], r0, W, per_item=name == "per item")
    times, grads, paths = {name: [] for name in layers}, {name: {} for name in layers}, []
    for start in range(1, CALLS + 1, BLOCK):
        for name, layer in layers.items():
            for k in range(start, min(start + BLOCK, CALLS + 1)):
                seconds, grad, path = timed_call(layer, inputs[k], r0, W, per_item=name == "per item")
                times[name].append(seconds)
                grads[name][k] = grad
                if name == "default":
                    paths.append(path)
    difference = max(float((grads["default"][k] - grads["per item"][k]).norm() / grads["per item"][k].norm())
                     for k in grads["default"])
    medians = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    return {"medians": medians, "difference": difference,
            "batched_share": sum(p == "compiled QP, batched" for p in paths) / len(paths)}


def main() -> None:
    warnings.simplefilter("ignore")
    rows, figures = [], {"run.commit": commit()}
    for n, batch in CASES:
        result = run_case(n, batch)
        m = result["medians"]
        rows.append(f"| {n} | {batch} | {m['default']:.2f} | {m['per item']:.2f} | {m['MOREAU']:.2f} | "
                    f"{m['per item'] / m['default']:.2f}× | {m['MOREAU'] / m['default']:.1f}× | "
                    f"{100 * result['batched_share']:.0f} % | {result['difference']:.1e} |")
        key = f"n{n}_b{batch}"
        figures.update({f"{key}.default": f"{m['default']:.2f}", f"{key}.per_item": f"{m['per item']:.2f}",
                        f"{key}.moreau": f"{m['MOREAU']:.2f}", f"{key}.gain": f"{m['per item'] / m['default']:.2f}×",
                        f"{key}.vs_moreau": f"{m['MOREAU'] / m['default']:.1f}×",
                        f"{key}.difference": f"{result['difference']:.1e}"})
        print(rows[-1], flush=True)
    table = "\n".join([
        f"# ArgminLayer's batched path, CPU (commit {figures['run.commit']})", "",
        "Forward + backward medians (ms) at outer-loop steps; default = cbo's rule (batched path on the CPU for "
        "B >= 32 and n + m <= 100), per item = cbo forced item by item; batched = share of the default's calls "
        "on the batched path; difference = max relative difference of the two cbo paths' gradients.", "",
        "| n | B | cbo default | cbo per item | MOREAU | per item / default | MOREAU / default | batched | difference |",
        "|---|---|---|---|---|---|---|---|---|", *rows])
    OUTPUT.parent.mkdir(exist_ok=True)
    OUTPUT.write_text(table + "\n")
    print(f"\nwritten to {OUTPUT}")
    print(f"figures quoted by the documentation: {save_figures(__file__, figures, figures, arguments=[])}")


if __name__ == "__main__":
    main()
