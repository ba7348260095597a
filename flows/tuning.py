"""The tuning flow (`lensflow tune`): the data steps, then an Optuna study. Wiring only.

The training flow runs the same study as its optional `tune` step (tune.enabled).
"""

from __future__ import annotations

from prefect import flow

from components.core import config
from components.experiments import tune
from flows.data import validated_data
from flows.training import detection_tasks, tune_task


@flow(name="lensflow-tuning", log_prints=True)
def tuning_flow(
    params_path: str = "params.yaml", overrides: list[str] | None = None
) -> tune.TuneResult:
    cfg = config.load(params_path, overrides)
    validated_data(cfg)
    if cfg.task == "detection":
        return detection_tasks["tune"](cfg)
    return tune_task(cfg)
