"""Reading a detection dataset's annotations: COCO JSON, or the YOLO txt layout.

Layout: images under `<root>/images/`, and either a COCO file (`detection.annotations`, by
default `<root>/annotations.json`; `file_name` relative to `images/`) or YOLO labels
(`<root>/labels/<same sub-path>.txt`, one `class cx cy w h` line per box, normalised to
[0, 1], with the class names in `<root>/classes.txt`, one a line, ids from 0).

Nothing here raises on a broken annotation: every problem becomes a `Problem` naming the file
(and entry), for the detection gate to report under its policy. Boxes come out as one table,
COCO style: `image` (the path relative to the root), `category_id`, `x, y, w, h` (pixels;
YOLO's are normalised until `to_pixels` converts them with each image's size) and `iscrowd`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from components.core.errors import UserError

IMAGES = "images"
LABELS = "labels"
CLASSES_FILE = "classes.txt"
COCO_FILE = "annotations.json"
BOX_COLUMNS = ("image", "category_id", "x", "y", "w", "h", "iscrowd", "where")


@dataclass(frozen=True)
class Problem:
    path: str  # the annotation file, relative to the root
    image: str | None  # the image it concerns, when it names one
    code: str  # corrupt_annotations | missing_image
    message: str


@dataclass
class Annotations:
    format: str  # "coco" | "yolo"
    source: str  # the COCO file or the labels folder, relative to the root when inside it
    categories: dict[int, str]  # id -> name, in id order
    boxes: pd.DataFrame  # BOX_COLUMNS
    listed: dict[str, tuple[int, int]] | None = None  # COCO: image -> its (width, height)
    problems: list[Problem] = field(default_factory=list)


def read(root: Path, annotations: str | None, images: list[str]) -> Annotations:
    """The annotations of the dataset at `root`, whose image files are `images` (paths
    relative to the root, under images/)."""
    coco = root / (annotations or COCO_FILE)
    if annotations or coco.exists():
        if not coco.is_file():
            raise UserError(f"{coco}: detection.annotations names no file")
        return read_coco(coco, root)
    if (root / LABELS).is_dir() or (root / CLASSES_FILE).exists():
        return read_yolo(root, images)
    raise UserError(
        f"{root}: no {COCO_FILE} and no YOLO {LABELS}/ folder (a detection dataset is "
        f"{IMAGES}/ with {COCO_FILE}, or {IMAGES}/, {LABELS}/ and {CLASSES_FILE})"
    )


def is_dataset(root: Path) -> bool:
    """Whether `root` has a detection dataset's layout: images/ beside a COCO file or YOLO's
    labels/ or classes.txt (the default names)."""
    names = (COCO_FILE, LABELS, CLASSES_FILE)
    return (root / IMAGES).is_dir() and any((root / name).exists() for name in names)


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def read_coco(path: Path, root: Path) -> Annotations:
    where = _relative(path, root)
    found = Annotations("coco", where, {}, _box_table([]), listed={})

    def problem(message: str, image: str | None = None, code: str = "corrupt_annotations"):
        found.problems.append(Problem(where, image, code, message))

    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        problem(f"not readable as JSON: {exc}")
        return found
    sections = ("images", "annotations", "categories")
    if not isinstance(data, dict) or not all(isinstance(data.get(s), list) for s in sections):
        problem("not COCO: expected an object with lists 'images', 'annotations', 'categories'")
        return found
    for i, category in enumerate(data["categories"]):
        if not (_is_int(_get(category, "id")) and isinstance(_get(category, "name"), str)):
            problem(f"categories[{i}]: expected an integer 'id' and a string 'name'")
            continue
        found.categories[category["id"]] = category["name"]
    found.categories = dict(sorted(found.categories.items()))
    by_id = _coco_images(data["images"], root, found, problem)
    rows = []
    for i, entry in enumerate(data["annotations"]):
        image_id = _get(entry, "image_id")
        image = by_id.get(image_id) if _is_int(image_id) else None
        label = f"annotations[{i}] (id {_get(entry, 'id')})"
        if image is None:
            problem(f"{label}: image_id {image_id!r} is not an entry of 'images'")
            continue
        bbox, category = _get(entry, "bbox"), _get(entry, "category_id")
        if not (_is_box(bbox) and _is_int(category)):
            problem(f"{label}: expected 'bbox' [x, y, w, h] of numbers and an integer "
                    f"'category_id', got {bbox!r}, {category!r}", image)  # fmt: skip
            continue
        crowd = int(bool(_get(entry, "iscrowd") or 0))
        rows.append((image, category, *map(float, bbox), crowd, f"{where} {label}"))
    found.boxes = _box_table(rows)
    return found


def _coco_images(entries: list, root: Path, found: Annotations, problem) -> dict[int, str]:
    """image id -> image path (relative to the root) of the well-formed image entries."""
    by_id = {}
    for i, entry in enumerate(entries):
        image_id, name = _get(entry, "id"), _get(entry, "file_name")
        width, height = _get(entry, "width"), _get(entry, "height")
        if not (_is_int(image_id) and isinstance(name, str) and name):
            problem(f"images[{i}]: expected an integer 'id' and a 'file_name'")
            continue
        image = f"{IMAGES}/{name}"
        if not (_is_int(width) and _is_int(height) and width > 0 and height > 0):
            problem(f"images[{i}] ({name}): expected positive integer 'width' and 'height'", image)
            continue
        if image_id in by_id:
            problem(f"images[{i}] ({name}): id {image_id} is also {by_id[image_id]}", image)
            continue
        if not (root / image).is_file():
            hint = f" (file_name is relative to {IMAGES}/)" if (root / name).is_file() else ""
            problem(f"images[{i}]: {image} not found{hint}", image, code="missing_image")
        by_id[image_id] = image
        found.listed[image] = (width, height)
    return by_id


def read_yolo(root: Path, images: list[str]) -> Annotations:
    classes_path = root / CLASSES_FILE
    if not classes_path.is_file():
        raise UserError(f"{classes_path}: not found (the YOLO layout names its classes there)")
    try:
        names = [line.strip() for line in classes_path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{classes_path}: cannot be read ({exc})") from None
    found = Annotations("yolo", LABELS, dict(enumerate(names, start=1)), _box_table([]))
    rows, labelled = [], set()
    for image in images:
        label_path = root / LABELS / Path(image).relative_to(IMAGES).with_suffix(".txt")
        if not label_path.exists():
            continue
        where = _relative(label_path, root)
        labelled.add(where)
        parsed = _yolo_lines(label_path)
        if isinstance(parsed, str):
            found.problems.append(Problem(where, image, "corrupt_annotations", parsed))
            continue
        rows += [(image, cls + 1, *box, 0, f"{where} line {n}") for n, cls, box in parsed]
    for orphan in sorted((root / LABELS).rglob("*.txt")) if (root / LABELS).is_dir() else []:
        where = _relative(orphan, root)
        if where not in labelled:
            found.problems.append(
                Problem(where, None, "missing_image", f"{where}: no image of this name")
            )
    found.boxes = _box_table(rows)
    return found


def _yolo_lines(path: Path) -> list[tuple[int, int, tuple]] | str:
    """(line number, class, (cx, cy, w, h)) per line, or the reason the file is corrupt."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        return f"cannot be read: {exc}"
    parsed = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            cls, box = int(fields[0]), tuple(float(v) for v in fields[1:])
        except (ValueError, IndexError):
            return f"line {n}: expected `class cx cy w h`, got {line.strip()[:80]!r}"
        if len(box) != 4 or not all(math.isfinite(v) for v in box):
            return f"line {n}: expected `class cx cy w h`, got {line.strip()[:80]!r}"
        parsed.append((n, cls, box))
    return parsed


def to_pixels(boxes: pd.DataFrame, sizes: pd.DataFrame) -> pd.DataFrame:
    """YOLO's normalised (cx, cy, w, h) -> COCO pixel (x, y, w, h), with each image's size
    (`sizes`: image -> width, height); boxes of images without a size are left out."""
    joined = boxes.join(sizes, on="image", how="inner")
    w, h = joined["w"] * joined["width"], joined["h"] * joined["height"]
    joined["x"] = joined["x"] * joined["width"] - w / 2
    joined["y"] = joined["y"] * joined["height"] - h / 2
    joined["w"], joined["h"] = w, h
    return joined[list(BOX_COLUMNS)].reset_index(drop=True)


def _box_table(rows: list[tuple]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=list(BOX_COLUMNS))
    return table.astype({"category_id": "int64", "x": float, "y": float, "w": float,
                         "h": float, "iscrowd": "int64"})  # fmt: skip


def _get(entry, key: str):
    return entry.get(key) if isinstance(entry, dict) else None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_box(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 4
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        and all(math.isfinite(v) for v in value)
    )
