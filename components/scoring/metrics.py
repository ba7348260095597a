"""metrics: what the pipeline measures of a backend on a labelled set, the same for every
format: accuracy, top-k, precision/recall/F1 (macro, weighted, per class), the confusion
matrix and calibration (ECE with the bins of a reliability diagram)."""

from __future__ import annotations

import math

import numpy as np

from components.scoring.backends import Predictor

CALIBRATION_BINS = 15


def score(predict: Predictor, images: np.ndarray, labels: np.ndarray, classes: list[str]):
    """Metrics of one backend on one labelled set; returns (metrics, probabilities [N, K])."""
    probabilities = predict(images)
    predicted = probabilities.argmax(axis=1)
    matrix = confusion_matrix(labels, predicted, len(classes))
    precision, recall, f1, support = per_class_scores(matrix)
    k = min(5, max(1, len(classes) - 1))
    top_k = np.argsort(-probabilities, axis=1)[:, :k]
    ece, bins = calibration(probabilities, labels)
    metrics = {
        "accuracy": float((predicted == labels).mean()),
        "top_k": k,
        "top_k_accuracy": float((top_k == labels[:, None]).any(axis=1).mean()),
        "n_images": int(len(labels)),
        "ece": ece,
        "calibration_bins": bins,
    }
    weights = {"macro": np.ones(len(classes)), "weighted": support.astype(float)}
    for average, weight in weights.items():
        for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
            mean = float(values @ weight / weight.sum()) if weight.sum() else 0.0
            metrics[f"{average}_{name}"] = mean
    metrics["per_class"] = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(classes)
    }
    metrics["confusion_matrix"] = matrix.tolist()
    row_sums = matrix.sum(axis=1, keepdims=True).clip(min=1)
    metrics["confusion_matrix_normalized"] = np.round(matrix / row_sums, 4).tolist()
    return metrics, probabilities


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """[true class, predicted class] -> count."""
    pairs = np.asarray(labels, dtype=np.int64) * n_classes + np.asarray(predicted, dtype=np.int64)
    return np.bincount(pairs, minlength=n_classes**2).reshape(n_classes, n_classes)


def per_class_scores(matrix: np.ndarray) -> tuple[np.ndarray, ...]:
    """Precision, recall, F1 and support of each class, 0 where a ratio has nothing to divide
    (scikit-learn's zero_division=0; not scikit-learn itself, whose import adds about 2 s to
    the start of every stage that scores)."""
    hits = np.diag(matrix).astype(float)
    support, predicted = matrix.sum(axis=1), matrix.sum(axis=0)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)
    return precision, recall, f1, support


def calibration(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = CALIBRATION_BINS):
    """Expected calibration error and the per-bin data of a reliability diagram."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0, 1, n_bins + 1)
    bins, ece = [], 0.0
    for lower, upper in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > lower) & (confidence <= upper)
        count = int(inside.sum())
        accuracy = float(correct[inside].mean()) if count else 0.0
        mean_confidence = float(confidence[inside].mean()) if count else 0.0
        ece += count / max(1, len(labels)) * abs(accuracy - mean_confidence)
        bins.append(
            {
                "lower": float(lower),
                "upper": float(upper),
                "count": count,
                "accuracy": accuracy,
                "confidence": mean_confidence,
            }
        )
    return float(ece), bins


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar test: b, c = test images only one of the two models gets right."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return float(f"{min(1.0, 2 * tail):.3g}")
