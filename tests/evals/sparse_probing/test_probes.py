"""Top-k feature selection and logistic regression probes on synthetic features."""

from __future__ import annotations

import numpy as np

from evals.sparse_probing.probes import evaluate_probes, fit_probe, top_k_by_mean_difference


def synthetic_task(
    n: int = 200, n_features: int = 20, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Features where only 3 (strongly) and 7 (weakly, negatively) depend on the label."""
    rng = np.random.default_rng(seed)
    labels_N = rng.permutation(np.repeat([0, 1], n // 2))
    features_NF = rng.normal(size=(n, n_features))
    features_NF[:, 3] += 4.0 * labels_N
    features_NF[:, 7] -= 1.5 * labels_N
    return features_NF, labels_N


def test_top_k_picks_informative_features() -> None:
    features_NF, labels_N = synthetic_task()
    assert top_k_by_mean_difference(features_NF, labels_N, 1).tolist() == [3]
    assert top_k_by_mean_difference(features_NF, labels_N, 2).tolist() == [3, 7]


def test_top_k_ties_prefer_lower_index() -> None:
    features_NF = np.array([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    labels_N = np.array([1, 0])
    assert top_k_by_mean_difference(features_NF, labels_N, 2).tolist() == [1, 2]


def test_top_k_above_width_returns_all() -> None:
    features_NF, labels_N = synthetic_task(n_features=8)
    selected = top_k_by_mean_difference(features_NF, labels_N, 50)
    assert sorted(selected.tolist()) == list(range(8))


def test_fit_probe_separable_and_noise() -> None:
    features_NF, labels_N = synthetic_task(n=400)
    separable = fit_probe(
        features_NF[:200], labels_N[:200], features_NF[200:], labels_N[200:], max_iter=1000
    )
    assert separable.test_accuracy > 0.95
    assert separable.converged

    noise_NF = np.random.default_rng(1).normal(size=features_NF.shape)
    chance = fit_probe(
        noise_NF[:200], labels_N[:200], noise_NF[200:], labels_N[200:], max_iter=1000
    )
    assert 0.3 < chance.test_accuracy < 0.7


def test_evaluate_probes_selects_on_train_only() -> None:
    """The top-1 probe uses the feature informative on the train set, even when the test set disagrees."""
    train_X, train_y = synthetic_task(seed=2)
    test_X, test_y = synthetic_task(seed=3)
    # On the test set feature 3 carries nothing and feature 0 carries the label.
    test_X[:, 3] = np.random.default_rng(4).normal(size=len(test_X))
    test_X[:, 0] += 4.0 * test_y
    accuracies, not_converged = evaluate_probes(
        train_X, train_y, test_X, test_y, [1, 5], max_iter=1000
    )

    assert set(accuracies) == {"test_accuracy", "top_1_test_accuracy", "top_5_test_accuracy"}
    assert accuracies["top_1_test_accuracy"] < 0.7
    assert not_converged == 0


def test_fit_probe_reports_no_convergence() -> None:
    features_NF, labels_N = synthetic_task()
    result = fit_probe(features_NF * 100.0, labels_N, features_NF, labels_N, max_iter=1)
    assert not result.converged
    assert 0.0 <= result.test_accuracy <= 1.0
