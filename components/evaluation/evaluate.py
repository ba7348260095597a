"""evaluate: the trained checkpoint on the test split, by the one evaluator every format uses.

Writes reports/evaluation.json (the metrics of `metrics.score`, accuracy under corruptions,
the wrong predictions the model is surest of), reports/predictions.csv and the figures, and
logs them to MLflow.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass

import numpy as np

from components.core import paths, tracking
from components.core.config import Config
from components.data import prepared
from components.data.prepared import load_split
from components.evaluation.figures import evaluation_figures
from components.scoring import backends, robustness
from components.scoring.metrics import score
from components.training import models


@dataclass(frozen=True)
class EvaluationResult:
    accuracy: float
    macro_f1: float
    report: str


def run(cfg: Config) -> EvaluationResult:
    model, spec = models.load_checkpoint(paths.CHECKPOINT)
    images, labels = load_split("test")
    classes = spec["classes"]
    predict = backends.torch_predictor(model)
    metrics, probabilities = score(predict, images, labels, classes)
    sample = prepared.sample(len(images), cfg.evaluate.robustness_images, cfg.seed)
    metrics["corruptions"] = robustness.corruption_accuracy(
        predict, images, labels, sample, cfg.seed
    )
    metrics["corruption_images"] = len(sample)
    metrics["most_confident_wrong"] = most_confident_wrong(probabilities, labels, classes)
    paths.write_json(paths.EVALUATION_REPORT, metrics)
    paths.write_metrics(
        paths.EVALUATION_METRICS,
        {
            "test_accuracy": metrics["accuracy"],
            "test_macro_f1": metrics["macro_f1"],
            "test_ece": metrics["ece"],
        },
    )
    _write_predictions(labels, probabilities.argmax(1), classes)
    figures = evaluation_figures(model, metrics, probabilities, images, labels, classes)

    with tracking.step_run(cfg, "evaluate"):
        import mlflow

        mlflow.log_metrics(
            {
                "test/accuracy": metrics["accuracy"],
                "test/macro_f1": metrics["macro_f1"],
                "test/top_k_accuracy": metrics["top_k_accuracy"],
                "test/ece": metrics["ece"],
            }
        )
        for name, row in metrics["per_class"].items():
            mlflow.log_metrics({f"test/f1/{name}": row["f1"], f"test/recall/{name}": row["recall"]})
        for name, values in metrics["corruptions"].items():
            for severity, value in enumerate(values, start=1):
                mlflow.log_metric(f"robustness/{name}", value, step=severity)
        mlflow.log_artifact(str(paths.EVALUATION_REPORT))
        for figure in figures:
            mlflow.log_artifact(str(figure), "plots")
    return EvaluationResult(metrics["accuracy"], metrics["macro_f1"], str(paths.EVALUATION_REPORT))


def most_confident_wrong(probabilities, labels, classes, limit: int = 10) -> list[dict]:
    """The wrong predictions the model is surest of: often label errors in the data."""
    test_paths = _test_paths(len(labels))
    predicted = probabilities.argmax(1)
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")][:limit]
    return [
        {
            "path": test_paths[i],
            "label": classes[labels[i]],
            "predicted": classes[predicted[i]],
            "confidence": round(float(probabilities[i, predicted[i]]), 4),
        }
        for i in wrong
    ]


def _test_paths(n: int) -> list[str]:
    """Paths of the test split in shard order (prepare stacks rows in manifest order)."""
    import pandas as pd

    if not paths.MANIFEST.exists():
        return [f"#{i}" for i in range(n)]
    manifest = pd.read_parquet(paths.MANIFEST, columns=["path", "split"])
    test_paths = manifest.loc[manifest["split"] == "test", "path"].tolist()
    return test_paths if len(test_paths) == n else [f"#{i}" for i in range(n)]


def _write_predictions(labels: np.ndarray, predicted: np.ndarray, classes: list[str]) -> None:
    with paths.atomic(paths.PREDICTIONS) as partial, partial.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        writer.writerows((classes[a], classes[p]) for a, p in zip(labels, predicted, strict=True))
