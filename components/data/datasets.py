"""Built-in datasets, written as ImageFolders (`<root>/<class>/<image>.png`).

Both come from installed packages or code, so nothing is downloaded:
- `digits`: scikit-learn's 1,797 real 8x8 handwritten digits (grayscale PNG).
- `shapes`: seeded synthetic 32x32 RGB images, 10 visually distinct classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from components.core import paths

SHAPE_CLASSES = (
    "spiral_0",
    "spiral_120",
    "spiral_240",
    "checker_2",
    "checker_4",
    "checker_8",
    "gradient_h",
    "gradient_v",
    "circle_small",
    "circle_large",
)


def write(name: str, root: Path, per_class: int = 100, seed: int = 0) -> int:
    """Write built-in dataset `name` under `root`; returns the number of images written."""
    if name == "digits":
        return _write_digits(root)
    if name == "shapes":
        return _write_shapes(root, per_class, seed)
    raise ValueError(f"unknown built-in dataset {name!r}; choose one of {paths.BUILTIN}")


def _write_digits(root: Path) -> int:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    for index, (image, label) in enumerate(zip(pixels, digits.target, strict=True)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{index:04d}.png")
    return len(pixels)


def _write_shapes(root: Path, per_class: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    for name in SHAPE_CLASSES:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            Image.fromarray(shape_image(name, rng), mode="RGB").save(folder / f"{index:04d}.png")
    return per_class * len(SHAPE_CLASSES)


def shape_image(name: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One 32x32 RGB uint8 image of class `name`: a pattern in a random colour over noise."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = (size - 1) / 2 + rng.uniform(-2, 2, size=2)
    dx, dy = xs - cx, ys - cy
    kind, _, arg = name.partition("_")
    if kind == "spiral":
        angle = np.arctan2(dy, dx) + np.deg2rad(float(arg))
        radius = np.hypot(dx, dy)
        pattern = (np.sin(angle + radius * 0.6 + rng.uniform(-0.3, 0.3)) > 0).astype(np.float32)
    elif kind == "checker":
        cell = size / (2 * int(arg))
        offset = rng.integers(0, max(1, int(cell)), size=2)
        pattern = (((xs + offset[0]) // cell + (ys + offset[1]) // cell) % 2).astype(np.float32)
    elif kind == "gradient":
        axis = xs if arg == "h" else ys
        pattern = axis / (size - 1)
    elif kind == "circle":
        radius = (5 if arg == "small" else 12) + rng.uniform(-1, 1)
        pattern = (np.hypot(dx, dy) <= radius).astype(np.float32)
    else:
        raise ValueError(f"unknown shape class {name!r}")
    colour = rng.uniform(0.5, 1.0, size=3).astype(np.float32)
    image = pattern[..., None] * colour * 220 + 20
    image += rng.normal(0, 8, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def run(cfg) -> Path:
    """Make sure the configured dataset exists; write a built-in one once, and version it.

    An existing folder is never touched (after changing it, `dvc add` it yourself). In a DVC
    repository a freshly written built-in dataset is tracked with `dvc add`, so `data.md5`
    names its version.
    """
    from components.core import versioning

    root = paths.source_dir(cfg)
    if cfg.data.source not in paths.BUILTIN or root.exists():
        return root
    write(cfg.data.source, root, cfg.data.shapes_per_class, cfg.seed)
    if versioning.in_dvc_repo():
        versioning.dvc_add(root)
    return root
