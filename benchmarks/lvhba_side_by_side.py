r"""LV-HBA's published experiments, their code beside cbo: same machine, same data, splits, seeds and start.

The peer is the code release of LV-HBA (W. Yao, C. Yu, S. Zeng, J. Zhang,
"Constrained Bi-Level Optimization: Proximal Lagrangian Value Function
Approach and Hessian-free Algorithm", ICLR 2024), GitHub
``SUSTech-Optimization/LV-HBA``, which also ships its GAM baseline (S. Xu,
M. Zhu, "Efficient gradient approximation method for constrained bilevel
optimization", AAAI 2023). Experiments:

* ``svm-diabetes``, ``svm-fourclass``: per-sample SVM hyperparameters
  (``Hyperparameter optimization/Linear SVM/...``; :mod:`problems.svm_per_sample`),
  their ``run(seed, epochs=80)``.
* ``cleaning``: data hyper-cleaning on breast-cancer, 40 % flipped labels
  (``.../Data Clean/LV-HBA/LV-HBA.py`` ``run(seed, 80)`` and ``.../GAM/GAM.py``
  ``run(seed)``, 10 steps; :mod:`problems.data_cleaning_svm`).
* ``toy``: the toy problem with a coupled constraint, x in R^100
  (``Toy-example/LLC/LV-HBA.py`` ``fun(1500)``; :mod:`problems.toy_llc`), and
  the effect of cbo's Tikhonov remedy eps/2 ||y||^2 for several eps.

How their code runs. The repository is extracted to a temporary folder (from
``--lvhba``: a clone or a bare git dir; default: the mirror the ``fetch``
tool leaves under /work/.mirror) and each script is executed as it is, in
its own folder, in a subprocess, by a small wrapper (:data:`WRAPPER`) that
calls the script's per-seed function and prints its return value (their
own per-epoch metrics and timings) as JSON. The wrapper changes no step of
their algorithms; what it does:

* ``np.random.seed(s)`` (their per-seed call) also seeds torch: their c0
  (``torch.Tensor(N).uniform_(-6, -5)``) and DataLoader order come from
  torch's generator, which they never seed. cbo starts from the same c0.
* ``.cuda()`` returns the tensor / module unchanged when CUDA is absent (the
  data-cleaning LV-HBA script calls it unconditionally); this machine has no GPU.
* The data-cleaning scripts hard-code gisette (``open("gisette_scale")``,
  5000 features), which the repository does not ship. The wrapper writes
  breast-cancer (labels 2 / 4 as -1 / +1, else their LIBSVM file byte for byte)
  under that name and replaces the two literals of the feature count,
  ``range(1,5001,1)`` and ``feature=5000`` / ``feature = 5000``, by 10.
* Their data-cleaning LV-HBA projects with ECOS at abstol = reltol = feastol
  = 2; on breast-cancer ECOS then declares the (always feasible) projection
  infeasible at the first epoch, ``C.value`` is None and their bare
  ``except: break`` ends the run with no epoch (the table says so, from a run
  as it is). The runs use the ECOS call commented out right under it in
  their script (their SVM scripts' tolerances, abstol = reltol = 2e-3).

These are the only texts it changes, each found with the expected count.

Their dependencies: torch, cvxpy with ECOS (``pip install ecos``; not a
cvxpy dependency since cvxpy 1.6), matplotlib; ``--peer-path`` puts a folder
with extra packages (``pip install --target DIR ecos``) on their path only.

What is compared. Upper level: F = the validation loss sum (their printed
"val loss" is F / 15, reported as such), test accuracy, wall time. Their F
is printed at their iterate (w, b), which is not the lower-level solution for
their c; cbo's F is at the exact inner solution. Note (their code, not
fixed): LV-HBA's update of c, ``model.C.data.add(d1, alpha=-alpha)``, is not
in place, so its c stays at c0 (up to the ECOS tolerance of the projection)
and only (w, b, xi) move; the table gives F at y*(c0) for it too. Their
times are their own ``time_computation`` (from their algorithm's start,
after data loading and problem set-up; their per-epoch evaluation is
inside); cbo's are from the start of ``cbo.minimize`` (set-up: ``build``,
timed apart), its per-step metrics computed after the run. cbo runs twice:
with ``cbo.minimize``'s defaults (only the task's tol, since F is flat at c0)
and with the task's settings. Its curves show every evaluation for Adam, and
for the line-search optimizers the evaluations that lower F (their
iterates; rejected trial points left out).

    python benchmarks/lvhba_side_by_side.py [--experiments svm-diabetes svm-fourclass cleaning toy]
        [--seeds 1 2 3] [--lvhba PATH] [--peer-path DIR]

Writes ``benchmarks/output/lvhba_side_by_side.{md,json}`` and the plots
``docs/img/lvhba_*.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import cbo  # noqa: E402
from fast_path import machine_lines  # noqa: E402
from problems import data_cleaning_svm, svm_per_sample, toy_llc  # noqa: E402
from problems.figures import commit as code_commit, save_figures, slug  # noqa: E402

REPOSITORY = "SUSTech-Optimization/LV-HBA"
MIRROR = Path("/work/.mirror/SUSTech-Optimization+LV-HBA/repo")
OUTPUT = ROOT / "benchmarks" / "output"
IMAGES = ROOT / "docs" / "img"
EPOCHS = 80           # their default epochs for LV-HBA
TOY_ITERATIONS = 1500  # their __main__: fun(1500)
TOY_EPS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-6)
VAL_SCALE = 15.0      # their printed validation loss is F / 15

SVM_DIR = "Hyperparameter optimization/Linear SVM"
CLEAN_DIR = "Hyperparameter optimization/Data Clean"
# The data-cleaning scripts' gisette literals (text, count) and what they become for breast-cancer's 10 features.
BREAST_CANCER_LITERALS = [("range(1,5001,1)", "range(1,11,1)", 1)]
# Their data-cleaning LV-HBA projects with ECOS at abstol = reltol = feastol = 2: on breast-cancer ECOS then calls
# the (always feasible) projection infeasible at the first epoch, C.value is None, and their bare except ends the run
# with no epoch (AS_IS below). The line under it in their script, commented out, has their SVM scripts' tolerances:
LVHBA_CLEANING_ECOS = ("prob.solve(solver='ECOS', abstol=2,reltol=2,max_iters=1800,feastol=2)",
                       "prob.solve(solver='ECOS', abstol=2e-3,reltol=2e-3,max_iters=1000000000, warm_start=True)", 1)

WRAPPER = r'''"""Call one function of an LV-HBA script and print its return value as JSON (cbo's lvhba_side_by_side.py).

argv[1]: JSON {script, function, args, replace: [[old, new, count], ...]}. The script's text is run as it is
but for those replacements. np.random.seed(s) also seeds torch; .cuda() is the identity without CUDA.
"""
import json
import sys
import time

import matplotlib
matplotlib.use("Agg")
import numpy as np
import torch

spec = json.loads(sys.argv[1])
_numpy_seed = np.random.seed


def _seed_numpy_and_torch(seed=None):
    _numpy_seed(seed)
    if seed is not None:
        torch.manual_seed(seed)


np.random.seed = _seed_numpy_and_torch
if not torch.cuda.is_available():
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self

with open(spec["script"], encoding="utf-8") as f:
    source = f.read()
for old, new, count in spec["replace"]:
    if source.count(old) != count:
        sys.exit(f"expected {count} x {old!r} in {spec['script']}, found {source.count(old)}")
    source = source.replace(old, new)
namespace = {"__name__": "lvhba_script", "__file__": spec["script"]}
exec(compile(source, spec["script"], "exec"), namespace)


def plain(value):
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


start = time.perf_counter()
result = namespace[spec["function"]](*spec["args"])
print("@@RESULT@@" + json.dumps(dict(wall=time.perf_counter() - start, result=plain(result))))
'''


# ---------------------------------------------------------------- their code

@dataclass
class Peer:
    """One of their scripts: where it is, which function runs one seed, and how its return value reads."""
    name: str
    script: str
    function: str
    args: Any                      # callable seed -> list of arguments
    fields: tuple[str, ...]        # names of the returned lists
    replace: list = field(default_factory=list)
    data: str | None = None        # a data file the wrapper writes into the script's folder: "breast-cancer"


PEERS: dict[str, list[Peer]] = {
    "svm-diabetes": [Peer("LV-HBA", f"{SVM_DIR}/diabetes/LV-HBA.py", "run", lambda seed: [seed, EPOCHS],
                          ("val_loss", "test_loss", "val_acc", "test_acc", "time", "duration"))],
    "svm-fourclass": [Peer("LV-HBA", f"{SVM_DIR}/fourclass/LV-HBA/LV-HBA.py", "run", lambda seed: [seed, EPOCHS],
                           ("val_loss", "test_loss", "val_acc", "test_acc", "time", "duration"))],
    "cleaning": [
        Peer("LV-HBA", f"{CLEAN_DIR}/LV-HBA/LV-HBA.py", "run", lambda seed: [seed, EPOCHS],
             ("val_loss", "test_loss", "val_acc", "test_acc", "time", "duration"),
             BREAST_CANCER_LITERALS + [("feature = 5000", "feature = 10", 1), LVHBA_CLEANING_ECOS], "breast-cancer"),
        Peer("GAM", f"{CLEAN_DIR}/GAM/GAM.py", "run", lambda seed: [seed],
             ("val_loss", "test_loss", "val_acc", "test_acc", "time"),
             BREAST_CANCER_LITERALS + [("feature=5000", "feature=10", 1)], "breast-cancer"),
    ],
    "toy": [Peer("LV-HBA", "Toy-example/LLC/LV-HBA.py", "fun", lambda seed: [TOY_ITERATIONS],
                 ("log_x_error", "unused", "time"))],
}


def extract_repository(source: Path) -> tuple[Path, str]:
    """Their repository in a new temporary folder, and its commit; ``source`` is a bare git dir or a clone."""
    if not source.exists():
        raise SystemExit(f"LV-HBA's code not found at {source}. Clone it (git clone https://github.com/{REPOSITORY}) "
                         "and pass --lvhba PATH.")
    target = Path(tempfile.mkdtemp(prefix="lvhba_"))
    git_dir = source if (source / "HEAD").exists() and not (source / ".git").exists() else source / ".git"
    commit = subprocess.run(["git", "--git-dir", str(git_dir), "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    archive = subprocess.run(["git", "--git-dir", str(git_dir), "archive", "HEAD"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target, commit


def write_breast_cancer(folder: Path) -> None:
    """breast-cancer_scale with labels -1 / +1, under the name their data-cleaning scripts open."""
    lines = (svm_per_sample.DATA_DIR / svm_per_sample.DATASETS["breast-cancer"]["file"]).read_text().splitlines(True)
    relabel = {"2": "-1", "4": "1"}
    (folder / "gisette_scale").write_text("".join(relabel[line.split(" ", 1)[0]] + " " + line.split(" ", 1)[1]
                                                  for line in lines))


def run_peer(peer: Peer, repository: Path, seed: int, peer_path: str | None) -> dict[str, Any]:
    """Run ``peer`` for one seed in a subprocess; their returned lists by name, and the call's wall time."""
    script = repository / peer.script
    if peer.data == "breast-cancer":
        write_breast_cancer(script.parent)
    (repository / "lvhba_call.py").write_text(WRAPPER)
    spec = dict(script=str(script), function=peer.function, args=peer.args(seed), replace=peer.replace)
    env = dict(os.environ, MPLBACKEND="Agg")
    if peer_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [peer_path, env.get("PYTHONPATH")]))
    completed = subprocess.run([sys.executable, str(repository / "lvhba_call.py"), json.dumps(spec)],
                               cwd=script.parent, env=env, capture_output=True, text=True)
    results = [line for line in completed.stdout.splitlines() if line.startswith("@@RESULT@@")]
    if completed.returncode != 0 or not results:
        raise RuntimeError(f"{peer.name} ({peer.script}) failed for seed {seed}:\n{completed.stderr[-3000:]}")
    payload = json.loads(results[-1][len("@@RESULT@@"):])
    out = dict(zip(peer.fields, payload["result"]), wall=payload["wall"])
    out["time"] = [float(t) for t in out["time"]]
    return out


def check_epochs(peer: Peer, out: dict, expected: int) -> None:
    """The data-cleaning scripts wrap each epoch in ``try: ... except: break``: a silent error ends the run."""
    if len(out["time"]) != expected:
        raise RuntimeError(f"{peer.name} ({peer.script}) returned {len(out['time'])} epochs, expected {expected}: "
                           "an exception inside their epoch loop (caught by their bare except) stopped it.")


def as_is_epochs(seed: int, repository: Path, peer_path: str | None) -> int:
    """Epochs their data-cleaning LV-HBA completes with its own ECOS tolerances (no LVHBA_CLEANING_ECOS)."""
    peer = PEERS["cleaning"][0]
    as_is = Peer(peer.name, peer.script, peer.function, peer.args, peer.fields,
                 [r for r in peer.replace if r is not LVHBA_CLEANING_ECOS], peer.data)
    return len(run_peer(as_is, repository, seed, peer_path)["time"])


def their_c0(n: int, seed: int) -> torch.Tensor:
    """Their c0 for ``seed``: torch.Tensor(n).uniform_(-6, -5) right after the seeding (float32, as theirs)."""
    torch.manual_seed(seed)
    return torch.Tensor(n).uniform_(-6.0, -5.0).double()


# ---------------------------------------------------------------- cbo

# cbo's two configurations: cbo.minimize's defaults (only the task's tol: F is flat at c0) and the task's settings.
CBO_CONFIGS = ("cbo", "cbo, task settings")


def run_cbo(instance, x0: torch.Tensor, config: str) -> dict[str, Any]:
    """cbo.minimize from x0 (one parameter) in ``config`` (:data:`CBO_CONFIGS`); per evaluation the time since the
    start, F and x (metrics computed afterwards). An InnerSolveError or DivergenceError ends the run at the best
    point so far (the table says so)."""
    times, values, points = [], [], []
    start = time.perf_counter()

    def record(step, x, f, grad, info):
        times.append(time.perf_counter() - start)
        values.append(float(f))
        (point,) = [x] if torch.is_tensor(x) else x  # the tasks have one parameter
        points.append(point.detach().clone())

    stop = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if config == "cbo":
                result = cbo.minimize(instance.problem, x0, outer_constraints=instance.outer_constraints,
                                      tol=instance.settings["tol"], progress=False, callback=record)
            else:
                result = instance.minimize(x0=x0, progress=False, callback=record)
            optimizer, x_final, message = result.optimizer, result.x, result.message
        except (cbo.InnerSolveError, cbo.DivergenceError) as error:  # at a trial point with huge |c|: exp(c) overflows
            best = int(np.nanargmin(values))
            optimizer, x_final, message = f"stopped by {type(error).__name__}", points[best], str(error).split(". ")[0]
            stop = f"{type(error).__name__} after {len(values)} evaluations ({message}); best point kept"
    wall = time.perf_counter() - start
    keep = range(len(values)) if optimizer in ("adam", "sgd") else improving(values)
    return dict(time=[times[i] for i in keep], F=[values[i] for i in keep], points=[points[i] for i in keep],
                evaluations=len(values), x=x_final, wall=wall, optimizer=optimizer, message=message, stop=stop,
                warnings=sorted({w.category.__name__ for w in caught} - {"UserWarning"}))


def improving(values: list[float]) -> list[int]:
    """Indices where ``values`` reach a new minimum: a line-search optimizer's iterates, not its trial points."""
    return [i for i, v in enumerate(values) if v < min(values[:i], default=np.inf)]  # a nan is never one


def svm_instance(experiment: str, seed: int):
    if experiment == "cleaning":
        return data_cleaning_svm.build("large", seed)
    return svm_per_sample.build("large", seed, dataset=experiment.split("-", 1)[1])


def cbo_svm(experiment: str, seed: int, config: str) -> dict[str, Any]:
    """cbo on the SVM / cleaning task from their c0; per evaluation F / 15, test and validation accuracy; the
    last entry is the final point."""
    start = time.perf_counter()
    instance = svm_instance(experiment, seed)
    build_time = time.perf_counter() - start
    c0 = their_c0(instance.x0.numel(), seed)
    run = run_cbo(instance, c0, config)
    metrics = [instance.evaluate(x) for x in run["points"] + [run["x"]]]
    at_c0 = instance.evaluate(c0)
    return dict(time=run["time"] + [run["wall"]], val_loss=[m["F"] / VAL_SCALE for m in metrics],
                test_acc=[m["test_accuracy"] for m in metrics], val_acc=[m["val_accuracy"] for m in metrics],
                wall=run["wall"], build=build_time, warnings=run["warnings"], optimizer=run["optimizer"],
                message=run["message"], stop=run["stop"], steps=run["evaluations"],
                at_c0=dict(val_loss=at_c0["F"] / VAL_SCALE, test_acc=at_c0["test_accuracy"],
                           val_acc=at_c0["val_accuracy"]),
                flip_auc=metrics[-1].get("flip_auc"))


def cbo_toy(eps: float, config: str = "cbo") -> dict[str, Any]:
    """cbo on the toy problem (x in R^100) from their start with the Tikhonov weight eps; the last entry is the
    final point."""
    start = time.perf_counter()
    instance = toy_llc.build("large", eps=eps)
    build_time = time.perf_counter() - start
    run = run_cbo(instance, instance.x0, config)
    x_star = instance.reference["x_star"]
    errors = [float(np.linalg.norm(x.numpy() - x_star) / np.linalg.norm(x_star)) for x in run["points"] + [run["x"]]]
    regularized = toy_llc.solution(eps)["t"] if eps > 0 else float("nan")
    return dict(time=run["time"] + [run["wall"]], x_error=errors, F=instance.evaluate(run["x"])["F"],
                wall=run["wall"], build=build_time, steps=run["evaluations"], warnings=run["warnings"],
                optimizer=run["optimizer"], F_star=instance.reference["F_star"],
                x_error_vs_regularized=float(np.abs(run["x"].numpy() - regularized).max()) if eps > 0 else None)


# ---------------------------------------------------------------- experiments

def svm_experiment(experiment: str, seeds, repository: Path, peer_path: str | None) -> dict[str, Any]:
    """Per seed: each of their scripts, then cbo (interleaved, so that machine noise hits both)."""
    runs: dict[str, dict[int, dict]] = {name: {} for name in [p.name for p in PEERS[experiment]] + list(CBO_CONFIGS)}
    for seed in seeds:
        for peer in PEERS[experiment]:
            out = run_peer(peer, repository, seed, peer_path)
            check_epochs(peer, out, EPOCHS if peer.name == "LV-HBA" else 10)
            runs[peer.name][seed] = out
            print(f"{experiment} seed {seed} {peer.name}: {out['time'][-1]:.2f} s, val loss {out['val_loss'][-1]:.3f}, "
                  f"test acc {out['test_acc'][-1]:.3f}", flush=True)
        for config in CBO_CONFIGS:
            c = runs[config][seed] = cbo_svm(experiment, seed, config)
            print(f"{experiment} seed {seed} {config} ({c['optimizer']}): {c['time'][-1]:.2f} s, val loss "
                  f"{c['val_loss'][-1]:.3f}, test acc {c['test_acc'][-1]:.3f}{'; ' + c['stop'] if c['stop'] else ''}",
                  flush=True)
    return runs


def toy_experiment(seeds, repository: Path, peer_path: str | None) -> dict[str, Any]:
    """Their fun(1500) and cbo at eps = toy_llc.EPS, once per seed (the problem is deterministic: timing repeats);
    then cbo for each eps of TOY_EPS and at eps = 0."""
    (peer,) = PEERS["toy"]
    runs: dict[str, Any] = {"LV-HBA": {}, **{config: {} for config in CBO_CONFIGS}}
    for seed in seeds:
        out = run_peer(peer, repository, seed, peer_path)
        out["x_error"] = [float(np.exp(v)) for v in out["log_x_error"]]
        runs["LV-HBA"][seed] = out
        for config in CBO_CONFIGS:
            runs[config][seed] = cbo_toy(toy_llc.EPS, config)
        print(f"toy run {seed}: LV-HBA {out['time'][-1]:.2f} s, x error {out['x_error'][-1]:.2e}; cbo "
              f"{runs['cbo'][seed]['time'][-1]:.3f} s, x error {runs['cbo'][seed]['x_error'][-1]:.2e}", flush=True)
    runs["eps"] = {eps: cbo_toy(eps) for eps in TOY_EPS + (0.0,)}
    return runs


# ---------------------------------------------------------------- tables and plots

def _mean(values) -> float:
    return float(np.mean(values))


def _mean_or_none(values):
    return None if any(v is None for v in values) else _mean(values)


def _fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _time_to(run: dict, key: str, target: float) -> float | None:
    """The first time at which ``run[key]`` is at or below ``target`` (None: never)."""
    return next((t for t, v in zip(run["time"], run[key]) if v <= target), None)


SVM_COLUMNS = {  # the columns of svm_table after seed and method: name, format
    "F15": ".3f", "F15_exact": ".3f", "test_acc": ".3f", "val_acc": ".3f", "evaluations": ".0f", "seconds": ".2f",
    "reach_defaults": ".3f", "reach_task": ".3f"}


def svm_rows(runs: dict) -> list[dict[str, Any]]:
    """Per seed and on average, per method: final F / 15 (theirs as printed; F / 15 at y*(c) for cbo, and at
    y*(c0) for LV-HBA, whose c stays c0), test and validation accuracy, evaluations, wall time, and for a peer the
    time each cbo configuration took to reach its final F / 15 (None: never, or not a peer)."""
    rows, per_method = [], {name: [] for name in runs}
    for seed, ours in runs["cbo"].items():
        for name in runs:
            r = runs[name][seed]
            final = r["val_loss"][-1]
            exact = final if name in CBO_CONFIGS else ours["at_c0"]["val_loss"] if name == "LV-HBA" else None
            reach = [None] * 2 if name in CBO_CONFIGS else [_time_to(runs[c][seed], "val_loss", final)
                                                            for c in CBO_CONFIGS]
            row = dict(seed=seed, method=name, label=f"{name} ({r['optimizer']})" if name in CBO_CONFIGS else name,
                       optimizer=r.get("optimizer"),
                       F15=final, F15_exact=exact, test_acc=r["test_acc"][-1], val_acc=r["val_acc"][-1],
                       evaluations=r["steps"] if name in CBO_CONFIGS else len(r["time"]), seconds=r["time"][-1],
                       reach_defaults=reach[0], reach_task=reach[1])
            rows.append(row)
            per_method[name].append(row)
    for name, seeds in per_method.items():
        rows.append(dict(seed="mean", method=name, label=f"**{name}**",
                         **{column: _mean_or_none([row[column] for row in seeds]) for column in SVM_COLUMNS}))
    return rows


def svm_table(runs: dict) -> list[str]:
    """The rows of :func:`svm_rows` as a markdown table, and cbo's early stops."""
    lines = ["| seed | method | F/15 (their 'val loss') | F/15 at y*(c) | test acc | val acc | evaluations | time (s) "
             "| time for cbo to reach this F/15 (s): defaults; task settings |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in svm_rows(runs):
        cells = [_fmt(row[column], spec) for column, spec in SVM_COLUMNS.items()]
        reach = "" if row["method"] in CBO_CONFIGS else f"{cells[6]}; {cells[7]}"
        lines.append(f"| {row['seed']} | {row['label']} | {' | '.join(cells[:6])} | {reach} |")
    stops = [f"{name}, seed {seed}: {r['stop']}" for name in CBO_CONFIGS for seed, r in runs[name].items() if r["stop"]]
    return lines + ([""] + [f"- {stop}" for stop in stops] if stops else [])


def svm_figures(experiment: str, runs: dict) -> dict[str, str]:
    """The table's cells as figures, "<experiment>.<seed or mean>.<method>.<column>", and what the page derives
    from them: LV-HBA's mean time over cbo's (task settings), the range of LV-HBA's F / 15 at y*(c0) over its
    printed F / 15 (SVM tasks), the number of cbo's early stops."""
    rows, prefix = svm_rows(runs), slug(experiment)
    figures = {f"{prefix}.{row['seed']}.{slug(row['method'])}.{column}": _fmt(row[column], spec)
               for row in rows for column, spec in SVM_COLUMNS.items()
               if not (column.startswith("reach") and row["method"] in CBO_CONFIGS)}
    figures.update({f"{prefix}.{row['seed']}.{slug(row['method'])}.optimizer": slug(row["optimizer"])
                    for row in rows if row["method"] in CBO_CONFIGS and row["seed"] != "mean"})
    means = {row["method"]: row for row in rows if row["seed"] == "mean"}
    figures[f"{prefix}.speedup_task"] = f"{means['LV-HBA']['seconds'] / means['cbo, task settings']['seconds']:.0f}×"
    if experiment.startswith("svm"):  # F / 15 > 0 there, so the ratio reads as "times"
        ratios = [row["F15_exact"] / row["F15"] for row in rows if row["method"] == "LV-HBA" and row["seed"] != "mean"]
        figures[f"{prefix}.lvhba_exact_over_printed_min"] = f"{min(ratios):.1f}"
        figures[f"{prefix}.lvhba_exact_over_printed_max"] = f"{max(ratios):.1f}"
    figures[f"{prefix}.cbo_stops"] = str(sum(1 for name in CBO_CONFIGS for r in runs[name].values() if r["stop"]))
    return figures


def cleaning_checks(runs: dict, as_is: int) -> dict[str, Any]:
    """The data-cleaning checks: GAM's first F/15 and cbo's F(c0)/15 per seed (same split, flips and c0), the
    epochs their LV-HBA completes as it is, the flip AUC of each cbo configuration per seed."""
    seeds = list(runs["cbo"])
    return dict(first=[(runs["GAM"][s]["val_loss"][0], runs["cbo"][s]["at_c0"]["val_loss"]) for s in seeds],
                seed=seeds[0], as_is=as_is,
                flip_auc={config: [r["flip_auc"] for r in runs[config].values()] for config in CBO_CONFIGS})


def cleaning_notes(checks: dict[str, Any]) -> list[str]:
    """:func:`cleaning_checks` as the lines under the data-cleaning table."""
    same = ", ".join(f"{gam:.5f} vs {ours:.5f}" for gam, ours in checks["first"])
    auc = [f"- {config}: flip AUC (P(c_i < c_j), i flipped, j clean; 0.5 = no detection) per seed "
           + ", ".join(f"{value:.3f}" for value in values) for config, values in checks["flip_auc"].items()]
    return [f"- GAM's first F/15 (at y*(c0), by ECOS) vs cbo's F(c0)/15, per seed: {same}",
            f"- their data-cleaning LV-HBA as it is (ECOS at abstol = reltol = feastol = 2) completed "
            f"{checks['as_is']} epochs for seed {checks['seed']}; the runs above use the ECOS call commented out "
            "under it (abstol = reltol = 2e-3)", *auc, ""]


def cleaning_figures(checks: dict[str, Any]) -> dict[str, str]:
    """:func:`cleaning_checks` as figures: the largest difference of the first F/15, the epochs as it is, the
    flip AUCs "cleaning.flip_auc.<config>.<seed index from 1>"."""
    figures = {"cleaning.c0_agreement": f"{max(abs(gam - ours) for gam, ours in checks['first']):.0e}",
               "cleaning.as_is_epochs": str(checks["as_is"])}
    for config, values in checks["flip_auc"].items():
        figures.update({f"cleaning.flip_auc.{slug(config)}.{i}": f"{v:.3f}" for i, v in enumerate(values, 1)})
    return figures


TOY_COLUMNS = {"final": ".2e", "best": ".2e", "iterations": "d", "seconds": ".3f", "reach": ".3f"}
EPS_COLUMNS = {"final": ".2e", "vs_closed_form": ".1e", "F_gap": ".2e", "evaluations": "d", "seconds": ".3f"}


def toy_rows(runs: dict) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per run, their fun(1500) and each cbo configuration (final and best ||x - x*|| / ||x*||, iterations, time,
    cbo's time to LV-HBA's best error); per Tikhonov weight eps, cbo's final error, its distance to the closed
    form t(eps) e, F - F*, evaluations, time and warnings."""
    rows = []
    for seed, theirs in runs["LV-HBA"].items():
        rows.append(dict(seed=seed, method="LV-HBA", label="LV-HBA", final=theirs["x_error"][-1],
                         best=min(theirs["x_error"]), iterations=len(theirs["time"]), seconds=theirs["time"][-1],
                         reach=None))
        for config in CBO_CONFIGS:
            ours = runs[config][seed]
            rows.append(dict(seed=seed, method=config, label=f"{config} ({ours['optimizer']}), eps = {toy_llc.EPS:g}",
                             optimizer=ours["optimizer"],
                             final=ours["x_error"][-1], best=min(ours["x_error"]), iterations=ours["steps"],
                             seconds=ours["time"][-1], reach=_time_to(ours, "x_error", min(theirs["x_error"]))))
    eps_rows = [dict(eps=eps, final=r["x_error"][-1], vs_closed_form=r["x_error_vs_regularized"],
                     F_gap=r["F"] - r["F_star"], evaluations=r["steps"], seconds=r["time"][-1],
                     warnings=", ".join(r["warnings"]) or "-") for eps, r in runs["eps"].items()]
    return rows, eps_rows


def toy_tables(runs: dict) -> list[str]:
    """The rows of :func:`toy_rows` as two markdown tables."""
    rows, eps_rows = toy_rows(runs)
    lines = ["| run | method | final ‖x − x*‖ / ‖x*‖ | best on the way | iterations | time (s) "
             "| cbo's time to LV-HBA's best error (s) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        reach = "" if row["method"] == "LV-HBA" else _fmt(row["reach"])
        lines.append(f"| {row['seed']} | {row['label']} | "
                     + " | ".join(_fmt(row[c], spec) for c, spec in TOY_COLUMNS.items() if c != "reach")
                     + f" | {reach} |")
    lines += ["", "| eps | final ‖x − x*‖ / ‖x*‖ | max abs(x − t(eps) e), closed form | F − F* "
              "| evaluations | time (s) | warnings |", "|---|---|---|---|---|---|---|"]
    for row in eps_rows:
        lines.append(f"| {row['eps']:g} | " + " | ".join(_fmt(row[c], spec) for c, spec in EPS_COLUMNS.items())
                     + f" | {row['warnings']} |")
    return lines


def toy_figures(runs: dict) -> dict[str, str]:
    """The tables' cells as figures, "toy.<run>.<method>.<column>" and "toy.eps_<eps>.<column>" (eps as in
    1e_04), and what the page derives from them: the iteration of LV-HBA's best error, cbo's final error over eps
    (the regularization's bias, per eps and its range)."""
    rows, eps_rows = toy_rows(runs)
    figures = {f"toy.{row['seed']}.{slug(row['method'])}.{column}": _fmt(row[column], spec)
               for row in rows for column, spec in TOY_COLUMNS.items()}
    figures.update({f"toy.{row['seed']}.{slug(row['method'])}.optimizer": slug(row["optimizer"])
                    for row in rows if row["method"] in CBO_CONFIGS})
    bias = {}
    for row in eps_rows:
        key = "toy.eps_" + slug(f"{row['eps']:.0e}")
        figures.update({f"{key}.{column}": _fmt(row[column], spec) for column, spec in EPS_COLUMNS.items()})
        figures[f"{key}.warnings"] = row["warnings"].replace(", ", "+") if row["warnings"] != "-" else "none"
        if row["eps"] > 0:
            bias[key] = row["final"] / row["eps"]
            figures[f"{key}.bias_over_eps"] = f"{bias[key]:.2f}"
    figures["toy.bias_over_eps_min"], figures["toy.bias_over_eps_max"] = (f"{min(bias.values()):.2f}",
                                                                        f"{max(bias.values()):.2f}")
    first = next(iter(runs["LV-HBA"].values()))
    figures["toy.lvhba_best_iteration"] = str(int(np.argmin(first["x_error"])) + 1)
    return figures


def varying(figures: dict[str, str]) -> list[str]:
    """The figures that change from run to run: times (their scripts' and cbo's) and the run's own details."""
    return [key for key in figures if key.split(".")[-1] in ("seconds", "reach_defaults", "reach_task", "reach")
            or ".speedup" in key or key.startswith("run.")]


COLORS = {"cbo": "tab:blue", "cbo, task settings": "tab:purple", "LV-HBA": "tab:orange", "GAM": "tab:green"}
MACHINE = "2-core Intel Xeon, no GPU"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_svm(experiment: str, runs: dict, path: Path) -> None:
    """F / 15 and test accuracy against wall time, one line per seed and method."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, per_seed in runs.items():
        for i, r in enumerate(per_seed.values()):
            label = name if i == 0 else None
            axes[0].plot(r["time"], r["val_loss"], color=COLORS[name], marker=".", ms=3, lw=1, label=label)
            axes[1].plot(r["time"], r["test_acc"], color=COLORS[name], marker=".", ms=3, lw=1, label=label)
    axes[0].set_ylabel("upper-level objective F / 15 (val loss)")
    axes[1].set_ylabel("test accuracy")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel(f"wall time (s), {MACHINE}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{experiment}: LV-HBA's code vs cbo, seeds {', '.join(map(str, runs['cbo']))}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_toy(runs: dict, path: Path) -> None:
    """||x - x*|| / ||x*|| against wall time: their fun(1500) and cbo at eps = EPS; the eps study beside it."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in ("LV-HBA", *CBO_CONFIGS):
        for i, r in enumerate(runs[name].values()):
            label = (name if name == "LV-HBA" else f"{name}, eps = {toy_llc.EPS:g}") if i == 0 else None
            axes[0].plot(r["time"], r["x_error"], color=COLORS[name], lw=1,
                         marker=None if name == "LV-HBA" else ".", label=label)
    axes[0].set_yscale("log")
    axes[0].set_xscale("log")
    axes[0].set_xlabel(f"wall time (s), {MACHINE}")
    axes[0].set_ylabel("‖x − x*‖ / ‖x*‖")
    eps = [e for e in runs["eps"] if e > 0]
    axes[1].loglog(eps, [runs["eps"][e]["x_error"][-1] for e in eps], "o", color=COLORS["cbo"], label="cbo")
    axes[1].loglog(eps, [abs(toy_llc.solution(e)["t"] - toy_llc.X_STAR) / abs(toy_llc.X_STAR) for e in eps], "k--",
                   lw=1, label="closed form |t(eps) + 0.3| / 0.3")
    axes[1].set_xlabel("Tikhonov weight eps")
    axes[1].set_ylabel("final ‖x − x*‖ / ‖x*‖")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("LV-HBA's toy problem with a coupled constraint (x in R^100)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plain_runs(runs):
    """The runs without tensors, for the JSON file."""
    if isinstance(runs, dict):
        return {str(k): plain_runs(v) for k, v in runs.items() if k not in ("points", "x")}
    if isinstance(runs, (list, tuple)):
        return [plain_runs(v) for v in runs]
    return runs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", nargs="+", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--lvhba", type=Path, default=MIRROR, help="their repository: a clone or a bare git dir")
    parser.add_argument("--peer-path", default=None, help="extra packages for their code only (e.g. ecos)")
    parser.add_argument("--name", default="lvhba_side_by_side", help="stem of the output files")
    parser.add_argument("--code", default=None, help="which cbo code ran, for the header (e.g. 'archive of 1a2b3c4')")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="You are solving a parameterized problem that is not DPP")  # evaluate()

    repository, commit = extract_repository(args.lvhba)
    code, their_seconds = code_commit(), []
    head = [f"# LV-HBA's experiments side by side with cbo", "",
            f"- their code: github.com/{REPOSITORY} at commit {commit}, run by the wrapper of "
            "benchmarks/lvhba_side_by_side.py", *machine_lines(),
            "- cbo: cbo.minimize's defaults with the task's tol (row 'cbo'), and the task's settings (row 'cbo, task "
            f"settings': {svm_per_sample.SIZES['large']['settings']} for the SVM tasks, "
            f"{toy_llc.SIZES['large']['settings']} for the toy); in brackets the optimizer that ran",
            "- command: python benchmarks/lvhba_side_by_side.py " + " ".join(sys.argv[1:] if argv is None else argv),
            *([f"- cbo code: {args.code} ({Path(cbo.__file__).parent})"] if args.code else []),
            ""]
    lines, record = list(head), dict(commit=commit, machine=machine_lines(), experiments={})
    figures = {"run.their_commit": commit, "run.commit": code, "run.load": f"{os.getloadavg()[0]:.1f}"}
    try:
        for experiment in args.experiments:
            if experiment == "toy":
                runs = toy_experiment(args.seeds, repository, args.peer_path)
                lines += [f"## {experiment}", "", *toy_tables(runs), ""]
                figures.update(toy_figures(runs))
                plot_toy(runs, IMAGES / "lvhba_toy.png")
            else:
                runs = svm_experiment(experiment, args.seeds, repository, args.peer_path)
                lines += [f"## {experiment}", "", *svm_table(runs), ""]
                figures.update(svm_figures(experiment, runs))
                their_seconds += [r["time"][-1] for peer in PEERS[experiment] for r in runs[peer.name].values()]
                if experiment == "cleaning":
                    checks = cleaning_checks(runs, as_is_epochs(args.seeds[0], repository, args.peer_path))
                    lines += cleaning_notes(checks)
                    figures.update(cleaning_figures(checks))
                plot_svm(experiment, runs, IMAGES / f"lvhba_{experiment.replace('-', '_')}.png")
            record["experiments"][experiment] = plain_runs(runs)
            print("\n".join(lines[-40:]), flush=True)
    finally:
        shutil.rmtree(repository, ignore_errors=True)
    OUTPUT.mkdir(exist_ok=True)
    (OUTPUT / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (OUTPUT / f"{args.name}.json").write_text(json.dumps(record, indent=1, default=float))
    print(f"wrote {OUTPUT / args.name}.md/.json and the plots in {IMAGES}")
    if args.experiments != parser.get_default("experiments") or args.seeds != parser.get_default("seeds"):
        print("figures not saved for the documentation, which quotes a run of every experiment and seed")
        return
    figures["run.their_seconds_min"], figures["run.their_seconds_max"] = (f"{min(their_seconds):.1f}",
                                                                        f"{max(their_seconds):.1f}")
    print(f"figures quoted by the documentation: {save_figures(__file__, figures, varying(figures))}")


if __name__ == "__main__":
    main()
