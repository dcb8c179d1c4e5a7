"""problems.reweight: data, inner solution, hypergradient, and the driver reweighting on the simplex.

References independent of cbo: scikit-learn's LogisticRegression for theta*(w)
(C = 1/lam, the intercept a penalized feature, sample_weight = w), the
closed-form hypergradient of an unconstrained inner problem,
dF/dw_i = -(d_theta l_i)^T H^{-1} d_theta F, in numpy, and central finite
differences of F along a direction with theta* from cvxpy, Newton-polished in
numpy by tests/builders.py.
"""
from functools import cache

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
from sklearn.linear_model import LogisticRegression  # noqa: E402

import cbo  # noqa: E402
from problems import logistic_loss  # noqa: E402
from problems import reweight as rw  # noqa: E402

from builders import Case, central_jacobian, polished_kkt_point, relative_error  # noqa: E402

LAM = rw.REGULARIZATION


@cache
def _instance(variant: str):
    return rw.build("small", seed=0, variant=variant)


@cache
def _solved(variant: str):
    instance = _instance(variant)
    return instance.minimize(progress=False)


def _interior_point(n: int, seed: int) -> np.ndarray:
    """A random point of the simplex, well inside it (Dirichlet(5): no weight near 0)."""
    return np.random.default_rng(seed).dirichlet(np.full(n, 5.0))


# ---------------------------------------------------------------- numpy and scikit-learn references

def _sigmoid(t):
    return 0.5 * (1.0 + np.tanh(0.5 * t))


def _sklearn_theta(X, s, sample_weight=None, C=1.0 / LAM):
    """scikit-learn's L2 logistic regression; the trailing column of ones is an ordinary, penalized feature."""
    model = LogisticRegression(C=C, fit_intercept=False, tol=1e-12, max_iter=10_000)
    return model.fit(X, s, sample_weight=sample_weight).coef_.ravel()


def _grad_inner(data, w, theta):
    """d/dtheta of sum_i w_i log(1 + exp(-s_i x_i^T theta)) + lam/2 ||theta||^2."""
    return -data.X_train.T @ (w * data.s_train * _sigmoid(-data.s_train * (data.X_train @ theta))) + LAM * theta


def _closed_form_hypergrad(data, w, theta):
    """dF/dw_i = -(d_theta l_i)^T H^{-1} d_theta F, H the Hessian of the inner objective."""
    X, s = data.X_train, data.s_train
    z = s * (X @ theta)
    hess = X.T @ (X * (w * _sigmoid(z) * _sigmoid(-z))[:, None]) + LAM * np.eye(theta.size)
    grad_losses = X * (-s * _sigmoid(-z))[:, None]  # row i: d_theta log(1 + exp(-s_i x_i^T theta))
    grad_F = data.X_val.T @ (-data.s_val * _sigmoid(-data.s_val * (data.X_val @ theta))) / data.s_val.size
    return -grad_losses @ np.linalg.solve(hess, grad_F)


def _case(instance) -> Case:
    """The inner problem as a builders.Case (no constraints), for the numpy KKT polish."""
    data, n_y = instance.data["dataset"], instance.problem.n_y
    return Case(
        "reweight", instance.problem, [instance.x0.numpy()], np.zeros(n_y),
        grad_g=lambda theta, xs: _grad_inner(data, xs[0], theta),
        ineq=lambda theta, xs: np.zeros(0), ineq_jac=lambda theta, xs: np.zeros((0, n_y)),
        eq=lambda theta, xs: np.zeros(0), eq_jac=lambda theta, xs: np.zeros((0, n_y)),
    )


# ---------------------------------------------------------------- data and reference

def test_imbalanced_training_set_is_95_5_and_clean():
    data = _instance("imbalance").data["dataset"]
    n = data.n_train
    assert np.sum(data.s_train > 0) == round(rw.MINORITY_FRACTION * n) and not data.flipped.any()
    np.testing.assert_array_equal(data.s_train, data.clean_train)


def test_noisy_training_set_flips_the_stated_fraction_per_class():
    data = _instance("noisy").data["dataset"]
    np.testing.assert_array_equal(data.s_train != data.clean_train, data.flipped)
    for label, rate in rw.FLIP_RATES.items():
        members = data.clean_train == label
        assert data.flipped[members].sum() == round(rate * members.sum())
    assert data.flipped.mean() == pytest.approx(0.35, abs=0.01)


@pytest.mark.parametrize("variant", rw.VARIANTS)
def test_validation_and_test_sets_are_balanced(variant):
    data = _instance(variant).data["dataset"]
    for X, s in [(data.X_val, data.s_val), (data.X_test, data.s_test)]:
        assert np.sum(s > 0) == np.sum(s < 0) and np.all(X[:, -1] == 1.0)


@pytest.mark.parametrize("variant", rw.VARIANTS)
@pytest.mark.parametrize("weights", ["uniform", "inverse_frequency", "interior"])
def test_inner_solution_matches_scikit_learn(variant, weights):
    """cbo's polished theta*(w) and the module's cvxpy fit are scikit-learn's weighted fit with C = 1/lam."""
    instance = _instance(variant)
    data = instance.data["dataset"]
    w = (_interior_point(data.n_train, seed=1) if weights == "interior"
         else rw.baseline_weights(data.s_train, weights))
    reference = _sklearn_theta(data.X_train, data.s_train, sample_weight=w)
    _, info = cbo.hypergrad(instance.problem, torch.as_tensor(w), return_info=True)
    assert relative_error([info.y[0].numpy()], [reference]) < 1e-6
    assert relative_error([instance.data["fit"](w)], [reference]) < 1e-6


def test_uniform_weights_are_the_unweighted_fit():
    """With the n w_i scaling, w = 1/n is plain L2 logistic regression: C = 1/(lam n), no sample weights."""
    instance = _instance("imbalance")
    data = instance.data["dataset"]
    _, info = cbo.hypergrad(instance.problem, instance.x0, return_info=True)
    reference = _sklearn_theta(data.X_train, data.s_train, C=1.0 / (LAM * data.n_train))
    assert relative_error([info.y[0].numpy()], [reference]) < 1e-6


@pytest.mark.parametrize("variant", rw.VARIANTS)
def test_reference_metrics_match_scikit_learn(variant):
    instance = _instance(variant)
    data = instance.data["dataset"]
    assert set(instance.reference) == ({"uniform", "inverse_frequency"} if variant == "imbalance" else {"uniform"})
    for kind, values in instance.reference.items():
        w = rw.baseline_weights(data.s_train, kind)
        theta = _sklearn_theta(data.X_train, data.s_train, sample_weight=w)
        model = LogisticRegression(fit_intercept=False).fit(data.X_train, data.s_train)
        model.coef_ = theta[None, :]  # predictions of scikit-learn's own decision function
        predicted = model.predict(data.X_test)
        assert values["val_loss"] == pytest.approx(logistic_loss(data.X_val, data.s_val, theta), rel=1e-6)
        assert values["test_accuracy"] == pytest.approx(np.mean(predicted == data.s_test), abs=1e-3)
        assert values["test_recall_pos"] == pytest.approx(np.mean(predicted[data.s_test > 0] == 1), abs=2e-3)
        assert values["minority_weight"] == pytest.approx(w[data.clean_train > 0].sum())


def test_inverse_frequency_weights_split_the_mass_equally_between_classes():
    data = _instance("imbalance").data["dataset"]
    w = rw.baseline_weights(data.s_train, "inverse_frequency")
    assert w.sum() == pytest.approx(1.0) and w[data.s_train > 0].sum() == pytest.approx(0.5)
    assert len(np.unique(w[data.s_train > 0])) == 1 and len(np.unique(w[data.s_train < 0])) == 1


# ---------------------------------------------------------------- hypergradient

@pytest.mark.parametrize("variant", rw.VARIANTS)
def test_hypergrad_matches_closed_form_and_finite_differences(variant):
    """At a random interior point of the simplex, along a direction tangent to it."""
    instance = _instance(variant)
    data = instance.data["dataset"]
    w = _interior_point(data.n_train, seed=2)
    grad = cbo.hypergrad(instance.problem, torch.as_tensor(w), method="cg").numpy()

    case = _case(instance)
    theta = polished_kkt_point(case, [w])[0]
    assert relative_error([grad], [_closed_form_hypergrad(data, w, theta)]) < 1e-6

    direction = w * np.random.default_rng(3).standard_normal(w.size)
    direction -= w * direction.sum() / w.sum()  # sum(direction) = 0: stays on the simplex

    def F(t):
        theta_t = polished_kkt_point(case, [w + t[0] * direction])[0]
        return np.array([logistic_loss(data.X_val, data.s_val, theta_t)])

    fd = central_jacobian(F, np.zeros(1), h=1e-4)[0, 0]
    assert abs(grad @ direction - fd) < 1e-7 * max(1.0, abs(fd)), (grad @ direction, fd)


# ---------------------------------------------------------------- the driver

@pytest.mark.parametrize("variant", rw.VARIANTS)
def test_driver_lowers_the_validation_loss_on_the_simplex(variant):
    """Projected gradient from w = 1/n: F at most 0.6 x uniform's [measured at seed 0: 0.83 -> 0.30 imbalance,
    0.62 -> 0.21 noisy], w on the simplex to 1e-8, and evaluate(w) agrees with the driver's F."""
    instance, result = _instance(variant), _solved(variant)
    uniform = instance.reference["uniform"]["val_loss"]
    assert result.history.f[0] == pytest.approx(uniform, rel=1e-6)
    assert result.fun < 0.6 * uniform
    w = result.x.numpy()
    assert w.min() >= -1e-8 and abs(w.sum() - 1.0) <= 1e-8
    assert instance.evaluate(result.x)["val_loss"] == pytest.approx(result.fun, rel=1e-5)


def test_imbalance_beats_both_baselines():
    """Learned weights beat inverse class frequency on validation loss [0.30 vs 0.58] and lift the test accuracy
    of the balanced test set by at least 0.1 over uniform weights, to no less than inverse frequency's
    [0.70 uniform, 0.85 inverse frequency, 0.88 learned]."""
    instance, result = _instance("imbalance"), _solved("imbalance")
    ref, learned = instance.reference, instance.evaluate(result.x)
    assert result.fun < ref["inverse_frequency"]["val_loss"]
    assert learned["test_accuracy"] >= ref["uniform"]["test_accuracy"] + 0.1
    assert learned["test_accuracy"] >= ref["inverse_frequency"]["test_accuracy"] - 0.01
    assert learned["minority_weight"] > 2 * rw.MINORITY_FRACTION  # the minority class is up-weighted [0.14]


def test_noisy_moves_the_weight_off_the_flipped_labels():
    """The flipped samples (35 % of them) end with less than half their uniform share of the mass [0.05], a
    flipped sample weighs on average less than a third of a clean one, and the test accuracy rises by at
    least 0.1 over uniform weights [0.68 -> 0.90]."""
    instance, result = _instance("noisy"), _solved("noisy")
    data, w = instance.data["dataset"], result.x.numpy()
    learned = instance.evaluate(result.x)
    uniform_share = data.flipped.mean()
    assert learned["flipped_weight"] < 0.5 * uniform_share
    assert w[data.flipped].mean() < w[~data.flipped].mean() / 3
    assert learned["test_accuracy"] >= instance.reference["uniform"]["test_accuracy"] + 0.1


# ---------------------------------------------------------------- bad input

def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="Unknown size"):
        rw.build("huge")
    with pytest.raises(ValueError, match="Unknown variant"):
        rw.build("small", variant="both")
    with pytest.raises(ValueError, match="Unknown baseline"):
        rw.baseline_weights(np.array([1.0, -1.0]), "oracle")
