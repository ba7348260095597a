"""Optuna studies shared through PostgreSQL (LENSFLOW_TUNE_STORAGE), as by processes on several
machines: `lensflow tune --workers 2` and a second `lensflow tune` in another project, at once,
on one study, logging to the MLflow server on PostgreSQL; one worker is killed (SIGKILL) in the
middle of a trial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import mlflow
import optuna
import psutil
import psycopg2
import pytest

from components.experiments import tune_storage
from tests.conftest import write_tiny_params

EXPERIMENT = "tune-on-postgres"
GRACE = 3  # tune.heartbeat_grace: a heartbeat every second
STUDY = [
    f"tracking.experiment={EXPERIMENT}",
    "tune.startup_trials=2",
    "tune.pruner=none",  # every trial trains its epochs: trials long enough to kill one
    f"tune.heartbeat_grace={GRACE}",
    "train.epochs=4",
    "train.patience=4",
    "tune.space={train: {lr: {type: float, low: 1.0e-3, high: 3.0e-2, log: true}}}",
]
WORKERS_TRIALS, OTHER_TRIALS = 4, 2


def _sets(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def _trial_runs(client: mlflow.MlflowClient, experiment_id: str) -> list:
    return client.search_runs([experiment_id], "tags.`lensflow.step` = 'tune-trial'")


def _has_heartbeat(database: str, number: int) -> bool:
    with psycopg2.connect(database) as db, db.cursor() as cursor:
        cursor.execute(
            "select count(*) from trials join trial_heartbeats using (trial_id)"
            " where trials.number = %s and trials.state = 'RUNNING'",
            [number],
        )
        return cursor.fetchone()[0] == 1


def _spawned(process: psutil.Process) -> bool:
    """A multiprocessing worker, alive (one that just exited has no command line)."""
    try:
        return "multiprocessing.spawn" in " ".join(process.cmdline())
    except psutil.Error:
        return False


def _kill_a_worker_in_its_last_trial(workers: subprocess.Popen, database, tracking) -> int:
    """SIGKILL a worker of `workers` while it runs its second (last) trial, once that trial
    has a heartbeat; returns the trial's number."""
    client = mlflow.MlflowClient(tracking)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and workers.poll() is None:
        pids = {
            str(child.pid) for child in psutil.Process(workers.pid).children() if _spawned(child)
        }
        experiment = client.get_experiment_by_name(EXPERIMENT)
        runs = _trial_runs(client, experiment.experiment_id) if experiment else []
        for pid in pids:
            mine = [run for run in runs if run.data.tags["lensflow.pid"] == pid]
            running = [run for run in mine if run.info.status == "RUNNING"]
            if len(mine) == 2 and running:
                number = int(running[0].data.tags["optuna.trial"])
                if _has_heartbeat(database, number):
                    os.kill(int(pid), signal.SIGKILL)
                    return number
        time.sleep(0.2)
    raise AssertionError("no worker ran a second trial to kill")


@pytest.fixture(scope="module")
def shared_study(postgres, mlflow_on_postgres, prefect_server, tmp_path_factory):
    database = postgres.create_database("optuna")
    env = prefect_server.client_env(
        MLFLOW_TRACKING_URI=mlflow_on_postgres.url, LENSFLOW_TUNE_STORAGE=database
    )
    projects, commands = {}, {}
    for name, trials, workers in (("workers", WORKERS_TRIALS, 2), ("other", OTHER_TRIALS, 1)):
        projects[name] = project = tmp_path_factory.mktemp(f"tune-{name}")
        write_tiny_params(project)
        command = [sys.executable, "-m", "cli.main", "tune", "--trials", str(trials)]
        commands[name] = subprocess.Popen(
            [*command, "--workers", str(workers), *_sets(STUDY)],
            cwd=project,
            env={**env, "PREFECT_HOME": str(project / ".prefect")},
            stdout=(project / "out.txt").open("w"),
            stderr=subprocess.STDOUT,
        )
    try:
        killed = _kill_a_worker_in_its_last_trial(
            commands["workers"], database, mlflow_on_postgres.url
        )
        codes = {name: process.wait(timeout=600) for name, process in commands.items()}
    finally:
        for process in commands.values():
            if process.poll() is None:
                process.kill()
    return {
        "database": database,
        "tracking": mlflow_on_postgres.url,
        "killed": killed,
        "codes": codes,
        "output": {name: (p / "out.txt").read_text() for name, p in projects.items()},
        "reports": {
            name: json.loads((p / "reports/tuning.json").read_text())
            for name, p in projects.items()
        },
    }


def test_two_invocations_share_one_study_with_unique_trial_numbers(shared_study):
    reports, output = shared_study["reports"], shared_study["output"]
    assert shared_study["codes"]["other"] == 0, output["other"][-3000:]
    assert reports["workers"]["study"] == reports["other"]["study"]
    study = optuna.load_study(
        study_name=reports["other"]["study"], storage=shared_study["database"]
    )
    numbers = sorted(trial.number for trial in study.trials)
    assert numbers == list(range(WORKERS_TRIALS + OTHER_TRIALS))


def test_each_invocation_is_one_mlflow_parent_of_its_trials(shared_study):
    client = mlflow.MlflowClient(shared_study["tracking"])
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    study = shared_study["reports"]["other"]["study"]
    parents = client.search_runs(
        [experiment], f"tags.`lensflow.step` = 'tune' and tags.`optuna.study` = '{study}'"
    )
    reported = {name: report["mlflow_run_id"] for name, report in shared_study["reports"].items()}
    assert {run.info.run_id for run in parents} == set(reported.values())
    children = {name: [] for name in reported}
    for run in _trial_runs(client, experiment):
        name = next(n for n, r in reported.items() if r == run.data.tags["mlflow.parentRunId"])
        children[name].append(int(run.data.tags["optuna.trial"]))
    assert sorted(map(len, (children["workers"], children["other"]))) == sorted(
        [WORKERS_TRIALS, OTHER_TRIALS]
    )
    assert sorted(children["workers"] + children["other"]) == list(range(6))


def test_a_killed_worker_leaves_its_trial_failed_and_the_study_goes_on(shared_study):
    killed, output = shared_study["killed"], shared_study["output"]["workers"]
    assert shared_study["codes"]["workers"] == 1, output[-3000:]
    assert "1 tune workers stopped with an error (exit codes [-9]" in output
    study = optuna.load_study(
        study_name=shared_study["reports"]["workers"]["study"], storage=shared_study["database"]
    )
    states = {trial.number: trial.state.name for trial in study.trials}
    assert states.pop(killed) == "FAIL"
    assert set(states.values()) == {"COMPLETE"}
    run_id = study.trials[killed].user_attrs[tune_storage.RUN_ATTR]
    assert mlflow.MlflowClient(shared_study["tracking"]).get_run(run_id).info.status == "KILLED"
    report = shared_study["reports"]["workers"]
    assert report["counts"]["fail"] == 1 and report["counts"]["running"] == 0


def test_processes_opening_a_new_database_at_once_all_get_the_study_storage(postgres):
    url = postgres.create_database("optuna_race")
    start, opened = threading.Barrier(4), []

    def open_it():
        start.wait()
        opened.append(type(tune_storage.open_storage(url, GRACE)).__name__)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert opened == ["RDBStorage"] * 4
