"""Shared fixtures: every test runs in its own project directory with its own MLflow store."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from components import config

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
REPO = Path(__file__).resolve().parents[1]

# A small, fast configuration on the synthetic shapes data (3-channel, 10 classes).
TINY = {
    "data": {"source": "shapes", "shapes_per_class": 30},
    "prepare": {"image_size": 16, "channels": 3},
    "model": {"widths": [16, 32]},
    "train": {"epochs": 8, "batch_size": 32, "progress_bar": False},
    "registry": {"min_accuracy": 0.0},
}


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """An empty project directory (the cwd) with a private sqlite MLflow store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / ".dvc-site-cache"))
    return tmp_path


@pytest.fixture
def tiny_cfg(project) -> config.Config:
    write_tiny_params(project)
    return config.load(project / "params.yaml")


def write_tiny_params(project: Path) -> None:
    """A complete params.yaml (every key, as DVC needs) with the TINY values."""
    (project / "params.yaml").write_text(yaml.safe_dump(config.from_dict(TINY).as_dict()))


@contextmanager
def tiny_project(root: Path):
    """`root` as a tiny project for a module-scoped fixture: the cwd, TINY params.yaml, a
    private sqlite MLflow store. Yields the MonkeyPatch that undoes it on exit."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        write_tiny_params(root)
        yield mp
