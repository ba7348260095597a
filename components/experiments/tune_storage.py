"""Where Optuna studies live: a database URL (tune.storage, or LENSFLOW_TUNE_STORAGE for URLs
with credentials, which params refuse), opened with heartbeats so a trial whose worker died is
failed, and its MLflow run closed, instead of staying "running" for ever."""

from __future__ import annotations

import os
import time
import warnings

import optuna

from components.core import credentials, tracking
from components.core.config import Config
from components.core.errors import UserError

STORAGE_ENV = credentials.TUNE_STORAGE_ENV  # wins over tune.storage: URLs with credentials
RUN_ATTR = "mlflow_run_id"  # trial attribute: its MLflow run
CREATE_ATTEMPTS = 4  # opening a new database: tries while other processes create the tables


def storage_url(cfg: Config) -> str:
    """LENSFLOW_TUNE_STORAGE, else tune.storage (which never holds a password: config.load
    refuses one)."""
    return os.environ.get(STORAGE_ENV) or cfg.tune.storage


def open_storage(url: str, grace_seconds: int) -> optuna.storages.RDBStorage:
    """The study database, with heartbeats: a trial whose worker died is failed (and its MLflow
    run closed) once it has been silent for grace_seconds (tune.heartbeat_grace); a running
    trial beats three times in that time."""
    import sqlalchemy.exc

    for attempt in range(CREATE_ATTEMPTS):
        try:
            return _rdb_storage(url, grace_seconds)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            # processes opening a new PostgreSQL database at once all create Optuna's tables:
            # all but one fail on a duplicate type or table, and then find them made
            failure = exc
            time.sleep(0.5 * (attempt + 1))
        except (ImportError, ValueError, sqlalchemy.exc.SQLAlchemyError) as exc:
            failure = exc
            break
    reason = str(failure).splitlines()[0] if str(failure) else type(failure).__name__
    source = STORAGE_ENV if os.environ.get(STORAGE_ENV) else "tune.storage"
    raise UserError(credentials.redact(f"{source} {url}: {reason}")) from None


def _rdb_storage(url: str, grace_seconds: int) -> optuna.storages.RDBStorage:
    # sqlite: wait for the other workers' writes instead of failing on a locked file
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine,
            heartbeat_interval=max(1, grace_seconds // 3),
            grace_period=grace_seconds,
            heartbeat_stale_trial_callback=close_stale_run,
        )


def close_stale_run(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Optuna failed a trial whose worker died: close its MLflow run the same way."""
    import mlflow

    run_id = trial.user_attrs.get(RUN_ATTR)
    if not run_id:
        return
    try:
        client = mlflow.MlflowClient(tracking.tracking_uri())
        client.set_tag(run_id, "optuna.state", "FAIL")
        client.set_tag(run_id, "error", "its worker stopped (no heartbeat)")
        client.set_terminated(run_id, "KILLED")
    except Exception as exc:  # another MLflow store: the study must go on regardless
        warnings.warn(
            f"trial {trial.number}: could not close MLflow run {run_id}: {exc}", stacklevel=2
        )
