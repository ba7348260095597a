"""The continuous-validation flow: one monitoring pass, its markdown artifact, and per
monitor.on_alert a run of the training deployment. Wiring only
(components/monitoring/monitor.py)."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from components.core import config
from components.monitoring import monitor
from flows.data import component_task

# The deployment `lensflow schedule` (flows/deployments.py) serves for the training flow.
TRAINING_DEPLOYMENT = "lensflow-training/training"

monitor_task = component_task(monitor.run, "monitor")


@flow(name="lensflow-continuous-validation", log_prints=True)
def continuous_validation_flow(
    params_path: str = "params.yaml",
    data: str | None = None,
    model: str | None = None,
    overrides: list[str] | None = None,
) -> dict:
    cfg = config.load(params_path, overrides)
    report = monitor_task(cfg, data, model)
    create_markdown_artifact(
        monitor.markdown(report), key="continuous-validation", description="lensflow monitor"
    )
    print(monitor.summary(report))
    if report["alert"] and cfg.monitor.on_alert == "retrain":
        report = monitor.record(report, retrain=start_training())
    return report


def start_training() -> dict:
    """A run of the training deployment, started and not waited for; without such a
    deployment, a clear warning instead of a traceback."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    logger = get_run_logger()
    try:
        run = run_deployment(TRAINING_DEPLOYMENT, timeout=0)
    except ObjectNotFound:
        message = (
            f"monitor.on_alert is retrain, but there is no deployment {TRAINING_DEPLOYMENT} "
            "on this Prefect server: start `lensflow schedule` (or deploy the training flow) "
            "for alerts to start retraining"
        )
        logger.warning(message)
        return {"status": "no_deployment", "deployment": TRAINING_DEPLOYMENT, "message": message}
    logger.info("alert: started %s, flow run %s", TRAINING_DEPLOYMENT, run.id)
    return {"status": "started", "deployment": TRAINING_DEPLOYMENT, "flow_run_id": str(run.id)}
