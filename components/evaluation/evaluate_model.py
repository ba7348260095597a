"""lensflow evaluate: score any exported lensflow model (a registry URI, a run URI or an .onnx
file) on any ImageFolder, or on this project's test split, with the pipeline's evaluator."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.core import paths, tracking
from components.core.errors import UserError
from components.core.params_pipeline import Prepare
from components.data import imagefacts, prepared
from components.release import registry
from components.scoring import backends
from components.scoring.metrics import score


@dataclass(frozen=True)
class ModelEvaluation:
    model: str
    accuracy: float
    macro_f1: float
    n_images: int
    report: str


def run(model_uri: str, data: str | None, report: str | Path) -> ModelEvaluation:
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    session, meta = registry.load_onnx_session(model_uri)
    if meta.get("task") == "detection":
        raise UserError(
            f"{model_uri} is a detector: `lensflow evaluate` scores classifiers; a detector's "
            "COCO mAP is `lensflow stage evaluate --set task=detection` (or `lensflow predict`)"
        )
    classes = meta["classes"]
    if data:
        if "image_size" not in meta:
            raise UserError(f"{model_uri}: no image_size in its metadata; export it again")
        size, channels = int(meta["image_size"]), int(meta["channels"])
        images, labels = read_image_folder(data, classes, channels, size)
    else:
        images, labels = _test_split(model_uri, meta)
    metrics, _ = score(backends.onnx_predictor(session), images, labels, classes)
    report = Path(report)
    paths.write_json(report, {"model": model_uri, "data": data or "test split", **metrics})
    return ModelEvaluation(
        model_uri, metrics["accuracy"], metrics["macro_f1"], metrics["n_images"], str(report)
    )


def _test_split(model_uri: str, meta: dict):
    """This project's test split, as the model takes it (its channels and size)."""
    ours = prepared.load_meta()
    if sorted(ours["classes"]) != sorted(meta["classes"]):
        raise UserError(f"{model_uri} predicts other classes than this project's test split")
    spec = [int(meta.get(key, ours[key])) for key in ("channels", "image_size")]
    images, labels, unreadable = registry.test_split(meta["classes"], *spec, Prepare().max_pixels)
    if unreadable:
        raise UserError(f"{unreadable}: cannot be used as an image any more")
    return images, labels


def summary(result: ModelEvaluation) -> str:
    return (
        f"{result.model}: accuracy {result.accuracy:.4f}, macro-F1 {result.macro_f1:.4f} "
        f"on {result.n_images} images ({result.report})"
    )


def read_image_folder(root, classes: list[str], channels: int, size: int):
    """An ImageFolder decoded exactly as prepare decodes it (imagefacts: EXIF rotation, mode
    conversion, pixel limit, resize): uint8 [N, C, size, size] + labels."""
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
