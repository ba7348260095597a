"""metrics.score's precision, recall, F1 and confusion matrix are scikit-learn's (computed
with numpy, to keep scikit-learn's import out of every scoring stage's start)."""

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from components.scoring import metrics


def test_scores_equal_scikit_learns_with_zero_division_0():
    rng = np.random.default_rng(0)
    for case in range(100):
        n_classes, n = int(rng.integers(2, 12)), int(rng.integers(1, 60))
        labels, predicted = rng.integers(0, n_classes, n), rng.integers(0, n_classes, n)
        if case % 3 == 0:  # mostly right, one class predicted for a third: empty columns
            predicted = labels.copy()
            predicted[: n // 3] = 0
        classes = [f"c{i}" for i in range(n_classes)]
        indices = list(range(n_classes))
        one_hot = np.eye(n_classes)[predicted] * 0.9 + 0.1 / n_classes
        scored, _ = metrics.score(lambda images, p=one_hot: p, None, labels, classes)

        assert (
            scored["confusion_matrix"]
            == confusion_matrix(labels, predicted, labels=indices).tolist()
        )
        per_class = precision_recall_fscore_support(
            labels, predicted, labels=indices, zero_division=0
        )
        for i, name in enumerate(classes):
            expected = [values[i] for values in per_class]
            got = scored["per_class"][name]
            got = [got["precision"], got["recall"], got["f1"], got["support"]]
            assert np.allclose(got, expected, rtol=0, atol=1e-12), (case, name)
        for average in ("macro", "weighted"):
            expected = precision_recall_fscore_support(
                labels, predicted, labels=indices, average=average, zero_division=0
            )[:3]
            got = [scored[f"{average}_{name}"] for name in ("precision", "recall", "f1")]
            assert np.allclose(got, expected, rtol=0, atol=1e-12), (case, average)
