"""Shared fixtures: every test runs in its own project directory with its own MLflow store."""

from __future__ import annotations

import os

# One torch/OpenMP thread per process, set before numpy and torch load: the suite runs two test
# processes and their subprocesses on two cores, where torch's default of a thread per core
# makes each thread wait for a descheduled other (TINY's 8 epochs: 35-58 s in the training loop
# on the loaded machine, 1.7-1.9 s with one thread, to the same weights).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import atexit  # noqa: E402
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from components.core import config

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
# Prefect's profile and local database belong to this test run, never to ~/.prefect.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="lensflow-test-prefect-home-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
REPO = Path(__file__).resolve().parents[1]

# The test files of a minute or more, longest first (`--durations` of a whole run, setup
# included). `make test` hands whole files to its workers in collection order
# (--no-loadscope-reorder): these go out first, so that the last file a worker starts is a
# short one. xdist's own order (most tests first) started the longest of them last.
SLOW_FILES_FIRST = (
    "tests/flows/test_dvc_front_end.py",
    "tests/flows/test_run_safety.py",
    "tests/cli/test_main.py",
    "tests/flows/test_detection_flow.py",
    "tests/flows/test_detection_dvc.py",
    "tests/infra/test_stack.py",
    "tests/infra/test_deployments.py",
    "tests/components/release/test_promote.py",
    "tests/components/labelling/test_review_ingest.py",
    "tests/infra/test_tune_on_postgres.py",
    "tests/infra/test_mlflow_on_postgres.py",
    "tests/infra/test_team_auth.py",
    "tests/components/release/test_train_evaluate_export_register.py",
    "tests/serving/test_rollout.py",
    "tests/flows/test_monitoring.py",
    "tests/flows/test_photographs.py",
    "tests/flows/test_detection_photographs.py",
    "tests/flows/test_detection_compare.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """SLOW_FILES_FIRST first, in its order; every other file after them, as collected."""
    rank = {path: i for i, path in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


# A small, fast configuration on the synthetic shapes data (3-channel, 10 classes).
TINY = {
    "data": {"source": "shapes", "shapes_per_class": 30},
    "prepare": {"image_size": 16, "channels": 3},
    "model": {"widths": [16, 32]},
    "train": {"epochs": 8, "batch_size": 32, "progress_bar": False},
    "promote": {"min_accuracy": 0.0, "min_macro_f1": 0.0},
}


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """An empty project directory (the cwd) with a private sqlite MLflow store."""
    monkeypatch.chdir(tmp_path)
    _track_into(monkeypatch, f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / ".dvc-site-cache"))
    return tmp_path


def _track_into(monkeypatch: pytest.MonkeyPatch, uri: str) -> None:
    """MLflow's store for this test: in the environment (subprocesses, lensflow code) and as
    MLflow's process-wide URI, which lensflow sets when a step runs and which outlives a test
    (a client made without a URI would talk to an earlier test's store)."""
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(utils, "_tracking_uri", uri)  # what mlflow.set_tracking_uri sets; undone


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
        _track_into(mp, f"sqlite:///{root / 'mlflow.db'}")
        write_tiny_params(root)
        yield mp


@pytest.fixture(scope="session")
def trained_template(tmp_path_factory):
    """Prepared, validated, trained, evaluated and exported on TINY (its own MLflow store),
    once per test session. Modules take a copy (`trained_copy`): never change this one."""
    from components.data import datasets, prepare, validate
    from components.evaluation import evaluate
    from components.release import export
    from components.training import train

    root = tmp_path_factory.mktemp("trained-template")
    with tiny_project(root):
        cfg = config.load("params.yaml")
        datasets.run(cfg)
        prepare.run(cfg)
        assert validate.run(cfg).success
        results = {"train": train.run(cfg), "evaluation": evaluate.run(cfg)}
        results["export"] = export.run(cfg)
    return {"root": root, **results}


def trained_copy(template: dict, tmp_path_factory, name: str) -> Path:
    """A fresh directory holding the template project (files and MLflow store)."""
    root = tmp_path_factory.mktemp(name)
    shutil.copytree(template["root"], root, dirs_exist_ok=True)
    return root


PHOTO_CLASSES = ("china", "flower")  # scikit-learn's two sample photographs, in that order


def write_photographs(
    root: Path, per_class: int = 20, sizes=(25, 40), modes=("L", "RGB"), seed: int = 0
) -> Path:
    """An ImageFolder of real photographs: seeded square crops (100-200 px) of scikit-learn's
    two sample photos, one class each, shrunk to `sizes`, in `modes`, as PNG and JPEG; every
    combination of size, mode and format recurs every 8 images. Returns `root`."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    for name, photo in zip(PHOTO_CLASSES, load_sample_images().images, strict=True):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        height, width, _ = photo.shape
        for i in range(per_class):
            side = int(rng.integers(100, 200))
            y, x = rng.integers(0, height - side), rng.integers(0, width - side)
            size, mode = sizes[i % len(sizes)], modes[i // 2 % len(modes)]
            crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size))
            crop.convert(mode).save(folder / f"{i:03d}.{'png' if i // 4 % 2 else 'jpg'}")
    return root


@pytest.fixture
def photographs(tmp_path) -> Path:
    """tmp_path/photos: two classes of 20 small photographs each, grayscale and RGB, 25 and
    40 px, PNG and JPEG (see write_photographs)."""
    return write_photographs(tmp_path / "photos")


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL cluster for the test run (tests/servers.py); each test makes its own
    database with `postgres.create_database(name)`."""
    from tests.servers import postgres_server

    with postgres_server() as server:
        yield server


@pytest.fixture(scope="session")
def prefect_server(postgres, tmp_path_factory):
    """One Prefect server for the test run (tests/servers.py), on 127.0.0.1 and a free port,
    its database on the session PostgreSQL; `prefect_server.client_env()` points a subprocess
    at it, `with prefect_server.settings():` this process."""
    from tests.servers import prefect_server as start_prefect_server

    postgres.create_database("prefect")
    folder = tmp_path_factory.mktemp("prefect-server")
    database = postgres.url("prefect", driver="postgresql+asyncpg")
    with start_prefect_server(database, folder) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_on_postgres(postgres, tmp_path_factory):
    """One MLflow tracking server for the test run, its backend store a PostgreSQL database,
    its artifacts served from a folder (tests/servers.py). `.url` is the tracking URI."""
    from tests.servers import mlflow_server

    store = postgres.create_database("mlflow")
    with mlflow_server(store, tmp_path_factory.mktemp("mlflow-on-postgres")) as server:
        yield server


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """One Label Studio server for the test run, from its own venv (`make label-studio-venv`;
    LENSFLOW_LABEL_STUDIO_VENV names another): the tests that need it skip, with the reason,
    where that venv is absent. Local files are served from the session's temporary root."""
    from tests.servers import LABEL_STUDIO_VENV, label_studio_server

    venv = Path(os.environ.get(LABEL_STUDIO_VENV) or REPO / ".label-studio-venv")
    if not (venv / "bin" / "label-studio").exists():
        pytest.skip(f"no Label Studio venv at {venv} (make label-studio-venv builds it)")
    folder = tmp_path_factory.mktemp("label-studio")
    with label_studio_server(venv, folder, tmp_path_factory.getbasetemp()) as server:
        yield server


def documented_commands(page: Path) -> list[list[str]]:
    """The arguments of every `lensflow …` command in the fenced code blocks of a markdown page
    (a leading `$ ` prompt, `\\` continuations and trailing `# comments` handled), as a user
    would type them: ["run", "--set", "train.epochs=3"]."""
    import shlex

    commands, in_code, pending = [], False, ""
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_code, pending = not in_code, ""
            continue
        if not in_code:
            continue
        line = pending + line.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        line = line.removeprefix("$ ")
        if line.startswith("lensflow "):
            commands.append(shlex.split(line, comments=True)[1:])
    return commands
