r"""Per-sample SVM hyperparameters: the linear-SVM experiment of LV-HBA (Yao et al., ICLR 2024).

One weight c_i per training point of a squared-hinge linear SVM, written with
coupled (upper- and lower-level) constraints, tuned on a validation set:

.. math::

    (w^*, b^*, \xi^*)(c) = \operatorname*{argmin}_{w, b, \xi}
        \tfrac12 \lVert w\rVert^2 + \tfrac12 \textstyle\sum_i e^{c_i} \xi_i^2
        \quad \text{s.t.} \quad 1 - \xi_i - y_i (z_i^\top w + b) \le 0, \quad i = 1..N,

    \min_c \; F(c) = \textstyle\sum_{j \in \text{val}}
        \operatorname{LeakyReLU}\bigl(2\,\sigma(-5\, y_j (z_j^\top w^* + b^*) / \lVert w^*\rVert) - 1\bigr),

with sigma the logistic sigmoid and LeakyReLU of negative slope 0.01 (torch's
default): a smooth surrogate of the validation 0-1 loss on the normalized
margin, about 1 per misclassified point, about -0.01 per well-classified one.
There is no constraint on c and no xi >= 0 (at the solution
xi_i = max(0, 1 - y_i (z_i^T w + b)) anyway).

Source: SUSTech-Optimization/LV-HBA on GitHub,
``Hyperparameter optimization/Linear SVM/diabetes/LV-HBA.py`` and
``.../fourclass/LV-HBA/LV-HBA.py`` (class ``LinearSVM``: ``loss_lower``,
``loss_upper``, ``constrain_values``; function ``run``). Same here:

* the inner objective, constraints and outer F (their ``loss_upper`` summed
  over the validation set; their hypergradient step weights it by
  c_k = 1/sqrt(k+1), which is a property of their algorithm, not of F);
* the data: the LIBSVM files they ship (``diabetes_scale``, 768 x 8, and
  ``fourclass_scale``, 862 x 2, features already scaled to [-1, 1] by LIBSVM;
  their code does no further scaling), copied to ``problems/data/``;
* the split: rows [z, y] shuffled by ``np.random.seed(seed);
  np.random.shuffle``, then 500 train / 150 validation / the rest test (118
  for diabetes, 212 for fourclass); their driver runs seeds 1..39;
* c0 ~ U(-6, -5) elementwise; accuracy counts y_j (z_j^T w + b) > 0.

Differences, all deliberate:

* c0 is drawn with ``np.random.default_rng(seed)``. Theirs comes from
  ``torch.Tensor(N).uniform_(-6, -5)`` with torch's generator never seeded,
  so their c0 cannot be reproduced.
* Their sparse-line parser reads positional fields, not ``index:value``: on
  the 7 fourclass lines where LIBSVM omits a zero first feature (e.g.
  ``+1 2:0.54386``) it stores (0.54386, 0) instead of (0, 0.54386).
  :func:`load` parses ``index:value`` (``reference_parser=True`` reproduces
  theirs). Every diabetes line lists all 8 features, so diabetes is unaffected.
* The losses they print are ``sum / 15`` on validation and ``sum / 11.8`` on
  test (10 x the mean for diabetes's 150 / 118 points; the fourclass script
  keeps / 11.8 for its 212 test points). :func:`build`'s ``evaluate`` reports
  10 x the mean for both splits (equal to theirs on diabetes at the large size)
  and F itself.
* Float64 and exact inner solutions (implicit differentiation) instead of
  their float32 single-loop LV-HBA iterates. Note that their update of c,
  ``model.C.data.add(d1, alpha=-alpha)``, is not in place, and the projection
  that follows (``prob.solve``, onto the constraint set, in which c is free)
  returns c unchanged up to the ECOS tolerance: in the published scripts c
  stays at c0 and only (w, b, xi) are trained.

**DPP variant** (``build(..., dpp=True)``). ``exp(c)`` makes the inner problem
non-DPP (cvxpy re-canonicalizes it at each solve; cbo differentiates it all
the same). ``dpp=True`` takes the parameter ``C = cp.Parameter(N, nonneg=True)``
standing for exp(c), objective ``1/2 ||w||^2 + 1/2 sum_i C_i xi_i^2``: its
parameter value is exp(c), not c (x0 = exp(c0), ``evaluate`` takes C), and
dF/dc = exp(c) * dF/dC. The DPP problem is an inner QP, for which cbo has a
compiled path. Steps in C are badly scaled (c0 = -6..-5 means C ~ 0.003, and
the interesting range spans decades), so ``cbo.minimize`` on the DPP variant
needs a small learning rate and the bound C >= ``C_MIN``; prefer the c form
for optimization.

**Sizes.** ``large``: their split and sizes exactly. ``small``: the first 60
training and the first 30 validation points of the same shuffled split, the
same test set (a test of seconds).

**Flat start.** At c0 ~ U(-6, -5) the weights e^c ~ 0.004 are so small
that the exact inner solution has ||w*|| ~ 0.06 and |b*| / ||w*|| large:
every point is classified by the sign of b* (the majority class), each
sigmoid saturates and F is flat (hypergradient ~1e-7 at the small size,
below the driver's default tol of 1e-6; ``settings`` has tol = 1e-10). Their
iterates never see this: w starts at 1 and moves by steps of 0.01.

**Reference.** The LV-HBA repository's README has no numbers, and the paper
reports this experiment as curves (loss and accuracy against time), not as
a table: ``reference["paper"]`` is None. ``reference["at_x0"]`` holds the
metrics at c0 with the exact inner solution. Measured here (seed 1,
``settings``, 80 Adam steps, method "cg"): diabetes F 43.53 -> 7.03, test
accuracy 0.644 -> 0.763 (72 s on 2 cores); fourclass F 20.91 -> 17.89, test
accuracy 0.788 -> 0.797 (6 s). ``settings`` now leave the method to cbo (the
QP fast path: c enters only through exp(c), lifted to a parameter), about
5 ms per hypergradient at the large size instead of 3.4 s with "cg".
``benchmarks/lvhba_side_by_side.py`` runs their scripts beside cbo
(``docs/experiments.md``).

**Data hyper-cleaning** (``corruption`` > 0, :mod:`problems.data_cleaning_svm`):
the same problem on LIBSVM's breast-cancer (``dataset="breast-cancer"``,
683 x 10) with training labels flipped as in their GAM and LV-HBA scripts.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cvxpy as cp
import numpy as np
import torch

import cbo

from . import Instance

__all__ = ["build", "load", "split", "outer_loss", "inner_solution", "DATASETS", "SIZES", "SPLIT", "C0_RANGE",
           "LEAKY_SLOPE", "C_MIN", "DATA_DIR"]

DATA_DIR = Path(__file__).resolve().parent / "data"
# LIBSVM files (https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary.html), see data/README.md.
DATASETS: dict[str, dict[str, Any]] = {
    "diabetes": dict(file="diabetes_scale.txt", n_features=8, n_rows=768),
    "fourclass": dict(file="fourclass_scale.txt", n_features=2, n_rows=862),
    # labels 2 (benign) / 4 (malignant) in the file, read as -1 / +1
    "breast-cancer": dict(file="breast-cancer_scale.txt", n_features=10, n_rows=683, labels={2.0: -1.0, 4.0: 1.0}),
}
SPLIT = (500, 150)          # their train / validation sizes; the rest is the test set
C0_RANGE = (-6.0, -5.0)     # c0 ~ U(-6, -5), as model.C.data.uniform_(-6.0, -5.0)
LEAKY_SLOPE = 0.01          # torch.nn.LeakyReLU() default negative slope
MARGIN_SCALE = 5.0          # sigmoid(-5 y f / ||w||)
LOSS_REPORT_SCALE = 10.0    # reported losses: 10 x the mean (their sum / 15 on 150 validation points)
C_MIN = math.exp(-15.0)     # lower bound on C = exp(c) for cbo.minimize on the DPP variant

_SETTINGS = dict(optimizer="adam", tol=1e-10)  # tol: F is flat at c0 (module docstring)
SIZES: dict[str, dict[str, Any]] = {
    "small": dict(n_train=60, n_val=30, settings=dict(_SETTINGS, lr=0.1, steps=30),
                  dpp_settings=dict(_SETTINGS, lr=3e-4, steps=30)),
    "large": dict(n_train=500, n_val=150, settings=dict(_SETTINGS, lr=0.1, steps=80),
                  dpp_settings=dict(_SETTINGS, lr=3e-4, steps=80)),
}


# ---------------------------------------------------------------- data

def load(dataset: str = "diabetes", path: str | Path | None = None,
         reference_parser: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Features Z (n, d) and labels y in {-1, +1} from a LIBSVM-format file.

    ``dataset``: "diabetes", "fourclass" or "breast-cancer" (the files in
    ``problems/data/``; breast-cancer's labels 2 / 4 are read as -1 / +1),
    or any name with ``path`` given (then d is the largest index in the file).
    Omitted features are 0 (LIBSVM's sparse format). ``reference_parser=True``
    reads fields by position as the LV-HBA scripts do (see the module
    docstring): it differs only on lines that omit a feature.
    """
    if path is None:
        if dataset not in DATASETS:
            raise ValueError(f"Unknown dataset {dataset!r}; choose one of {sorted(DATASETS)} or pass path=.")
        path = DATA_DIR / DATASETS[dataset]["file"]
    n_features = DATASETS[dataset]["n_features"] if dataset in DATASETS else None
    labels, rows = [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            labels.append(float(fields[0]))
            rows.append({int(k): float(v) for k, v in (f.split(":", 1) for f in fields[1:])})
        except ValueError as error:
            raise ValueError(f"{path}:{number}: not a LIBSVM line ({error}): {line!r}") from None
    d = n_features or max((max(r, default=0) for r in rows), default=0)
    Z = np.zeros((len(rows), d))
    for i, row in enumerate(rows):
        if reference_parser:  # positional, as `line2[i].split(':')[1] if line2[i] != '' else 0`
            values = list(row.values())
            Z[i, :len(values)] = values[:d]
        else:
            for k, v in row.items():
                if not 1 <= k <= d:
                    raise ValueError(f"{path}: feature index {k} outside 1..{d}.")
                Z[i, k - 1] = v
    relabel = DATASETS.get(dataset, {}).get("labels", {})
    y = np.asarray([relabel.get(label, label) for label in labels])
    if not np.all(np.isin(y, (-1.0, 1.0))):
        raise ValueError(f"{path}: labels must be -1 or +1, got {sorted(set(y.tolist()))}.")
    return Z, y


def split(Z: np.ndarray, y: np.ndarray, seed: int = 1, n_train: int = SPLIT[0],
          n_val: int = SPLIT[1], corruption: float = 0.0) -> dict[str, np.ndarray]:
    """Their split: rows [z, y] shuffled by ``np.random.seed(seed); np.random.shuffle``, then train / val / rest.

    ``n_train`` and ``n_val`` below 500 / 150 take the first points of their
    train and validation parts; the test set is always their test set.
    ``corruption`` > 0 flips training labels as their data hyper-cleaning
    scripts do: after the shuffle, for each of the 500 training points in
    turn, ``y_i *= np.random.choice([-1, 1], p=[corruption, 1 - corruption])``
    (the same generator). Adds ``y_train_clean`` and the mask ``flipped``.
    """
    if not (0 < n_train <= SPLIT[0] and 0 < n_val <= SPLIT[1]):
        raise ValueError(f"n_train={n_train}, n_val={n_val} must be in 1..{SPLIT[0]} and 1..{SPLIT[1]}.")
    if not 0.0 <= corruption < 0.5:
        raise ValueError(f"corruption={corruption} must be in [0, 0.5): at 0.5 or more the labels carry no signal.")
    data_array = np.column_stack([Z, y]).astype(float)
    generator = np.random.RandomState(seed)  # = np.random.seed(seed): the shuffle, then the flips
    generator.shuffle(data_array)
    n1, n2 = SPLIT
    signs = np.array([generator.choice([-1, 1], p=[corruption, 1 - corruption]) for _ in range(n1)]) \
        if corruption > 0 else np.ones(n1, dtype=int)
    parts = dict(train=data_array[:n1][:n_train], val=data_array[n1:n1 + n2][:n_val], test=data_array[n1 + n2:])
    out: dict[str, np.ndarray] = {}
    for name, part in parts.items():
        out[f"Z_{name}"], out[f"y_{name}"] = part[:, :-1].copy(), part[:, -1].copy()
    out["y_train_clean"], out["flipped"] = out["y_train"].copy(), signs[:n_train] < 0
    out["y_train"] = out["y_train"] * signs[:n_train]
    return out


# ---------------------------------------------------------------- the bilevel problem

def outer_loss(w: torch.Tensor, b: torch.Tensor, Z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_j LeakyReLU(2 sigmoid(-5 y_j (z_j^T w + b) / ||w||) - 1), slope 0.01: their ``loss_upper``."""
    margin = y * (Z @ w + b) / torch.linalg.norm(w)
    return torch.nn.functional.leaky_relu(2 * torch.sigmoid(-MARGIN_SCALE * margin) - 1,
                                          negative_slope=LEAKY_SLOPE).sum()


def build(size: str = "small", seed: int = 1, dataset: str = "diabetes", dpp: bool = False,
          corruption: float = 0.0) -> Instance:
    """The per-sample SVM task (module docstring) on ``dataset`` at ``size`` with their split for ``seed``.

    ``corruption`` flips training labels as in their data hyper-cleaning
    experiment (:func:`split`; :mod:`problems.data_cleaning_svm`).

    The parameter is c (``dpp=False``, objective term
    ``0.5 * cp.sum(cp.multiply(cp.exp(c), cp.square(xi)))``) or C = exp(c)
    (``dpp=True``, ``cp.Parameter(N, nonneg=True)``); ``x0`` is c0 or exp(c0).
    ``evaluate(x)`` (x: the parameter's value) returns ``F``, ``val_loss``,
    ``test_loss`` (10 x mean), ``val_accuracy``, ``test_accuracy``, ``w``, ``b``.
    ``data``: the splits, ``c0``, ``dataset``, ``dpp``.
    """
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}; choose one of {sorted(SIZES)}.")
    config = SIZES[size]
    Z, y = load(dataset)
    data: dict[str, Any] = split(Z, y, seed, config["n_train"], config["n_val"], corruption)
    Z_train, y_train = data["Z_train"], data["y_train"]
    n, d = Z_train.shape
    c0 = np.random.default_rng(seed).uniform(*C0_RANGE, size=n)

    w, b, xi = cp.Variable(d, name="w"), cp.Variable(name="b"), cp.Variable(n, name="xi")
    if dpp:
        param = cp.Parameter(n, nonneg=True, name="C")
        weights = param
    else:
        param = cp.Parameter(n, name="c")
        weights = cp.exp(param)
    objective = 0.5 * cp.sum_squares(w) + 0.5 * cp.sum(cp.multiply(weights, cp.square(xi)))
    constraints = [1 - xi - cp.multiply(y_train, Z_train @ w + b) <= 0]
    inner = cp.Problem(cp.Minimize(objective), constraints)

    Z_val, y_val = torch.as_tensor(data["Z_val"]), torch.as_tensor(data["y_val"])

    def outer(x_t: torch.Tensor, w_t: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
        return outer_loss(w_t, b_t, Z_val, y_val)

    problem = cbo.BilevelProblem(inner, parameters=[param], variables=[w, b], outer=outer)

    def evaluate(x) -> dict[str, Any]:
        w_x, b_x = inner_solution(problem, x)
        metrics: dict[str, Any] = {}
        for name in ("val", "test"):
            Z_s, y_s = torch.as_tensor(data[f"Z_{name}"]), torch.as_tensor(data[f"y_{name}"])
            total = float(outer_loss(torch.as_tensor(w_x), torch.as_tensor(b_x), Z_s, y_s))
            if name == "val":
                metrics["F"] = total
            metrics[f"{name}_loss"] = LOSS_REPORT_SCALE * total / len(y_s)
            metrics[f"{name}_accuracy"] = float(np.mean(data[f"y_{name}"] * (data[f"Z_{name}"] @ w_x + b_x) > 0))
        return dict(metrics, w=w_x, b=b_x)

    x0 = np.exp(c0) if dpp else c0
    data.update(c0=c0, dataset=dataset, dpp=dpp, corruption=corruption)
    reference = dict(
        source="Yao, Yu, Zeng, Zhang, ICLR 2024; github.com/SUSTech-Optimization/LV-HBA, "
               "'Hyperparameter optimization/Linear SVM/{diabetes,fourclass}/.../LV-HBA.py'",
        paper=None,  # no table of this experiment in the paper or the repository (curves only)
        split=dict(n_train=SPLIT[0], n_val=SPLIT[1], n_test=len(data["y_test"]), seeds=range(1, 40)),
        at_x0={k: v for k, v in evaluate(x0).items() if k not in ("w", "b")},
    )
    outer_constraints = [param >= C_MIN] if dpp else []
    settings = dict(config["dpp_settings"] if dpp else config["settings"])
    return Instance(problem=problem, x0=torch.as_tensor(x0, dtype=torch.float64), outer_constraints=outer_constraints,
                    settings=settings, reference=reference, evaluate=evaluate, data=data)


def inner_solution(problem: cbo.BilevelProblem, x, **solve_options) -> tuple[np.ndarray, float]:
    """(w*, b*) at parameter value x, by cvxpy (Clarabel unless ``solve_options`` say otherwise)."""
    (param,) = problem.parameters
    param.value = np.asarray(torch.as_tensor(x).detach().cpu(), dtype=float)
    problem.inner.solve(**({"solver": "CLARABEL"} | solve_options))
    if problem.inner.status != cp.OPTIMAL:
        raise cbo.InnerSolveError(f"Inner problem status {problem.inner.status!r} at this x.")
    w, b = problem.variables
    return np.asarray(w.value, dtype=float), float(b.value)
