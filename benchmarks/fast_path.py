r"""The QP fast path (cbo/qp.py) against its targets: one hypergradient should cost about one inner solve.

Measures the targets of the issue "Fast path: compile the inner problem once"
and prints markdown tables (also written to benchmarks/output/fast_path.md).
Every ratio is against peers measured in the SAME run, in alternating blocks of calls.

Sections (``--sections``, default all four):

``dense``
    ``cbo.hypergrad(problem, x, return_info=True)`` on the dense QP

        min_y 1/2 y'Py + x'y   s.t.   G y <= h  (n/2 rows),   C y = d  (max(1, n/10) rows)

    with P = M'M/n + I and h, d built around a point y0 at which a random half
    of the rows of G is tight: x0 = -(P y0 + G_S' mu0 + C' nu0) makes y0 optimal,
    so about half of the inequalities are active near x0. Outer
    F = ||y - target||^2 + 0.1 ||x||^2 (torch); n = 10, 30, 100. Peers:
    cvxpylayers' ``CvxpyLayer(problem, [x], [y])`` (its default solver) and the
    same with ``solver="MOREAU"``, each ``(y,) = layer(x); F(x, y).backward()``
    on one unbatched x. Context: the bare cvxpy + Clarabel solve of the same
    problem (``problem.solve(solver="CLARABEL")``). Gradients: cbo's default
    against ``method="cg"`` (the general route; target 1e-8 relative) and
    against each peer (the peer's own error shows there).
``layer``
    ``cbo.ArgminLayer`` forward + backward, batch 4, on the sparse QP of
    benchmarks/vs_cvxpylayers.py (``make_qp(n, 4, rng)``, ``build_inner``; inputs
    q (B, n) and r (B, m); loss (y * W).sum()), n = 100, 300, 1000, against the
    same two peers. Gradients against the peers and against the dense-KKT
    reference of ``vs_cvxpylayers.reference_gradient`` (no cbo in it), at the
    last input of each sequence. Target: cbo backward / forward <= 10 % at n = 1000.
``svm``
    ``problems.svm_per_sample.build(size="large", dataset="diabetes", seed=1)``:
    ``cbo.hypergrad`` against the bare inner solve (a second instance of the
    problem, the parameter's value set, ``inner.solve(solver="CLARABEL")``) and
    against cbo's own solve (``info.timings["inner_solve"]``). Target:
    hypergrad / bare solve <= 1.5.
``scale``
    The sparse QP with batch 1 at n = 1000, 2000, 5000, 10000, 20000 (``--scale-pattern``: "banded",
    local coupling with 10 nonzeros per row, default; or "random", make_qp's pattern), each size
    in a child process of this script (a size that runs out of time or memory
    takes only its child down): construction of ``cbo.BilevelProblem``
    (one-time), one hypergrad at a fresh x and at outer-loop steps, the bare
    solve (cbo's own, ``info.timings["inner_solve"]``, and cvxpy + Clarabel on
    cvxpy's compiled data, ``SolvingChain.solve_via_data``), hypergrad / inner
    solve (target <= 1.5), and peak memory of one hypergrad call against the bare
    solve's: the process's peak RSS growth (``resource.getrusage`` after
    resetting the peak through /proc/self/clear_refs) and tracemalloc's peak
    (numpy and Python allocations only; measured in a separate repeat of the
    call, since tracemalloc slows allocation; skipped where one call takes more
    than 30 s). Loss F = (y * w).sum() with a fixed random w. A size whose
    construction exceeds 120 s is skipped, and so is a size whose predicted
    time (the previous size's, times (n / n_prev)^3) exceeds what is left of
    ``--scale-budget``; the table says so.

Modes (dense, layer, svm). "outer-loop steps": x_k = x_{k-1} + s randn
(s = 1e-3 dense, 1e-2 layer (on q) and svm), what an optimizer does; cbo tries
the previous call's active set first. "independent x": x = x0 + 0.3 randn
(dense, svm) or q = q_batch + 1.0 randn (layer; make_qp's own spread, 0.1,
leaves the active sets unchanged), fresh each call; cbo still
tries the previous active set first (and pays for the failed try), as it would
in use.

How it is timed. A sequence's inputs are split into blocks of ``--block``
consecutive calls (default 10). In each block every method runs the block's
inputs back to back, as an outer loop calls its hypergradient, in an order
rotated at every block; so the methods alternate, and a change of load on the
machine reaches all of them. Each call is timed with time.perf_counter; tables
show medians. (With ``--block 1`` every call alternates with the peers' calls,
which leaves cbo's small-n calls to run with cold CPU caches: at n = 10 a
cbo call then takes about 1.5x as long, a MOREAU call about as long, which
no outer loop sees.) The mode column also
gives the CPU cores other processes used meanwhile (busy ticks from /proc/stat
minus this process's): on a small shared machine their load slows every method
(OpenBLAS's threaded LU stalls for ~0.1 s on a busy 2-core machine). One warm-up call per method
and size is excluded. Each method has a time budget per sequence (``--budget``
seconds): it always runs the first call, then sits out the rest of the sequence
once its next call would exceed the budget, so slow peers run fewer calls (the
"calls" columns say how many). "fastest peer" is the peer with the smaller
median; ratio = peer median / cbo median (> 1: cbo is faster). Phase shares
come from ``info.timings``: inner_solve (the QP solver; 0 when the previous
active set was reused), polish (the KKT solve on the active set, its
factorization and checks), kkt_checks (general route only), adjoint_solve; the
rest of the call is the outer F, its torch gradient and bookkeeping. Shares are
sum(phase) / sum(wall time) over the sequence. Exceptions are caught per call
and per cell and printed in the tables.

Run (from the repository root, in the project's venv):

    python benchmarks/fast_path.py                      # full run, ~15 min on 2 cores
    python benchmarks/fast_path.py --quick              # ~2 min: smaller sizes, fewer calls
    python benchmarks/fast_path.py --sections dense svm --repeats 100
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
import tracemalloc
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cvxpy as cp
import numpy as np
import scipy.sparse as sp
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ (vs_cvxpylayers)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root (problems)

import cbo  # noqa: E402
from cvxpylayers.torch import CvxpyLayer  # noqa: E402
from problems.figures import commit, save_figures, significant  # noqa: E402
from qp_solvers import local_rows  # noqa: E402
from vs_cvxpylayers import ForeignLoad, QPData, build_inner, make_qp, qp_around_optimum, reference_gradient  # noqa: E402,E501

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "benchmarks" / "output" / "fast_path.md"
SECTIONS = ("dense", "layer", "svm", "scale")

DENSE_SIZES, DENSE_STEP, INDEPENDENT_SCALE = (10, 30, 100), 1e-3, 0.3
LAYER_SIZES, LAYER_BATCH, LAYER_STEP = (100, 300, 1000), 4, 1e-2
LAYER_INDEPENDENT = 1.0       # q = q_batch + 1.0 randn: make_qp's 0.1 leaves the active sets as they were
SVM_STEP = 1e-2
SCALE_SIZES, SCALE_STEP, SCALE_STEP_CALLS = (1000, 2000, 5000, 10000, 20000), 1e-2, 3
CONSTRUCTION_LIMIT = 120.0    # s: a size whose BilevelProblem takes longer to build is skipped
TRACEMALLOC_LIMIT = 30.0      # s: calls longer than this are not repeated under tracemalloc
SCALE_EXPONENT = 3.0          # time(n) ~ n^3 to predict the next size's cost

TARGET_CG = 1e-8              # cbo default vs method="cg", relative
TARGET_BWD_OVER_FWD = 0.10    # layer, n = 1000
TARGET_OVER_SOLVE = 1.5       # hypergrad / inner solve (svm, scale)

PEERS = ("cvxpylayers", "MOREAU")
PHASES = ("inner_solve", "polish", "kkt_checks", "adjoint_solve")


# ---------------------------------------------------------------- machine and formatting

def machine_lines() -> list[str]:
    """Which machine and which code ran this benchmark."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = []
    for package in ("torch", "cvxpy", "cvxpylayers", "moreau", "numpy", "scipy", "clarabel", "daqp", "diffcp", "scs"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f"{package} {importlib.metadata.version(package)}")

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    dirty = [line for line in git("status", "--porcelain", "--", "cbo").splitlines() if line]
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return [
        f"- machine: {platform.platform()}, {cpu}, {os.cpu_count()} cores (load average {load}), "
        f"Python {platform.python_version()}, torch threads {torch.get_num_threads()}"
        + "".join(f", {v}={os.environ[v]}" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
                  if v in os.environ),
        f"- versions: {', '.join(versions)}",
        f"- code: commit {commit}" + (f", with {len(dirty)} uncommitted file(s) in cbo/" if dirty else ""),
    ]


def seconds(value: float | None) -> str:
    if value is None or not np.isfinite(value):
        return "—"
    if value < 1e-3:
        return f"{value * 1e6:.0f} µs"
    if value < 1.0:
        return f"{value * 1e3:.2f} ms"
    return f"{value:.2f} s"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not (np.isfinite(a) and np.isfinite(b)) or b <= 0:
        return "—"
    r = a / b
    return f"{r:.3g}×" if r < 100 else f"{r:.0f}×"


def megabytes(value: float | None) -> str:
    return "—" if value is None else f"{value / 2**20:.1f} MB"


def sci(value: float | None) -> str:
    return "—" if value is None or not np.isfinite(value) else f"{value:.1e}"


def error_text(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("|", "/").replace("\n", " ")
    return "error: " + (text if len(text) < 140 else text[:137] + "...")


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def counts(values) -> str:
    """'active set reused 59, DAQP 1' for a list of names."""
    return ", ".join(f"{name} {k}" for name, k in Counter(values).most_common())


def relative(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b||."""
    norm = float(np.linalg.norm(b))
    return float(np.linalg.norm(a - b)) / norm if norm else float(np.linalg.norm(a - b))


# ---------------------------------------------------------------- figures the documentation quotes

# docs/speed.md and README's Speed section quote these (problems/figures.py), filled by the sections and saved by
# main; all of them are timings or measured on timed calls, so all vary from run to run.
QUOTED: dict[str, str] = {}
MODE_KEYS = {"outer-loop steps": "steps", "independent x": "independent", "independent q": "independent",
             "independent x, warm starts forgotten": "forgotten"}
VERSIONS = ("torch", "cvxpy", "cvxpylayers", "moreau", "daqp", "clarabel", "qdldl")


def quote(prefix: str, **figures: str) -> None:
    """Record figures for the documentation as "prefix.name"."""
    QUOTED.update({f"{prefix}.{name}": value for name, value in figures.items()})


def in_ms(value: float | None) -> str:
    """Seconds as milliseconds, 3 significant digits ("n/a" where there is no value)."""
    return "n/a" if value is None or not np.isfinite(value) else significant(1e3 * value)


def quoted_ratio(a: float | None, b: float | None) -> str:
    """ratio(a, b) as the tables print it ("2.33×"), "n/a" where there is none."""
    text = ratio(a, b)
    return "n/a" if text == "—" else text


def rest_share(samples: list[Sample]) -> str:
    """The share of cbo's wall time outside the phases of info.timings (outer F, its gradient, bookkeeping), in %."""
    wall = sum(s.total for s in samples)
    known = sum(float(s.info.timings.get(phase, 0.0)) for s in samples for phase in PHASES)
    return f"{100 * (wall - known) / wall:.0f}" if wall else "n/a"


def quote_run(code: str, started_load: float, minutes: float) -> None:
    """The run itself: the commit of its code, the versions, the load average at its start and its length; and
    the targets the tables are read against."""
    quote("run", commit=code, load=f"{started_load:.1f}", minutes=f"{minutes:.0f}",
          python=platform.python_version())
    quote("target", over_solve=f"{TARGET_OVER_SOLVE:g}×", backward_share=f"{100 * TARGET_BWD_OVER_FWD:.0f}")
    for package in VERSIONS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            quote("version", **{package: importlib.metadata.version(package)})


# ---------------------------------------------------------------- interleaved sequences

@dataclass
class Sample:
    """One call of one method: wall time (total, and forward / backward where they apply), its gradient
    (flat numpy) and cbo's info."""

    k: int
    total: float
    forward: float = float("nan")
    backward: float = float("nan")
    grad: np.ndarray | None = None
    info: Any = None


@dataclass
class Method:
    """A method timed in a sequence: ``call(input, k) -> Sample``."""

    name: str
    call: Callable[[Any, int], Sample]
    samples: list[Sample] = field(default_factory=list)
    spent: float = 0.0
    errors: list[str] = field(default_factory=list)
    warnings: Counter = field(default_factory=Counter)
    warmup: float | None = None
    disabled: bool = False

    def median(self, attribute: str = "total") -> float | None:
        values = [getattr(s, attribute) for s in self.samples]
        return statistics.median(values) if values else None

    def by_call(self) -> dict[int, Sample]:
        return {s.k: s for s in self.samples}

    def cell(self, attribute: str = "total") -> str:
        """The median, or why there is none."""
        if self.samples:
            return seconds(self.median(attribute))
        return self.errors[0] if self.errors else "—"

    def note(self) -> str:
        parts = []
        if self.errors:
            parts.append(f"{self.name}: {len(self.errors)} failed call(s), first {self.errors[0]}")
        if self.warnings:
            parts.append(f"{self.name} warned: " + ", ".join(f"{w} ×{k}" for w, k in self.warnings.items()))
        return "; ".join(parts)


def invoke(method: Method, value, k: int) -> Sample | None:
    """One call, its warnings counted and its exception recorded (None then)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            sample = method.call(value, k)
        except Exception as err:  # noqa: BLE001 - reported in the table
            method.errors.append(error_text(err))
            sample = None
    for w in caught:
        if not issubclass(w.category, (DeprecationWarning, FutureWarning)):
            method.warnings[w.category.__name__] += 1
    return sample


def failed_method(name: str, err: BaseException) -> Method:
    """A method that could not be built: listed with its error, never called."""
    method = Method(name, lambda value, k: None, disabled=True)
    method.errors.append(error_text(err))
    return method


def warm_up(methods: list[Method], value) -> None:
    for method in methods:
        if method.disabled:
            continue
        start = time.perf_counter()
        invoke(method, value, -1)
        method.warmup = time.perf_counter() - start


def run_sequence(methods: list[Method], inputs: list, budget: float, bar: tqdm, label: str, block: int) -> float:
    """The inputs in blocks of ``block`` consecutive calls: in each block every method (in a rotated order)
    runs the block's inputs back to back, as an outer loop calls its hypergradient, and the methods' blocks
    alternate, so that a change of load on the machine reaches all of them. A method sits out once its next
    call (predicted by its median so far) would take it past ``budget`` seconds; it always runs the first
    call. Stops early when every method sits out. Returns the cores other processes used meanwhile."""
    for method in methods:
        method.samples, method.spent = [], 0.0
    bar.set_description(label)
    with ForeignLoad() as load:
        _run_calls(methods, inputs, budget, bar, block)
    return load.cores


def _run_calls(methods: list[Method], inputs: list, budget: float, bar: tqdm, block: int) -> None:
    for start in range(0, len(inputs), block):
        rotation = (start // block) % len(methods)
        ran = False
        for method in methods[rotation:] + methods[:rotation]:
            for k in range(start, min(start + block, len(inputs))):
                if method.samples and method.spent + method.median() > budget:
                    break
                if method.disabled or (len(method.errors) >= 3 and not method.samples):
                    break
                ran = True
                sample = invoke(method, inputs[k], k)
                if sample is not None:
                    method.samples.append(sample)
                    method.spent += sample.total
        bar.update(min(block, len(inputs) - start))
        if not ran:
            bar.update(max(0, len(inputs) - start - block))
            break


def phase_cells(samples: list[Sample], phases=PHASES, rest: str = "rest") -> dict[str, str]:
    """Median of each phase of info.timings and its share sum(phase) / sum(wall), and the rest of the wall time."""
    cells: dict[str, str] = {}
    if not samples:
        return cells
    wall = sum(s.total for s in samples)
    known = np.zeros(len(samples))
    for phase in phases:
        values = np.array([float(s.info.timings.get(phase, 0.0)) for s in samples])
        known += values
        if phase == "kkt_checks" and not values.any():
            cells[phase] = "—"
            continue
        cells[phase] = f"{seconds(float(np.median(values)))} ({100 * values.sum() / wall:.0f} %)"
    remaining = np.array([s.total for s in samples]) - known
    cells[rest] = f"{seconds(float(np.median(remaining)))} ({100 * remaining.sum() / wall:.0f} %)"
    return cells


def fastest(peers: list[Method]) -> Method | None:
    timed = [p for p in peers if p.samples]
    return min(timed, key=lambda p: p.median()) if timed else None


def peer_errors(cbo_method: Method, peer: Method) -> tuple[float | None, float | None, Sample | None]:
    """Median and max of ||g_peer - g_cbo|| / ||g_cbo|| over the calls both ran, and cbo's sample at the max."""
    ours = cbo_method.by_call()
    errors = [(relative(s.grad, ours[s.k].grad), s.k) for s in peer.samples if s.k in ours and s.grad is not None]
    if not errors:
        return None, None, None
    worst = max(errors)
    return statistics.median(e for e, _ in errors), worst[0], ours[worst[1]]


def where_worst(errors, peers) -> list[str]:
    """Notes on the calls where a peer's gradient differs from cbo's by more than 1e-3: cbo's path there."""
    notes = []
    for (_, worst, sample), peer in zip(errors, peers):
        if worst is not None and worst > 1e-3 and sample.info is not None:
            info = sample.info
            if isinstance(info, cbo.LayerInfo):
                how = f"{info.path}, {counts(info.solvers or [])}".rstrip(", ")
            else:
                how = f"{info.path}, {info.solver}"
            notes.append(f"{peer.name} vs cbo max {worst:.1e} at call {sample.k} (cbo there: {how})")
    return notes


# ---------------------------------------------------------------- section 1: dense QP, cbo.hypergrad

def sequence_notes(where: str, methods: list[Method], errors, peers: list[Method]) -> list[str]:
    """The notes of one sequence (warnings, errors, the worst peer disagreements); then the methods'
    per-sequence records are cleared for the next sequence."""
    notes = [f"{where}: {m.note()}" for m in methods if m.note()]
    notes += [f"{where}: {text}" for text in where_worst(errors, peers)]
    for m in methods:
        if not m.disabled:
            m.errors.clear()
        m.warnings.clear()
    return notes


def dense_qp(n: int, rng: np.random.Generator):
    """The dense QP of the module docstring: (cvxpy problem factory, x0, target)."""
    m, p = n // 2, max(1, n // 10)
    M = rng.standard_normal((n, n))
    P = M.T @ M / n + np.eye(n)
    G, C = rng.standard_normal((m, n)), rng.standard_normal((p, n))
    y0 = rng.standard_normal(n)
    active = rng.choice(m, size=m // 2, replace=False)
    mu0 = np.zeros(m)
    mu0[active] = rng.uniform(0.5, 1.5, active.size)
    slack = rng.uniform(0.5, 1.5, m)
    slack[active] = 0.0
    h, d = G @ y0 + slack, C @ y0
    x0 = -(P @ y0 + G.T @ mu0 + C.T @ rng.standard_normal(p))

    def build():
        x, y = cp.Parameter(n, name="x"), cp.Variable(n, name="y")
        problem = cp.Problem(cp.Minimize(0.5 * cp.quad_form(y, cp.psd_wrap(P)) + x @ y), [G @ y <= h, C @ y == d])
        return problem, x, y

    return build, torch.as_tensor(x0), torch.as_tensor(rng.standard_normal(n))


def hypergrad_method(name: str, problem: cbo.BilevelProblem, forget: bool = False, **options) -> Method:
    """cbo.hypergrad; ``forget``: drop the kept active sets before each call (not timed)."""
    def call(x, k):
        if forget:
            cbo.forget_warm_starts(problem)
        start = time.perf_counter()
        g, info = cbo.hypergrad(problem, x, return_info=True, **options)
        total = time.perf_counter() - start
        g = g if isinstance(g, torch.Tensor) else torch.cat([t.reshape(-1) for t in g])
        return Sample(k, total, grad=g.detach().numpy().ravel().copy(), info=info)
    return Method(name, call)


def dense_peer(name: str, layer: CvxpyLayer, F) -> Method:
    def call(x, k):
        x = x.clone().requires_grad_(True)
        start = time.perf_counter()
        (y,) = layer(x)
        value = F(x, y)
        middle = time.perf_counter()
        value.backward()
        end = time.perf_counter()
        return Sample(k, end - start, middle - start, end - middle, x.grad.numpy().copy())
    return Method(name, call)


def bare_solve_method(name: str, problem: cp.Problem, parameters: list[cp.Parameter], **solve_options) -> Method:
    def call(x, k):
        values = x if isinstance(x, (list, tuple)) else [x]
        for param, value in zip(parameters, values):
            param.value = np.asarray(value.detach() if isinstance(value, torch.Tensor) else value, dtype=float)
        start = time.perf_counter()
        problem.solve(**solve_options)
        total = time.perf_counter() - start
        if problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
            raise RuntimeError(f"status {problem.status}")
        return Sample(k, total)
    return Method(name, call)


def section_dense(args, bar: tqdm) -> list[str]:
    timing_rows, phase_rows, grad_rows, notes = [], [], [], []
    for n in args.dense_sizes:
        try:
            rng = np.random.default_rng(args.seed + n)
            build, x0, target = dense_qp(n, rng)

            def F(x, y, target=target):
                return ((y - target) ** 2).sum() + 0.1 * (x ** 2).sum()

            start = time.perf_counter()
            problem, x, y = build()
            bilevel = cbo.BilevelProblem(problem, [x], [y], outer=F)
            construction = time.perf_counter() - start
            cg_problem, x_cg, y_cg = build()
            cg_bilevel = cbo.BilevelProblem(cg_problem, [x_cg], [y_cg], outer=F)
            ours = hypergrad_method("cbo", bilevel)
            peers = []
            for peer in PEERS:
                p_problem, p_x, p_y = build()
                try:
                    layer = (CvxpyLayer(p_problem, [p_x], [p_y]) if peer == "cvxpylayers"
                             else CvxpyLayer(p_problem, [p_x], [p_y], solver=peer))
                    peers.append(dense_peer(peer, layer, F))
                except Exception as err:  # noqa: BLE001
                    peers.append(failed_method(peer, err))
            b_problem, b_x, _ = build()
            bare = bare_solve_method("cvxpy+Clarabel", b_problem, [b_x], solver="CLARABEL")
            methods = [ours, *peers, bare]
            warm_up(methods, x0)
        except Exception as err:  # noqa: BLE001
            timing_rows.append([n, "both", error_text(err)] + [""] * 9)
            bar.update(2 * args.repeats)
            continue
        gen = torch.Generator().manual_seed(args.seed + 7 * n)
        walk = [x0.clone()]
        for _ in range(args.repeats - 1):
            walk.append(walk[-1] + DENSE_STEP * torch.randn(n, dtype=torch.float64, generator=gen))
        fresh = [x0 + INDEPENDENT_SCALE * torch.randn(n, dtype=torch.float64, generator=gen) for _ in range(args.repeats)]
        for mode, inputs in (("outer-loop steps", walk), ("independent x", fresh)):
            cg_errors = []
            try:
                load = run_sequence(methods, inputs, args.budget, bar, f"dense n={n} {mode}", args.block)
                best = fastest([p for p in methods if p.name in PEERS])
                # cbo default against the general route, on about 12 of the inputs (not timed).
                for s in ours.samples[:: max(1, len(ours.samples) // 12)]:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        g_cg = cbo.hypergrad(cg_bilevel, inputs[s.k], method="cg")
                    cg_errors.append(relative(s.grad, g_cg.numpy()))
                infos = [s.info for s in ours.samples]
                timing_rows.append([
                    n, f"{mode} ({max(load, 0.0):.1f})", f"{len(ours.samples)}/{'/'.join(str(len(p.samples)) for p in methods[1:])}",
                    ours.cell(), *(p.cell() for p in peers), best.name if best else "—",
                    ratio(best.median(), ours.median()) if best else "—", bare.cell(),
                    ratio(ours.median(), bare.median()), counts(i.solver for i in infos), counts(i.path for i in infos)])
                cells = phase_cells(ours.samples, rest="outer F + rest")
                phase_rows.append([n, mode, *(cells.get(c, "—") for c in (*PHASES, "outer F + rest")),
                                   seconds(ours.median())])
                errors = [peer_errors(ours, p) for p in peers]
                grad_rows.append([n, mode, *(f"{sci(med)} / {sci(mx)}" for med, mx, _ in errors),
                                  f"{sci(max(cg_errors))} ({len(cg_errors)} calls)" if cg_errors else "—",
                                  f"{construction * 1e3:.1f} ms"])
                moreau = peers[PEERS.index("MOREAU")]
                quote(f"dense.n{n}_{MODE_KEYS[mode]}", cbo=in_ms(ours.median()), moreau=in_ms(moreau.median()),
                      ratio=quoted_ratio(moreau.median(), ours.median()), solve=in_ms(bare.median()),
                      over_solve=quoted_ratio(ours.median(), bare.median()), rest_share=rest_share(ours.samples),
                      moreau_error=sci(errors[PEERS.index("MOREAU")][1]).replace("—", "n/a"),
                      cg_error=sci(max(cg_errors)) if cg_errors else "n/a")
                notes += sequence_notes(f"n={n}, {mode}", methods, errors, peers)
            except Exception as err:  # noqa: BLE001
                timing_rows.append([n, mode, error_text(err)] + [""] * 9)
                traceback.print_exc()
    out = ["## 1. dense: cbo.hypergrad on the dense QP, one unbatched x", "",
           f"Medians of {args.repeats}-call sequences (fewer where the budget of {args.budget:.0f} s per method "
           "ran out; calls: cbo/cvxpylayers/MOREAU/bare solve). ratio = fastest peer / cbo (> 1: cbo faster); "
           "cbo/solve = cbo's whole hypergradient over the bare cvxpy + Clarabel solve.", "",
           markdown_table(["n", "mode (other load, cores)", "calls", "cbo", *PEERS, "fastest peer", "peer / cbo", "cvxpy+Clarabel solve",
                           "cbo / solve", "cbo info.solver", "info.path"], timing_rows), "",
           "cbo's phases (median per call, share of cbo's total time over the sequence):", "",
           markdown_table(["n", "mode", *PHASES, "outer F + rest", "cbo total"], phase_rows), "",
           f"Gradients, ||g - g_cbo|| / ||g_cbo|| (median / max over the calls), and cbo default vs method=\"cg\" "
           f"(max over the calls checked; target {TARGET_CG:.0e}); construction = cvxpy problem + "
           "cbo.BilevelProblem:", "",
           markdown_table(["n", "mode", *(f"{p} vs cbo" for p in PEERS), "cbo vs cbo cg (max)", "construction"],
                          grad_rows)]
    if notes:
        out += ["", "Notes: " + " | ".join(notes)]
    return out


# ---------------------------------------------------------------- section 2: batched ArgminLayer

def layer_method(name: str, layer, W: torch.Tensor, ours: bool) -> Method:
    def call(value, k):
        q0, r0 = value
        q, r = q0.clone().requires_grad_(True), r0.clone().requires_grad_(True)
        info = None
        start = time.perf_counter()
        if ours:
            (y,), info = layer(q, r, return_info=True)
        else:
            (y,) = layer(q, r)
        middle = time.perf_counter()
        (y * W).sum().backward()
        end = time.perf_counter()
        grad = torch.cat([q.grad.reshape(-1), r.grad.reshape(-1)]).numpy().copy()
        return Sample(k, end - start, middle - start, end - middle, grad, info)
    return Method(name, call)


def section_layer(args, bar: tqdm) -> list[str]:
    timing_rows, phase_rows, grad_rows, notes = [], [], [], []
    for n in args.layer_sizes:
        try:
            rng = np.random.default_rng(args.seed + n)
            data = make_qp(n, LAYER_BATCH, rng)
            W = torch.as_tensor(data.W)
            inner = build_inner(data)
            start = time.perf_counter()
            cbo_layer = cbo.ArgminLayer(inner.problem, [inner.q, inner.r], [inner.y])
            construction = time.perf_counter() - start
            ours = layer_method("cbo", cbo_layer, W, True)
            peers = []
            for peer in PEERS:
                p_inner = build_inner(data)
                try:
                    kwargs = {} if peer == "cvxpylayers" else {"solver": peer}
                    peers.append(layer_method(peer, CvxpyLayer(p_inner.problem, [p_inner.q, p_inner.r], [p_inner.y],
                                                               **kwargs), W, False))
                except Exception as err:  # noqa: BLE001
                    peers.append(failed_method(peer, err))
            methods = [ours, *peers]
            q_batch, r_batch = torch.as_tensor(data.q), torch.as_tensor(data.r)
            warm_up(methods, (q_batch, r_batch))
        except Exception as err:  # noqa: BLE001
            timing_rows.append([n, "both", error_text(err)] + [""] * 9)
            bar.update(2 * args.repeats)
            continue
        gen = torch.Generator().manual_seed(args.seed + 11 * n)
        walk = [q_batch.clone()]
        for _ in range(args.repeats - 1):
            walk.append(walk[-1] + LAYER_STEP * torch.randn(q_batch.shape, dtype=torch.float64, generator=gen))
        fresh = [q_batch + LAYER_INDEPENDENT * torch.randn(q_batch.shape, dtype=torch.float64, generator=gen)
                 for _ in range(args.repeats)]
        for mode, qs in (("outer-loop steps", walk), ("independent q", fresh)):
            try:
                inputs = [(q, r_batch) for q in qs]
                load = run_sequence(methods, inputs, args.budget, bar, f"layer n={n} {mode}", args.block)
                best = fastest(peers)
                fwd, bwd = ours.median("forward"), ours.median("backward")
                timing_rows.append([
                    n, f"{mode} ({max(load, 0.0):.1f})", "/".join(str(len(m.samples)) for m in methods),
                    *(f"{m.cell('forward')} + {m.cell('backward')} = {m.cell()}" if m.samples else m.cell()
                      for m in methods),
                    best.name if best else "—", ratio(best.median(), ours.median()) if best else "—",
                    (f"{100 * bwd / fwd:.1f} %" + (" ✓" if bwd / fwd <= TARGET_BWD_OVER_FWD else ""))
                    if fwd and bwd is not None else "—",
                    counts(s for smp in ours.samples for s in (smp.info.solvers or [])),
                    counts(smp.info.path for smp in ours.samples)])
                cells = phase_cells(ours.samples)
                fwd_rest = [s.forward - sum(s.info.timings.get(p, 0) for p in ("inner_solve", "polish", "kkt_checks"))
                            for s in ours.samples]
                phase_rows.append([n, mode, cells.get("inner_solve", "—"), cells.get("polish", "—"),
                                   cells.get("kkt_checks", "—"),
                                   seconds(statistics.median(fwd_rest)) if fwd_rest else "—",
                                   cells.get("adjoint_solve", "—"), cells.get("rest", "—"), seconds(ours.median())])
                # The independent reference at the last input cbo ran.
                reference_error = "—"
                if ours.samples:
                    last = ours.samples[-1]
                    try:
                        q_last = inputs[last.k][0].numpy()
                        reference = reference_gradient(dataclasses.replace(data, q=q_last), build_inner(data))
                        reference_error = sci(relative(last.grad, reference.flat))
                    except Exception as err:  # noqa: BLE001
                        reference_error = error_text(err)
                errors = [peer_errors(ours, p) for p in peers]
                grad_rows.append([n, mode, *(f"{sci(med)} / {sci(mx)}" for med, mx, _ in errors), reference_error,
                                  f"{construction:.2f} s"])
                moreau = peers[PEERS.index("MOREAU")]
                quote(f"layer.n{n}_{MODE_KEYS[mode]}", cbo_forward=in_ms(fwd), cbo_backward=in_ms(bwd),
                      moreau_forward=in_ms(moreau.median("forward")), moreau_backward=in_ms(moreau.median("backward")),
                      ratio=quoted_ratio(moreau.median(), ours.median()),
                      backward_share=f"{100 * bwd / fwd:.1f}" if fwd and bwd is not None else "n/a",
                      reference_error=reference_error if reference_error[0].isdigit() else "n/a")
                notes += sequence_notes(f"n={n}, {mode}", methods, errors, peers)
            except Exception as err:  # noqa: BLE001
                timing_rows.append([n, mode, error_text(err)] + [""] * 9)
                traceback.print_exc()
    out = [f"## 2. layer: cbo.ArgminLayer forward + backward, batch {LAYER_BATCH}, sparse QP of vs_cvxpylayers.py", "",
           f"Medians forward + backward = total (each median on its own); calls: cbo/cvxpylayers/MOREAU, "
           f"budget {args.budget:.0f} s per method and sequence. ratio = fastest peer / cbo (totals). "
           f"Target: cbo backward / forward <= {100 * TARGET_BWD_OVER_FWD:.0f} % at n = 1000 (a forward that solves: "
           "the independent mode).", "",
           markdown_table(["n", "mode (other load, cores)", "calls", "cbo", *PEERS, "fastest peer", "peer / cbo", "cbo bwd / fwd",
                           "cbo info.solvers (items)", "info.path"], timing_rows), "",
           "cbo's phases (median per call, share of forward + backward over the sequence; inner_solve and polish "
           "summed over the batch):", "",
           markdown_table(["n", "mode", "inner_solve", "polish", "kkt_checks", "rest of forward", "adjoint_solve",
                           "rest (forward + backward)", "cbo total"], phase_rows), "",
           "Gradients w.r.t. (q, r): ||g - g_cbo|| / ||g_cbo|| (median / max over the calls); cbo vs the dense-KKT "
           "reference (vs_cvxpylayers.reference_gradient) at the last input; construction = cbo.ArgminLayer(...):", "",
           markdown_table(["n", "mode", *(f"{p} vs cbo" for p in PEERS), "cbo vs reference", "construction"],
                          grad_rows)]
    if notes:
        out += ["", "Notes: " + " | ".join(notes)]
    return out


# ---------------------------------------------------------------- section 3: per-sample SVM

def section_svm(args, bar: tqdm) -> list[str]:
    from problems import svm_per_sample
    rows, phase_rows, notes = [], [], []
    try:
        start = time.perf_counter()
        instance = svm_per_sample.build(size="large", dataset="diabetes", seed=1)
        construction = time.perf_counter() - start
        twin = svm_per_sample.build(size="large", dataset="diabetes", seed=1)
        problem, x0 = instance.problem, instance.x0
        ours = hypergrad_method("cbo", problem)
        forgetful = hypergrad_method("cbo", problem, forget=True)
        bare = bare_solve_method("cvxpy+Clarabel", twin.problem.inner, twin.problem.parameters, solver="CLARABEL")
        methods = [ours, bare]
        warm_up(methods, x0)
        program = cbo.compiled.compiled(problem).qp
        shape = (f"{program.n} QP variables, {program.m} rows" if program is not None
                 else "not compiled to a QP")
    except Exception as err:  # noqa: BLE001
        bar.update(3 * args.repeats)
        return ["## 3. svm: problems.svm_per_sample (large, diabetes)", "", error_text(err)]
    gen = torch.Generator().manual_seed(args.seed + 3)
    walk = [x0.clone()]
    for _ in range(args.repeats - 1):
        walk.append(walk[-1] + SVM_STEP * torch.randn(x0.shape, dtype=torch.float64, generator=gen))
    fresh = [x0 + INDEPENDENT_SCALE * torch.randn(x0.shape, dtype=torch.float64, generator=gen)
             for _ in range(args.repeats)]
    for mode, inputs in (("outer-loop steps", walk), ("independent x", fresh),
                         ("independent x, warm starts forgotten", fresh)):
        try:
            if mode.endswith("forgotten"):
                methods[0] = ours = forgetful
            load = run_sequence(methods, inputs, args.budget, bar, f"svm {mode}", args.block)
            infos = [s.info for s in ours.samples]
            solves = [i.timings["inner_solve"] for i in infos if i.timings.get("inner_solve", 0) > 0]
            own_solve = statistics.median(solves) if solves else None
            over = ours.median() / bare.median() if ours.samples and bare.samples else None
            rows.append([f"{mode} ({max(load, 0.0):.1f})", f"{len(ours.samples)}/{len(bare.samples)}", ours.cell(), bare.cell(),
                         f"{seconds(own_solve)} ({len(solves)} calls)",
                         ratio(ours.median(), bare.median()),
                         "—" if over is None else ("yes" if over <= TARGET_OVER_SOLVE else "no"),
                         ratio(ours.median(), own_solve), counts(i.solver for i in infos),
                         counts(i.path for i in infos)])
            cells = phase_cells(ours.samples, rest="outer F + rest")
            phase_rows.append([mode, *(cells.get(c, "—") for c in (*PHASES, "outer F + rest")), seconds(ours.median())])
            quote(f"svm.{MODE_KEYS[mode]}", cbo=in_ms(ours.median()), solve=in_ms(bare.median()),
                  over_solve=quoted_ratio(ours.median(), bare.median()))
            notes += [f"{mode}: {m.note()}" for m in methods if m.note()]
            for m in methods:
                m.errors.clear()
                m.warnings.clear()
        except Exception as err:  # noqa: BLE001
            rows.append([mode, error_text(err)] + [""] * 8)
    out = ["## 3. svm: problems.svm_per_sample.build(size=\"large\", dataset=\"diabetes\", seed=1)", "",
           f"{shape}; build {construction:.2f} s. Bare solve = a second instance's inner.solve(solver=\"CLARABEL\") "
           f"at the same x; cbo's own solve = info.timings[\"inner_solve\"] over the calls that ran the QP solver. "
           "The third mode calls cbo.forget_warm_starts(problem) before each call (untimed), so that cbo solves. "
           f"Target: hypergrad / bare solve <= {TARGET_OVER_SOLVE}.", "",
           markdown_table(["mode (other load, cores)", "calls", "cbo.hypergrad", "bare solve", "cbo's own solve", "hypergrad / bare",
                           f"<= {TARGET_OVER_SOLVE}", "hypergrad / own solve", "info.solver", "info.path"], rows), "",
           "cbo's phases (median per call, share of cbo's total time):", "",
           markdown_table(["mode", *PHASES, "outer F + rest", "cbo total"], phase_rows)]
    if notes:
        out += ["", "Notes: " + " | ".join(notes)]
    return out


# ---------------------------------------------------------------- section 4: scale (child processes)

def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux >= 4.0), so that getrusage's ru_maxrss is the peak from now on."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def proc_status(field_name: str) -> int | None:
    """A field of /proc/self/status in bytes (VmRSS, VmHWM), None where unavailable."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in open("/proc/self/status"):
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return None


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def rss_growth(box: dict, key: str):
    """box[key]: the peak RSS during the block (VmHWM, reset before it) minus the RSS before it;
    box[key + "_maxrss"]: the growth of getrusage's ru_maxrss over the block (the process's lifetime
    high-water mark: 0 where the block stays below an earlier peak, e.g. the imports')."""
    maxrss_before = max_rss()
    reset = reset_peak_rss()
    before = proc_status("VmRSS")
    yield
    peak = proc_status("VmHWM")
    box[key + "_maxrss"] = max(0, max_rss() - maxrss_before)
    if reset and peak is not None and before is not None:
        box[key] = max(0, peak - before)
    else:
        box["rss_note"] = "peak RSS not resettable here: only getrusage's high-water mark growth"


def traced_peak(function: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def make_banded_qp(n: int, batch: int, rng: np.random.Generator) -> QPData:
    """The sparse QP of make_qp with local coupling: P = M'M + I with M upper bidiagonal plus one more band
    (9 nonzeros per row), G and C with 10 nonzeros per row in a sliding window. Its KKT matrix has a
    sparse LU (make_qp's random pattern fills in almost completely: 66-82 % of dense at n = 1000-2000)."""
    m, p = n // 2, n // 10
    M = sp.diags([rng.standard_normal(n - k) for k in range(3)], offsets=[0, 1, 2])
    P = (M.T @ M + sp.eye(n)).tocsc()
    return qp_around_optimum(P, local_rows(m, n, rng), local_rows(p, n, rng), batch, rng)


SCALE_PATTERNS = {"banded": make_banded_qp, "random": make_qp}


def scale_child(n: int, seed: int, pattern: str = "banded") -> None:
    """One size of the scale section; prints 'RESULT <json>' after every measurement (the parent keeps
    the last, so that a size that times out still reports what it measured)."""
    result: dict[str, Any] = {"n": n}

    def report():
        print("RESULT " + json.dumps(result), flush=True)

    warnings.simplefilter("ignore")
    # torch starts its autograd engine at the first backward pass of a process (~2 ms, the same for any
    # torch code): one tiny backward here, so that the first hypergradient's time is cbo's.
    warm = torch.zeros(1, requires_grad=True)
    torch.autograd.grad(2 * warm.sum(), warm)
    rng = np.random.default_rng(seed + n)
    data = SCALE_PATTERNS[pattern](n, 1, rng)
    w = torch.as_tensor(rng.standard_normal(n))
    inner = build_inner(data)
    start = time.perf_counter()
    problem = cbo.BilevelProblem(inner.problem, [inner.q, inner.r], [inner.y], outer=lambda q, r, y: (y * w).sum())
    result["construct"] = time.perf_counter() - start
    report()
    if result["construct"] > CONSTRUCTION_LIMIT:
        result["skipped"] = f"construction {result['construct']:.0f} s > {CONSTRUCTION_LIMIT:.0f} s"
        report()
        return
    program = cbo.compiled.compiled(problem).qp
    result["qp"] = f"{program.n} vars, {program.m} rows" if program is not None else "not a QP"
    q, r = torch.as_tensor(data.q[0]), torch.as_tensor(data.r[0])

    # The bare solve: cvxpy's compiled data (not timed), then Clarabel on it.
    twin = build_inner(data)
    twin.q.value, twin.r.value = data.q[0], data.r[0]
    start = time.perf_counter()
    solver_data, chain, _ = twin.problem.get_problem_data(cp.CLARABEL)
    result["cvxpy_compile"] = time.perf_counter() - start
    start = time.perf_counter()
    with rss_growth(result, "bare_rss"):
        chain.solve_via_data(twin.problem, solver_data)
    result["bare"] = time.perf_counter() - start
    report()

    # One hypergrad at a fresh x (nothing to reuse), then outer-loop steps.
    try:
        start = time.perf_counter()
        with rss_growth(result, "hypergrad_rss"):
            _, info = cbo.hypergrad(problem, [q, r], return_info=True)
        result["fresh"] = time.perf_counter() - start
        result["fresh_timings"] = dict(info.timings)
        result["fresh_path"], result["fresh_solver"] = info.path, info.solver
    except Exception as err:  # noqa: BLE001
        result["fresh_error"] = error_text(err)
    report()
    steps, paths = [], []
    gen = torch.Generator().manual_seed(seed)
    try:
        for _ in range(SCALE_STEP_CALLS):
            q = q + SCALE_STEP * torch.randn(n, dtype=torch.float64, generator=gen)
            start = time.perf_counter()
            _, info = cbo.hypergrad(problem, [q, r], return_info=True)
            steps.append(time.perf_counter() - start)
            paths.append(f"{info.path}: {info.solver}")
            result["step"], result["step_paths"] = statistics.median(steps), counts(paths)
            report()
    except Exception as err:  # noqa: BLE001
        result["step_error"] = error_text(err)
        report()

    # tracemalloc peaks, in repeats of the calls (tracemalloc slows allocation down).
    if result.get("bare", np.inf) < TRACEMALLOC_LIMIT:
        result["bare_traced"] = traced_peak(lambda: chain.solve_via_data(twin.problem, solver_data))
        report()
    if result.get("fresh", np.inf) < TRACEMALLOC_LIMIT:
        cbo.forget_warm_starts(problem)
        q0 = torch.as_tensor(data.q[0])
        result["hypergrad_traced"] = traced_peak(lambda: cbo.hypergrad(problem, [q0, r]))
        report()


def quote_scale(res: dict[str, Any]) -> None:
    """The figures of one size of the scale section (ms, MB; construction in s)."""
    t, mb = res.get("fresh_timings", {}), (lambda v: "n/a" if v is None else f"{v / 2**20:.1f}")
    quote(f"scale.n{res['n']}", bare=in_ms(res.get("bare")), fresh=in_ms(res.get("fresh")),
          **{phase: in_ms(t.get(phase)) for phase in ("inner_solve", "polish", "adjoint_solve")},
          over_solve=quoted_ratio(res.get("fresh"), t.get("inner_solve")),
          over_bare=quoted_ratio(res.get("fresh"), res.get("bare")), step=in_ms(res.get("step")),
          rss_bare=mb(res.get("bare_rss")), rss_cbo=mb(res.get("hypergrad_rss")),
          construct="n/a" if res.get("construct") is None else significant(res["construct"], 2))


def section_scale(args, bar: tqdm) -> list[str]:
    rows, memory_rows, notes = [], [], []
    deadline = time.perf_counter() + args.scale_budget
    last: tuple[int, float] | None = None
    for n in args.scale_sizes:
        bar.set_description(f"scale n={n}")
        left = deadline - time.perf_counter()
        if last is not None:
            predicted = last[1] * (n / last[0]) ** SCALE_EXPONENT
            if predicted > left:
                rows.append([n, f"skipped: predicted {predicted:.0f} s (n={last[0]} took {last[1]:.0f} s, × (n ratio)^3) "
                             f"> {max(left, 0):.0f} s left of --scale-budget {args.scale_budget:.0f} s"] + [""] * 9)
                bar.update(1)
                continue
        command = [sys.executable, str(Path(__file__).resolve()), "--scale-child", str(n), "--seed", str(args.seed),
                   "--scale-pattern", args.scale_pattern]
        start = time.perf_counter()
        timed_out, stderr = False, ""
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=max(left, 30), cwd=ROOT)
            stdout, stderr = done.stdout, done.stderr
            code = done.returncode
        except subprocess.TimeoutExpired as err:
            stdout = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
            timed_out, code = True, None
        wall = time.perf_counter() - start
        last = (n, wall)
        bar.update(1)
        results = [line[7:] for line in stdout.splitlines() if line.startswith("RESULT ")]
        res = json.loads(results[-1]) if results else {"n": n}
        status = ("timed out after %.0f s" % wall) if timed_out else \
            ("" if code == 0 else f"child exited {code}: " + (stderr.strip().splitlines() or ["?"])[-1][:140])
        if res.get("skipped"):
            status = "skipped: " + res["skipped"]
        t = res.get("fresh_timings", {})
        inner = t.get("inner_solve")
        rows.append([
            n, res.get("qp", "—"), seconds(res.get("construct")), seconds(res.get("cvxpy_compile")),
            seconds(res.get("bare")), res.get("fresh_error") or seconds(res.get("fresh")),
            " / ".join(seconds(t.get(p)) for p in ("inner_solve", "polish", "adjoint_solve"))
            + (f" (kkt_checks {seconds(t['kkt_checks'])})" if "kkt_checks" in t else ""),
            ratio(res.get("fresh"), inner) + (" ✓" if res.get("fresh") and inner and res["fresh"] / inner
                                              <= TARGET_OVER_SOLVE else ""),
            ratio(res.get("fresh"), res.get("bare")),
            res.get("step_error") or seconds(res.get("step")),
            f"{res.get('fresh_path', '—')}: {res.get('fresh_solver', '—')}; steps: {res.get('step_paths', '—')}"
            + (f"; {status}" if status else "")])
        memory_rows.append([n, megabytes(res.get("bare_rss")), megabytes(res.get("hypergrad_rss")),
                            ratio(res.get("hypergrad_rss"), res.get("bare_rss")),
                            f"{megabytes(res.get('bare_rss_maxrss'))} / {megabytes(res.get('hypergrad_rss_maxrss'))}",
                            megabytes(res.get("bare_traced")), megabytes(res.get("hypergrad_traced")),
                            ratio(res.get("hypergrad_traced"), res.get("bare_traced"))])
        if res.get("rss_note"):
            notes.append(res["rss_note"])
        quote_scale(res)
    out = [f"## 4. scale: the sparse QP (batch 1, {args.scale_pattern} sparsity pattern), one x, each size in a "
           "child process", "",
           "construct = cbo.BilevelProblem (one-time); cvxpy compile = get_problem_data(CLARABEL) of a second "
           "instance; bare = Clarabel on that compiled data (solve_via_data); hypergrad fresh = the first call "
           f"(nothing to reuse), its phases inner_solve / polish / adjoint_solve; step = median of "
           f"{SCALE_STEP_CALLS} calls after q += {SCALE_STEP:g} randn. Target: fresh / inner_solve <= "
           f"{TARGET_OVER_SOLVE} (✓).", "",
           markdown_table(["n", "QP", "construct", "cvxpy compile", "bare Clarabel", "hypergrad fresh",
                           "inner_solve / polish / adjoint", "fresh / inner_solve", "fresh / bare", "hypergrad step",
                           "path: solver (fresh; steps)"], rows), "",
           "Peak memory of one call: RSS = peak resident set during the call (VmHWM, reset through "
           "/proc/self/clear_refs) minus the RSS before it; ru_maxrss growth = growth of getrusage's lifetime "
           "high-water mark over the call (bare first, then hypergrad; 0 below an earlier peak); tracemalloc = "
           "peak of numpy/Python allocations in a repeat of the call (Clarabel's and SuperLU's own allocations "
           f"are invisible to it, so bare is mostly cvxpy's unpacking; skipped for calls over "
           f"{TRACEMALLOC_LIMIT:.0f} s).", "",
           markdown_table(["n", "RSS bare", "RSS hypergrad", "ratio", "ru_maxrss growth bare / hypergrad",
                           "tracemalloc bare", "tracemalloc hypergrad", "ratio"], memory_rows)]
    if notes:
        out += ["", "Notes: " + " | ".join(sorted(set(notes)))]
    return out


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="~2 minutes: dense n = 10, 30, 100; layer n = 100, 300; scale n = 1000, 2000; "
                             "15 calls per sequence, budget 4 s")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--repeats", type=int, default=None,
                        help="calls per sequence (per mode) in dense, layer, svm (default 60; --quick 15)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds per method and sequence before it sits out (default 30; --quick 4)")
    parser.add_argument("--scale-budget", type=float, default=None,
                        help="seconds for the scale section (default 300; --quick 60)")
    parser.add_argument("--block", type=int, default=10,
                        help="consecutive calls per method before the next method runs (default 10; see the docstring)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale-pattern", choices=sorted(SCALE_PATTERNS), default="banded",
                        help="sparsity of the scale section's QPs: banded (local coupling, a sparse LU) or random "
                             "(make_qp's pattern, whose LU fills in)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--scale-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (15 if args.quick else 60)
    args.budget = args.budget or (4.0 if args.quick else 30.0)
    args.scale_budget = args.scale_budget or (60.0 if args.quick else 300.0)
    args.dense_sizes = DENSE_SIZES
    args.layer_sizes = LAYER_SIZES[:2] if args.quick else LAYER_SIZES
    args.scale_sizes = SCALE_SIZES[:2] if args.quick else SCALE_SIZES
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.scale_child is not None:
        scale_child(args.scale_child, args.seed, args.scale_pattern)
        return
    started, load, code = time.perf_counter(), os.getloadavg()[0], commit()
    units = {"dense": 2 * args.repeats * len(args.dense_sizes), "layer": 2 * args.repeats * len(args.layer_sizes),
             "svm": 3 * args.repeats, "scale": len(args.scale_sizes)}
    sections = [s for s in SECTIONS if s in args.sections]
    run = {"dense": section_dense, "layer": section_layer, "svm": section_svm, "scale": section_scale}
    lines = ["# cbo QP fast path: hypergradient and layer cost against cvxpylayers and the bare solve", "",
             *machine_lines(),
             f"- run: {' '.join(sys.argv[1:]) or '(defaults)'}; sections {', '.join(sections)}; "
             f"{args.repeats} calls per sequence in blocks of {args.block}, budget {args.budget:.0f} s per method and "
             f"sequence, seed {args.seed}"]
    with tqdm(total=sum(units[s] for s in sections), unit="call", dynamic_ncols=True) as bar:
        for name in sections:
            try:
                lines += ["", *run[name](args, bar)]
            except Exception as err:  # noqa: BLE001
                lines += ["", f"## {name}", "", error_text(err)]
                traceback.print_exc()
    lines += ["", f"Total time {time.perf_counter() - started:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"written to {args.output}")
    if args.quick or len(sections) < len(SECTIONS):
        print("figures not saved for the documentation, which quotes a full run (every section, without --quick)")
        return
    quote_run(code, load, (time.perf_counter() - started) / 60)
    print(f"figures quoted by the documentation: {save_figures(__file__, QUOTED, varies=QUOTED)}")


if __name__ == "__main__":
    main()
