r"""BOLIB test problems whose lower level is convex in y, with their published optima.

BOLIB (S. Zhou, A. B. Zemkoho and A. Tin, "BOLIB: Bilevel Optimization LIBrary
of test problems", in *Bilevel Optimization: Advances and Next Challenges*,
Springer, 2020; arXiv:1812.00230) collects nonlinear bilevel programs

.. math::

    \min_{x} F(x, y) \;\text{ s.t. }\; G(x) \le 0,\quad
    y \in \operatorname*{argmin}_y \{ f(x, y) : g(x, y) \le 0 \}.

The problems here are those whose lower level is convex in y for fixed x (f
convex and g convex in y, here even strictly convex f: y*(x) is unique) and
whose upper-level constraints G involve x only; the upper level may be
nonconvex. Each is written as a :class:`cbo.BilevelProblem` with x as
``cp.Parameter`` and G as outer constraints, transcribed from the MATLAB file
``BOLIB/BLIBExamples/<name>.m`` of github.com/ShenglongZhou/BOLIB (commit
38d21d3). The published optimum (F*, f*, x*, y*, "global" or "best known") is
Table 3 and the comment of the problem in Section 3 of
``BOLIB/BOLIB_test_examples_library.pdf`` (the paper above); each problem's
``source`` names the paper the problem and its optimum come from, as BOLIB
cites them. The standard start x0 is the x part of ``xy_init`` in BOLIBver2's
``InfomAllExamp.m`` (as converted to ``src/BOLIBver2_converted/nonlinear/
<name>.jl`` in github.com/cinaral/BOLIB.jl), projected onto the outer
constraints by :func:`cbo.minimize`.

Notes on individual problems (found by ``tests/test_problems_bolib.py``):

* **FalkLiu1995**: the published optimum x* = y* = (sqrt(3)/2, sqrt(3)/2),
  F* = -2.1962 is not optimal for the problem as published: y*(x) = x on
  [0.5, 1.5]^2, so F = sum_i 2 x_i^2 - 3 x_i there, minimal at x = y = (0.75,
  0.75) with F = -2.25 (the default optimizer reaches it).
* **Outrata1990Ex1e**: the published point is not consistent: at x* = (2.42,
  -3.65) the lower level's solution is y = (0, 1.821), not (0, 1.58), and F
  there is -3.708, not -3.15. The default reaches F = -3.78947 at x = (3.158,
  -3.158), better than both.
* **Outrata1990Ex2d**: the default reaches F = 0.84851 at x = 2.8563, better
  than the published 0.92 at x = 2.498 (F = 0.91946 there).
* **Outrata1990Ex2a**: the published y* = (3, 3), F* = 0.5 is the vertex of the
  lower level with 1/3 for 0.333; with 0.333 (BOLIB's code) the vertex is
  (2.9985, 2.9985) and F* = 0.50150, reached on a whole interval of x (y* stays
  at the vertex there), so x* is not unique.
* **SinhaMaloDeb2014TP6**: BOLIB gives F* and f* only, no x*. The lower level
  is infeasible for x > 17/9: that bound is added to BOLIB's x >= 0. The
  default reaches F = -1.20988 at x = 17/9 (published: -1.2091).
* **DeSilva1978** and **AllendeStill2013**: the optimum x = y = (0.5, 0.5) is a
  kink of F(x, y*(x)) (the lower bound y >= 0.5 turns active there with a zero
  multiplier). AllendeStill2013's lower-level constraint (y_i - 1)^2 <= 0.25 is
  written as 0.5 <= y_i <= 1.5 (the same set; a weakly active quadratic
  constraint would make the conic route refuse the hypergradient there).
* **Outrata1990Ex1b, Ex1d, Ex2c, Outrata1993Ex31, Outrata1994Ex31**: the optimum
  lies on a kink (in 2-D, a valley along one); the default ends there on a
  stalled line search or on F no longer decreasing, not on tol. Ex1d's optimum
  is x = (2, 0), F = -3.6 (where y* = (2, 0), F = -4 + 0.1 ||x||^2, and x1 >= 2);
  the published x* = (2, 0.06) gives -3.59964.
* The published values have 2-4 digits; the test compares with the optimum
  refined from them (``tests/test_problems_bolib.py``). ``python -m
  problems.bolib`` prints the published F*, what the default optimizer reaches
  (F, x, steps, hypergradients, seconds) and what projected Adam with lr = 1e-2
  and 100 steps reaches.

:func:`build` returns an :class:`~problems.Instance` with empty ``settings``
(the default optimizer of :func:`cbo.minimize` is meant to solve them) and
``reference`` = ``F_star``, ``f_star``, ``x_star``, ``y_star`` (None where not
published), ``status``, ``source``; ``data`` holds ``outer_constraints_on``
(the outer constraints as a function of any cvxpy expression for x, for
references that project without cbo) and ``lower_level`` (the cvxpy lower-level
problem with its parameter x and variable y).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cvxpy as cp
import numpy as np
import torch

import cbo
from problems import Instance

__all__ = ["NAMES", "Published", "build"]


@dataclass(frozen=True)
class Published:
    """A published optimum: F*, f*, x*, y* (None if not published), "global" or "best known", and where
    it comes from (BOLIB's reference for it)."""

    F: float
    f: float
    x: tuple[float, ...] | None
    y: tuple[float, ...] | None
    status: str
    source: str


@dataclass
class _Parts:
    """One problem: the lower level in cvxpy, F in torch, the outer constraints on x, the standard start."""

    x: cp.Parameter
    y: cp.Variable
    lower_level: cp.Problem
    outer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    outer_constraints_on: Callable[[cp.Expression], list[cp.Constraint]]
    x0: tuple[float, ...]


def _y_minus(y: torch.Tensor, values) -> torch.Tensor:
    return y - torch.as_tensor(values, dtype=y.dtype, device=y.device)


def _free(x: cp.Expression) -> list[cp.Constraint]:
    return []


def _nonneg(x: cp.Expression) -> list[cp.Constraint]:
    return [x >= 0]


# ---------------------------------------------------------------- the problems

def henderson_quandt_1958() -> _Parts:
    """F = x (0.5 (x + y) - 95), f = y^2 + (0.5 x - 100) y, y >= 0, 0 <= x <= 200 (a Cournot duopoly)."""
    x, y = cp.Parameter(), cp.Variable()
    lower = cp.Problem(cp.Minimize(cp.square(y) + (0.5 * x - 100) * y), [y >= 0])
    return _Parts(x, y, lower, lambda x, y: x * (0.5 * (x + y) - 95), lambda x: [x >= 0, x <= 200], (0.0,))


def shimizu_aiyoshi_1981_ex2() -> _Parts:
    """F = ||x - (30, 20)||^2 - 20 y1 + 20 y2, f = ||x - y||^2, 0 <= y <= 10,
    x1 + 2 x2 >= 30, x1 + x2 <= 25, x2 <= 15 (not a box: SPG)."""
    x, y = cp.Parameter(2), cp.Variable(2)
    lower = cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [y <= 10, y >= 0])

    def outer(x, y):
        return (_y_minus(x, [30.0, 20.0]) ** 2).sum() - 20 * y[0] + 20 * y[1]

    def constraints(x):
        return [x[0] + 2 * x[1] >= 30, x[0] + x[1] <= 25, x[1] <= 15]

    return _Parts(x, y, lower, outer, constraints, (1.0, 1.0))


def _box_tracking(shift: float, x0: tuple[float, float]) -> _Parts:
    """DeSilva1978 (shift 1) and FalkLiu1995 (shift 1.5): F = sum (x - shift)^2 + y^2 - 2 shift^2,
    f = ||y - x||^2, 0.5 <= y <= 1.5, x free."""
    x, y = cp.Parameter(2), cp.Variable(2)
    lower = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y >= 0.5, y <= 1.5])
    return _Parts(x, y, lower, lambda x, y: ((x - shift) ** 2 + y ** 2).sum() - 2 * shift ** 2, _free, x0)


def de_silva_1978() -> _Parts:
    return _box_tracking(1.0, (0.0, 0.0))


def falk_liu_1995() -> _Parts:
    return _box_tracking(1.5, (0.0, 0.0))


def _outrata_1990_ex1(r: float, H, B, x0: tuple[float, float]) -> _Parts:
    """F = 0.5 ||y||^2 - 3 y1 - 4 y2 + r ||x||^2, f = 0.5 y^T H y - (B x)^T y,
    -0.333 y1 + y2 <= 2, y1 - 0.333 y2 <= 2, y >= 0, x free."""
    x, y = cp.Parameter(2), cp.Variable(2)
    H, B = np.asarray(H, dtype=float), np.asarray(B, dtype=float)
    lower = cp.Problem(cp.Minimize(0.5 * cp.quad_form(y, H) - (B @ x) @ y),
                       [-0.333 * y[0] + y[1] <= 2, y[0] - 0.333 * y[1] <= 2, y >= 0])

    def outer(x, y):
        return 0.5 * (y ** 2).sum() - 3 * y[0] - 4 * y[1] + r * (x ** 2).sum()

    return _Parts(x, y, lower, outer, _free, x0)


_H_A, _H_C = [[1, -2], [-2, 5]], [[1, 3], [3, 10]]


def outrata_1990_ex1a() -> _Parts:
    return _outrata_1990_ex1(0.1, _H_A, np.eye(2), (0.0, 0.0))


def outrata_1990_ex1b() -> _Parts:
    return _outrata_1990_ex1(1.0, _H_A, np.eye(2), (0.0, 0.0))


def outrata_1990_ex1d() -> _Parts:
    return _outrata_1990_ex1(0.1, _H_C, np.eye(2), (6.0, -3.0))


def outrata_1990_ex1e() -> _Parts:
    return _outrata_1990_ex1(0.1, _H_C, [[-1, 2], [3, -3]], (6.0, -3.0))


def _outrata_scalar(curvature: tuple[float, float], linear: float, constraints, x0: float = 0.0,
                    outer_constraints=_nonneg) -> _Parts:
    """The Outrata family with one x >= 0: F = 0.5 ||y - (3, 4)||^2,
    f = 0.5 (1 + a1 x) y1^2 + 0.5 (1 + a2 x) y2^2 - (3 + c x) y1 - x y2, g = constraints(x, y)."""
    x, y = cp.Parameter(nonneg=True), cp.Variable(2)
    a1, a2 = curvature
    objective = (0.5 * (1 + a1 * x) * cp.square(y[0]) + 0.5 * (1 + a2 * x) * cp.square(y[1])
                 - (3 + linear * x) * y[0] - x * y[1])
    lower = cp.Problem(cp.Minimize(objective), constraints(x, y) + [y >= 0])
    return _Parts(x, y, lower, lambda x, y: 0.5 * (_y_minus(y, [3.0, 4.0]) ** 2).sum(), outer_constraints, (x0,))


def _fixed_rows(x, y):
    return [-0.333 * y[0] + y[1] <= 2, y[0] - 0.333 * y[1] <= 2]


def _moving_rows(x, y):
    return [(-0.333 + 0.1 * x) * y[0] + y[1] <= x, y[0] + (-0.333 - 0.1 * x) * y[1] <= 2]


def _moving_rows_1993(x, y):
    return [(-0.333 + 0.1 * x) * y[0] + y[1] + 0.1 * x <= 2, y[0] + (-0.333 - 0.1 * x) * y[1] + 0.1 * x <= 2]


def _disk_rows_1994(x, y):
    return [-0.333 * y[0] + y[1] + 0.1 * x <= 1, cp.sum_squares(y) <= 0.1 * x + 9]


def outrata_1990_ex2a() -> _Parts:
    return _outrata_scalar((0.0, 0.0), 1.333, _fixed_rows, x0=1.0)


def outrata_1990_ex2c() -> _Parts:
    return _outrata_scalar((1.0, 0.1), 1.333, _fixed_rows)


def outrata_1990_ex2d() -> _Parts:
    return _outrata_scalar((0.0, 0.0), 1.333, _moving_rows)


def outrata_1990_ex2e() -> _Parts:
    return _outrata_scalar((1.0, 0.0), 1.333, _moving_rows)


def outrata_1993_ex31() -> _Parts:
    return _outrata_scalar((0.2, 0.1), 1.333, _moving_rows_1993)


def outrata_1994_ex31() -> _Parts:
    return _outrata_scalar((0.2, 0.1), 1.333, _disk_rows_1994, outer_constraints=lambda x: [x >= 0, x <= 10])


def muu_quy_2003_ex1() -> _Parts:
    """F = x^2 - 4x + ||y||^2, f = y1^2 + y2^2/2 + y1 y2 + (1 - 3x) y1 + (1 + x) y2,
    2 y1 + y2 <= 2x + 1, y >= 0, 0 <= x <= 2."""
    x, y = cp.Parameter(), cp.Variable(2)
    Q = np.array([[2.0, 1.0], [1.0, 1.0]])
    lower = cp.Problem(cp.Minimize(0.5 * cp.quad_form(y, Q) + (1 - 3 * x) * y[0] + (1 + x) * y[1]),
                       [2 * y[0] + y[1] <= 2 * x + 1, y >= 0])
    return _Parts(x, y, lower, lambda x, y: x ** 2 - 4 * x + (y ** 2).sum(), lambda x: [x >= 0, x <= 2], (2.0,))


def muu_quy_2003_ex2() -> _Parts:
    """F = -7 x1 + 4 x2 + y1^2 + y3^2 - y1 y3 - 4 y2, f = y1^2 + y2^2/2 + y3^2/2 + y1 y2 + (1 - 3 x1) y1
    + (1 + x2) y2, 2 y1 + y2 - y3 + x1 - 2 x2 + 2 <= 0, y >= 0; x >= 0, x1 + x2 <= 1 (not a box: SPG)."""
    x, y = cp.Parameter(2), cp.Variable(3)
    Q = np.array([[2.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    lower = cp.Problem(cp.Minimize(0.5 * cp.quad_form(y, Q) + (1 - 3 * x[0]) * y[0] + (1 + x[1]) * y[1]),
                       [2 * y[0] + y[1] - y[2] + x[0] - 2 * x[1] + 2 <= 0, y >= 0])

    def outer(x, y):
        return -7 * x[0] + 4 * x[1] + y[0] ** 2 + y[2] ** 2 - y[0] * y[2] - 4 * y[1]

    return _Parts(x, y, lower, outer, lambda x: [x >= 0, cp.sum(x) <= 1], (0.0, 1.0))


def sinha_malo_deb_2014_tp6() -> _Parts:
    """F = (x - 1)^2 - 2x + 2 y1, f = (2 y1 - 4)^2 + (2 y2 - 1)^2 + x y1, y >= 0 and four linear rows; x >= 0
    (BOLIB's G) and x <= 17/9, where the lower level stops being feasible (x - 1 <= y1 <= (12 - 4x)/5)."""
    x, y = cp.Parameter(nonneg=True), cp.Variable(2)
    rows = [4 * x + 5 * y[0] + 4 * y[1] <= 12, -4 * x - 5 * y[0] + 4 * y[1] <= -4,
            4 * x - 4 * y[0] + 5 * y[1] <= 4, -4 * x + 4 * y[0] + 5 * y[1] <= 4, y >= 0]
    lower = cp.Problem(cp.Minimize(cp.square(2 * y[0] - 4) + cp.square(2 * y[1] - 1) + x * y[0]), rows)
    return _Parts(x, y, lower, lambda x, y: (x - 1) ** 2 - 2 * x + 2 * y[0], lambda x: [x >= 0, x <= 17 / 9], (1.0,))


def allende_still_2013() -> _Parts:
    """F = ||x - 1||^2 + ||y||^2, f = ||y||^2 - 2 x^T y, (y_i - 1)^2 <= 0.25 (written 0.5 <= y <= 1.5);
    x >= 0, x1 <= 2 (BOLIB's G also has y >= 0, implied by the lower level)."""
    x, y = cp.Parameter(2), cp.Variable(2)
    lower = cp.Problem(cp.Minimize(cp.sum_squares(y) - 2 * x @ y), [y >= 0.5, y <= 1.5])
    return _Parts(x, y, lower, lambda x, y: ((x - 1) ** 2).sum() + (y ** 2).sum(),
                  lambda x: [x >= 0, x[0] <= 2], (0.0, 0.0))


def macal_hurter_1997() -> _Parts:
    """F = (x - 1)^2 + (y - 1)^2, f = 0.5 y^2 + 500 y - 50 x y (y* = 50 x - 500: a badly scaled F)."""
    x, y = cp.Parameter(), cp.Variable()
    lower = cp.Problem(cp.Minimize(0.5 * cp.square(y) + 500 * y - 50 * x * y))
    return _Parts(x, y, lower, lambda x, y: (x - 1) ** 2 + (y - 1) ** 2, _free, (1.0,))


def lampariello_sagratella_2017_ex32() -> _Parts:
    """F = x^2 + y^2, f = (x + y - 1)^2 (y* = 1 - x)."""
    x, y = cp.Parameter(), cp.Variable()
    lower = cp.Problem(cp.Minimize(cp.square(x + y - 1)))
    return _Parts(x, y, lower, lambda x, y: x ** 2 + y ** 2, _free, (1.0,))


# ---------------------------------------------------------------- registry

# name -> (builder, published optimum). The optimum: BOLIB Table 3 (F*, f*) and the problem's comment in
# Section 3 (x*, y*); "source" is the reference BOLIB gives for the values ([n] = its bibliography).
_PROBLEMS: dict[str, tuple[Callable[[], _Parts], Published]] = {
    "HendersonQuandt1958": (henderson_quandt_1958, Published(
        -3266.67, -711.11, (93.33333,), (26.667,), "best known",
        "Henderson and Quandt, Microeconomic Theory, 1958 [24]; x*, y* as in BOLIB's comment")),
    "ShimizuAiyoshi1981Ex2": (shimizu_aiyoshi_1981_ex2, Published(
        225.0, 100.0, (20.0, 5.0), (10.0, 5.0), "global", "Shimizu and Aiyoshi, IEEE TAC 1981 [46]")),
    "DeSilva1978": (de_silva_1978, Published(
        -1.0, 0.0, (0.5, 0.5), (0.5, 0.5), "global", "De Silva, PhD thesis 1978; values from Colson's BIPA [8]")),
    "FalkLiu1995": (falk_liu_1995, Published(
        -2.1962, 0.0, (np.sqrt(3) / 2,) * 2, (np.sqrt(3) / 2,) * 2, "best known",
        "Falk and Liu, Math. Programming 1995 [19] (not optimal: see the module docstring)")),
    "Outrata1990Ex1a": (outrata_1990_ex1a, Published(
        -8.92, -6.05, (0.97, 3.14), (2.6, 1.8), "best known", "Outrata, ZOR 1990 [40]")),
    "Outrata1990Ex1b": (outrata_1990_ex1b, Published(
        -7.56, -0.58, (0.28, 0.48), (2.34, 1.03), "best known", "Outrata, ZOR 1990 [40]")),
    "Outrata1990Ex1d": (outrata_1990_ex1d, Published(
        -3.6, -2.0, (2.0, 0.06), (2.0, 0.0), "best known", "Outrata, ZOR 1990 [40]")),
    "Outrata1990Ex1e": (outrata_1990_ex1e, Published(
        -3.15, -16.29, (2.42, -3.65), (0.0, 1.58), "best known", "Outrata, ZOR 1990 [40]")),
    "Outrata1990Ex2a": (outrata_1990_ex2a, Published(
        0.5, -14.53, (2.07,), (3.0, 3.0), "best known", "Outrata, ZOR 1990 [40]")),
    "Outrata1990Ex2c": (outrata_1990_ex2c, Published(
        1.86, -10.93, (3.456,), (1.707, 2.569), "best known", "Outrata, ZOR 1990 [40]")),
    "Outrata1990Ex2d": (outrata_1990_ex2d, Published(
        0.92, -19.47, (2.498,), (3.632, 2.8), "best known", "Outrata, ZOR 1990 [40]")),
    "Outrata1990Ex2e": (outrata_1990_ex2e, Published(
        0.90, -14.94, (3.999,), (1.665, 3.887), "best known", "Outrata, ZOR 1990 [40]")),
    "Outrata1993Ex31": (outrata_1993_ex31, Published(
        1.56, -11.67, (1.90910,), (2.97836, 2.23182), "best known", "Outrata, SIAM J. Optim. 1993 [41]")),
    "Outrata1994Ex31": (outrata_1994_ex31, Published(
        3.21, -20.53, (4.0604,), (2.6822, 1.4871), "best known", "Outrata, JOTA 1994 [42]")),
    "MuuQuy2003Ex1": (muu_quy_2003_ex1, Published(
        -2.08, -0.59, (0.8438,), (0.7657, 0.0), "best known", "Muu and Quy, J. Global Optim. 2003 [38]")),
    "MuuQuy2003Ex2": (muu_quy_2003_ex2, Published(
        0.64, 1.67, (0.609, 0.391), (0.0, 0.0, 1.828), "best known", "Muu and Quy, J. Global Optim. 2003 [38]")),
    "SinhaMaloDeb2014TP6": (sinha_malo_deb_2014_tp6, Published(
        -1.2091, 7.6145, None, None, "best known", "Sinha, Malo and Deb, EJOR 2014 [48]")),
    "AllendeStill2013": (allende_still_2013, Published(
        1.0, -0.5, (0.5, 0.5), (0.5, 0.5), "global", "Allende and Still, Math. Programming 2013 [2]")),
    "MacalHurter1997": (macal_hurter_1997, Published(
        81.33, -0.33, (10.0163,), (0.8197,), "global", "Macal and Hurter, Comput. Oper. Res. 1997 [34]")),
    "LamparielloSagratella2017Ex32": (lampariello_sagratella_2017_ex32, Published(
        0.5, 0.0, (0.5,), (0.5,), "global", "Lampariello and Sagratella, arXiv 2017 [30]")),
}

NAMES = tuple(_PROBLEMS)


def build(name: str) -> Instance:
    """The BOLIB problem ``name`` (one of :data:`NAMES`) as an :class:`~problems.Instance`.

    Raises ValueError for an unknown name, listing the known ones.
    """
    if name not in _PROBLEMS:
        raise ValueError(f"Unknown BOLIB problem {name!r}. Known problems: {', '.join(NAMES)}.")
    builder, published = _PROBLEMS[name]
    parts = builder()
    problem = cbo.BilevelProblem(parts.lower_level, [parts.x], [parts.y], outer=parts.outer)
    x0 = torch.tensor(parts.x0 if parts.x.shape else parts.x0[0], dtype=torch.float64)
    reference = dict(F_star=published.F, f_star=published.f, x_star=published.x, y_star=published.y,
                     status=published.status, source=published.source)
    data = dict(lower_level=parts.lower_level, x=parts.x, y=parts.y, outer_constraints_on=parts.outer_constraints_on)
    return Instance(problem=problem, x0=x0, outer_constraints=parts.outer_constraints_on(parts.x), settings={},
                    reference=reference, data=data)


def _compare(names: tuple[str, ...] = NAMES) -> dict[str, str]:
    """Print, per problem, the published F* and what cbo.minimize reaches with its default optimizer and with
    projected Adam at lr = 1e-2, steps = 100 (the defaults before the line-search optimizers); return the figures
    docs/driver.md quotes (problems/figures.py), per problem "<name>.<F_star, F, steps, evals, seconds, F_adam>"."""
    import time
    import warnings

    figures = {}
    print(f"{'problem':30s} {'F* published':>13s} {'F default':>13s}  {'x default':24s} {'steps':>5s} "
          f"{'evals':>5s} {'s':>6s} {'F Adam':>13s}")
    for name in names:
        instance = build(name)
        runs = []
        for settings in ({}, dict(optimizer="adam", lr=1e-2, steps=100)):
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = instance.minimize(progress=False, **settings)
            runs.append((result, time.perf_counter() - start))
        (result, seconds), (adam, _) = runs
        x = np.array2string(np.atleast_1d(result.x.numpy()), precision=5, separator=", ")
        print(f"{name:30s} {instance.reference['F_star']:13.6g} {result.fun:13.8g}  {x:24s} {result.n_steps:5d} "
              f"{len(result.history):5d} {seconds:6.2f} {adam.fun:13.8g}")
        figures.update({f"{name}.F_star": f"{instance.reference['F_star']:.6g}", f"{name}.F": f"{result.fun:.6g}",
                        f"{name}.steps": str(result.n_steps), f"{name}.evals": str(len(result.history)),
                        f"{name}.seconds": f"{seconds:.2f}", f"{name}.F_adam": f"{adam.fun:.6g}"})
    return figures


if __name__ == "__main__":
    from problems.figures import commit, save_figures

    code = commit()  # before the run: the commit whose code ran
    quoted = {**_compare(), "commit": code}
    print(f"figures quoted by the documentation: "
          f"{save_figures(__file__, quoted, [key for key in quoted if key.endswith('seconds')] + ['commit'])}")
