"""The data steps every flow starts with: data -> prepare -> validate. Wiring only."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from components.core import config, memory
from components.core.errors import GateFailed
from components.data import datasets, prepare, validate


def component_task(fn, name: str):
    # Components read and write files; Prefect passes only configs and small results.
    # The flow's stages share one process: each gives back the memory it freed.
    return task(memory.stage(fn), name=name, cache_policy=NO_CACHE)


data_task = component_task(datasets.run, "data")
prepare_task = component_task(prepare.run, "prepare")
validate_task = component_task(validate.run, "validate")


def validated_data(cfg: config.Config) -> None:
    """data -> prepare -> validate; the flow stops here when the data fails validation."""
    data_task(cfg)
    prepare_task(cfg)
    validation = validate_task(cfg)
    print(validate.summary(validation))
    if not validation.success:
        raise GateFailed(f"the data failed validation; see {validation.report}")
