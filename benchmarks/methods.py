r"""Error vs cost of every hypergradient route of ``cbo.hypergrad`` on one constrained QP.

Problem: ``tests/builders.py``'s ``random_qp(n)``,

    y*(x, r) = argmin_y 1/2 y^T P y + (q + x)^T y   s.t.  G y <= h + B r,  C y == d,

n variables, n/2 inequalities (about half active), n/10 equalities, parameters
x (n,) and r (3,); outer F = 1/2 ||y - y_target||^2 + 0.1 (||x||^2 + ||r||^2).

Rows (all through ``cbo.hypergrad(problem, [x, r], method=...)``):

* implicit: "direct", "cg", "minres", "fixed_point", "neumann" (warm_start=False);
* "reverse" (RMD through T descent-ascent steps from the solution), T swept;
* "truncated" (K-RMD: back-propagate through the last K of T steps), K swept at fixed T;
* "forward" (FMD, one tangent per parameter entry: n + 3 of them), T swept;
* "penalty" and "augmented_lagrangian", weight rho swept.

Columns: relative error ||g - g_ref|| / ||g_ref|| of the concatenated (dF/dx, dF/dr)
against method="direct" (itself checked once against the dense numpy KKT
reference ``builders.dense_kkt_hypergrad``); differentiation time
``info.timings['adjoint_solve']`` and total time of the call (medians of
``--repeats`` calls, after one untimed call that also measures memory); peak memory.

Memory. torch's CPU allocations are invisible to tracemalloc, and RSS is too coarse
here (RMD at n=30 needs a few MB). In a separate, untimed call a background thread
samples glibc's ``mallinfo2()`` (bytes in use from malloc: uordblks + hblkhd; every
torch CPU tensor, autograd graph node and numpy buffer lives there) every ~0.5 ms
with the GIL switch interval lowered to 0.5 ms. "heap peak" is the largest sample
inside the differentiation phase (located with the call's own phase timings) minus
the last sample before the phase began. With ``--profile-memory``, a second column
gives the peak of torch tensor storage alone (``torch.profiler`` with
profile_memory=True, running sum of its [memory] allocation/free events over the
whole call): this excludes autograd bookkeeping and is slow (the profiler records
every op).

Run:  python benchmarks/methods.py [--n 30] [--seed 0] [--quick] [--repeats 3] [--profile-memory]
Writes benchmarks/output/methods.md and benchmarks/output/methods.png; without --quick also the page's copy
docs/img/methods.png and the figures docs/methods.md quotes (benchmarks/results/methods.json).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import math
import statistics
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import cbo  # noqa: E402
from builders import dense_kkt_hypergrad, random_qp  # noqa: E402
from problems.figures import save_figures, significant  # noqa: E402

OUTPUT = Path(__file__).resolve().parent / "output"
DOCS_IMAGE = ROOT / "docs" / "img" / "methods.png"  # the figure of docs/methods.md (full runs only)
IMPLICIT = ("direct", "cg", "minres", "fixed_point", "neumann")
ERROR_FLOOR = 1e-16  # plotted in place of an exact zero (the reference against itself)
MEMORY_FLOOR = 0.5e3  # bytes: heap growth below this is plotted here ("at most the resolution")

FULL = dict(reverse=[50, 100, 200, 400, 800, 1600], truncated_T=1600,
            truncated=[25, 50, 100, 200, 400, 800], forward=[50, 200, 800],
            rho=[1e1, 1e2, 1e3, 1e4, 1e5])
QUICK = dict(reverse=[50, 200, 800], truncated_T=800, truncated=[25, 100, 400], forward=[50, 200],
             rho=[1e1, 1e3, 1e5])


# ---------------------------------------------------------------- memory measurement

class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _heap_reader():
    """A function returning the bytes malloc has handed out (glibc mallinfo2), or None if unavailable."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None

    def used() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    return used


HEAP_BYTES = _heap_reader()


class HeapSampler:
    """Samples (time, heap bytes in use) in a background thread every ``interval`` seconds."""

    def __init__(self, interval: float = 5e-4):
        self.interval, self.samples, self._stop = interval, [], threading.Event()

    def __enter__(self):
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(self.interval)  # let the sampler in while the main thread runs Python code
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.samples.append((time.perf_counter(), HEAP_BYTES()))
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), HEAP_BYTES()))
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        sys.setswitchinterval(self._switch)
        self.samples.append((time.perf_counter(), HEAP_BYTES()))

    def peak_in(self, start: float, end: float) -> tuple[float, int]:
        """(peak bytes in [start, end] above the last sample before start, number of samples in the window)."""
        before = [b for t, b in self.samples if t <= start] or [self.samples[0][1]]
        inside = [b for t, b in self.samples if start <= t <= end]
        return max([before[-1], *inside]) - before[-1], len(inside)


def tensor_peak_bytes(call) -> int:
    """Peak of the running sum of torch's CPU allocations and frees during ``call()`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = np.cumsum([0, *[b for _, b in events]])
    return int(running.max())


# ---------------------------------------------------------------- rows

@dataclass
class Row:
    family: str          # implicit / reverse / truncated / forward / penalty / augmented_lagrangian
    method: str
    label: str           # e.g. "T=200"
    kwargs: dict
    sweep: float | None = None   # T, K or rho (for the plot)
    error: float = math.nan
    diff_time: float = math.nan
    total_time: float = math.nan
    heap_peak: float = math.nan  # bytes
    heap_samples: int = 0
    tensor_peak: float = math.nan  # bytes
    iterations: int | None = None
    extra: dict = field(default_factory=dict)
    failure: str = ""


def make_rows(sweeps: dict) -> list[Row]:
    rows = [Row("implicit", m, m, dict(warm_start=False)) for m in IMPLICIT]
    rows += [Row("reverse", "reverse", f"T={T}", dict(steps=T), T) for T in sweeps["reverse"]]
    T = sweeps["truncated_T"]
    rows += [Row("truncated", "truncated", f"T={T}, K={K}", dict(steps=T, truncate=K), K) for K in sweeps["truncated"]]
    rows += [Row("forward", "forward", f"T={T}", dict(steps=T), T) for T in sweeps["forward"]]
    for method in ("penalty", "augmented_lagrangian"):
        rows += [Row(method, method, f"rho={rho:.0e}", dict(penalty=rho), rho) for rho in sweeps["rho"]]
    return rows


def flat(grads) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(g.detach().cpu() if isinstance(g, torch.Tensor) else g))
                           for g in grads])


def relative_error(got: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(got - reference) / max(np.linalg.norm(reference), 1e-300))


def run_row(row: Row, problem, x, reference: np.ndarray, repeats: int, profile_memory: bool) -> None:
    def call():
        return cbo.hypergrad(problem, x, method=row.method, return_info=True, **row.kwargs)

    try:
        # 1. untimed call (also the warm-up): heap peak of the differentiation phase
        gc.collect()
        if HEAP_BYTES is not None:
            with HeapSampler() as sampler:
                begin = time.perf_counter()
                grads, info = call()
            end_of_phase = begin + info.timings["total"]
            start_of_phase = end_of_phase - info.timings["adjoint_solve"]
            row.heap_peak, row.heap_samples = sampler.peak_in(start_of_phase, end_of_phase)
        else:
            grads, info = call()
        row.error = relative_error(flat(grads), reference)
        row.iterations = info.linear_solve.iterations
        row.extra = dict(info.linear_solve.extra or {})
        # 2. timed calls
        diff, total = [], []
        for _ in range(repeats):
            g, info = call()
            diff.append(info.timings["adjoint_solve"])
            total.append(info.timings["total"])
            spread = relative_error(flat(g), flat(grads))
            if spread > 0:
                row.extra["repeat_spread"] = max(spread, row.extra.get("repeat_spread", 0.0))
        row.diff_time, row.total_time = statistics.median(diff), statistics.median(total)
        # 3. optional: torch tensor storage only, by the profiler
        if profile_memory:
            gc.collect()
            row.tensor_peak = tensor_peak_bytes(call)
    except Exception as exc:  # report, keep going
        row.failure = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


# ---------------------------------------------------------------- output

def _scalar(value):
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return value[0]
    return value


def note(row: Row) -> str:
    if row.failure:
        return "FAILED " + row.failure
    parts = []
    e = row.extra
    if row.family in ("reverse", "truncated", "forward"):
        alpha, q = _scalar(e.get("step_size")), _scalar(e.get("contraction_factor"))
        if alpha is not None and q is not None:
            k = row.kwargs.get("truncate", row.kwargs["steps"])
            parts.append(f"alpha={alpha:.2e}, q={q:.4f}, q^{'K' if row.family == 'truncated' else 'T'}={q ** k:.1e}")
    elif row.family in ("penalty", "augmented_lagrangian"):
        parts.append("CG on penalized Hessian")
    elif row.method in ("fixed_point", "neumann"):
        q = _scalar(e.get("contraction_factor"))
        if q is not None:
            parts.append(f"q={q:.3f}")
    elif row.method == "cg" and "null_space_dim" in e:
        parts.append(f"null space dim {_scalar(e['null_space_dim'])}")
    if e.get("repeat_spread"):
        parts.append(f"repeats differ by {e['repeat_spread']:.0e}")
    if row.heap_samples and row.heap_samples < 3:
        parts.append(f"only {row.heap_samples} memory samples")
    return "; ".join(parts)


HEADER = ["route", "setting", "rel. error", "diff [s]", "total [s]", "heap peak [kB]", "tensor peak [kB]", "iters",
          "note"]


def table_rows(rows: list[Row], profile_memory: bool) -> list[list[str]]:
    def fmt(value, spec):
        return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)

    out = []
    for r in rows:
        cells = [r.family, r.label if r.family != "implicit" else r.method, fmt(r.error, ".2e"),
                 fmt(r.diff_time, ".4f"), fmt(r.total_time, ".4f"), fmt(r.heap_peak / 1e3, ".1f"),
                 fmt(r.tensor_peak / 1e3, ".1f"), fmt(r.iterations, "d"), note(r)]
        if not profile_memory:
            del cells[6]
        out.append(cells)
    return out


def header(profile_memory: bool) -> list[str]:
    return HEADER if profile_memory else [h for h in HEADER if h != "tensor peak [kB]"]


def print_table(head: list[str], body: list[list[str]]) -> str:
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(head)]
    right = {2, 3, 4, 5, 6, 7} if len(head) == 9 else {2, 3, 4, 5, 6}
    line = lambda cells: "  ".join(c.rjust(w) if i in right else c.ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(c) for c in body)])


def markdown_table(head: list[str], body: list[list[str]]) -> str:
    align = ["---" if h in ("route", "setting", "note") else "--:" for h in head]
    rows = [head, align, *body]
    return "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows)


# ---------------------------------------------------------------- plot

STYLE = {
    "implicit": dict(color="black"),
    "reverse": dict(color="tab:red", marker="o"),
    "truncated": dict(color="tab:orange", marker="s"),
    "forward": dict(color="tab:purple", marker="^"),
    "penalty": dict(color="tab:blue", marker="D"),
    "augmented_lagrangian": dict(color="tab:green", marker="v"),
}
IMPLICIT_MARKERS = dict(direct="*", cg="P", minres="X", fixed_point="h", neumann="p")
FAMILY_LABEL = dict(reverse="RMD (reverse), T steps", truncated="K-RMD (truncated), last K of T={T}",
                    forward="FMD (forward), T steps", penalty="quadratic penalty, weight rho",
                    augmented_lagrangian="augmented Lagrangian, weight rho")


def plot(rows: list[Row], path: Path, n: int, n_params: int, sweeps: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.failure and not math.isnan(r.diff_time)]
    fig, (ax, ax_mem) = plt.subplots(1, 2, figsize=(17, 8), gridspec_kw=dict(width_ratios=[1.35, 1]))

    # -- error vs differentiation time
    for r in (r for r in ok if r.family == "implicit"):
        err = max(r.error, ERROR_FLOOR)
        ax.scatter(r.diff_time, err, s=140, marker=IMPLICIT_MARKERS[r.method], color="black", zorder=5,
                   label=f"implicit: {r.method}")
        offset = dict(fixed_point=(-20, 12), neumann=(6, -14)).get(r.method, (7, 6))
        ax.annotate(r.method + (" (reference)" if r.method == "direct" else ""), (r.diff_time, err),
                    textcoords="offset points", xytext=offset, fontsize=9)
    for family in ("reverse", "truncated", "forward", "penalty", "augmented_lagrangian"):
        pts = sorted((r for r in ok if r.family == family), key=lambda r: r.sweep)
        if not pts:
            continue
        xs, ys = [r.diff_time for r in pts], [max(r.error, ERROR_FLOOR) for r in pts]
        ax.plot(xs, ys, linestyle="-", linewidth=1.5, markersize=7, **STYLE[family],
                label=FAMILY_LABEL[family].format(T=sweeps["truncated_T"]))
        annotate = {0, len(pts) - 1}
        for i in sorted(annotate):
            r = pts[i]
            text = {"reverse": f"T={r.sweep:g}", "forward": f"T={r.sweep:g}", "truncated": f"K={r.sweep:g}"}.get(
                family, f"rho={r.sweep:.0e}")
            offset = {"reverse": (6, 6), "truncated": (6, -13), "forward": (6, 6), "penalty": (-10, 8),
                      "augmented_lagrangian": (6, -13)}[family]
            ax.annotate(text, (xs[i], ys[i]), textcoords="offset points", xytext=offset, fontsize=8,
                        color=STYLE[family]["color"])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("differentiation time, info.timings['adjoint_solve'] [s] (median of repeats; log scale)")
    ax.set_ylabel("relative error ||g - g_ref|| / ||g_ref||  (g_ref: method='direct'; log scale)")
    ax.set_title(f"Hypergradient error vs differentiation time (lower left is better)\n"
                 f"random constrained QP: n={n} inner variables, {n_params} outer parameters")
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.1)
    ax.legend(fontsize=8, loc="center right")

    # -- peak memory vs steps
    def kb(r):
        return max(r.heap_peak, MEMORY_FLOOR) / 1e3

    for family in ("reverse", "truncated", "forward"):
        pts = sorted((r for r in ok if r.family == family and not math.isnan(r.heap_peak)), key=lambda r: r.sweep)
        if pts:
            ax_mem.plot([r.sweep for r in pts], [kb(r) for r in pts], linestyle="-", markersize=7, **STYLE[family],
                        label={"reverse": "RMD: vs T", "truncated": f"K-RMD (T={sweeps['truncated_T']}): vs K",
                               "forward": f"FMD: vs T ({n_params} tangents)"}[family])
    linestyles = dict(direct="-", cg="--", minres="-.", fixed_point=":", neumann=(0, (5, 1, 1, 1, 1, 1)))
    for r in (r for r in ok if r.family in ("implicit", "penalty") and not math.isnan(r.heap_peak)):
        if r.family == "penalty" and r.sweep != max(p.sweep for p in ok if p.family == "penalty"):
            continue
        below = " (below resolution)" if r.heap_peak < MEMORY_FLOOR else ""
        ax_mem.axhline(kb(r), color="black" if r.family == "implicit" else STYLE["penalty"]["color"],
                       linestyle=linestyles.get(r.method, "--"), linewidth=1.2, alpha=0.8,
                       label=(f"implicit {r.method}" if r.family == "implicit" else f"penalty, rho={r.sweep:.0e}")
                       + f": {r.heap_peak / 1e3:.1f} kB{below}")
    steps = sorted({r.sweep for r in ok if r.family in ("reverse", "truncated", "forward")})
    ax_mem.set_xscale("log")
    ax_mem.set_yscale("log")
    ax_mem.set_xticks(steps)
    ax_mem.set_xticklabels([f"{s:g}" for s in steps], fontsize=8)
    ax_mem.minorticks_off()
    ax_mem.set_xlabel("steps differentiated through: T (RMD, FMD) or K (K-RMD)  (log scale)")
    ax_mem.set_ylabel("peak heap growth during differentiation [kB]  (glibc mallinfo2; log scale)")
    ax_mem.set_title("Peak memory of the differentiation phase\n(horizontal lines: methods without a step count)")
    ax_mem.grid(True, which="major", alpha=0.35)
    ax_mem.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)

    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ---------------------------------------------------------------- figures the documentation quotes

def quoted_figures(rows: list[Row]) -> dict[str, str]:
    """The figures docs/methods.md quotes (problems/figures.py): per row its error, differentiation time (ms)
    and heap peak (kB); per family the range of times; the contraction factors; the reverse-mode memory per step;
    the quadratic penalty's error times rho and its ratio to the augmented Lagrangian's at the largest rho; the
    largest heap peak of the implicit methods."""
    ok = [r for r in rows if not r.failure and not math.isnan(r.diff_time)]
    figures = {}
    for r in ok:
        key = f"{r.family}.{r.method if r.family == 'implicit' else _sweep_key(r)}"
        figures.update({f"{key}.error": f"{r.error:.1e}", f"{key}.ms": significant(1e3 * r.diff_time, 2),
                        f"{key}.kB": f"{r.heap_peak / 1e3:.0f}" if not math.isnan(r.heap_peak) else "n/a"})
    for name, families in {"implicit": ("implicit",), "penalty_and_al": ("penalty", "augmented_lagrangian")}.items():
        times = [1e3 * r.diff_time for r in ok if r.family in families]
        figures[f"{name}.ms_min"], figures[f"{name}.ms_max"] = significant(min(times), 2), significant(max(times), 2)
    implicit = [r for r in ok if r.family == "implicit"]
    figures["implicit.fastest"] = min(implicit, key=lambda r: r.diff_time).method
    figures["implicit.error_max"] = f"{max(r.error for r in implicit if r.method != 'direct'):.0e}"
    figures["implicit.kB_max"] = f"{max(r.heap_peak for r in implicit) / 1e3:.0f}"
    for family, digits in (("fixed_point", 2), ("reverse", 3)):
        q = next((_scalar(r.extra.get("contraction_factor")) for r in ok if r.method == family), None)
        figures[f"{family}.q"] = "n/a" if q is None else f"{q:.{digits}f}"
    reverse = [r for r in ok if r.family == "reverse"]
    per_step = np.polyfit([r.sweep for r in reverse], [r.heap_peak for r in reverse], 1)[0]
    figures["reverse.kB_per_step"] = f"{per_step / 1e3:.0f}"
    rho = max(r.sweep for r in ok if r.family == "penalty")
    penalty, al = (next(r for r in ok if r.family == f and r.sweep == rho) for f in ("penalty", "augmented_lagrangian"))
    figures["penalty.error_times_rho"] = significant(penalty.error * rho, 2)
    figures["penalty.over_al"] = f"{penalty.error / al.error:.1f}"
    return figures


def _sweep_key(row: Row) -> str:
    """"T1600", "K25", "rho1e5": the row's sweep value as a key."""
    if row.family in ("penalty", "augmented_lagrangian"):
        return f"rho{row.sweep:.0e}".replace("+0", "").replace("+", "")
    return f"{'K' if row.family == 'truncated' else 'T'}{row.sweep:g}"


# ---------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30, help="inner variables of random_qp (default 30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer sweep points")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per row (median)")
    parser.add_argument("--profile-memory", action="store_true",
                        help="also measure torch tensor-storage peak with torch.profiler (slow)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    started = time.perf_counter()
    warnings.simplefilter("ignore", category=FutureWarning)
    sweeps = QUICK if args.quick else FULL

    case = random_qp(args.n, args.seed)
    problem, x = case.problem, case.x_tensors
    n_params = sum(t.numel() for t in x)
    reference_grads, ref_info = cbo.hypergrad(problem, x, method="direct", return_info=True, warm_start=False)
    reference = flat(reference_grads)
    dense_error = relative_error(reference, np.concatenate([np.ravel(g) for g in dense_kkt_hypergrad(case)]))
    n_active = int(ref_info.active_set.active.numel())
    setup = (f"random_qp(n={args.n}, seed={args.seed}): {problem.n_y} variables, {problem.n_ineq} inequalities "
             f"({n_active} active), {problem.n_eq} equalities, {n_params} parameter entries (x: {args.n}, r: 3). "
             f"Reference: method='direct'; its relative error against builders.dense_kkt_hypergrad (numpy, "
             f"independent of cbo): {dense_error:.2e}.")
    print(setup)

    rows = make_rows(sweeps)
    # one cheap untimed call per method first: the first "forward" call alone retains ~35 MB (torch.func/vmap
    # set-up), which would otherwise be charged to the first row measured
    for method in dict.fromkeys(r.method for r in rows):
        cbo.hypergrad(problem, x, method=method, warm_start=False, steps=4, truncate=2)
    for row in tqdm(rows, desc="routes", unit="row"):
        run_row(row, problem, x, reference, args.repeats, args.profile_memory)

    runtime = time.perf_counter() - started
    head, body = header(args.profile_memory), table_rows(rows, args.profile_memory)
    text_table = print_table(head, body)
    print(text_table)
    fit = ""
    reverse = [r for r in rows if r.family == "reverse" and not math.isnan(r.diff_time)]
    if len(reverse) >= 2:
        slope, intercept = np.polyfit([r.sweep for r in reverse], [r.diff_time for r in reverse], 1)
        mem_slope = np.polyfit([r.sweep for r in reverse], [r.heap_peak for r in reverse], 1)[0]
        fit = (f"RMD least-squares fits over T: diff time = {intercept:.3f} s + {1e3 * slope:.3f} ms x T "
               f"(the constant is mostly the step-size search of the descent-ascent map); heap peak grows by "
               f"{mem_slope / 1e3:.1f} kB per step.")
        print(fit)
    memory_note = (
        "heap peak: in an untimed call, glibc mallinfo2() (uordblks + hblkhd: all malloc'd bytes, so torch CPU "
        "tensors, autograd graph nodes, numpy buffers) sampled every ~0.5 ms by a background thread (GIL switch "
        "interval 0.5 ms); peak inside the differentiation phase (located from info.timings) minus the level when "
        "the phase began.")
    if args.profile_memory:
        memory_note += (" tensor peak: torch.profiler(profile_memory=True), peak of the running sum of torch CPU "
                        "allocation/free events over the whole hypergrad call (tensor storage only, no autograd "
                        "bookkeeping).")
    print(f"runtime {runtime:.1f} s")

    args.output.mkdir(parents=True, exist_ok=True)
    png = args.output / "methods.png"
    plot(rows, png, args.n, n_params, sweeps)
    if not args.quick:
        plot(rows, DOCS_IMAGE, args.n, n_params, sweeps)
    md = [
        "# cbo.hypergrad: error vs cost of every method",
        "",
        f"`python benchmarks/methods.py --n {args.n} --seed {args.seed}{' --quick' if args.quick else ''}"
        f"{' --profile-memory' if args.profile_memory else ''}`; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, total runtime {runtime:.1f} s.",
        "",
        setup,
        "",
        "rel. error: ||g - g_ref|| / ||g_ref|| over (dF/dx, dF/dr). diff: info.timings['adjoint_solve'] (for the "
        "routes this includes choosing the step size of the descent-ascent map, or solving the penalized problem); "
        f"total: the whole call; both medians of {args.repeats} calls after an untimed one. Implicit methods with "
        "warm_start=False. q: contraction factor of the descent-ascent map (RMD/K-RMD/FMD error is expected to "
        "decay like q^T or q^K).",
        "",
        memory_note,
        "",
        markdown_table(head, body),
        "",
        fit,
        "",
        f"![error vs time]({png.name})",
        "",
    ]
    (args.output / "methods.md").write_text("\n".join(md))
    print(f"wrote {args.output / 'methods.md'} and {png}")
    if args.quick:
        print("figures not saved for the documentation, which quotes a full run (without --quick)")
    else:
        figures = quoted_figures(rows)
        steady = {key for key in figures if key.endswith(".error") or key.endswith(".q") or key == "penalty.over_al"}
        print(f"figures quoted by the documentation: {save_figures(__file__, figures, set(figures) - steady)}")


if __name__ == "__main__":
    main()
