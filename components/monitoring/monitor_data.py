"""A monitoring batch through the training data's gate: prepare + validate (the same Great
Expectations suite and file policies as training data) in a scratch directory, so bad files
are reported, never crash the pass, and never reach the model. The batch is an ImageFolder
with labels (`<batch>/<class>/<image>`, classes the model knows) or a flat folder of images
without labels. The batch folder is only read."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.core import config, paths
from components.core.config import Config
from components.core.errors import UserError
from components.data import prepare, prepared, validate

UNLABELLED = "_unlabelled"  # the one class folder a flat batch is read as
# Checks about a training set's shape, not about the files: off for a batch.
DATASET_CHECKS = (
    "split_leakage",
    "near_duplicate",
    "missing_class",
    "empty_class",
    "too_few_images",
    "class_imbalance",
)


@dataclass
class Batch:
    images: np.ndarray  # uint8 [N, C, S, S]: the usable files, decoded as prepare decodes
    labels: np.ndarray | None  # indices into the model's classes; None without labels
    files: list[str]  # relative to the batch folder, in the rows' order
    widths: np.ndarray
    heights: np.ndarray
    validation: dict  # the gate's report (reports/validation.json's keys)
    fingerprint: str  # sha256 over every file's (relative path, sha256, label)


def read(cfg: Config, folder: str | Path, classes: list[str], channels: int, size: int) -> Batch:
    """The batch at `folder`, decoded for a model of `classes`, `channels` and `size`."""
    root = Path(folder).expanduser().resolve()
    if not root.exists():
        raise UserError(f"{folder}: batch folder not found")
    if not root.is_dir():
        raise UserError(f"{folder}: not a directory (expected a folder of images)")
    visible = [p for p in root.iterdir() if not p.name.startswith(".")]
    labelled = any(p.is_dir() for p in visible)
    if not visible:
        raise UserError(f"{folder}: empty (expected images, or <class>/<image> folders)")
    with tempfile.TemporaryDirectory(prefix="lensflow-monitor-") as work:
        source = root if labelled else _as_one_class(root, Path(work) / "batch")
        batch_cfg = _batch_config(cfg, source, classes if labelled else None, channels, size)
        project = Path(work) / "project"
        project.mkdir()
        cwd = Path.cwd()
        os.chdir(project)
        try:
            prepare.run(batch_cfg)
            validate.run(batch_cfg, track=False)
            report = json.loads(paths.VALIDATION_REPORT.read_text())
            batch = _collect(report, labelled)
        finally:
            os.chdir(cwd)
    if not labelled:
        for issue in batch.validation["issues"]:
            issue["path"] = issue["path"].removeprefix(f"{UNLABELLED}/")
        batch.files = [f.removeprefix(f"{UNLABELLED}/") for f in batch.files]
    return batch


def _as_one_class(root: Path, target: Path) -> Path:
    """A flat folder as an ImageFolder of one class: its files hard-linked (or copied) into
    target/_unlabelled. A link that leads outside `root` stays a link, so the gate refuses it
    as it would in the folder itself."""
    folder = target / UNLABELLED
    folder.mkdir(parents=True)
    for file in sorted(root.iterdir()):
        if file.name.startswith(".") or not (file.is_file() or file.is_symlink()):
            continue
        if file.is_symlink() and not file.resolve().is_relative_to(root):
            (folder / file.name).symlink_to(file.resolve())
            continue
        try:
            os.link(file.resolve(), folder / file.name)
        except OSError:  # another file system, or links not allowed
            shutil.copyfile(file, folder / file.name)
    return target


def _batch_config(cfg: Config, source: Path, classes, channels: int, size: int) -> Config:
    raw = cfg.as_dict()
    raw["data"] = {**raw["data"], "source": str(source), "classes": classes}
    raw["prepare"] = {**raw["prepare"], "channels": channels, "image_size": size}
    policy = raw["validate"]["policy"]
    raw["validate"]["policy"] = {**policy, **dict.fromkeys(DATASET_CHECKS, "off")}
    return config.from_dict(raw, source="params (monitoring batch)")


def _collect(report: dict, labelled: bool) -> Batch:
    """Every usable row of the manifest, in manifest order, with its pixels from the shards."""
    import pandas as pd

    columns = ["path", "label_index", "split", "width", "height", "sha256", "label"]
    manifest = pd.read_parquet(paths.MANIFEST, columns=columns)
    parts, order = [], []
    for split in prepare.SPLITS:
        images, _ = prepared.load_split(split)
        parts.append(np.array(images))
        order.append(manifest.index[manifest["split"] == split].to_numpy())
    rows = np.concatenate(order)
    images = np.concatenate(parts)[np.argsort(rows, kind="stable")]
    used = manifest.loc[np.sort(rows)]
    digest = hashlib.sha256()
    for row in manifest[["path", "sha256", "label"]].fillna("").astype(str).itertuples(False):
        digest.update(("\t".join(row) + "\n").encode())
    return Batch(
        images=images,
        labels=used["label_index"].to_numpy(np.int64) if labelled else None,
        files=used["path"].tolist(),
        widths=used["width"].to_numpy(),
        heights=used["height"].to_numpy(),
        validation=report,
        fingerprint=digest.hexdigest(),
    )
