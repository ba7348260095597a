"""The continuous-validation flow: one monitoring pass, its markdown artifact, and per
monitor.on_alert a run of the training deployment, as the retrain guard allows. Wiring only
(components/monitoring/monitor.py; components/detection/monitor.py under `task: detection`;
flows/retrain.py)."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from components.core import config
from components.detection import monitor as detection_monitor
from components.monitoring import monitor
from flows.data import component_task
from flows.retrain import start_training

monitor_task = component_task(monitor.run, "monitor")
detection_monitor_task = component_task(detection_monitor.run, "monitor")


@flow(name="lensflow-continuous-validation", log_prints=True)
def continuous_validation_flow(
    params_path: str = "params.yaml",
    data: str | None = None,
    model: str | None = None,
    overrides: list[str] | None = None,
) -> dict:
    cfg = config.load(params_path, overrides)
    task = detection_monitor_task if cfg.task == "detection" else monitor_task
    report = task(cfg, data, model)
    create_markdown_artifact(
        monitor.markdown(report), key="continuous-validation", description="lensflow monitor"
    )
    print(monitor.summary(report))
    if report["alert"] and cfg.monitor.on_alert == "retrain":
        started = start_training(cfg, report["batch"]["fingerprint"], get_run_logger())
        report = monitor.record(report, retrain=started)
    return report
