"""`lensflow run` as a scheduler runs it, with credentials in its environment: stopped by
SIGTERM during training it leaves no process behind and its MLflow runs end KILLED; the next
run succeeds; a password in params is refused; a run with tuning on, whose Optuna storage
cannot be reached, stops with one line before Prefect starts; and the password of the tracking
server and of the Optuna storage appears in nothing lensflow printed or wrote.

One project, four commands (a real MLflow server with basic auth in its URL, an ephemeral
Prefect server, git + DVC), shared by the tests below: a full run is the costly part.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import psutil
import pytest

from tests.conftest import REPO, write_tiny_params
from tests.servers import free_port

SECRET = "S3cret"
TRAINING_FOR_LONG = ["--set", "train.epochs=500", "--set", "train.patience=500"]


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _healthy(url: str) -> bool:
    try:
        return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
    except OSError:
        return False


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _git_dvc_project(project: Path) -> None:
    shutil.copy(REPO / "dvc.yaml", project)
    for package in ("components", "flows"):  # dvc.yaml's code deps
        shutil.copytree(
            REPO / package, project / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    write_tiny_params(project)
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=project, check=True, capture_output=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    project, logs = tmp_path_factory.mktemp("project"), tmp_path_factory.mktemp("logs")
    _git_dvc_project(project)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{project / 'mlflow.db'}",
         "--artifacts-destination", str(project / "mlartifacts")],
        cwd=logs, stdout=(logs / "server.log").open("w"), stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no job workers
        start_new_session=True,
    )  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MLFLOW_TRACKING_URI": f"http://lensflow:{SECRET}@127.0.0.1:{port}",
        "LENSFLOW_TUNE_STORAGE": f"postgresql://lensflow:{SECRET}@127.0.0.1:9/optuna",
        "PREFECT_HOME": str(project / ".prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
        "DVC_SITE_CACHE_DIR": str(project / ".dvc-site-cache"),
    }
    env.pop("MLFLOW_TRACKING_USERNAME", None), env.pop("MLFLOW_TRACKING_PASSWORD", None)
    lensflow = [sys.executable, "-m", "cli.main", "run"]
    found = {"project": project, "tracking": f"http://127.0.0.1:{port}", "printed": []}
    try:
        _wait_until(lambda: _healthy(found["tracking"]), 180, "the MLflow server")

        storage = f"tune.storage=postgresql://u:{SECRET}@127.0.0.1:9/x"
        refused = subprocess.run(
            [*lensflow, "--set", storage], cwd=project, env=env, capture_output=True, text=True
        )
        found["refused"] = refused
        found["printed"] += [refused.stdout, refused.stderr]

        (project / "models/last.pt").unlink(missing_ok=True)  # its arrival: training started
        with (logs / "stopped.txt").open("w") as out:
            stopped = subprocess.Popen(
                [*lensflow, *TRAINING_FOR_LONG], cwd=project, env=env, stdout=out, stderr=out
            )
        _wait_until(
            lambda: (project / "models/last.pt").exists() or stopped.poll() is not None,
            600,
            "the first epoch",
        )
        assert stopped.poll() is None, (logs / "stopped.txt").read_text()
        main = psutil.Process(stopped.pid)
        found["processes"] = [main, *main.children(recursive=True)]
        found["commands"] = [" ".join(p.cmdline()) for p in found["processes"]]
        stopped.send_signal(signal.SIGTERM)
        found["stopped_rc"] = stopped.wait(timeout=60)
        with contextlib.suppress(AssertionError):  # what is still there is the test's finding
            _wait_until(lambda: not any(map(_alive, found["processes"])), 60, "the processes")
        found["left"] = [" ".join(p.cmdline()) for p in found["processes"] if _alive(p)]
        for process in found["processes"]:
            if _alive(process):  # do not leave them to the next test
                process.kill()
        found["stopped_output"] = (logs / "stopped.txt").read_text()
        found["printed"].append(found["stopped_output"])
        found["after_sigterm"] = _statuses(found["tracking"])

        rerun = subprocess.run(lensflow, cwd=project, env=env, capture_output=True, text=True)
        found["rerun"] = rerun
        found["printed"] += [rerun.stdout, rerun.stderr]
        found["after_rerun"] = _statuses(found["tracking"])

        # tuning on: the run opens the study storage of LENSFLOW_TUNE_STORAGE, unreachable
        tuning = subprocess.run(
            [*lensflow, "--set", "tune.enabled=true"], cwd=project, env=env, capture_output=True,
            text=True,
        )  # fmt: skip
        found["tuning"] = tuning
        found["printed"] += [tuning.stdout, tuning.stderr]
        yield found
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _statuses(tracking: str) -> dict[str, list[str]]:
    """{run name: [status, ...]} of every run in the project's experiment."""
    client = mlflow.MlflowClient(tracking)
    experiment = client.get_experiment_by_name("lensflow").experiment_id
    statuses = {}
    for run in client.search_runs([experiment]):
        statuses.setdefault(run.info.run_name, []).append(run.info.status)
    return statuses


def test_a_password_in_params_is_refused_at_load(runs):
    refused = runs["refused"]
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    [line] = refused.stderr.strip().splitlines()
    assert "'tune.storage'" in line and "LENSFLOW_TUNE_STORAGE" in line


def test_sigterm_during_training_leaves_no_process_of_the_run(runs):
    assert any("uvicorn" in command for command in runs["commands"])  # Prefect's server
    assert runs["stopped_rc"] == 128 + signal.SIGTERM
    assert "lensflow: stopped by SIGTERM" in runs["stopped_output"]
    assert runs["left"] == []


def test_sigterm_ends_the_runs_mlflow_runs_killed(runs):
    statuses = runs["after_sigterm"]
    assert statuses["training"] == statuses["train"] == ["KILLED"]
    assert "RUNNING" not in {s for each in statuses.values() for s in each}


def test_the_next_run_succeeds_and_leaves_no_run_running(runs):
    assert runs["rerun"].returncode == 0, runs["rerun"].stderr[-3000:]
    statuses = runs["after_rerun"]
    assert sorted(statuses["training"]) == ["FINISHED", "KILLED"]
    assert "RUNNING" not in {s for each in statuses.values() for s in each}


def test_tuning_against_an_unreachable_storage_is_one_line_without_its_password(runs):
    tuning = runs["tuning"]
    assert tuning.returncode == 2, tuning.stderr[-3000:]
    assert "temporary server" not in tuning.stderr  # the preflight's: before Prefect starts
    [line] = [line for line in tuning.stderr.splitlines() if line.startswith("lensflow: ")]
    assert line.startswith(
        "lensflow: error: LENSFLOW_TUNE_STORAGE postgresql://lensflow:***@127.0.0.1:9/optuna: "
    ), line
    assert "Traceback" not in tuning.stdout + tuning.stderr


def test_no_password_in_anything_lensflow_printed_or_wrote(runs):
    project = runs["project"]
    assert "LENSFLOW_TUNE_STORAGE" in runs["tuning"].stderr  # the storage URL was read
    for name in ("mlflow.db", "dvc.lock", "reports", "mlartifacts", ".prefect"):
        assert (project / name).exists(), name  # what is searched below was written
    assert all(SECRET not in text for text in runs["printed"])
    holding = [
        str(path.relative_to(project))
        for path in project.rglob("*")
        if path.is_file() and SECRET.encode() in path.read_bytes()
    ]
    assert holding == []
