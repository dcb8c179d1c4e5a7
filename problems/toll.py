r"""A Stackelberg toll-setting problem: a leader prices links, the traffic answers.

Followers (inner problem): the Wardrop user equilibrium with link tolls x is the
minimizer of the tolled Beckmann potential over link flows f,

.. math::

    f^*(x) = \operatorname*{argmin}_f \; \sum_e a_e f_e + \tfrac{b_e}{2} f_e^2 + (Sx)_e f_e
    \quad \text{s.t.} \quad N f = s, \;\; 0 \le f \le \text{cap},

with link travel time t_e(f_e) = a_e + b_e f_e, N the node-link incidence
matrix (one redundant row dropped, so that LICQ can hold), s the node supplies
(demand at the origins, minus the total at the destination; a single
destination, so one commodity suffices), and S the 0/1 matrix that puts the
tolls x on the tollable links. At f*, every used path has the same tolled
cost, no unused path is cheaper, and saturated links carry a queueing delay
(their capacity multiplier).

Leader (outer problem), tolls in a box 0 <= x <= x_max (outer constraints):

* ``"revenue"``: maximize the toll revenue, F(x, f) = -sum_k x_k (S^T f)_k;
* ``"system_cost"``: minimize the total travel time, F(f) = sum_e (a_e + b_e f_e) f_e.

**Small instance: three parallel links, closed-form optimum.** Links 1 and 2
are tolled, link 3 is a free alternative. If, at the optimum, the links in U
are used below capacity and those in Sat are saturated, then with w = 1/b,
beta = sum_U w_i the equilibrium is f_i = w_i (lambda - a_i - x_i) (i in U),
f_i = cap_i (i in Sat), lambda = (D - sum_Sat cap + sum_U w_i (a_i + x_i)) / beta,
so the revenue is a quadratic in x, strictly concave on the tolls of U because
the free link is in U. Its stationarity conditions are the linear system

.. math::

    2 x_j - \tfrac{2}{\beta} \sum_{i \in T \cap U} w_i x_i = \lambda_0 - a_j,
    \qquad j \in T \cap U, \quad \lambda_0 = \lambda(x)|_{x_{T\cap U} = 0},

while the toll of a saturated link only scales its fixed flow, dR/dx_j = cap_j > 0,
so it sits at x_max (:func:`parallel_piece_optimum`). The default small
instance is built so that link 1 is saturated with its toll at x_max (both an
inner capacity and an outer bound active, with positive multipliers) and
link 2's toll is interior. :func:`parallel_grid_optimum` checks the closed form
by a global zooming grid search over the toll box, each equilibrium solved by
bisection on lambda (no cvxpy).

**Large instance: a grid network.** Pigouvian (marginal-cost) tolls
x_e = b_e f_e^SO, with f^SO the system optimum (the same problem without tolls
and with 2 b_e instead of b_e), make the equilibrium the system optimum (the
two KKT systems coincide), so with every link tollable the least reachable
total travel time is the system optimum's: the known answer of the
``"system_cost"`` objective. With only some links tollable (second best) the
example compares learned tolls against no tolls and against Pigouvian tolls
on those links only.
"""
from __future__ import annotations

from dataclasses import dataclass

import cvxpy as cp
import numpy as np
import torch

import cbo
from problems import Instance

__all__ = ["Network", "parallel_network", "grid_network", "follower_problem", "bilevel_problem",
           "equilibrium", "system_optimum", "pigouvian_tolls", "total_cost", "revenue",
           "parallel_equilibrium", "parallel_piece_optimum", "parallel_grid_optimum", "build", "OBJECTIVES"]

OBJECTIVES = ("revenue", "system_cost")
SOLVER_OPTIONS = {"solver": "CLARABEL", "tol_gap_abs": 1e-11, "tol_gap_rel": 1e-11, "tol_feas": 1e-11}


@dataclass(frozen=True)
class Network:
    """A traffic network with affine link travel times t_e(f) = a_e + b_e f.

    ``links`` is an (E, 2) array of (tail, head) node indices; ``supply`` the
    net outflow of each node (positive at origins, negative at the single
    destination, summing to 0); ``cap`` the link capacities (np.inf: none);
    ``tolled`` the indices of the tollable links; ``x_max`` their toll
    bounds; ``positions`` (nodes, 2) coordinates for drawing.
    """

    links: np.ndarray
    a: np.ndarray
    b: np.ndarray
    cap: np.ndarray
    supply: np.ndarray
    tolled: np.ndarray
    x_max: np.ndarray
    positions: np.ndarray

    @property
    def n_links(self) -> int:
        return self.links.shape[0]

    @property
    def n_nodes(self) -> int:
        return self.supply.size

    def incidence(self) -> np.ndarray:
        """N with N[tail, e] = 1 and N[head, e] = -1, so that N f = supply is flow conservation."""
        N = np.zeros((self.n_nodes, self.n_links))
        N[self.links[:, 0], np.arange(self.n_links)] = 1.0
        N[self.links[:, 1], np.arange(self.n_links)] = -1.0
        return N

    def toll_matrix(self) -> np.ndarray:
        """S (E, T): S[tolled[k], k] = 1, so that S x are the link tolls."""
        S = np.zeros((self.n_links, self.tolled.size))
        S[self.tolled, np.arange(self.tolled.size)] = 1.0
        return S


def parallel_network(a, b, cap, demand: float, tolled, x_max) -> Network:
    """Links from node 0 to node 1, in parallel, carrying ``demand``."""
    a, b, cap = (np.asarray(v, dtype=float) for v in (a, b, cap))
    n = a.size
    return Network(links=np.tile([0, 1], (n, 1)), a=a, b=b, cap=cap, supply=np.array([demand, -demand]),
                   tolled=np.asarray(tolled, dtype=int), x_max=np.asarray(x_max, dtype=float),
                   positions=np.array([[0.0, 0.0], [1.0, 0.0]]))


def grid_network(rows: int = 5, cols: int = 5, demand: float = 15.0, tolled: str = "all",
                 seed: int = 0) -> Network:
    """A rows x cols grid with Braess-like shortcuts, demand from the top-left to the bottom-right corner.

    Street links go right and down, slow but hard to congest (a_e ~ U(1, 3),
    b_e ~ U(0.01, 0.03)); a diagonal shortcut crosses every cell, fast but
    congestible (a_e ~ U(0.1, 0.3), b_e ~ U(0.5, 1.5)) and with capacity
    ``0.25 * demand``. Selfish routing overuses the shortcuts: the
    equilibrium's total travel time is well above the system optimum's.
    ``tolled``: "all" links tollable, or "shortcuts" only; x_max = 10.
    """
    if tolled not in ("all", "shortcuts"):
        raise ValueError(f"tolled must be 'all' or 'shortcuts', got {tolled!r}.")
    rng = np.random.default_rng(seed)
    node = lambda i, j: i * cols + j  # noqa: E731
    streets = [(node(i, j), node(i, j + 1)) for i in range(rows) for j in range(cols - 1)]
    streets += [(node(i, j), node(i + 1, j)) for i in range(rows - 1) for j in range(cols)]
    shortcuts = [(node(i, j), node(i + 1, j + 1)) for i in range(rows - 1) for j in range(cols - 1)]
    links = np.array(streets + shortcuts)
    is_shortcut = np.arange(len(links)) >= len(streets)
    n = len(links)
    a = np.where(is_shortcut, rng.uniform(0.1, 0.3, n), rng.uniform(1.0, 3.0, n))
    b = np.where(is_shortcut, rng.uniform(0.5, 1.5, n), rng.uniform(0.01, 0.03, n))
    cap = np.where(is_shortcut, 0.25 * demand, np.inf)
    supply = np.zeros(rows * cols)
    supply[node(0, 0)], supply[node(rows - 1, cols - 1)] = demand, -demand
    toll_links = np.arange(n) if tolled == "all" else np.flatnonzero(is_shortcut)
    positions = np.array([[j, -i] for i in range(rows) for j in range(cols)], dtype=float)
    return Network(links, a, b, cap, supply, toll_links, np.full(toll_links.size, 10.0), positions)


def _flow_constraints(net: Network, f) -> list:
    """N f = s (last node's row dropped: it is the sum of the others), f >= 0, f <= cap where finite."""
    N = net.incidence()
    constraints = [N[:-1] @ f == net.supply[:-1], f >= 0]
    capped = np.flatnonzero(np.isfinite(net.cap))
    if capped.size:
        constraints.append(f[capped] <= net.cap[capped])
    return constraints


def follower_problem(net: Network) -> tuple[cp.Problem, cp.Parameter, cp.Variable]:
    """The tolled user-equilibrium problem in cvxpy, tolls x a Parameter."""
    x, f = cp.Parameter(net.tolled.size, name="tolls"), cp.Variable(net.n_links, name="flow")
    potential = net.a @ f + cp.sum(cp.multiply(net.b / 2, cp.square(f))) + (net.toll_matrix() @ x) @ f
    return cp.Problem(cp.Minimize(potential), _flow_constraints(net, f)), x, f


def bilevel_problem(net: Network, objective: str) -> tuple[cbo.BilevelProblem, cp.Parameter]:
    """The leader's problem for ``objective`` in :data:`OBJECTIVES`, and its toll parameter."""
    if objective not in OBJECTIVES:
        raise ValueError(f"Unknown objective {objective!r}; choose one of {OBJECTIVES}.")
    inner, x, f = follower_problem(net)
    a, b = torch.as_tensor(net.a), torch.as_tensor(net.b)
    tolled = torch.as_tensor(net.tolled)

    def negative_revenue(tolls: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        return -(tolls * flow[tolled.to(flow.device)]).sum()

    def system_cost(tolls: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        return ((a.to(flow) + b.to(flow) * flow) * flow).sum()

    outer = negative_revenue if objective == "revenue" else system_cost
    return cbo.BilevelProblem(inner, parameters=[x], variables=[f], outer=outer), x


# ---------------------------------------------------------------- references (numpy / plain cvxpy, no cbo)

def _solve_flows(net: Network, link_cost: np.ndarray, slope: np.ndarray) -> np.ndarray:
    """argmin_f sum (link_cost f + slope/2 f^2) over the feasible flows, by cvxpy."""
    f = cp.Variable(net.n_links)
    problem = cp.Problem(cp.Minimize(link_cost @ f + cp.sum(cp.multiply(slope / 2, cp.square(f)))),
                         _flow_constraints(net, f))
    problem.solve(**SOLVER_OPTIONS)
    if problem.status != cp.OPTIMAL:
        raise RuntimeError(f"Flow problem not solved: {problem.status}. Is the demand within the capacities?")
    return _polish_flows(net, link_cost, slope, f.value)


def _polish_flows(net: Network, link_cost: np.ndarray, slope: np.ndarray, flows: np.ndarray,
                  tol: float = 1e-6) -> np.ndarray:
    """The exact minimizer on the face that the solver's flows identify.

    An interior-point solution leaves flows of order tol / multiplier on the
    unused links, which bias finite differences. Links with flow below ``tol``
    are fixed at 0, those within ``tol`` of capacity at capacity; the others
    solve the equality-constrained QP  diag(slope) f + N^T nu = -link_cost,
    N f = s - N f_fixed  (least squares: N may have dependent rows where
    nodes carry no flow; f is unique all the same, slope > 0).
    """
    fixed = np.where(flows < tol, 0.0, np.where(flows > net.cap - tol, net.cap, np.nan))
    free = np.flatnonzero(np.isnan(fixed))
    out = np.where(np.isnan(fixed), 0.0, fixed)
    N = net.incidence()[:-1]
    k = N.shape[0]
    K = np.block([[np.diag(slope[free]), N[:, free].T], [N[:, free], np.zeros((k, k))]])
    rhs = np.concatenate([-link_cost[free], net.supply[:-1] - N @ out])
    out[free] = np.linalg.lstsq(K, rhs, rcond=None)[0][: free.size]
    return out


def equilibrium(net: Network, tolls: np.ndarray) -> np.ndarray:
    """User-equilibrium link flows under ``tolls`` (on the tollable links)."""
    return _solve_flows(net, net.a + net.toll_matrix() @ tolls, net.b)


def system_optimum(net: Network) -> np.ndarray:
    """Flows minimizing the total travel time sum (a_e + b_e f_e) f_e."""
    return _solve_flows(net, net.a, 2 * net.b)


def pigouvian_tolls(net: Network, links: np.ndarray | None = None) -> np.ndarray:
    """Marginal-cost tolls b_e f_e^SO on the tollable links (the link set of the network, or ``links``)."""
    flows = system_optimum(net)
    return (net.b * flows)[net.tolled if links is None else links]


def total_cost(net: Network, flows: np.ndarray) -> float:
    """Total travel time sum_e (a_e + b_e f_e) f_e (tolls are transfers, not costs)."""
    return float(np.sum((net.a + net.b * flows) * flows))


def revenue(net: Network, tolls: np.ndarray, flows: np.ndarray) -> float:
    """Toll revenue sum_k x_k f_{tolled[k]}."""
    return float(tolls @ flows[net.tolled])


def _is_parallel(net: Network) -> None:
    if net.n_nodes != 2 or not np.all(net.links == [0, 1]):
        raise ValueError("This reference is for parallel networks (all links from node 0 to node 1); "
                         "build one with parallel_network().")


def parallel_equilibrium(net: Network, tolls: np.ndarray, iterations: int = 200) -> np.ndarray:
    """Equilibrium flows of a parallel network by bisection on the common travel time lambda.

    f_i(lambda) = clip((lambda - a_i - x_i) / b_i, 0, cap_i) is nondecreasing in
    lambda; lambda solves sum_i f_i(lambda) = D. ``tolls`` may carry leading
    batch dimensions (..., T): all equilibria are solved at once.
    """
    _is_parallel(net)
    tolls = np.asarray(tolls, dtype=float)
    if net.cap.sum() < net.supply[0]:
        raise ValueError(f"Demand {net.supply[0]} exceeds the total capacity {net.cap.sum()}: no feasible flow.")
    cost0 = np.broadcast_to(net.a, tolls.shape[:-1] + (net.n_links,)).copy()
    cost0[..., net.tolled] += tolls
    lo = np.full(tolls.shape[:-1], net.a.min())
    hi = np.full(tolls.shape[:-1], cost0.max() + net.b.max() * net.supply[0])
    flows = lambda lam: np.clip((lam[..., None] - cost0) / net.b, 0.0, net.cap)  # noqa: E731
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        too_much = flows(mid).sum(-1) > net.supply[0]
        hi, lo = np.where(too_much, mid, hi), np.where(too_much, lo, mid)
    return flows(0.5 * (lo + hi))


def parallel_piece_optimum(net: Network, saturated) -> dict:
    """Closed-form revenue maximizer of a parallel network on one piece (see the module docstring).

    ``saturated``: links at capacity at the optimum (their tolls at x_max);
    all other links are assumed used below capacity and their tolls inside
    the box. Returns the tolls, flows, revenue, lambda, and ``consistent``:
    whether the solution indeed lies on that piece with strictly positive
    multipliers (flows in (0, cap), tolls in (0, x_max), saturated links'
    travel times below lambda).
    """
    _is_parallel(net)
    saturated = np.asarray(saturated, dtype=int)
    used = np.setdiff1d(np.arange(net.n_links), saturated)
    w = 1.0 / net.b
    beta = w[used].sum()
    demand_left = net.supply[0] - net.cap[saturated].sum()
    lambda0 = (demand_left + (w[used] * net.a[used]).sum()) / beta
    free = np.array([k for k, e in enumerate(net.tolled) if e in used], dtype=int)
    w_free = w[net.tolled[free]]
    system = 2 * np.eye(free.size) - (2 / beta) * np.outer(np.ones(free.size), w_free)
    x = net.x_max.copy()
    x[free] = np.linalg.solve(system, lambda0 - net.a[net.tolled[free]])
    lam = lambda0 + (w_free * x[free]).sum() / beta
    link_tolls = net.toll_matrix() @ x
    flows = net.cap.copy()
    flows[used] = w[used] * (lam - net.a[used] - link_tolls[used])
    consistent = (np.all(flows[used] > 0) and np.all(flows[used] < net.cap[used])
                  and np.all(x[free] > 0) and np.all(x[free] < net.x_max[free])
                  and np.all(net.a[saturated] + net.b[saturated] * net.cap[saturated] + link_tolls[saturated] < lam))
    return {"x_star": x, "flows": flows, "revenue": revenue(net, x, flows), "lambda": float(lam),
            "consistent": bool(consistent)}


def parallel_grid_optimum(net: Network, points: int = 101, levels: int = 6) -> dict:
    """Global revenue maximizer of a parallel network by a zooming grid search over the toll box.

    Level 0 evaluates the revenue on a ``points``^T grid of the box (every
    equilibrium by :func:`parallel_equilibrium`); each further level re-grids
    +-2 cells around the best point. The answer is accurate to about
    x_max / points * (4 / points)^(levels - 1).
    """
    lower, upper = np.zeros_like(net.x_max), net.x_max.copy()
    best = None
    for _ in range(levels):
        axes = [np.linspace(lo, hi, points) for lo, hi in zip(lower, upper)]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, net.tolled.size)
        values = (grid * parallel_equilibrium(net, grid)[:, net.tolled]).sum(-1)
        best = grid[np.argmax(values)]
        cell = (upper - lower) / (points - 1)
        lower, upper = np.maximum(best - 2 * cell, 0.0), np.minimum(best + 2 * cell, net.x_max)
    flows = parallel_equilibrium(net, best[None])[0]
    return {"x_star": best, "flows": flows, "revenue": revenue(net, best, flows)}


# ---------------------------------------------------------------- instances

SMALL = dict(a=[1.0, 1.5, 2.0], b=[0.2, 0.3, 0.25], cap=[3.0, np.inf, np.inf], demand=10.0, tolled=[0, 1],
             x_max=[1.0, 5.0])
SMALL_SATURATED = (0,)


def build(size: str = "small", seed: int = 0, objective: str | None = None, tolled: str = "all") -> Instance:
    """The toll-setting task.

    ``size="small"``: the three-link parallel network of the module docstring,
    revenue objective, closed-form optimum (``seed`` is not used: the data are
    fixed so that the optimum lies on the documented piece).
    ``size="large"``: a 5 x 5 grid network with shortcuts (56 links, see
    :func:`grid_network`), system-cost objective; with ``tolled="all"`` the
    reference is the system optimum's cost, reached by Pigouvian tolls.
    """
    if size == "small":
        net = parallel_network(**SMALL)
        objective = objective or "revenue"
        reference = parallel_piece_optimum(net, SMALL_SATURATED) if objective == "revenue" else {}
        # The default optimizer. Revenue is flat (zero hypergradient) where a toll prices its link out; a
        # first L-BFGS-B step of the length of g landed on such a plateau (F = -3), one scaled to 1 does not.
        settings = dict(steps=100, tol=1e-8)
    elif size == "large":
        net = grid_network(tolled=tolled, seed=seed)
        objective = objective or "system_cost"
        reference = {}
        settings = dict(steps=120, tol=1e-6)
    else:
        raise ValueError(f"size must be 'small' or 'large', got {size!r}.")
    problem, x = bilevel_problem(net, objective)
    flows_so = system_optimum(net)
    flows_ue = equilibrium(net, np.zeros(net.tolled.size))
    reference.update(system_optimum_cost=total_cost(net, flows_so), no_toll_cost=total_cost(net, flows_ue))

    def evaluate(tolls) -> dict:
        tolls = np.asarray(tolls.detach() if isinstance(tolls, torch.Tensor) else tolls, dtype=float)
        flows = equilibrium(net, tolls)
        return {"revenue": revenue(net, tolls, flows), "total_cost": total_cost(net, flows), "flows": flows}

    return Instance(problem=problem, x0=torch.zeros(net.tolled.size, dtype=torch.float64),
                    outer_constraints=[x >= 0, x <= net.x_max], settings=settings, reference=reference,
                    evaluate=evaluate, data={"network": net, "objective": objective,
                                             "flows_system_optimum": flows_so, "flows_no_toll": flows_ue})
