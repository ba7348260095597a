"""MLflow run context: one parent run per pipeline run, one child run per step.

Local by default (`sqlite:///mlflow.db`, artifacts in ./mlartifacts); `MLFLOW_TRACKING_URI`
points everything at a team server instead. Every run carries the same lineage tags, logs
the data it used as an MLflow dataset input (the runs table's Dataset column), and records the
host and process that run it: a run whose process died without ending it (SIGKILL, power cut)
is ended KILLED by the next lensflow process that uses the experiment on that host.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import sys
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import psutil

from components.core import credentials, paths, versioning
from components.core.config import Config
from components.core.errors import UserError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
CHECKPOINT_ARTIFACT = "checkpoint/checkpoint.pt"  # a registered model's weights (register logs it)
PROFILE_ARTIFACT = "profile/profile.npz"  # its reference profile (export makes, register logs)
LOCAL_ARTIFACTS = Path("mlartifacts")
# The experiment's kind: model training, not a GenAI app (traces). MLflow 3.17's UI still opens
# in its GenAI mode unless told otherwise: runs_page() is the address that opens on the runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# seconds after boot its process started (started_after_boot): a reused PID is not it
PID_STARTED_TAG = "lensflow.pid_started_after_boot"
MODEL_TRAINING = "custom_model_development"

# Set by `pipeline_run` for the steps it contains; module state (not thread-local) because
# Prefect may run tasks on worker threads.
_parent_run_id: str | None = None
_flow_run_id: str = "none"
_swept: set[tuple[str, str]] = set()  # (tracking URI, experiment id) close_orphans has seen


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI (or the local default) as MLflow gets it. A user and password in an
    http(s) URI move to MLflow's own MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, so
    that no URL MLflow prints or puts in an error message holds them."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or parts.password is None:
        return uri
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(parts.username or ""))
    os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(parts.password))
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def shown_uri() -> str:
    """The tracking URI as lensflow prints it: without a password (a database URL keeps one)."""
    return credentials.redact(tracking_uri())


def setup(cfg: Config) -> str:
    """Point MLflow at the tracking server and experiment; returns the experiment id. The
    first time in a process, ends the experiment's runs that a dead process left RUNNING."""
    import mlflow

    logging.getLogger(SQLALCHEMY_POOL_LOGGER).addFilter(_cursor_of_a_closed_database)
    mlflow.set_tracking_uri(tracking_uri())
    experiment = experiment_named(
        cfg.tracking.experiment, LOCAL_ARTIFACTS, {EXPERIMENT_KIND_TAG: MODEL_TRAINING}
    )
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:  # made before the tag
        mlflow.MlflowClient().set_experiment_tag(
            experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING
        )
    if (tracking_uri(), experiment.experiment_id) not in _swept:
        _swept.add((tracking_uri(), experiment.experiment_id))
        close_orphans(experiment.experiment_id)
    return experiment.experiment_id


def experiment_named(name: str, local_artifacts: Path, tags: dict[str, str] | None = None):
    """The MLflow experiment `name`, created when missing (its artifacts in `local_artifacts`
    when the store is a local sqlite file). When another process creates it at the same moment
    (two commands started together), theirs."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = None
        if tracking_uri().startswith("sqlite:"):
            location = local_artifacts.resolve().as_uri()
        try:
            client.create_experiment(name, artifact_location=location, tags=tags)
        except mlflow.exceptions.MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        experiment = client.get_experiment_by_name(name)
    served_only(experiment)
    return experiment


def served_only(experiment) -> None:
    """A UserError, saying what to do, when the experiment keeps its artifacts where only an
    MLflow server reaches them (`mlflow-artifacts:/…`: made through a server that serves its
    artifacts, a team's or an older `lensflow stack up`) and MLflow is used without one."""
    location = experiment.artifact_location
    if location.startswith("mlflow-artifacts:") and urlsplit(tracking_uri()).scheme not in (
        "http",
        "https",
    ):
        raise UserError(
            f"MLflow experiment {experiment.name!r} keeps its artifacts on a tracking server "
            f"({location}), which {shown_uri()} cannot reach: start it "
            '(eval "$(lensflow stack up)") or set MLFLOW_TRACKING_URI to it, then run this again'
        )


def runs_page(experiment_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI page of an experiment's runs, in its model-training mode."""
    return f"{ui}/#/experiments/{experiment_id}?workflowType=machine_learning"


def ui_hint(experiment_id: str) -> str:
    """Where to see the runs: a tracking server is its own UI; a database needs `mlflow ui`."""
    uri = tracking_uri()
    if urlsplit(uri).scheme in ("http", "https"):  # tracking_uri() holds no password
        return f"MLflow UI: {runs_page(experiment_id, ui=uri.rstrip('/'))}"
    return (
        f"MLflow UI: mlflow ui --backend-store-uri {shown_uri()} --host 127.0.0.1 --port 5000"
        f"   then open {runs_page(experiment_id)}"
    )


def process_tags() -> dict[str, str]:
    """Who runs a run: a later process can tell whether it is still alive."""
    import psutil

    return {
        "lensflow.host": socket.gethostname(),
        "lensflow.pid": str(os.getpid()),
        PID_STARTED_TAG: f"{started_after_boot(psutil.Process()):.2f}",
    }


def close_orphans(experiment_id: str) -> list[str]:
    """End KILLED the RUNNING runs whose process, on this host, no longer exists (killed with
    SIGKILL, out of memory, a power cut): nothing else would ever end them. Runs of other
    hosts are left alone: whether their process lives cannot be told from here."""
    import mlflow

    client = mlflow.MlflowClient()
    host = socket.gethostname()
    running = client.search_runs(
        [experiment_id],
        f"attributes.status = 'RUNNING' and tags.`lensflow.host` = '{host}'",
        max_results=1000,
    )
    closed = []
    for run in running:
        pid, started = run.data.tags["lensflow.pid"], run.data.tags.get(PID_STARTED_TAG)
        if _alive(int(pid), started):
            continue
        client.set_tag(run.info.run_id, "error", f"its process (pid {pid} on {host}) was killed")
        client.set_terminated(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
    return closed


def process_alive(tags: dict[str, str]) -> bool | None:
    """Whether the process that `process_tags()` described still runs; None when it ran on
    another host (which cannot be told from here)."""
    if tags.get("lensflow.host") != socket.gethostname() or "lensflow.pid" not in tags:
        return None
    return _alive(int(tags["lensflow.pid"]), tags.get(PID_STARTED_TAG))


def _alive(pid: int, started: str | None) -> bool:
    import psutil

    try:
        return find_process(pid, None if started is None else float(started)) is not None
    except psutil.AccessDenied:  # another user's process: alive
        return True


def lineage(cfg: Config) -> dict[str, str]:
    return {
        "git.commit": versioning.git_commit(),
        "git.dirty": str(versioning.git_dirty()).lower(),
        "data.md5": versioning.data_md5(paths.source_dir(cfg)),
        "params.hash": cfg.params_hash(),
        "prefect.flow_run_id": _flow_run_id,
    }


def log_dataset(cfg: Config, context: str) -> None:
    """The raw data as the active run's dataset input: its folder name, the DVC hash as digest
    (the run's `data.md5` tag) and its path as source."""
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    source = paths.source_dir(cfg)
    dataset = MetaDataset(
        LocalArtifactDatasetSource(str(source)),
        name=source.name,
        digest=versioning.data_md5(source),
    )
    try:
        mlflow.log_input(dataset, context=context)
    except mlflow.exceptions.MlflowException as exc:
        # Two runs logging a new dataset at once (two tune invocations on one study): MLflow's
        # store looks it up, finds it in neither, inserts it in both, and the second insert
        # breaks the unique key. It exists now: logging again links it.
        if "INSERT INTO datasets" not in str(exc):
            raise
        mlflow.log_input(dataset, context=context)


@contextmanager
def pipeline_run(cfg: Config, name: str, flow_run_id: str | None = None):
    """The parent run of one pipeline execution; step runs opened inside nest under it."""
    import mlflow

    global _parent_run_id, _flow_run_id
    experiment_id = setup(cfg)
    _flow_run_id = flow_run_id or "none"
    tags = {**lineage(cfg), **process_tags()}
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags) as run:
        mlflow.log_params(_flatten(cfg.as_dict()))
        mlflow.log_dict(cfg.as_dict(), "config/params.resolved.yaml")
        log_dataset(cfg, name)
        _parent_run_id = run.info.run_id
        try:
            with _killed_when_interrupted():
                yield run
        finally:
            _parent_run_id, _flow_run_id = None, "none"


@contextmanager
def step_run(cfg: Config, step: str):
    """A child run of the current pipeline run, or a run of its own (DVC stage, test); either
    way with the params the step ran with."""
    import mlflow

    experiment_id = setup(cfg)
    tags = {**lineage(cfg), **process_tags(), "lensflow.step": step}
    if _parent_run_id is None:
        with mlflow.start_run(experiment_id=experiment_id, run_name=step, tags=tags) as run:
            mlflow.log_params(_flatten(cfg.as_dict()))
            with _killed_when_interrupted():
                log_dataset(cfg, step)
                yield run
        return
    client = mlflow.MlflowClient()
    run = client.create_run(
        experiment_id, run_name=step, tags={**tags, "mlflow.parentRunId": _parent_run_id}
    )
    # Resume the child by id: works on whichever thread Prefect runs the task on.
    with mlflow.start_run(run_id=run.info.run_id, nested=True) as active:
        # the step's own params: those of the parent, unless the step changed them (use_tuned)
        mlflow.log_params(_flatten(cfg.as_dict()))
        with _killed_when_interrupted():
            log_dataset(cfg, step)
            yield active


@contextmanager
def _killed_when_interrupted():
    """The active run ends KILLED when the process is stopped from outside (Ctrl-C, SIGTERM,
    Prefect's termination signal), not FAILED as on an error."""
    import mlflow

    try:
        yield
    except (Exception, GeneratorExit):
        raise
    except BaseException:
        # It may have cut an MLflow call short (SQLite's write lock still held: released
        # first). The interruption goes on whatever MLflow answers: MLflow would log a failure
        # with a traceback, so one line says it instead, and the next run ends this one.
        _release_database_connections()
        logging.disable(logging.CRITICAL)
        try:
            mlflow.end_run("KILLED")
        except Exception as exc:
            lines = [line for line in str(exc).splitlines() if not line.startswith("(raised as")]
            why = f"{type(exc).__name__}: {(lines or [''])[0][:200]}"
            print(f"lensflow: the MLflow run stays RUNNING until the next run ends it ({why})",
                  file=sys.stderr)  # fmt: skip
        finally:
            logging.disable(logging.NOTSET)
        raise


SQLALCHEMY_POOL_LOGGER = "sqlalchemy.pool.impl.QueuePool"  # MLflow's SQL store's pool


def _cursor_of_a_closed_database(record: logging.LogRecord) -> bool:
    """False for SQLAlchemy's "Error closing cursor" when the database connection is closed
    already: Ctrl-C in the middle of a query makes it log that with a traceback, while the
    interruption goes on and the run ends KILLED, saying so in one line."""
    failure = record.exc_info[1] if record.exc_info else None
    return not (record.getMessage() == "Error closing cursor" and "closed database" in str(failure))


def _release_database_connections() -> None:
    """Roll back every SQLite connection of this process left inside a write (MLflow's store
    is one): an interruption that lands between an MLflow write and its COMMIT can leave the
    write open on a connection back in SQLAlchemy's pool, or on one the pool gave up on and
    the traceback still holds, and SQLite locked for every other connection meanwhile."""
    if "sqlite3" not in sys.modules:
        return
    import sqlite3

    for each in gc.get_objects():
        # type(), not isinstance: that asks each object for __class__, and some warn doing so
        if issubclass(type(each), sqlite3.Connection):
            with suppress(Exception):  # closed, or another thread's: the run's end is tried
                if each.in_transaction:
                    each.rollback()


def model_run_id(uri: str) -> str:
    """The MLflow run that logged a lensflow model: `models:/NAME@ALIAS`, `models:/NAME/VERSION`
    or `runs:/RUN_ID[/PATH]`. A UserError naming the URI when there is no such model or run."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri())
    try:
        if uri.startswith("runs:/"):
            run_id = uri.removeprefix("runs:/").split("/")[0]
            return client.get_run(run_id).info.run_id
        name, at, alias = uri.removeprefix("models:/").partition("@")
        if at:
            return client.get_model_version_by_alias(name, alias).run_id
        name, _, number = name.partition("/")
        return client.get_model_version(name, number).run_id
    except MlflowException as exc:
        raise UserError(f"{uri}: {exc.message.splitlines()[0]}") from None


def no_checkpoint(uri: str, run_id: str) -> str:
    return (
        f"{uri}: run {run_id} logged no {CHECKPOINT_ARTIFACT} (name a registered lensflow "
        "model, or the run of its register step)"
    )


def _flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


# Telling a process apart from a later one that reuses its PID, from another process.
#
# A PID alone is not an identity: the OS hands it out again. PID + start time is, but the start
# time psutil reports is boot time + ticks since boot, and boot time is derived from the wall
# clock: when the clock steps (NTP, a virtual machine resumed), every process's start time moves
# by the same amount and a living server looks like a stranger. Seconds after boot do not move.
SAME_START_S = 0.05  # start times are clock ticks (10 ms on Linux)


def started_after_boot(process: psutil.Process) -> float:
    """When `process` started, in seconds after boot; unaffected by wall-clock steps."""
    return round(process.create_time() - psutil.boot_time(), 2)


def find_process(pid: int, started: float | None) -> psutil.Process | None:
    """The running (not zombie) process `pid` that started `started` seconds after boot, or None
    when it is gone or its PID now belongs to another process. `started` None: any process
    with that PID. AccessDenied (another user's process) propagates."""
    try:
        process = psutil.Process(pid)
        if started is not None and abs(started_after_boot(process) - started) > SAME_START_S:
            return None
        return None if process.status() == psutil.STATUS_ZOMBIE else process
    except psutil.NoSuchProcess:
        return None
