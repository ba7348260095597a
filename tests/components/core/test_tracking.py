"""MLflow runs end even when their process cannot end them: a run left RUNNING by a process
killed with SIGKILL is ended KILLED by the next run on the same host. Runs started together
do not trip over what both create (an experiment, a dataset)."""

import os
import signal
import subprocess
import sys
import threading

import mlflow
import pytest

from components.core import config, tracking
from components.core.errors import UserError
from tests.conftest import REPO

KILLED_IN_A_STEP = """
import os, signal
from components.core import config, tracking
with tracking.step_run(config.from_dict({}), "train"):
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_run_left_running_by_a_killed_process_ends_killed_at_the_next_run(project):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.Popen([sys.executable, "-c", KILLED_IN_A_STEP], cwd=project, env=env)
    assert killed.wait(timeout=120) == -signal.SIGKILL
    client = mlflow.MlflowClient(tracking.tracking_uri())
    experiment = client.get_experiment_by_name("lensflow").experiment_id
    [orphan] = client.search_runs([experiment])
    assert orphan.info.status == "RUNNING" and orphan.data.tags["lensflow.pid"] == str(killed.pid)
    elsewhere = client.create_run(
        experiment, tags={**orphan.data.tags, "lensflow.host": "another-host"}
    )

    with tracking.step_run(config.from_dict({}), "validate") as current:
        assert client.get_run(orphan.info.run_id).info.status == "KILLED"
        assert "was killed" in client.get_run(orphan.info.run_id).data.tags["error"]
        assert client.get_run(current.info.run_id).info.status == "RUNNING"  # alive: left be
        assert current.data.tags["lensflow.pid"] == str(os.getpid())
    assert client.get_run(elsewhere.info.run_id).info.status == "RUNNING"  # cannot tell: left be
    assert client.get_run(current.info.run_id).info.status == "FINISHED"


def test_an_experiment_another_process_creates_meanwhile_is_taken_not_an_error(
    project, monkeypatch
):
    # two commands started together: both look, find no experiment, both create it
    client = mlflow.MlflowClient(tracking.tracking_uri())
    made_by_the_other = client.create_experiment("together")
    real_lookup = mlflow.MlflowClient.get_experiment_by_name
    lookups = []

    def looked_before_the_other_created_it(self, name):
        lookups.append(name)
        return None if len(lookups) == 1 else real_lookup(self, name)

    monkeypatch.setattr(
        mlflow.MlflowClient, "get_experiment_by_name", looked_before_the_other_created_it
    )
    cfg = config.from_dict({"tracking": {"experiment": "together"}})
    assert tracking.setup(cfg) == made_by_the_other
    assert lookups == ["together", "together"]


def test_a_dataset_another_run_logs_meanwhile_is_linked_not_an_error(project):
    """Two runs logging a new dataset at once (seen with two `lensflow tune` on one study):
    MLflow's store finds it in neither, inserts it in both, and the second insert breaks its
    unique key. Here the other run logs it between this run's lookup and its insert."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    cfg = config.from_dict({})
    client = mlflow.MlflowClient(tracking.tracking_uri())
    experiment = tracking.setup(cfg)
    other = client.create_run(experiment)

    raced = threading.Event()

    def the_other_run_logs_it_first(connection, cursor, statement, *args):
        inserting = statement.lstrip().upper().startswith("INSERT INTO DATASETS")
        if inserting and not raced.is_set():  # this run's insert; the other's then passes
            raced.set()
            elsewhere = threading.Thread(target=log_in_the_other_run)  # its own active run
            elsewhere.start()
            elsewhere.join()

    def log_in_the_other_run():
        with mlflow.start_run(other.info.run_id):
            tracking.log_dataset(cfg, "train")

    event.listen(Engine, "before_cursor_execute", the_other_run_logs_it_first)
    try:
        with mlflow.start_run(experiment_id=experiment) as run:
            tracking.log_dataset(cfg, "train")
    finally:
        event.remove(Engine, "before_cursor_execute", the_other_run_logs_it_first)
    datasets = [
        [(i.dataset.name, i.dataset.digest) for i in client.get_run(r).inputs.dataset_inputs]
        for r in (other.info.run_id, run.info.run_id)
    ]
    assert datasets[0] == datasets[1] == [("digits", "untracked")]  # the default data.source


def test_an_experiment_whose_artifacts_only_a_server_reaches_is_one_line_saying_what_to_do(
    project,
):
    # made through a server that serves its artifacts (a team's, or an older `lensflow stack`)
    client = mlflow.MlflowClient(tracking.tracking_uri())
    client.create_experiment("served", artifact_location="mlflow-artifacts:/3")
    with pytest.raises(UserError) as error:  # the CLI prints it as one line, exit 2
        tracking.setup(config.from_dict({"tracking": {"experiment": "served"}}))
    assert str(error.value) == (
        "MLflow experiment 'served' keeps its artifacts on a tracking server "
        f"(mlflow-artifacts:/3), which {tracking.shown_uri()} cannot reach: start it "
        '(eval "$(lensflow stack up)") or set MLFLOW_TRACKING_URI to it, then run this again'
    )


@pytest.mark.parametrize("moment", ["commit", "after_cursor_execute"])
def test_a_step_interrupted_between_an_mlflow_write_and_its_commit_ends_killed(project, moment):
    """Ctrl-C landing after MLflow's INSERT and before its COMMIT (the write lock held), in
    SQLAlchemy's "commit" event or right after the INSERT ran, still ends the run KILLED at
    once; without releasing that connection, ending the run waited 20 s for SQLite's lock and
    left it RUNNING."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    def interrupt(connection, *args):
        if moment == "commit" or args[1].lstrip().upper().startswith("INSERT INTO METRICS"):
            event.remove(Engine, moment, interrupt)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), tracking.step_run(config.from_dict({}), "train") as run:
        event.listen(Engine, moment, interrupt)
        mlflow.log_metric("loss", 1.0)
    client = mlflow.MlflowClient(tracking.tracking_uri())
    assert client.get_run(run.info.run_id).info.status == "KILLED"


def test_sqlalchemys_failure_to_close_the_cursor_of_a_closed_database_is_not_printed(
    project, caplog
):
    """Ctrl-C in a query can leave SQLAlchemy closing a cursor whose database connection is
    gone: it logs "Error closing cursor" with a traceback (seen in CI's Ctrl-C test), which
    a step's process does not print. Made here by closing the connection under a query."""
    import sqlalchemy.exc
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    def close_the_database_under_the_query(connection, cursor, statement, *args):
        if statement.lstrip().upper().startswith("SELECT"):
            event.remove(Engine, "after_cursor_execute", close_the_database_under_the_query)
            connection.connection.dbapi_connection.close()
            raise RuntimeError("the query was cut short")

    tracking.setup(config.from_dict({}))  # as every step does first
    event.listen(Engine, "after_cursor_execute", close_the_database_under_the_query)
    failed = (mlflow.exceptions.MlflowException, sqlalchemy.exc.SQLAlchemyError)
    with pytest.raises(failed, match="closed database"):  # MLflow's wrapping, or not
        mlflow.MlflowClient().search_experiments()
    assert "Error closing cursor" not in caplog.text


def test_a_step_interrupted_while_a_connection_out_of_the_pool_holds_a_write_ends_killed(project):
    """The interruption can also leave the write open on a connection SQLAlchemy no longer
    pools (one it gave up on mid-checkin, still referenced by the traceback): that too is
    rolled back before the run ends KILLED."""
    import sqlite3

    with pytest.raises(KeyboardInterrupt), tracking.step_run(config.from_dict({}), "train") as run:
        held = sqlite3.connect(project / "mlflow.db", timeout=0)
        held.execute("BEGIN IMMEDIATE")  # SQLite's write lock, as an INSERT without its COMMIT
        raise KeyboardInterrupt
    client = mlflow.MlflowClient(tracking.tracking_uri())
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    assert not held.in_transaction
