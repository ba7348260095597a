"""MLflow run context: one parent run per pipeline run, one child run per step.

Local by default (`sqlite:///mlflow.db`, artifacts in ./mlartifacts); `MLFLOW_TRACKING_URI`
points everything at a team server instead. Every run carries the same lineage tags.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from components import datasets, versioning
from components.config import Config, UserError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
CHECKPOINT_ARTIFACT = "checkpoint/checkpoint.pt"  # a registered model's weights (register logs it)
LOCAL_ARTIFACTS = Path("mlartifacts")

# Set by `pipeline_run` for the steps it contains; module state (not thread-local) because
# Prefect may run tasks on worker threads.
_parent_run_id: str | None = None
_flow_run_id: str = "none"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


def setup(cfg: Config) -> str:
    """Point MLflow at the tracking server and experiment; returns the experiment id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:"):
        location = LOCAL_ARTIFACTS.resolve().as_uri()
    return mlflow.create_experiment(cfg.tracking.experiment, artifact_location=location)


def lineage(cfg: Config) -> dict[str, str]:
    return {
        "git.commit": versioning.git_commit(),
        "git.dirty": str(versioning.git_dirty()).lower(),
        "data.md5": versioning.data_md5(datasets.source_dir(cfg)),
        "params.hash": cfg.params_hash(),
        "prefect.flow_run_id": _flow_run_id,
    }


@contextmanager
def pipeline_run(cfg: Config, name: str, flow_run_id: str | None = None):
    """The parent run of one pipeline execution; step runs opened inside nest under it."""
    import mlflow

    global _parent_run_id, _flow_run_id
    experiment_id = setup(cfg)
    _flow_run_id = flow_run_id or "none"
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=lineage(cfg)) as run:
        mlflow.log_params(_flatten(cfg.as_dict()))
        mlflow.log_dict(cfg.as_dict(), "config/params.resolved.yaml")
        _parent_run_id = run.info.run_id
        try:
            yield run
        finally:
            _parent_run_id, _flow_run_id = None, "none"


@contextmanager
def step_run(cfg: Config, step: str):
    """A child run of the current pipeline run, or a run of its own (DVC stage, test); either
    way with the params the step ran with."""
    import mlflow

    experiment_id = setup(cfg)
    tags = {**lineage(cfg), "lensflow.step": step}
    if _parent_run_id is None:
        with mlflow.start_run(experiment_id=experiment_id, run_name=step, tags=tags) as run:
            mlflow.log_params(_flatten(cfg.as_dict()))
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
        yield active


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
