"""Linear probes on pooled features: top-k feature selection and logistic regression accuracy.

Every probe, on all features or on the top k, is scikit-learn's L2-regularized
``LogisticRegression`` (C = 1, lbfgs). SAEBench fits its all-feature probes with a
PyTorch probe and keeps the epoch with the best test accuracy, so its test set also
selects the probe. Here the test set only scores the fitted probe.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from evals.sparse_probing.data import NEGATIVE_LABEL, POSITIVE_LABEL


@dataclass
class ProbeResult:
    """Test accuracy of one fitted probe and whether its solver converged."""

    test_accuracy: float
    converged: bool


def top_k_by_mean_difference(features_NF: np.ndarray, labels_N: np.ndarray, k: int) -> np.ndarray:
    """Return the indices of the ``k`` features with the largest ``|mean(positive) - mean(negative)|``.

    Ties go to the lower index, so the choice is deterministic. With ``k`` at or above
    the number of features, every feature is returned.
    """
    positive_mean_F = features_NF[labels_N == POSITIVE_LABEL].mean(axis=0, dtype=np.float64)
    negative_mean_F = features_NF[labels_N == NEGATIVE_LABEL].mean(axis=0, dtype=np.float64)
    score_F = np.abs(positive_mean_F - negative_mean_F)
    order = np.argsort(-score_F, kind="stable")
    return order[: min(k, features_NF.shape[1])]


def fit_probe(
    train_X: np.ndarray,
    train_y: np.ndarray,
    test_X: np.ndarray,
    test_y: np.ndarray,
    max_iter: int,
) -> ProbeResult:
    """Fit a logistic regression on the train set and return its test accuracy."""
    probe = LogisticRegression(C=1.0, max_iter=max_iter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        probe.fit(train_X.astype(np.float64), train_y)
    converged = not any(issubclass(warning.category, ConvergenceWarning) for warning in caught)
    accuracy = float((probe.predict(test_X.astype(np.float64)) == test_y).mean())
    return ProbeResult(test_accuracy=accuracy, converged=converged)


def evaluate_probes(
    train_X: np.ndarray,
    train_y: np.ndarray,
    test_X: np.ndarray,
    test_y: np.ndarray,
    k_values: list[int],
    max_iter: int,
) -> tuple[dict[str, float], int]:
    """Fit the all-feature probe and one top-k probe per ``k`` on one task.

    Returns ``({"test_accuracy": ..., "top_{k}_test_accuracy": ...}, number of probes that
    did not converge)``. Top-k features are chosen on the train set only.
    """
    results = {"test_accuracy": fit_probe(train_X, train_y, test_X, test_y, max_iter)}
    for k in k_values:
        selected = top_k_by_mean_difference(train_X, train_y, k)
        results[f"top_{k}_test_accuracy"] = fit_probe(
            train_X[:, selected], train_y, test_X[:, selected], test_y, max_iter
        )
    not_converged = sum(not result.converged for result in results.values())
    return {name: result.test_accuracy for name, result in results.items()}, not_converged
