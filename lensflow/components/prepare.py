"""prepare: ImageFolder -> manifest (one row per file) + decoded uint8 tensor shards.

Every file under a class folder gets a manifest row, decodable or not, so `validate` can
report it. Identical files (same sha256) always land in the same split, so a duplicated
image can never leak from train into test. The raw folder is only ever read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from lensflow.components import datasets, paths
from lensflow.components.config import Config, UserError
from lensflow.components.preprocess import resize_uint8

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class PrepareResult:
    n_images: int
    n_per_split: dict[str, int]
    classes: list[str]
    manifest: str


def source_dir(cfg: Config) -> Path:
    """The raw ImageFolder: data/raw/<name> for a built-in dataset, else data.source itself."""
    if cfg.data.source in datasets.BUILTIN:
        return paths.RAW / cfg.data.source
    return Path(cfg.data.source).expanduser()


def run(cfg: Config) -> PrepareResult:
    root = source_dir(cfg)
    classes = _class_names(root, cfg)
    rows, arrays = _read_images(root, classes, cfg)
    manifest = pd.DataFrame(rows)
    manifest["split"] = _assign_splits(manifest, cfg)
    paths.PREPARED.mkdir(parents=True, exist_ok=True)
    manifest.to_parquet(paths.MANIFEST, index=False)

    n_per_split = {}
    for split in SPLITS:
        index = manifest.index[manifest["split"] == split]
        images = torch.stack([arrays[i] for i in index]) if len(index) else _empty(cfg)
        labels = torch.tensor(manifest.loc[index, "label_index"].to_numpy(), dtype=torch.int64)
        torch.save({"images": images, "labels": labels}, paths.shard(split))
        n_per_split[split] = len(index)

    mean, std = _channel_stats(paths.shard("train"))
    meta = {
        "source": str(root),
        "classes": classes,
        "image_size": cfg.prepare.image_size,
        "channels": cfg.prepare.channels,
        "mean": mean,
        "std": std,
        "n_per_split": n_per_split,
    }
    paths.META.write_text(json.dumps(meta, indent=2))
    return PrepareResult(len(manifest), n_per_split, classes, str(paths.MANIFEST))


def load_meta() -> dict:
    if not paths.META.exists():
        raise UserError(f"{paths.META} is missing: run the prepare stage first")
    return json.loads(paths.META.read_text())


def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [N, C, S, S], int64 labels [N]) of one split."""
    shard = torch.load(paths.shard(split), weights_only=True)
    return shard["images"], shard["labels"]


def _class_names(root: Path, cfg: Config) -> list[str]:
    if not root.exists():
        hint = " (run `lensflow data` to write it)" if cfg.data.source in datasets.BUILTIN else ""
        raise UserError(f"{root}: dataset folder not found{hint}")
    if not root.is_dir():
        raise UserError(f"{root}: not a directory (expected <root>/<class>/<image>)")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise UserError(f"{root}: no class folders (expected <root>/<class>/<image>)")
    return list(cfg.data.classes) if cfg.data.classes else found


def _read_images(root: Path, classes: list[str], cfg: Config):
    rows, arrays = [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for file in sorted(f for f in class_dir.rglob("*") if f.is_file()):
            if any(part.startswith(".") for part in file.relative_to(root).parts):
                continue
            row, array = _read_one(file, cfg)
            row["path"] = file.relative_to(root).as_posix()
            row["label"] = class_dir.name
            row["label_index"] = classes.index(class_dir.name) if class_dir.name in classes else -1
            rows.append(row)
            arrays.append(array)
    return rows, arrays


def _read_one(file: Path, cfg: Config) -> tuple[dict, torch.Tensor | None]:
    data = file.read_bytes()
    row = {"sha256": hashlib.sha256(data).hexdigest(), "width": 0, "height": 0, "mode": ""}
    try:
        with Image.open(file) as image:
            image.load()
            row.update(width=image.width, height=image.height, mode=image.mode)
            pixels = np.asarray(image.convert("L" if cfg.prepare.channels == 1 else "RGB"))
    except Exception as exc:  # PIL raises many types for broken files; all mean "undecodable"
        row.update(decodable=False, error=f"{type(exc).__name__}: {exc}")
        return row, None
    tensor = torch.from_numpy(pixels.copy()).reshape(pixels.shape[0], pixels.shape[1], -1)
    tensor = resize_uint8(tensor.permute(2, 0, 1).unsqueeze(0), cfg.prepare.image_size)[0]
    row.update(decodable=True, error="")
    return row, tensor


def _assign_splits(manifest: pd.DataFrame, cfg: Config) -> pd.Series:
    """Stratified, seeded split over groups of identical files; unusable rows are 'excluded'."""
    split = pd.Series("excluded", index=manifest.index, dtype=object)
    usable = manifest[manifest["decodable"] & (manifest["label_index"] >= 0)]
    groups = usable.groupby("sha256", sort=True)["label"].first()
    rng = np.random.default_rng(cfg.seed)
    assignment: dict[str, str] = {}
    for _, shas in groups.groupby(groups, sort=True):
        order = rng.permutation(shas.index.to_numpy())
        n_test = int(round(len(order) * cfg.prepare.test_fraction))
        n_val = int(round(len(order) * cfg.prepare.val_fraction))
        for i, sha in enumerate(order):
            assignment[sha] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    split[usable.index] = usable["sha256"].map(assignment)
    return split


def _channel_stats(train_shard: Path) -> tuple[list[float], list[float]]:
    images = torch.load(train_shard, weights_only=True)["images"].float() / 255.0
    if images.numel() == 0:
        raise UserError("the training split is empty: not enough usable images")
    mean = images.mean(dim=(0, 2, 3))
    std = images.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return [round(v, 6) for v in mean.tolist()], [round(v, 6) for v in std.tolist()]


def _empty(cfg: Config) -> torch.Tensor:
    size = cfg.prepare.image_size
    return torch.empty(0, cfg.prepare.channels, size, size, dtype=torch.uint8)
