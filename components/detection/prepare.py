"""prepare, for `task: detection`: images + COCO or YOLO annotations -> the detection gate's
findings, splits, uint8 shards and per-split COCO files.

Reads `<root>/images/` (every non-hidden file, in path order; links leading outside are never
followed) with the classification prepare's image reader, and the annotations with
`annotations` (YOLO boxes converted to COCO pixels with each image's size). `box_checks`
decides what each policy leaves out. An image's split follows from its content (sha256) and
the seed, as in classification. Writes under data/prepared/:

- `annotations.json`: the source annotations as COCO (the YOLO layout converted), untouched by
  the checks, for every image that decodes;
- `manifest.parquet` (one row per image file: facts, box counts, `excluded_by`, `split`),
  `boxes.parquet` (one row per annotation box: `codes` it breaks, `kept`), `issues.json`;
- per split, `<split>-images.npy` (uint8 [N, 3, S, S], S = `detection.image_size`, resized
  without keeping the aspect ratio) and `<split>-annotations.json` (COCO: image ids 1..N in
  shard order, boxes kept, in the image's own pixels);
- `meta.json`: classes, category ids, sizes, counts, the fingerprint.
The raw folder is only read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from components.core import paths
from components.core.config import Config
from components.core.errors import UserError
from components.data import imagefacts, prepare
from components.detection import annotations, box_checks

SPLITS = ("train", "val", "test")
BLOCK = 1024  # images read at a time
BOXES = paths.PREPARED / "boxes.parquet"
ISSUES = paths.PREPARED / "issues.json"
SOURCE_ANNOTATIONS = paths.PREPARED / "annotations.json"
MANIFEST_COLUMNS = (
    "path", "sha256", "size_bytes", "format", "decode", "error", "width", "height", "mode",
    "n_boxes", "n_kept", "excluded_by", "split",
)  # fmt: skip


def split_annotations(split: str) -> Path:
    """COCO JSON of one split's images and kept boxes."""
    return paths.PREPARED / f"{split}-annotations.json"


def gate_params(cfg: Config) -> dict:
    """The params whose change must redo prepare before validate may judge (its policies)."""
    return {
        "validate": cfg.validate_.model_dump(mode="json"),
        "detection": cfg.detection.model_dump(mode="json"),
        "prepare": {"max_pixels": cfg.prepare.max_pixels},
    }


def run(cfg: Config) -> prepare.PrepareResult:
    root = paths.source_dir(cfg)
    if not (root / annotations.IMAGES).is_dir():
        hint = " (run `lensflow data` to write it)" if cfg.data.source in paths.BUILTIN else ""
        raise UserError(f"{root}: no {annotations.IMAGES}/ folder of a detection dataset{hint}")
    entries = list(prepare.scan(root / annotations.IMAGES))
    images, pixels = _read(entries, cfg)
    found = annotations.read(root, cfg.detection.annotations, list(images["path"]))
    if found.format == "yolo":
        sizes = images.loc[images["decode"] == "ok"].set_index("path")[["width", "height"]]
        found.boxes = annotations.to_pixels(found.boxes, sizes)
    findings = box_checks.find(images, found, cfg)
    boxes = findings.boxes
    images["n_boxes"] = images["path"].map(boxes.groupby("image").size()).fillna(0).astype(int)
    kept_counts = boxes[boxes["kept"]].groupby("image").size()
    images["n_kept"] = images["path"].map(kept_counts).fillna(0).astype(int)
    images["excluded_by"] = findings.excluded_by
    images["split"] = prepare.split_by_content(images["sha256"], images["excluded_by"] == "", cfg)
    paths.PREPARED.mkdir(parents=True, exist_ok=True)
    _write_source_annotations(images, found)
    classes = list(found.categories.values())
    n_per_split = {}
    for split in SPLITS:
        chosen = images.index[images["split"] == split].to_numpy()
        _write_shard(split, pixels, chosen)
        _write_split_annotations(split, images.loc[chosen], boxes, found.categories)
        n_per_split[split] = len(chosen)
    _write_table(images[list(MANIFEST_COLUMNS)], paths.MANIFEST)
    _write_table(boxes, BOXES)
    paths.write_json(ISSUES, findings.issues)
    meta = {
        "task": "detection",
        "source": str(root),
        "format": found.format,
        "annotations": found.source,
        "classes": classes,
        "category_ids": list(found.categories),
        "image_size": cfg.detection.image_size,
        "channels": 3,
        "n_per_split": n_per_split,
        "n_boxes_per_split": {
            split: int(images.loc[images["split"] == split, "n_kept"].sum()) for split in SPLITS
        },
        "fingerprint": fingerprint(),
        "gate_params": gate_params(cfg),
    }
    paths.write_json(paths.META, meta)
    return prepare.PrepareResult(len(images), n_per_split, classes, str(paths.MANIFEST))


def read_split_at(cfg: Config, split: str, size: int) -> np.ndarray:
    """The `split`'s shard as prepare would write it at `size` px (uint8 [N, 3, size, size],
    in shard order, so the split's COCO file fits it): its images read again from the raw
    folder prepare read (only read), by prepare's reader. An image that no longer decodes, or
    whose content is not the manifest's (sha256), is a UserError naming it: the images would
    not be the ones the shard holds."""
    coco = json.loads(split_annotations(split).read_text())
    root = Path(json.loads(paths.META.read_text())["source"])
    sha256 = pd.read_parquet(paths.MANIFEST, columns=["path", "sha256"])
    sha256 = dict(zip(sha256["path"], sha256["sha256"], strict=True))
    files = [image["file_name"] for image in coco["images"]]
    options = imagefacts.ReadOptions(3, size, cfg.prepare.max_pixels)
    pixels = np.zeros((len(files), 3, size, size), dtype=np.uint8)
    for first in range(0, len(files), BLOCK):
        block = files[first : first + BLOCK]
        read = imagefacts.read_many([str(root / file) for file in block], options)
        for offset, (file, (facts, array)) in enumerate(zip(block, read, strict=True)):
            if array is None or facts["sha256"] != sha256.get(file):
                why = facts["error"] or "its content changed since prepare (sha256)"
                raise UserError(f"{root / file}: cannot be read again at {size} px: {why}")
            pixels[first + offset] = array
    return pixels


def summary(result: prepare.PrepareResult) -> str:
    counts = ", ".join(f"{split} {n}" for split, n in result.n_per_split.items())
    return f"prepare: {result.n_images} images ({counts}), classes {', '.join(result.classes)}"


def _read(entries: list, cfg: Config) -> tuple[pd.DataFrame, np.ndarray]:
    """One row of facts per file, and the pixels of each (zeros where not decoded)."""
    size = cfg.detection.image_size
    options = imagefacts.ReadOptions(3, size, cfg.prepare.max_pixels)
    pixels = np.zeros((len(entries), 3, size, size), dtype=np.uint8)
    rows = []
    for first in range(0, len(entries), BLOCK):
        block = entries[first : first + BLOCK]
        inside = [e for e in block if e.location != "outside_root"]
        results = iter(imagefacts.read_many([e.path for e in inside], options))
        for offset, entry in enumerate(block):
            if entry.location == "outside_root":
                facts, array = imagefacts.empty_facts(), None
                reason = "a symbolic link that leads outside the images folder: not followed"
                facts.update(decode="symlink_outside_root", decodable=False, error=reason)
            else:
                facts, array = next(results)
            if array is not None:
                pixels[first + offset] = array
            rows.append({"path": f"{annotations.IMAGES}/{entry.rel}", **facts})
    columns = ["path", *imagefacts.empty_facts()]
    return pd.DataFrame(rows, columns=columns), pixels


def _write_shard(split: str, pixels: np.ndarray, chosen: np.ndarray) -> None:
    with paths.atomic(paths.shard_images(split)) as partial:
        np.save(partial, pixels[chosen])
    paths.shard_labels(split).unlink(missing_ok=True)  # a classification run's, if any


def _coco(images: pd.DataFrame, boxes: pd.DataFrame, categories: dict[int, str]) -> dict:
    """COCO JSON of `images` (ids 1..N in their order) and their `boxes`."""
    ids = {path: i for i, path in enumerate(images["path"], start=1)}
    entries = [
        {"id": ids[row.path], "file_name": row.path, "width": int(row.width),
         "height": int(row.height)}
        for row in images.itertuples()
    ]  # fmt: skip
    chosen = boxes[boxes["image"].isin(ids)]
    found = [
        {"id": i, "image_id": ids[row.image], "category_id": int(row.category_id),
         "bbox": [round(float(v), 3) for v in (row.x, row.y, row.w, row.h)],
         "area": round(float(row.w * row.h), 3), "iscrowd": int(row.iscrowd)}
        for i, row in enumerate(chosen.itertuples(), start=1)
    ]  # fmt: skip
    named = [{"id": int(k), "name": v} for k, v in categories.items()]
    return {"images": entries, "annotations": found, "categories": named}


def _write_source_annotations(images: pd.DataFrame, found: annotations.Annotations) -> None:
    decoded = images[images["decode"] == "ok"]
    coco = _coco(decoded, found.boxes, found.categories)
    paths.write_text(SOURCE_ANNOTATIONS, json.dumps(coco))


def _write_split_annotations(split: str, images, boxes, categories: dict[int, str]) -> None:
    coco = _coco(images, boxes[boxes["kept"]], categories)
    paths.write_text(split_annotations(split), json.dumps(coco))


def _write_table(table: pd.DataFrame, path: Path) -> None:
    with paths.atomic(path) as partial:
        table.to_parquet(partial, index=False)


def fingerprint() -> str:
    """sha256 of the manifest's (path, sha256, split) rows and the split annotation files:
    the prepared data's identity where DVC does not track the folder."""
    digest = hashlib.sha256()
    manifest = pd.read_parquet(paths.MANIFEST, columns=["path", "sha256", "split"])
    for row in manifest.astype(str).itertuples(index=False):
        digest.update(("\t".join(row) + "\n").encode())
    for split in SPLITS:
        digest.update(split_annotations(split).read_bytes())
    return digest.hexdigest()
