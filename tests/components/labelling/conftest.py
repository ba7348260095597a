"""A tiny real dataset for the data loop: three shape classes of 16 RGB images each (16 px),
two of them filed under the wrong class, prepared and validated in a project of its own."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from components.core import config
from components.data import datasets, prepare, validate
from tests.conftest import TINY, tiny_project

CLASSES = ("checker_2", "circle_large", "gradient_h")
PER_CLASS = 16
# (class folder it is filed in, its true class, index): wrong labels, as a person made them
FLIPPED = (("checker_2", "circle_large", 0), ("gradient_h", "checker_2", 1))
LOOP = {
    **TINY,
    "data": {"source": "data/raw/mini"},
    "train": {**TINY["train"], "epochs": 20, "batch_size": 8, "patience": 50},
    "labels": {"folds": 2},
    "review": {"random": 3},
}


def write_mini(root: Path, seed: int = 0) -> dict[str, str]:
    """The dataset; returns {path relative to root: true class} of the flipped images."""
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(PER_CLASS):
            image = Image.fromarray(datasets.shape_image(name, rng, size=16))
            image.save(root / name / f"{name}-{i:02d}.png")
    flipped = {}
    for folder, true, i in FLIPPED:
        image = Image.fromarray(datasets.shape_image(true, rng, size=16))
        image.save(root / folder / f"odd-{i}.png")
        flipped[f"{folder}/odd-{i}.png"] = true
    return flipped


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@contextmanager
def mini_project(root: Path, prepared: bool):
    """`root` as a project on the mini dataset (the cwd inside), prepared and validated when
    `prepared`; yields {root, flipped: {path: true class}}."""
    with tiny_project(root) as mp:
        mp.setenv("DVC_SITE_CACHE_DIR", str(root / ".dvc-site-cache"))
        (root / "params.yaml").write_text(yaml.safe_dump(config.from_dict(LOOP).as_dict()))
        flipped = write_mini(root / "data/raw/mini")
        if prepared:
            cfg = config.load("params.yaml")
            prepare.run(cfg)
            assert validate.run(cfg).success
        yield {"root": root, "flipped": flipped}


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """A prepared, validated project on the mini dataset (the cwd while the module runs)."""
    with mini_project(tmp_path_factory.mktemp("mini"), prepared=True) as found:
        yield found


@pytest.fixture
def mini_raw(tmp_path):
    """A project on the mini dataset, not yet prepared (the cwd while the test runs)."""
    with mini_project(tmp_path, prepared=False) as found:
        yield found
