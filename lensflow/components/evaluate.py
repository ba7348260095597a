"""evaluate: one evaluator for every backend.

A backend is a function uint8 images [N, C, H, W] (numpy) -> class probabilities [N, K].
PyTorch modules and ONNX Runtime sessions are both wrapped into one, so every format is
scored on the same data by the same code, and gates compare like with like.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lensflow.components import models, paths, tracking
from lensflow.components.config import Config
from lensflow.components.prepare import load_split

Predictor = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class EvaluationResult:
    accuracy: float
    macro_f1: float
    report: str


def run(cfg: Config) -> EvaluationResult:
    model, spec = models.load_checkpoint(paths.CHECKPOINT)
    images, labels = load_split("test")
    metrics, predictions = score(
        torch_predictor(model), images.numpy(), labels.numpy(), spec["classes"]
    )
    paths.REPORTS.mkdir(parents=True, exist_ok=True)
    paths.EVALUATION_REPORT.write_text(json.dumps(metrics, indent=2))
    _write_predictions(labels.numpy(), predictions, spec["classes"])
    figure = confusion_matrix_png(np.array(metrics["confusion_matrix"]), spec["classes"])

    with tracking.step_run(cfg, "evaluate"):
        import mlflow

        mlflow.log_metrics(
            {"test/accuracy": metrics["accuracy"], "test/macro_f1": metrics["macro_f1"]}
        )
        for name, row in metrics["per_class"].items():
            mlflow.log_metrics({f"test/f1/{name}": row["f1"], f"test/recall/{name}": row["recall"]})
        mlflow.log_artifact(str(paths.EVALUATION_REPORT))
        mlflow.log_artifact(str(figure))
    return EvaluationResult(metrics["accuracy"], metrics["macro_f1"], str(paths.EVALUATION_REPORT))


def torch_predictor(model: torch.nn.Module, batch_size: int = 256) -> Predictor:
    model.eval()

    @torch.no_grad()
    def predict(images: np.ndarray) -> np.ndarray:
        out = [
            torch.softmax(model(torch.from_numpy(images[i : i + batch_size])), dim=1)
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(out).numpy()

    return predict


def onnx_predictor(session, batch_size: int = 256) -> Predictor:
    """An onnxruntime.InferenceSession of a lensflow export (`images` in, `probabilities` out)."""

    def predict(images: np.ndarray) -> np.ndarray:
        out = [
            session.run(["probabilities"], {"images": images[i : i + batch_size]})[0]
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(out)

    return predict


def score(predict: Predictor, images: np.ndarray, labels: np.ndarray, classes: list[str]):
    """Metrics of one backend on one labelled set; returns (metrics dict, predicted indices)."""
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    predicted = predict(images).argmax(axis=1)
    indices = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=indices, zero_division=0
    )
    metrics = {
        "accuracy": float((predicted == labels).mean()),
        "macro_f1": float(
            f1_score(labels, predicted, labels=indices, average="macro", zero_division=0)
        ),
        "weighted_f1": float(
            f1_score(labels, predicted, labels=indices, average="weighted", zero_division=0)
        ),
        "n_images": int(len(labels)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(labels, predicted, labels=indices).tolist(),
    }
    return metrics, predicted


def confusion_matrix_png(matrix: np.ndarray, classes: list[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set(
        xticks=range(len(classes)),
        yticks=range(len(classes)),
        xlabel="predicted",
        ylabel="true",
        title="confusion matrix (test)",
    )
    ax.set_xticklabels(classes, rotation=90)
    ax.set_yticklabels(classes)
    threshold = matrix.max() / 2 if matrix.size else 0
    for (row, col), value in np.ndenumerate(matrix):
        ax.text(
            col,
            row,
            str(value),
            ha="center",
            va="center",
            fontsize=7,
            color="white" if value > threshold else "black",
        )
    fig.tight_layout()
    paths.PLOTS.mkdir(parents=True, exist_ok=True)
    out = paths.PLOTS / "confusion_matrix.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _write_predictions(labels: np.ndarray, predicted: np.ndarray, classes: list[str]) -> None:
    with paths.PREDICTIONS.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        writer.writerows((classes[a], classes[p]) for a, p in zip(labels, predicted, strict=True))
