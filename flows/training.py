"""The training flow: every component as a Prefect task, in pipeline order. Wiring only."""

from __future__ import annotations

from prefect import flow, runtime, task
from prefect.cache_policies import NO_CACHE

from components import (
    config,
    datasets,
    evaluate,
    export,
    prepare,
    quantize,
    registry,
    tracking,
    train,
    tune,
    validate,
    versioning,
)


def _task(fn, name: str):
    # Components read and write files; Prefect passes only configs and small results.
    return task(fn, name=name, cache_policy=NO_CACHE)


data_task = _task(datasets.run, "data")
prepare_task = _task(prepare.run, "prepare")
validate_task = _task(validate.run, "validate")
tune_task = _task(tune.run, "tune")  # a study only when tune.enabled
train_task = _task(train.run, "train")
evaluate_task = _task(evaluate.run, "evaluate")
export_task = _task(export.run, "export")
quantize_task = _task(quantize.run, "quantize")
register_task = _task(registry.run, "register")
dvc_commit_task = _task(versioning.dvc_commit, "record-in-dvc-lock")


def validated_data(cfg: config.Config) -> None:
    """data -> prepare -> validate; the flow stops here when the data fails validation."""
    data_task(cfg)
    prepare_task(cfg)
    validation = validate_task(cfg)
    print(validate.summary(validation))
    if not validation.success:
        raise config.GateFailed(f"the data failed validation; see {validation.report}")


@flow(name="lensflow-training", log_prints=True)
def training_flow(
    params_path: str = "params.yaml", overrides: list[str] | None = None, resume: bool = False
) -> dict:
    cfg = config.load(params_path, overrides)
    with tracking.pipeline_run(cfg, "training", flow_run_id=str(runtime.flow_run.id)) as run:
        validated_data(cfg)
        tune_task(cfg)  # writes reports/tuning.json, which train reads when train.use_tuned
        trained = train_task(cfg, resume)
        evaluation = evaluate_task(cfg)
        exported = export_task(cfg)
        quantized = quantize_task(cfg)
        registered = register_task(cfg)
    # dvc.lock may only vouch for outputs made from params.yaml as written: no overrides.
    if versioning.in_dvc_repo() and not overrides:
        dvc_commit_task()
    return {
        "mlflow_run_id": run.info.run_id,
        "experiment": cfg.tracking.experiment,
        "test_accuracy": evaluation.accuracy,
        "test_macro_f1": evaluation.macro_f1,
        "onnx_accuracy": exported.accuracy,
        "int8_shipped": quantized.shipped,
        "int8_speedup": quantized.speedup,
        "epochs_run": trained.epochs_run,
        "train_loop_seconds": trained.train_loop_seconds,
        "model_name": registered.name,
        "version": registered.version,
        "promoted": registered.promoted,
        "champion_version": registered.champion_version,
    }
