"""The compare flow (`lensflow compare`): scratch against transfer learning on the same data.
The data steps, then every arm on every fraction as a task, then the report, all under one
MLflow parent run `compare`. Wiring only; the arms' logic is components/experiments/compare.py
(task: detection: components/detection_release/compare.py)."""

from __future__ import annotations

from prefect import flow, runtime

from components.core import config, tracking
from components.detection_release import compare as detection_compare
from components.experiments import compare, compare_arms
from flows.data import component_task, validated_data

arm_task = component_task(compare.run, "compare-arm")
report_task = component_task(compare.write_report, "compare-report")
detection_tasks = {
    "arm": component_task(detection_compare.run, "compare-arm"),
    "report": component_task(detection_compare.write_report, "compare-report"),
}


@flow(name="lensflow-compare", log_prints=True)
def compare_flow(
    params_path: str = "params.yaml", overrides: list[str] | None = None
) -> compare.CompareResult:
    cfg = config.load(params_path, overrides)
    arms = compare_arms.arm_configs(cfg)
    run_arm, report = arm_task, report_task
    if cfg.task == "detection":
        run_arm, report = detection_tasks["arm"], detection_tasks["report"]
    flow_run_id = str(runtime.flow_run.id)
    with tracking.pipeline_run(cfg, "compare", flow_run_id=flow_run_id) as parent:
        validated_data(cfg)
        runs = [
            run_arm(arm, arm_cfg, fraction)
            for fraction in cfg.compare.fractions
            for arm, arm_cfg in arms.items()
        ]
        return report(cfg, runs, parent.info.run_id)
