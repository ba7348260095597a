"""The training flow: every component as a Prefect task, in pipeline order. Wiring only."""

from __future__ import annotations

from prefect import flow, runtime

from components.core import config, tracking, versioning
from components.detection import evaluate as detection_evaluate
from components.detection import train as detection_train
from components.detection import tune as detection_tune
from components.detection_release import export as detection_export
from components.detection_release import promote as detection_promote
from components.detection_release import quantize as detection_quantize
from components.detection_release import registry as detection_registry
from components.evaluation import evaluate
from components.experiments import tune
from components.labelling import labels
from components.release import export, promote, quantize, registry
from components.training import train
from flows.data import component_task, validated_data

labels_task = component_task(labels.run, "labels")  # only when labels.enabled
tune_task = component_task(tune.run, "tune")  # a study only when tune.enabled
train_task = component_task(train.run, "train")
evaluate_task = component_task(evaluate.run, "evaluate")
export_task = component_task(export.run, "export")
quantize_task = component_task(quantize.run, "quantize")
register_task = component_task(registry.run, "register")
promote_task = component_task(promote.run, "promote")
dvc_commit_task = component_task(versioning.dvc_commit, "record-in-dvc-lock")
# task: detection (cli.pipeline.DETECTION_STAGES)
detection_tasks = {
    "tune": component_task(detection_tune.run, "tune"),  # a study only when tune.enabled
    "train": component_task(detection_train.run, "train"),
    "evaluate": component_task(detection_evaluate.run, "evaluate"),
    "export": component_task(detection_export.run, "export"),
    "quantize": component_task(detection_quantize.run, "quantize"),
    "register": component_task(detection_registry.run, "register"),
    "promote": component_task(detection_promote.run, "promote"),
}


@flow(name="lensflow-training", log_prints=True)
def training_flow(
    params_path: str = "params.yaml", overrides: list[str] | None = None, resume: bool = False
) -> dict:
    cfg = config.load(params_path, overrides)
    if cfg.task == "detection":
        return detection_flow(cfg, overrides)
    with tracking.pipeline_run(cfg, "training", flow_run_id=str(runtime.flow_run.id)) as run:
        validated_data(cfg)
        if cfg.labels.enabled:  # a gate when labels.max_noise_rate is set
            print(labels.summary(labels_task(cfg)))
        tune_task(cfg)  # writes reports/tuning.json, which train reads when train.use_tuned
        trained = train_task(cfg, resume)
        evaluation = evaluate_task(cfg)
        exported = export_task(cfg)
        quantized = quantize_task(cfg)
        registered = register_task(cfg)
        promoted = promote_task(cfg)
    # dvc.lock may only vouch for outputs made from params.yaml as written: no overrides.
    if versioning.in_dvc_repo() and not overrides:
        dvc_commit_task()
    return {
        "mlflow_run_id": run.info.run_id,
        "experiment": cfg.tracking.experiment,
        "experiment_id": run.info.experiment_id,
        "test_accuracy": evaluation.accuracy,
        "test_macro_f1": evaluation.macro_f1,
        "onnx_accuracy": exported.accuracy,
        "int8_shipped": quantized.shipped,
        "int8_speedup": quantized.speedup,
        "epochs_run": trained.epochs_run,
        "train_loop_seconds": trained.train_loop_seconds,
        "model_name": registered.name,
        "version": registered.version,
        "promoted": promoted.promoted,
        "champion_version": promoted.champion_version,
        "decision": promoted.decision,
    }


def detection_flow(cfg: config.Config, overrides: list[str] | None = None) -> dict:
    """`task: detection`: validate, tune (when enabled), train, evaluate, export with parity,
    quantize, register, promote: dvc.yaml's stages, recorded in dvc.lock as classification's."""
    with tracking.pipeline_run(cfg, "training", flow_run_id=str(runtime.flow_run.id)) as run:
        validated_data(cfg)
        detection_tasks["tune"](cfg)  # reports/tuning.json, which train.use_tuned reads
        detection_tasks["train"](cfg)
        evaluation = detection_tasks["evaluate"](cfg)
        exported = detection_tasks["export"](cfg)  # promote's export_parity gate reads it
        quantized = detection_tasks["quantize"](cfg)
        registered = detection_tasks["register"](cfg)
        promoted = detection_tasks["promote"](cfg)
        print(detection_promote.summary(promoted))  # what decided, against the champion
    if versioning.in_dvc_repo() and not overrides:
        dvc_commit_task()
    return {
        "task": "detection",
        "mlflow_run_id": run.info.run_id,
        "experiment": cfg.tracking.experiment,
        "experiment_id": run.info.experiment_id,
        "test_map": evaluation.map,
        "test_map_50": evaluation.map_50,
        "export_parity": exported.parity,
        "int8_shipped": quantized.shipped,
        "model_name": registered.name,
        "version": registered.version,
        "promoted": promoted.promoted,
        "champion_version": promoted.champion_version,
        "decision": promoted.decision,
    }
