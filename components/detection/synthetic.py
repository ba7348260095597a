"""The built-in detection set (`data.source: detection_shapes`): seeded synthetic images of
shapes on textured backgrounds, several per image, of several sizes, overlapping, with their
boxes in COCO JSON. Every annotated shape is visible: a shape is placed again (up to 10 tries,
then left out) when it would overlap one already drawn at IoU > 0.4 or leave less than half
of any earlier shape's box uncovered.

Written as `<root>/images/<n>.png` and `<root>/annotations.json`, the layout any COCO dataset
uses here. Nothing is downloaded; the same seed writes the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from components.core import paths

BUILTIN = "detection_shapes"  # data.source naming this set
CLASSES = ("circle", "square", "triangle")
MAX_OVERLAP = 0.4  # IoU above which a new shape would hide one already drawn: placed again
# a new shape is placed again if it would leave less than this fraction of an earlier shape's
# box uncovered (IoU alone lets a small box vanish under a bigger one drawn after it)
MIN_VISIBLE = 0.5


def write(root: Path, n_images: int, size: int, seed: int) -> int:
    """Write `n_images` images of `size` x `size` and their annotations under `root`."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(n_images):
        name = f"{index:05d}.png"
        picture, boxes = _image(rng, size)
        Image.fromarray(picture, mode="RGB").save(root / "images" / name)
        images.append({"id": index + 1, "file_name": name, "width": size, "height": size})
        for category, box in boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": category,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    paths.write_text(root / "annotations.json", json.dumps(coco))
    return n_images


def _image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list]:
    """One image: a texture, then 1-4 shapes, each a random colour far from the texture's."""
    canvas = Image.fromarray(_texture(rng, size), mode="RGB")
    draw = ImageDraw.Draw(canvas)
    boxes: list[tuple[int, list[float]]] = []
    owner = np.full((size, size), -1)  # which box is on top at each pixel
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(10):
            side = int(rng.integers(max(6, size // 8), max(8, size // 2) + 1))
            x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            box = [float(x), float(y), float(side), float(side)]
            placed = owner.copy()
            placed[y : y + side, x : x + side] = len(boxes)
            if all(_iou(box, other) <= MAX_OVERLAP for _, other in boxes) and all(
                visible_fraction(placed, k, other) >= MIN_VISIBLE
                for k, (_, other) in enumerate(boxes)
            ):
                break
        else:
            continue
        owner = placed
        category = int(rng.integers(0, len(CLASSES)))
        colour = tuple(int(c) for c in rng.integers(150, 256, size=3))
        _draw(draw, CLASSES[category], x, y, side, colour)
        boxes.append((category + 1, box))
    return np.asarray(canvas), boxes


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Dark stripes or checks at a random frequency and angle, with noise."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(3, 12)
    phase = (xs * np.cos(angle) + ys * np.sin(angle)) / period
    pattern = np.sin(phase * 2 * np.pi)
    if rng.random() < 0.5:
        pattern = pattern * np.sin((xs * -np.sin(angle) + ys * np.cos(angle)) / period * 2 * np.pi)
    base = rng.uniform(20, 70, size=3).astype(np.float32)
    image = base + pattern[..., None] * rng.uniform(10, 30, size=3).astype(np.float32)
    image += rng.normal(0, 6, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _draw(draw: ImageDraw.ImageDraw, shape: str, x: int, y: int, side: int, colour) -> None:
    """The shape fills its box: its box is exactly [x, y, side, side]."""
    last = side - 1
    if shape == "circle":
        draw.ellipse([x, y, x + last, y + last], fill=colour)
    elif shape == "square":
        draw.rectangle([x, y, x + last, y + last], fill=colour)
    else:
        draw.polygon([(x + last / 2, y), (x, y + last), (x + last, y + last)], fill=colour)


def visible_fraction(owner: np.ndarray, k: int, box: list[float]) -> float:
    """The fraction of box `k`'s pixels ([x, y, w, h]) where it is on top in `owner`."""
    x, y, w, h = (int(v) for v in box)
    return float((owner[y : y + h, x : x + w] == k).mean())


def _iou(a: list[float], b: list[float]) -> float:
    """IoU of two [x, y, w, h] boxes."""
    w = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def run(cfg) -> Path:
    """Make sure the configured dataset exists; write the built-in set once, and version it
    (as `components.data.datasets.run` does for the classification sets)."""
    from components.core import versioning

    root = paths.source_dir(cfg)
    if cfg.data.source != BUILTIN or root.exists():
        return root
    write(root, cfg.detection.synthetic_images, cfg.detection.synthetic_size, cfg.seed)
    if versioning.in_dvc_repo():
        versioning.dvc_add(root)
    return root
