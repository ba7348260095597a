"""Where Optuna studies live: a database URL (tune.storage, or LENSFLOW_TUNE_STORAGE for URLs
with credentials, which params refuse), opened with heartbeats so a trial whose worker died is
failed, and its MLflow run closed, instead of staying "running" for ever."""

from __future__ import annotations

import os
import warnings

import optuna

from components import credentials, tracking
from components.config import Config, UserError

STORAGE_ENV = credentials.TUNE_STORAGE_ENV  # wins over tune.storage: URLs with credentials
RUN_ATTR = "mlflow_run_id"  # study and trial attribute: their MLflow run
HEARTBEAT_SECONDS, GRACE_SECONDS = 10, 30  # a trial silent for GRACE_SECONDS was killed


def storage_url(cfg: Config) -> str:
    """LENSFLOW_TUNE_STORAGE, else tune.storage (which never holds a password: config.load
    refuses one)."""
    return os.environ.get(STORAGE_ENV) or cfg.tune.storage


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The study database, with heartbeats: a trial whose worker died is failed (and its MLflow
    run closed) once it has been silent for GRACE_SECONDS."""
    import sqlalchemy.exc

    # sqlite: wait for the other workers' writes instead of failing on a locked file
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine,
                heartbeat_interval=HEARTBEAT_SECONDS,
                grace_period=GRACE_SECONDS,
                heartbeat_stale_trial_callback=close_stale_run,
            )
    except (ImportError, ValueError, sqlalchemy.exc.SQLAlchemyError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        source = STORAGE_ENV if os.environ.get(STORAGE_ENV) else "tune.storage"
        raise UserError(credentials.redact(f"{source} {url}: {reason}")) from None


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
