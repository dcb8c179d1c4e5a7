"""Property-based tests (hypothesis): random inner problems with a designed optimum.

Each drawn :class:`Spec` (printed by hypothesis, and shrunk to a minimal one
when a property fails) is built into a :class:`builders.Case` by :func:`build`:

* family "qp": min 1/2 s y^T P y + (q + x)^T y, P positive definite;
* family "smooth": min s loss(A y) + rho/2 ||y||^2 + (q + x)^T y with loss a
  sum of logistics or a log-sum-exp, optionally with a quadratic constraint
  ||y - c||^2 <= t (active or not);

both under G y <= h + B r and C y == d + E e, with n in 2..12 variables (one
cvxpy variable, or two stacked), m in 0..n inequalities and p in 0..n//3
equalities. The parameters are a drawn subset of the placements

    x (linear term), s (scale of the quadratic / loss term), r (inequality
    right-hand side), G (inequality matrix), e (equality right-hand side),
    t (radius of the quadratic constraint),

and the placements not drawn are constants. The optimum is designed first:
y0, multipliers mu0 in [0.5, 2] on a drawn subset of the inequalities (whose
constraints pass through y0), slack in [0.5, 1.5] on the others, nu0, and then
q is set so that (y0, mu0, nu0) satisfies the KKT conditions exactly. Active
sets are well separated (strict complementarity), LICQ holds with margin (at
most n - p active rows, whose singular values are kept within a factor 5), and
the reference hypergradient is the dense numpy KKT solve at the designed point,
written without cbo or torch.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import cvxpy as cp
import numpy as np
import torch
from hypothesis import example, given, note
from hypothesis import strategies as st

import cbo
from builders import Case, central_jacobian, kkt_residual, outer_numpy, polished_kkt_point, relative_error

# fixed_point and neumann converge linearly: the issue allows them 1e-5.
TOLERANCE = {"direct": 1e-6, "minres": 1e-6, "cg": 1e-6, "fixed_point": 1e-5, "neumann": 1e-5}
PLACEMENTS = ("x", "s", "r", "G", "e", "t")
N_R, N_E = 3, 2  # sizes of the right-hand-side parameters r and e


# ---------------------------------------------------------------- the drawn problem

@dataclass(frozen=True)
class Spec:
    """What hypothesis draws (and shrinks): sizes, active set, placements, a seed for the matrices."""

    family: str                # "qp" or "smooth"
    n: int                     # number of inner variables
    m: int                     # linear inequalities
    p: int                     # linear equalities
    active: tuple[bool, ...]   # which linear inequalities are active at the optimum
    ball: str | None           # smooth family: quadratic constraint None, "active" or "inactive"
    loss: str | None           # smooth family: "logistic" or "logsumexp"
    params: tuple[str, ...]    # parameter placements, in the order of problem.parameters
    split: int                 # 0: one cvxpy variable; k: y = hstack(y1 (size k), y2 (size n - k))
    seed: int


@st.composite
def specs(draw, families=("qp", "smooth"), max_n: int = 12) -> Spec:
    family = draw(st.sampled_from(families))
    n = draw(st.integers(2, max_n))
    m = draw(st.integers(0, n))
    p = draw(st.integers(0, n // 3))
    active = draw(st.lists(st.booleans(), min_size=m, max_size=m))
    ball = loss = None
    if family == "smooth":
        loss = draw(st.sampled_from(["logistic", "logsumexp"]))
        ball = draw(st.sampled_from([None, "active", "inactive"]))
    # LICQ: at most n - p active inequality rows (the quadratic constraint counts when active).
    room = n - p - (ball == "active")
    kept = []
    for a in active:
        kept.append(a and room > 0)
        room -= kept[-1]
    available = ["x", "s"] + (["r", "G"] if m else []) + (["e"] if p else []) + (["t"] if ball else [])
    chosen = [name for name in available if draw(st.booleans())]
    params = tuple(name for name in PLACEMENTS if name in chosen) or ("x",)
    split = draw(st.one_of(st.just(0), st.integers(1, n - 1)))
    seed = draw(st.integers(0, 2**32 - 1))
    return Spec(family, n, m, p, tuple(kept), ball, loss, params, split, seed)


def _sigmoid(z):
    return 0.5 * (1 + np.tanh(z / 2))


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def build(spec: Spec) -> Case:
    """The cvxpy problem of ``spec``, its designed optimum, and numpy callables for the reference."""
    rng = np.random.default_rng(spec.seed)
    n, m, p = spec.n, spec.m, spec.p
    # Every random quantity is drawn, in a fixed order, whatever the spec, so
    # that shrinking the placements or the active set keeps the matrices.
    y0, target = rng.standard_normal(n), rng.standard_normal(n)
    M = rng.standard_normal((n, n))
    P = M.T @ M / n + 0.5 * np.eye(n)
    A = rng.standard_normal((2 * n, n)) / np.sqrt(n)
    rho = 0.5
    G0, B = rng.standard_normal((m, n)), rng.standard_normal((m, N_R))
    C, E = rng.standard_normal((p, n)), rng.standard_normal((p, N_E))
    mu0 = np.where(spec.active, 0.5 + 1.5 * rng.random(m), 0.0)
    slack = np.where(spec.active, 0.0, 0.5 + rng.random(m))
    nu0 = rng.standard_normal(p)
    x0, r0, e0 = 0.3 * rng.standard_normal(n), 0.3 * rng.standard_normal(N_R), 0.3 * rng.standard_normal(N_E)
    s0 = 0.5 + rng.random()
    u = rng.standard_normal(n)
    radius, mu_ball, ball_slack = 1.0 + rng.random(), 0.5 + 1.5 * rng.random(), 0.5 + rng.random()
    # LICQ, and not just generically: the Jacobian rows of the constraints active at y0
    # (G's active rows, C, the quadratic constraint's gradient along u) get their
    # singular values clipped to [0.2 s_max, s_max], so the KKT matrix is well conditioned
    # (random rows alone can be nearly dependent: cond 1e5 was seen at n = 4).
    active_rows = np.flatnonzero(spec.active)
    rows = np.concatenate([G0[active_rows], C, u[None, :] if spec.ball == "active" else np.zeros((0, n))])
    if len(rows):
        U, S, Vt = np.linalg.svd(rows, full_matrices=False)
        rows = U @ np.diag(np.clip(S, 0.2 * S.max(), None)) @ Vt
        G0 = G0.copy()
        G0[active_rows], C = rows[: len(active_rows)], rows[len(active_rows): len(active_rows) + p]
        u = rows[-1] if spec.ball == "active" else u
    c = y0 - radius * u / np.linalg.norm(u)
    t0 = radius**2 + (0.0 if spec.ball == "active" else ball_slack)
    mu_ball = mu_ball if spec.ball == "active" else 0.0

    nominal = {"x": x0, "s": np.array(s0), "r": r0, "G": G0, "e": e0, "t": np.array(t0)}
    constant = {"x": np.zeros(n), "s": np.array(1.0), "r": np.zeros(N_R), "G": G0, "e": np.zeros(N_E),
                "t": np.array(t0)}
    used = {k: (nominal if k in spec.params else constant)[k] for k in PLACEMENTS}

    # ---- the smooth part of g and its gradient (numpy)
    if spec.family == "qp":
        def smooth_grad(y, s):
            return s * (P @ y)
    elif spec.loss == "logistic":
        def smooth_grad(y, s):
            return s * (A.T @ _sigmoid(A @ y)) + rho * y
    else:
        def smooth_grad(y, s):
            return s * (A.T @ _softmax(A @ y)) + rho * y

    # ---- the designed optimum: constraints through y0 where active, and q from stationarity
    h = G0 @ y0 + slack - B @ used["r"]
    d = C @ y0 - E @ used["e"]
    q = -(smooth_grad(y0, used["s"]) + used["x"] + G0.T @ mu0 + C.T @ nu0 + mu_ball * 2 * (y0 - c))

    # ---- cvxpy
    cvx = {k: (cp.Parameter(np.shape(nominal[k]), nonneg=(k == "s"), name=k) if k in spec.params
               else used[k]) for k in PLACEMENTS}
    if spec.split:
        variables = [cp.Variable(spec.split, name="y1"), cp.Variable(n - spec.split, name="y2")]
        y = cp.hstack(variables)
    else:
        variables = [cp.Variable(n, name="y")]
        y = variables[0]
    if spec.family == "qp":
        smooth = 0.5 * cp.quad_form(y, P)
    else:
        smooth = cp.sum(cp.logistic(A @ y)) if spec.loss == "logistic" else cp.log_sum_exp(A @ y)
    g = (cvx["s"] * smooth if "s" in spec.params else smooth)
    g = g + (rho / 2 * cp.sum_squares(y) if spec.family == "smooth" else 0)
    g = g + ((q + cvx["x"]) @ y if "x" in spec.params else q @ y)
    constraints = []
    if m:
        rhs = h + B @ cvx["r"] if "r" in spec.params else h
        constraints.append(cvx["G"] @ y <= rhs)
    if spec.ball:
        constraints.append(cp.sum_squares(y - c) <= cvx["t"])
    if p:
        constraints.append(C @ y == (d + E @ cvx["e"] if "e" in spec.params else d))
    inner = cp.Problem(cp.Minimize(g), constraints)
    parameters = [cvx[k] for k in spec.params]

    # ---- numpy callables in "our" order of y, then permuted to cbo's (problem.all_variables) order
    def value(name, xs):
        return xs[spec.params.index(name)] if name in spec.params else used[name]

    def grad_ours(y, xs):
        return smooth_grad(y, value("s", xs)) + q + value("x", xs)

    def ineq_ours(y, xs):
        parts = [value("G", xs) @ y - h - B @ value("r", xs)]
        if spec.ball:
            parts.append(np.atleast_1d(np.sum((y - c) ** 2) - value("t", xs)))
        return np.concatenate(parts)

    def ineq_jac_ours(y, xs):
        rows = [np.asarray(value("G", xs)).reshape(m, n)]
        if spec.ball:
            rows.append(2 * (y - c)[None, :])
        return np.concatenate(rows)

    target_t = torch.as_tensor(target)

    def outer(*args):
        xs, ys = args[: len(parameters)], args[len(parameters):]
        y_all = torch.cat([v.reshape(-1) for v in ys])
        return 0.5 * ((y_all - target_t.to(y_all)) ** 2).sum() + 0.1 * sum((x ** 2).sum() for x in xs)

    problem = cbo.BilevelProblem(inner, parameters, variables, outer=outer)
    # cbo position j holds our entry idx[j]
    starts = dict(zip((v.id for v in variables), np.cumsum([0] + [v.size for v in variables])))
    idx = np.concatenate([starts[v.id] + np.arange(v.size) for v in problem.all_variables])

    def ours(y):
        out = np.empty_like(y)
        out[idx] = y
        return out

    case = Case(
        repr(spec), problem, [np.asarray(nominal[k], dtype=float) for k in spec.params], target[idx],
        grad_g=lambda y, xs: grad_ours(ours(y), xs)[idx],
        ineq=lambda y, xs: ineq_ours(ours(y), xs),
        ineq_jac=lambda y, xs: ineq_jac_ours(ours(y), xs)[:, idx],
        eq=lambda y, xs: C @ ours(y) - d - E @ value("e", xs),
        eq_jac=lambda y, xs: C[:, idx],
        data={"y0": y0[idx], "mu0": np.concatenate([mu0, [mu_ball] if spec.ball else []]), "nu0": nu0,
              "variables": variables, "y0_ours": y0},
    )
    return case


def designed_kkt_point(case: Case):
    """w0 = (y0, mu0_A, nu0) in cbo's order of y, and the active inequality entries."""
    active = np.flatnonzero(case.data["mu0"] > 0)
    return np.concatenate([case.data["y0"], case.data["mu0"][active], case.data["nu0"]]), active


def designed_reference(case: Case) -> list[np.ndarray]:
    """dF/dx = d_x F - (dR/dx)^T K^{-1} (d_y F, 0) at the designed point, dense numpy (no cvxpy, cbo, torch)."""
    xs = [np.asarray(v, dtype=float) for v in case.x]
    w, active = designed_kkt_point(case)
    n = case.problem.n_y
    K = central_jacobian(lambda z: kkt_residual(case, z, xs, active), w)
    sizes = np.cumsum([x.size for x in xs])[:-1]
    unflatten = lambda flat: [part.reshape(x.shape) for part, x in zip(np.split(flat, sizes), xs)]  # noqa: E731
    flat_x = np.concatenate([x.ravel() for x in xs])
    R_x = central_jacobian(lambda fx: kkt_residual(case, w, unflatten(fx), active), flat_x)
    v = np.linalg.solve(K, np.concatenate([w[:n] - case.y_target, np.zeros(w.size - n)]))
    grad = 0.2 * flat_x - R_x.T @ v
    return unflatten(grad)


def solved_kkt_point(case: Case, xs, steps: int = 4):
    """builders.polished_kkt_point, also accepting Clarabel's "optimal_inaccurate" on
    exponential-cone problems (accurate to ~1e-9; the Newton steps finish the job)."""
    return polished_kkt_point(case, xs, steps, accept_inaccurate=True)


def finite_difference(case: Case, direction, h: float = 1e-4) -> float:
    """d/dt F(x + t d, y*(x + t d)) at t = 0, each y* from :func:`solved_kkt_point`.

    Central differences with steps h and h/2, Richardson-extrapolated (error
    O(h^4)): y* is nonlinear in s, G and t, and plain central differences with
    h = 1e-4 are off by ~1e-6 relative there.
    """

    def F(step):
        xs = [x + step * d for x, d in zip(case.x, direction)]
        return outer_numpy(case, xs, solved_kkt_point(case, xs)[0][: case.problem.n_y])

    central = lambda step: (F(step) - F(-step)) / (2 * step)  # noqa: E731
    return (4 * central(h / 2) - central(h)) / 3


def directional(grads, direction) -> float:
    return sum(float(np.sum(np.asarray(g) * d)) for g, d in zip(grads, direction))


# ---------------------------------------------------------------- properties

@given(spec=specs())
def test_designed_point_is_the_inner_solution(spec):
    """The strategy itself: cvxpy (+ numpy Newton) finds the designed KKT point, so the reference is exact."""
    case = build(spec)
    assert case.problem.inner.is_dcp()
    w0, active0 = designed_kkt_point(case)
    assert np.abs(kkt_residual(case, w0, case.x, active0)).max() < 1e-10
    w, active = solved_kkt_point(case, case.x)
    assert active.tolist() == active0.tolist()
    assert np.allclose(w, w0, rtol=1e-8, atol=1e-8)


@given(spec=specs())
def test_every_method_matches_dense_kkt_reference(spec):
    case = build(spec)
    reference = designed_reference(case)
    note(f"reference: {reference}")
    for method in cbo.ADJOINT_METHODS:
        grads, info = cbo.hypergrad(case.problem, case.x_tensors, method=method, warm_start=False, return_info=True)
        assert [tuple(g.shape) for g in grads] == [x.shape for x in case.x]
        # cbo's KKT point and active set are the designed ones
        y = torch.cat([t.reshape(-1) for t in info.y]).numpy()
        assert np.allclose(y, case.data["y0"], rtol=1e-8, atol=1e-8), method
        assert info.active_set.active.tolist() == np.flatnonzero(case.data["mu0"] > 0).tolist(), method
        assert np.allclose(info.mu.numpy(), case.data["mu0"], rtol=1e-7, atol=1e-7), method
        assert np.allclose(info.nu.numpy(), case.data["nu0"], rtol=1e-7, atol=1e-7), method
        error = relative_error([g.numpy() for g in grads], reference)
        assert error <= TOLERANCE[method], (method, error)


# Seen as warnings in long runs of the property above, then searched for over seeds with the
# same builder: a few in a thousand drawn problems triggered a false "not unique" warning (the
# curvature check's Lanczos vectors left null(J_A) at breakdown; fixed), so the smallest one
# found is pinned as an explicit example (the derandomized default run would miss it otherwise).
DEGENERACY_FALSE_POSITIVE = Spec(family="smooth", n=7, m=0, p=2, active=(), ball=None, loss="logsumexp",
                                 params=("x",), split=0, seed=167)


@example(spec=DEGENERACY_FALSE_POSITIVE)
@given(spec=specs())
def test_no_degeneracy_warning_on_well_posed_problems(spec):
    """Strongly convex, LICQ with margin, strict complementarity: cbo must not call y* non-unique."""
    case = build(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cbo.DegenerateKKTWarning)
        cbo.hypergrad(case.problem, case.x_tensors, method="direct", warm_start=False)


@given(spec=specs(), method=st.sampled_from(cbo.ADJOINT_METHODS), data=st.data())
def test_hypergrad_matches_finite_differences(spec, method, data):
    """Differences of F(x, y*(x)) along a random unit direction, each y* from cvxpy (numpy-polished)."""
    case = build(spec)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="direction seed"))
    direction = [rng.standard_normal(x.shape) for x in case.x]
    scale = np.sqrt(sum(np.sum(d**2) for d in direction))
    direction = [d / scale for d in direction]
    grads = cbo.hypergrad(case.problem, case.x_tensors, method=method, warm_start=False)
    got = directional([g.numpy() for g in grads], direction)
    fd = finite_difference(case, direction)
    assert abs(fd - got) <= 1e-6 * max(1.0, abs(got)), (got, fd)


def check_layer_gradcheck(spec: Spec, method: str, batch: bool) -> None:
    case = build(spec)
    layer = cbo.ArgminLayer(case.problem.inner, case.problem.parameters, case.data["variables"], method=method,
                            n_workers=1)
    inputs = [t.clone() for t in case.x_tensors]
    if batch:
        noise = torch.as_tensor(np.random.default_rng(spec.seed).standard_normal((2, *inputs[0].shape)))
        inputs[0] = inputs[0] + 0.01 * noise
    inputs = [t.requires_grad_(True) for t in inputs]
    assert torch.autograd.gradcheck(lambda *a: layer(*a), inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@given(spec=specs(families=("qp",), max_n=5), method=st.sampled_from(cbo.ADJOINT_METHODS), batch=st.booleans())
def test_layer_gradcheck(spec, method, batch):
    """torch.autograd.gradcheck on cbo.ArgminLayer (outputs: the cvxpy variables) for a small drawn QP.

    With ``batch`` the first input carries a batch of two items near the designed
    point (the other inputs broadcast): the active set is the same for both.
    """
    check_layer_gradcheck(spec, method, batch)


@given(spec=specs())
def test_layer_forward_returns_designed_optimum(spec):
    """ArgminLayer on unbatched inputs (shaped like the parameters) returns y0, one tensor per variable."""
    case = build(spec)
    layer = cbo.ArgminLayer(case.problem.inner, case.problem.parameters, case.data["variables"], n_workers=1)
    outputs = layer(*case.x_tensors)
    assert [tuple(t.shape) for t in outputs] == [v.shape for v in case.data["variables"]]
    y = torch.cat([t.reshape(-1) for t in outputs]).numpy()
    assert np.allclose(y, case.data["y0_ours"], rtol=1e-8, atol=1e-8)
