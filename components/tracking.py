"""MLflow run context: one parent run per pipeline run, one child run per step.

Local by default (`sqlite:///mlflow.db`, artifacts in ./mlartifacts); `MLFLOW_TRACKING_URI`
points everything at a team server instead. Every run carries the same lineage tags and
logs the data it used as an MLflow dataset input (the runs table's Dataset column).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from components import datasets, versioning
from components.config import Config

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
LOCAL_ARTIFACTS = Path("mlartifacts")
# The experiment's kind: model training, not a GenAI app (traces). MLflow 3.17's UI still opens
# in its GenAI mode unless told otherwise: runs_page() is the address that opens on the runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"

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
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:  # made before the tag
            mlflow.MlflowClient().set_experiment_tag(
                experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING
            )
        return experiment.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:"):
        location = LOCAL_ARTIFACTS.resolve().as_uri()
    return mlflow.create_experiment(
        cfg.tracking.experiment,
        artifact_location=location,
        tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING},
    )


def runs_page(experiment_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI page of an experiment's runs, in its model-training mode."""
    return f"{ui}/#/experiments/{experiment_id}?workflowType=machine_learning"


def lineage(cfg: Config) -> dict[str, str]:
    return {
        "git.commit": versioning.git_commit(),
        "git.dirty": str(versioning.git_dirty()).lower(),
        "data.md5": versioning.data_md5(datasets.source_dir(cfg)),
        "params.hash": cfg.params_hash(),
        "prefect.flow_run_id": _flow_run_id,
    }


def log_dataset(cfg: Config, context: str) -> None:
    """The raw data as the active run's dataset input: its folder name, the DVC hash as digest
    (the run's `data.md5` tag) and its path as source."""
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    source = datasets.source_dir(cfg)
    dataset = MetaDataset(
        LocalArtifactDatasetSource(str(source)),
        name=source.name,
        digest=versioning.data_md5(source),
    )
    mlflow.log_input(dataset, context=context)


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
        log_dataset(cfg, name)
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
        log_dataset(cfg, step)
        yield active


def _flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat
