"""evaluate: one evaluator for every backend.

A backend is a function uint8 images [N, C, H, W] (numpy) -> class probabilities [N, K].
PyTorch modules, ONNX Runtime sessions (fp32 or int8) and TensorRT engines are all wrapped
into one, so every format is scored on the same data by the same code, and gates compare
like with like.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from components import models, paths, plots, tracking
from components.config import Config
from components.prepare import load_split

Predictor = Callable[[np.ndarray], np.ndarray]
CALIBRATION_BINS = 15
# name -> three severities; applied to uint8 images by `corrupt`
CORRUPTIONS = {
    "gaussian_noise": (8.0, 16.0, 32.0),  # std in pixel values
    "gaussian_blur": (0.5, 1.0, 1.5),  # sigma in pixels
    "brightness": (25.0, 50.0, 75.0),  # added to every pixel
    "contrast": (0.7, 0.5, 0.3),  # factor around each image's mean
}


@dataclass(frozen=True)
class EvaluationResult:
    accuracy: float
    macro_f1: float
    report: str


def run(cfg: Config) -> EvaluationResult:
    model, spec = models.load_checkpoint(paths.CHECKPOINT)
    images, labels = (t.numpy() for t in load_split("test"))
    classes = spec["classes"]
    predict = torch_predictor(model)
    metrics, probabilities = score(predict, images, labels, classes)
    metrics["corruptions"] = corruption_accuracy(predict, images, labels, cfg.seed)
    metrics["most_confident_wrong"] = most_confident_wrong(probabilities, labels, classes)
    paths.REPORTS.mkdir(parents=True, exist_ok=True)
    paths.EVALUATION_REPORT.write_text(json.dumps(metrics, indent=2))
    _write_predictions(labels, probabilities.argmax(1), classes)
    figures = _figures(model, metrics, probabilities, images, labels, classes)

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


def torch_predictor(model: torch.nn.Module, batch_size: int = 256) -> Predictor:
    model.eval()

    @torch.no_grad()
    def predict(images: np.ndarray) -> np.ndarray:
        batches = range(0, len(images), batch_size)
        out = [
            torch.softmax(model(torch.from_numpy(images[i : i + batch_size])), 1) for i in batches
        ]
        return torch.cat(out).numpy()

    return predict


def onnx_predictor(session, batch_size: int = 256) -> Predictor:
    """An onnxruntime.InferenceSession of a lensflow export (`images` in, `probabilities` out)."""

    def predict(images: np.ndarray) -> np.ndarray:
        batches = range(0, len(images), batch_size)
        out = [
            session.run(["probabilities"], {"images": images[i : i + batch_size]})[0]
            for i in batches
        ]
        return np.concatenate(out)

    return predict


def score(predict: Predictor, images: np.ndarray, labels: np.ndarray, classes: list[str]):
    """Metrics of one backend on one labelled set; returns (metrics, probabilities [N, K])."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    probabilities = predict(images)
    predicted = probabilities.argmax(axis=1)
    indices = list(range(len(classes)))
    per_class = precision_recall_fscore_support(labels, predicted, labels=indices, zero_division=0)
    matrix = confusion_matrix(labels, predicted, labels=indices)
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
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            labels, predicted, labels=indices, average=average, zero_division=0
        )
        metrics.update(
            {
                f"{average}_precision": float(p),
                f"{average}_recall": float(r),
                f"{average}_f1": float(f),
            }
        )
    metrics["per_class"] = {
        name: {
            "precision": float(per_class[0][i]),
            "recall": float(per_class[1][i]),
            "f1": float(per_class[2][i]),
            "support": int(per_class[3][i]),
        }
        for i, name in enumerate(classes)
    }
    metrics["confusion_matrix"] = matrix.tolist()
    row_sums = matrix.sum(axis=1, keepdims=True).clip(min=1)
    metrics["confusion_matrix_normalized"] = np.round(matrix / row_sums, 4).tolist()
    return metrics, probabilities


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


def corrupt(images: np.ndarray, name: str, severity: float, rng: np.random.Generator):
    """One standard corruption of uint8 images [N, C, H, W], returned as uint8."""
    x = images.astype(np.float32)
    if name == "gaussian_noise":
        x = x + rng.normal(0, severity, size=x.shape)
    elif name == "gaussian_blur":
        x = _blur(x, severity)
    elif name == "brightness":
        x = x + severity
    elif name == "contrast":
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        x = (x - mean) * severity + mean
    else:
        raise ValueError(f"unknown corruption {name!r}")
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def corruption_accuracy(predict: Predictor, images, labels, seed: int) -> dict[str, list[float]]:
    rng = np.random.default_rng(seed)
    return {
        name: [
            float((predict(corrupt(images, name, s, rng)).argmax(1) == labels).mean())
            for s in severities
        ]
        for name, severities in CORRUPTIONS.items()
    }


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


def saliency(model: models.Classifier, images: np.ndarray) -> np.ndarray:
    """Vanilla-gradient saliency of the predicted class, [N, 1, H, W] in [0, 1]."""
    model.eval()
    inputs = model.preprocess(torch.from_numpy(images)).detach().requires_grad_(True)
    logits = model.network(inputs)
    logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
    maps = inputs.grad.abs().amax(dim=1, keepdim=True)
    maps = maps / maps.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return maps.numpy()


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    radius = max(1, math.ceil(2 * sigma))
    taps = torch.exp(-(torch.arange(-radius, radius + 1.0) ** 2) / (2 * sigma**2))
    taps = taps / taps.sum()
    t = torch.from_numpy(x)
    channels = t.shape[1]
    for kernel in (taps.view(1, 1, 1, -1), taps.view(1, 1, -1, 1)):
        pad = (radius, radius, 0, 0) if kernel.shape[-1] > 1 else (0, 0, radius, radius)
        t = torch.nn.functional.pad(t, pad, mode="replicate")
        t = torch.nn.functional.conv2d(
            t, kernel.expand(channels, 1, *kernel.shape[2:]), groups=channels
        )
    return t.numpy()


def _figures(model, metrics, probabilities, images, labels, classes) -> list:
    predicted = probabilities.argmax(1)
    wrong = np.flatnonzero(predicted != labels)[:16]
    shown = np.unique(labels, return_index=True)[1][:8]  # one image per class
    maps = saliency(model, images[shown])
    gray = images[shown].astype(np.float32).mean(axis=1, keepdims=True) / 255.0
    overlay = np.concatenate([np.maximum(gray, maps), gray * (1 - maps), gray * (1 - maps)], 1)
    return [
        plots.confusion_matrix(
            np.array(metrics["confusion_matrix"]), classes, paths.PLOTS / "confusion_matrix.png"
        ),
        plots.reliability_diagram(
            metrics["calibration_bins"], metrics["ece"], paths.PLOTS / "reliability.png"
        ),
        plots.image_grid(
            images[wrong],
            [f"{classes[labels[i]]} -> {classes[predicted[i]]}" for i in wrong],
            paths.PLOTS / "misclassified.png",
        ),
        plots.image_grid(
            overlay, [f"pred {classes[predicted[i]]}" for i in shown], paths.PLOTS / "saliency.png"
        ),
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
    with paths.PREDICTIONS.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        writer.writerows((classes[a], classes[p]) for a, p in zip(labels, predicted, strict=True))


def read_image_folder(root, classes: list[str], channels: int, size: int):
    """An ImageFolder decoded exactly as prepare decodes it (imagefacts: EXIF rotation, mode
    conversion, pixel limit, resize): uint8 [N, C, size, size] + labels."""
    from pathlib import Path

    from components import imagefacts
    from components.config import Prepare, UserError

    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: not a directory (expected <root>/<class>/<image>)")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if p.name not in classes]
    if not folders or unknown:
        problem = f"classes the model does not know: {unknown}" if unknown else "no class folders"
        raise UserError(f"{root}: {problem} (the model knows {classes})")
    files, labels = [], []
    for folder in folders:
        visible = (f for f in folder.rglob("*") if f.is_file() and not f.name.startswith("."))
        for file in sorted(visible):
            files.append(str(file))
            labels.append(classes.index(folder.name))
    options = imagefacts.ReadOptions(channels, size, Prepare().max_pixels)
    images = []
    for file, (facts, pixels) in zip(files, imagefacts.read_many(files, options), strict=True):
        if pixels is None:
            raise UserError(f"{file}: cannot be used as an image ({facts['error']})")
        images.append(pixels)
    return np.stack(images), np.array(labels, dtype=np.int64)
