r"""Data hyper-cleaning with a per-sample SVM: the experiment of GAM (Xu & Zhu, 2023) and LV-HBA (Yao et al., 2024).

The bilevel problem is that of :mod:`problems.svm_per_sample` (one weight
e^{c_i} per training point in a squared-hinge linear SVM, the smooth
validation 0-1 surrogate as F), on LIBSVM's breast-cancer data with 40 % of
the training labels flipped: a point whose label is wrong should get a small
weight c_i, so that the SVM trained on the corrupted set still fits the clean
validation set.

**Source.** SUSTech-Optimization/LV-HBA on GitHub, ``Hyperparameter
optimization/Data Clean/LV-HBA/LV-HBA.py`` and ``.../Data Clean/GAM/GAM.py``
(GAM: the hypergradient by the implicit function theorem on the active
constraints, with a dense inverse of the KKT matrix, 10 steps of size 0.03 on
c). Both load ``gisette_scale`` (not in the repository); their LV-HBA folder
ships ``breast-cancer.txt``, LIBSVM's ``breast-cancer_scale`` (683 x 10,
labels 2 / 4), copied to ``problems/data/breast-cancer_scale.txt`` and read
with labels -1 / +1. Same as theirs: the split (shuffle by
``np.random.seed(seed)``, 500 train / 150 validation / 33 test), then the
flips ``y_i *= np.random.choice([-1, 1], p=[0.4, 0.6])`` for the 500 training
points in turn (:func:`problems.svm_per_sample.split`), c0 ~ U(-6, -5), the
inner problem and F. Validation and test labels are clean.

``evaluate`` adds to the SVM task's metrics ``flip_auc``: the probability
that a flipped training point has a smaller weight c_i than a clean one (0.5:
no detection, 1: perfect), a score of the cleaning itself.

**Sizes.** ``large``: theirs; ``small``: the first 60 training and 30
validation points of the same split (a test of seconds).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import Instance
from . import svm_per_sample

__all__ = ["build", "flip_auc", "CORRUPTION", "DATASET"]

CORRUPTION = 0.4          # their Corruption_rate
DATASET = "breast-cancer"


def flip_auc(c: np.ndarray, flipped: np.ndarray) -> float:
    """P(c_i < c_j) for i flipped and j clean (ties count 1/2): the Mann-Whitney AUC of -c as a flip detector."""
    c = np.asarray(c, dtype=float)
    if flipped.all() or not flipped.any():
        raise ValueError("flip_auc needs both flipped and clean points.")
    smaller = c[flipped][:, None] < c[~flipped][None, :]
    ties = c[flipped][:, None] == c[~flipped][None, :]
    return float(np.mean(smaller + 0.5 * ties))


def build(size: str = "small", seed: int = 1) -> Instance:
    """The data hyper-cleaning task (module docstring): :func:`problems.svm_per_sample.build` on breast-cancer
    with their label corruption for ``seed``; ``evaluate(c)`` also returns ``flip_auc``."""
    instance = svm_per_sample.build(size, seed, dataset=DATASET, corruption=CORRUPTION)
    svm_evaluate, flipped = instance.evaluate, instance.data["flipped"]

    def evaluate(c) -> dict[str, Any]:
        c_np = np.asarray(torch.as_tensor(c).detach().cpu(), dtype=float)
        return dict(svm_evaluate(c_np), flip_auc=flip_auc(c_np, flipped))

    instance.evaluate = evaluate
    instance.reference.update(
        source="Yao, Yu, Zeng, Zhang, ICLR 2024; github.com/SUSTech-Optimization/LV-HBA, "
               "'Hyperparameter optimization/Data Clean/{LV-HBA/LV-HBA.py,GAM/GAM.py}' (GAM: Xu & Zhu, 2023)",
        corruption=CORRUPTION,
        at_x0=dict(instance.reference["at_x0"], flip_auc=flip_auc(instance.x0.numpy(), flipped)),
    )
    return instance
