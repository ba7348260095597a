"""The retrain guard: whether an alert of continuous validation starts a run of the training
deployment, so that `monitor.on_alert: retrain` ends.

An alert starts one only when all hold:
- its batch never started one: each started run carries the tag `lensflow.batch:<batch
  fingerprint>` and the idempotency key `lensflow.retrain:<fingerprint>`, so the Prefect
  server itself returns the first run to a second alert on the same batch at the same moment;
- no training run of this project is in progress: none of the flow `lensflow-training` is
  pending, running, paused or cancelling, and none an alert started is still scheduled;
- the last run an alert started began at least `monitor.retrain_cooldown_s` ago.
Otherwise the report's `retrain` says `skipped`, when and why, naming the run in the way.
"""

from __future__ import annotations

import datetime
import uuid

from components.core.config import Config

TRAINING_FLOW = "lensflow-training"
# The deployment `lensflow schedule` (flows/deployments.py) serves for the training flow.
TRAINING_DEPLOYMENT = f"{TRAINING_FLOW}/training"
RETRAIN_TAG = "lensflow.retrain"  # every training run an alert started
BATCH_TAG = "lensflow.batch:"  # + the fingerprint of the batch that started it


def start_training(cfg: Config, fingerprint: str, logger) -> dict:
    """A run of the training deployment for the alert on batch `fingerprint`, started and not
    waited for, or why not: {status: started | skipped | no_deployment, ...}."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(TRAINING_DEPLOYMENT)
        except ObjectNotFound:
            message = (
                f"monitor.on_alert is retrain, but there is no deployment {TRAINING_DEPLOYMENT} "
                "on this Prefect server: start `lensflow schedule` (or deploy the training "
                "flow) for alerts to start retraining"
            )
            logger.warning(message)
            return {
                "status": "no_deployment",
                "deployment": TRAINING_DEPLOYMENT,
                "message": message,
            }
        skipped = _in_the_way(client, fingerprint, cfg.monitor.retrain_cooldown_s)
    if skipped is None:
        mine = f"lensflow.alert:{uuid.uuid4().hex}"
        run = run_deployment(
            TRAINING_DEPLOYMENT, timeout=0, tags=[RETRAIN_TAG, f"{BATCH_TAG}{fingerprint}", mine],
            idempotency_key=f"{RETRAIN_TAG}:{fingerprint}",
        )  # fmt: skip
        if mine in run.tags:
            logger.info("alert: started %s, flow run %s", TRAINING_DEPLOYMENT, run.id)
            return {
                "status": "started",
                "deployment": TRAINING_DEPLOYMENT,
                "flow_run_id": str(run.id),
            }
        skipped = (run, "another alert on this batch started it at the same moment")
    run, why = skipped
    reason = f"{why}: flow run {run.name} ({run.id}, {run.state_name})"
    logger.warning("alert: retraining skipped, %s", reason)
    return {
        "status": "skipped",
        "deployment": TRAINING_DEPLOYMENT,
        "at": _now().isoformat(timespec="seconds"),
        "reason": reason,
        "flow_run_id": str(run.id),
    }


def _in_the_way(client, fingerprint: str, cooldown_s: float):
    """(the flow run, why) that stops this alert from starting a training run, or None."""
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    def runs(tags=None, states=None, limit=1):
        found = FlowRunFilter(
            tags=FlowRunFilterTags(all_=tags) if tags else None,
            state={"type": FlowRunFilterStateType(any_=states)} if states else None,
        )
        training = FlowFilter(name=FlowFilterName(any_=[TRAINING_FLOW]))
        newest = FlowRunSort.EXPECTED_START_TIME_DESC
        return client.read_flow_runs(
            flow_filter=training, flow_run_filter=found, sort=newest, limit=limit
        )

    for run in runs(tags=[f"{BATCH_TAG}{fingerprint}"]):
        return run, "this batch already started retraining (one retrain per batch)"
    busy = [StateType.PENDING, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING]
    for run in [*runs(states=busy), *runs(tags=[RETRAIN_TAG], states=[StateType.SCHEDULED])]:
        return run, "a training run is in progress (one at a time)"
    for run in runs(tags=[RETRAIN_TAG]):
        age_s = (_now() - run.created).total_seconds() if run.created else float("inf")
        if age_s < cooldown_s:
            return run, (
                f"cool-down: the last retrain began {age_s:.0f} s ago, under "
                f"monitor.retrain_cooldown_s = {cooldown_s:g}"
            )
    return None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
