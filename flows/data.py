"""The data steps every flow starts with: data -> prepare -> validate. Wiring only."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from components.core import config, memory
from components.core.errors import GateFailed
from components.data import datasets, prepare, validate
from components.detection import prepare as detection_prepare
from components.detection import synthetic
from components.detection import validate as detection_validate


def component_task(fn, name: str):
    # Components read and write files; Prefect passes only configs and small results.
    # The flow's stages share one process: each gives back the memory it freed.
    return task(memory.stage(fn), name=name, cache_policy=NO_CACHE)


data_task = component_task(datasets.run, "data")
prepare_task = component_task(prepare.run, "prepare")
validate_task = component_task(validate.run, "validate")
# task: detection
detection_data_task = component_task(synthetic.run, "data")
detection_prepare_task = component_task(detection_prepare.run, "prepare")
detection_validate_task = component_task(detection_validate.run, "validate")


def validated_data(cfg: config.Config) -> None:
    """data -> prepare -> validate; the flow stops here when the data fails validation."""
    if cfg.task == "detection":
        detection_data_task(cfg)
        detection_prepare_task(cfg)
        validation = detection_validate_task(cfg)
    else:
        data_task(cfg)
        prepare_task(cfg)
        validation = validate_task(cfg)
    print((detection_validate if cfg.task == "detection" else validate).summary(validation))
    if not validation.success:
        raise GateFailed(f"the data failed validation; see {validation.report}")
