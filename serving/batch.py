"""Batch scoring (`lensflow predict`, flows/batch_inference.py): files and folders of images
through the model the service would serve, written as Parquet and CSV.

It lives beside the service, not in components/, because it is the service's path without
HTTP: the same model loading (alias resolved, golden check, int8 when asked) and the same
decoding, so a file gets the same probabilities from `lensflow predict` as from POST /predict.
Files that cannot be read or decoded are skipped and listed (path, reason), never dropped
silently. Files stream: their headers are read first (sizes, for batching), then each is
decoded just before its batch is scored, so memory does not grow with the number of files.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.core import paths as project_paths
from components.core.config import Config
from components.core.errors import UserError
from serving import images
from serving.model import Refused, Transient, alias_version, boxes, load, parse

COLUMNS = ("path", "class", "confidence", "model_version")
# a detector: one row per box (x1, y1, x2, y2 in the image's pixels); an image without a box
# gets one row with empty class, score and box, so every scored file is listed
DETECTION_COLUMNS = ("path", "class", "score", "x1", "y1", "x2", "y2", "model_version")
BATCH_PIXELS = 64 * 224 * 224  # pixels decoded and scored together (~10 MB for RGB)


@dataclass(frozen=True)
class BatchResult:
    model_version: str
    scored: int
    skipped: list[tuple[str, str]]  # (path, reason)
    parquet: str
    csv: str
    skipped_csv: str


def run(cfg: Config, inputs: list[str], model_uri: str | None, out: str | Path) -> BatchResult:
    files = _files(inputs)
    model = _model(cfg, model_uri)
    skipped, shapes = [], {}
    for file in files:  # headers only: each file's size, so that same-sized images batch
        try:
            with images.open_image(Path(file).read_bytes(), cfg.serve.max_pixels, file) as image:
                shapes[file] = (image.height, image.width)
        except (OSError, images.BadRequest) as exc:
            skipped.append((file, _reason(file, exc)))
    probabilities = dict(_predict(model, shapes, cfg.serve.max_pixels, skipped))
    skipped.sort()
    if model.task == "detection":
        rows = [row for file in files if file in probabilities
                for row in _box_rows(file, probabilities[file], model)]  # fmt: skip
        return _write(Path(out), rows, skipped, model.version, DETECTION_COLUMNS)
    rows = [
        (file, model.classes[int(p.argmax())], round(float(p.max()), 6), model.version)
        for file in files
        if (p := probabilities.get(file)) is not None
    ]
    return _write(Path(out), rows, skipped, model.version)


def _box_rows(file: str, found: dict, model) -> list[tuple]:
    rows = [
        (file, box["class"], box["score"], *box["box"], model.version)
        for box in boxes(found, model.classes)
    ]
    return rows or [(file, None, None, None, None, None, None, model.version)]


def summary(result: BatchResult) -> str:
    lines = [
        f"predict: {result.scored} images scored by version {result.model_version} -> "
        f"{result.parquet}, {result.csv}"
    ]
    if result.skipped:
        lines.append(f"skipped {len(result.skipped)} (see {result.skipped_csv}):")
        lines += [f"  {path}: {reason}" for path, reason in result.skipped]
    return "\n".join(lines)


def _files(inputs: list[str]) -> list[str]:
    files = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            found = (p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            files += sorted(str(p) for p in found)
        elif path.is_file():
            files.append(str(path))
        elif path.exists():
            raise UserError(f"{given}: not a regular file or a folder")
        else:
            raise UserError(f"{given}: no such file or folder")
    if not files:
        raise UserError(f"{' '.join(inputs)}: no files to score")
    return files


def _model(cfg: Config, model_uri: str | None):
    import mlflow

    from components.core import tracking

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(tracking.tracking_uri())
    source = parse(model_uri or f"models:/{cfg.registry.model_name}@champion")
    try:
        version = alias_version(source) if source.alias else (source.version or "file")
    except Exception as exc:
        raise UserError(f"{source.uri}: the registry did not answer ({exc})") from None
    if version is None:
        raise UserError(f"{source.uri}: no such model version or alias in the registry")
    try:
        return load(source, version, cfg.serve)
    except (Refused, Transient) as exc:
        raise UserError(f"{source.uri}: {exc}") from None


def _predict(model, shapes: dict[str, tuple], max_pixels: int, skipped: list):
    """(file, probabilities) of each file, decoded one at a time in order of size and scored
    BATCH_PIXELS at most together: memory is one batch, whatever the number of files."""
    batch, names, pixels = [], [], 0
    for file in sorted(shapes, key=lambda f: (shapes[f], f)):
        try:
            array = images.decode(Path(file).read_bytes(), model.channels, max_pixels, file)
        except (OSError, images.BadRequest) as exc:
            skipped.append((file, _reason(file, exc)))
            continue
        if batch and (batch[0].shape != array.shape or pixels >= BATCH_PIXELS):
            yield from zip(names, model.predict(np.concatenate(batch)), strict=True)
            batch, names, pixels = [], [], 0
        batch.append(array)
        names.append(file)
        pixels += array.shape[2] * array.shape[3]
    if batch:
        yield from zip(names, model.predict(np.concatenate(batch)), strict=True)


def _reason(file: str, exc: Exception) -> str:
    if isinstance(exc, OSError):
        return f"cannot be read: {exc.strerror or exc}"
    return exc.message.removeprefix(f"{file}: ")


def _write(out: Path, rows: list, skipped: list, version: str, columns=COLUMNS) -> BatchResult:
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows, columns=list(columns)).astype({"model_version": str})
    numbers = [c for c in ("score", "x1", "y1", "x2", "y2") if c in table]  # None -> NaN
    table = table.astype(dict.fromkeys(numbers, float))
    parquet, csv_file, skipped_file = (
        out / "predictions.parquet",
        out / "predictions.csv",
        out / "skipped.csv",
    )
    with project_paths.atomic(parquet) as partial:
        table.to_parquet(partial, index=False)
    with project_paths.atomic(csv_file) as partial:
        table.to_csv(partial, index=False)
    with project_paths.atomic(skipped_file) as partial, partial.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("path", "reason"))
        writer.writerows(skipped)
    scored = table["path"].nunique()
    return BatchResult(version, scored, skipped, str(parquet), str(csv_file), str(skipped_file))
