"""Live rollouts of `@challenger`: `lensflow rollout start|status|stop|watch`.

A rollout is one MLflow run in `<tracking.experiment>-rollouts` (who, which versions, the
test's settings, its evidence at every pass) and the `@challenger` alias that the servers
follow. The controller (`watch`) keeps nothing of its own: each pass reads the pair log
(rollout_log.py), which any number of serve workers write, runs the sequential test
(sequential.py) on the labelled pairs, and then

- promotes the challenger through the promotion log, under its lease (action `rollout`, the
  test's evidence in the record), once it is significantly more accurate (canary: from the
  last ramp step);
- ends the rollout keeping the champion, once the challenger is significantly less accurate
  or fails significantly more often (canary: its traffic goes back to the champion);
- moves the canary to its next ramp step after rollout.ramp_labels labelled pairs at a step;
- ends it with no decision after rollout.max_labels labelled pairs or rollout.max_hours.

A decision that ends a rollout is recorded in the promotion log too (`lensflow history`).
"""

from __future__ import annotations

import json
import time

import numpy as np

from components.core import tracking
from components.core.config import Config
from components.core.errors import UserError
from components.release import promote, promotion_log, rollout_log, sequential
from components.release.promotion_log import CHALLENGER, Decision

EXPERIMENT_SUFFIX = "-rollouts"
FRACTION_TAG = "lensflow.canary_fraction"  # on the challenger version: what servers route
STATE = "lensflow.rollout_state"  # running | promoted | rolled-back | ended | stopped


def start(cfg: Config, version: str, reason: str = "") -> dict:
    name, mode = cfg.registry.model_name, cfg.serve.rollout
    if mode == "off":
        raise UserError("serve.rollout is off: set it to shadow or canary (the servers too)")
    rollout_log.folder(cfg)
    promotion_log.require_version(name, version)
    champion = promotion_log.champion(name)
    if champion is None:
        raise UserError(f"{name} has no @champion: nothing to roll out against")
    if champion == version:
        raise UserError(f"version {version} is already {name}@champion")
    if running(cfg) is not None:
        raise UserError(f"a rollout of {name} is running: `lensflow rollout stop` it first")
    classes = promote.same_classes(name, champion, promote.classes_of(name, version))
    if not classes["passed"]:
        raise UserError(
            f"version {version} of {name} predicts other classes than @champion v{champion} "
            f"({len(classes['value'])} vs {len(classes['threshold'])}): no live comparison; "
            "a person decides (lensflow promote)"
        )
    client = promotion_log.client()
    tags = {
        "lensflow.model_name": name, STATE: "running", "lensflow.champion": champion,
        "lensflow.challenger": version, "lensflow.mode": mode, "lensflow.rollout_step": "0",
        "lensflow.step_labels": "0", "lensflow.actor": promotion_log.person(),
        "lensflow.reason": reason, **tracking.process_tags(),
    }  # fmt: skip
    run = client.create_run(_experiment_id(cfg), run_name=f"v{champion} vs v{version}", tags=tags)
    settings = {**cfg.rollout.model_dump(), "mode": mode, "shadow": cfg.serve.shadow_fraction}
    for key, value in settings.items():
        client.log_param(run.info.run_id, key, json.dumps(value))
    if mode == "canary":
        client.set_model_version_tag(name, version, FRACTION_TAG, str(cfg.rollout.ramp[0]))
    client.set_registered_model_alias(name, CHALLENGER, version)
    return status(cfg)


def running(cfg: Config):
    found = _runs(cfg, f"tags.`{STATE}` = 'running'", 1)
    return found[0] if found else None


def status(cfg: Config) -> dict:
    """The running rollout (with its evidence now), else the last one (as it ended)."""
    run = running(cfg) or next(iter(_runs(cfg, "", 1)), None)
    if run is None:
        return {"state": "none", "model_name": cfg.registry.model_name}
    tags = run.data.tags
    info = _describe(run)
    if tags[STATE] == "running":
        info["evidence"] = evidence(cfg, run)
    else:
        info["summary"] = tags.get("lensflow.summary", "")
    return info


def evidence(cfg: Config, run) -> dict:
    """What the pair log says now about this rollout's champion and challenger."""
    tags, settings = run.data.tags, cfg.rollout
    frame = rollout_log.labelled_pairs(
        rollout_log.folder(cfg), tags["lensflow.champion"], tags["lensflow.challenger"],
        run.info.start_time / 1000,
    )  # fmt: skip
    labelled = frame[frame["label"].notna()]
    champion_right = (labelled["champion_class"] == labelled["label"]).to_numpy(bool)
    challenger_right = (labelled["challenger_class"] == labelled["label"]).to_numpy(bool)
    accuracy = sequential.verdict(
        int((challenger_right & ~champion_right).sum()),
        int((champion_right & ~challenger_right).sum()), settings.alpha, settings.prior,
    )  # fmt: skip
    champion_failed = frame["champion_error"].notna().to_numpy(bool)
    challenger_failed = frame["challenger_error"].notna().to_numpy(bool)
    errors = sequential.verdict(
        int((champion_failed & ~challenger_failed).sum()),
        int((challenger_failed & ~champion_failed).sum()), settings.alpha, settings.prior,
    )  # fmt: skip
    n = len(labelled)
    return {
        "pairs": len(frame),
        "requests": int(frame["request_id"].nunique()),
        "labelled": n,
        "agreement": _mean(frame["champion_class"] == frame["challenger_class"]),
        "champion_accuracy": _mean(champion_right) if n else None,
        "challenger_accuracy": _mean(challenger_right) if n else None,
        "champion_errors": int(champion_failed.sum()),
        "challenger_errors": int(challenger_failed.sum()),
        "answered_by_challenger": int((frame["answered_by"] == "challenger").sum()),
        "accuracy_test": accuracy.as_dict(),
        "error_test": errors.as_dict(),
        "hours": round((time.time() - run.info.start_time / 1000) / 3600, 4),
    }


def step(cfg: Config) -> dict:
    """One controller pass: test, then promote, end, ramp or wait. Returns status()."""
    run = running(cfg)
    if run is None:
        return status(cfg)
    tags, settings = run.data.tags, cfg.rollout
    name, champion = cfg.registry.model_name, tags["lensflow.champion"]
    ev = evidence(cfg, run)
    _log_pass(run.info.run_id, ev)
    verdict, labelled = ev["accuracy_test"]["decided"], ev["labelled"]
    enough = labelled >= settings.min_pairs
    canary_step = int(tags["lensflow.rollout_step"])
    last_step = tags["lensflow.mode"] != "canary" or canary_step >= len(settings.ramp) - 1
    if promotion_log.champion(name) != champion:
        _end(cfg, run, "ended", "@champion moved outside the rollout: nothing decided", ev)
    elif ev["error_test"]["decided"] == "champion":
        _end(cfg, run, "rolled-back", "the challenger fails significantly more often", ev)
    elif enough and verdict == "champion":
        _end(cfg, run, "rolled-back", "the challenger is significantly less accurate", ev)
    elif enough and verdict == "challenger" and last_step:
        _promote(cfg, run, ev)
    elif labelled >= settings.max_labels or ev["hours"] >= settings.max_hours:
        _end(cfg, run, "ended", "no significant difference by the maximum: champion kept", ev)
    elif not last_step and labelled - int(tags["lensflow.step_labels"]) >= settings.ramp_labels:
        _ramp(cfg, run, canary_step + 1, labelled)
    return status(cfg)


def watch(cfg: Config, once: bool = False, report=print) -> dict:
    """`lensflow rollout watch`: a pass every rollout.poll_seconds until the rollout ends."""
    while True:
        now = step(cfg)
        report(_line(now))
        if once or now["state"] != "running":
            return now
        time.sleep(cfg.rollout.poll_seconds)


def stop(cfg: Config, reason: str) -> dict:
    run = running(cfg)
    if run is None:
        raise UserError(f"no rollout of {cfg.registry.model_name} is running")
    if not reason.strip():
        raise UserError("--reason: say why (it goes into the promotion log)")
    _end(cfg, run, "stopped", f"stopped by hand: {reason}", evidence(cfg, run),
         actor=promotion_log.person())  # fmt: skip
    return status(cfg)


def of_version(cfg: Config, name: str, version: str) -> list[dict]:
    """The rollouts a version took part in (for `lensflow lineage`)."""
    by_name = cfg.model_copy(
        update={"registry": cfg.registry.model_copy(update={"model_name": name})}
    )
    roles = ("lensflow.champion", "lensflow.challenger")
    return [
        _describe(run)
        for run in _runs(by_name, "", 1000)
        if version in (run.data.tags.get(role) for role in roles)
    ]


def _promote(cfg: Config, run, ev: dict) -> None:
    tags, name = run.data.tags, cfg.registry.model_name
    champion, challenger = tags["lensflow.champion"], tags["lensflow.challenger"]
    summary = f"@champion v{champion} -> v{challenger}: significantly more accurate live"
    with promotion_log.lock(name, cfg.promote.lease_s) as held:
        promotion_log.settle_incomplete(cfg)
        moved = promotion_log.champion(name) != champion
        if not moved:
            decision = Decision(
                name, "rollout", champion, challenger, challenger, f"rollout:{run.info.run_id}",
                summary, "sequential test (mSPRT) on labelled live traffic", _gates(ev), ev,
            )  # fmt: skip
            promotion_log.decide(cfg, decision, held)
    if moved:
        _end(cfg, run, "ended", "@champion moved outside the rollout: nothing decided", ev)
    else:
        _close(run, "promoted", summary, ev)


def _end(cfg: Config, run, state: str, why: str, ev: dict, actor: str = "") -> None:
    """End the rollout keeping the champion: recorded, then `@challenger` removed."""
    tags, name = run.data.tags, cfg.registry.model_name
    champion, challenger = tags["lensflow.champion"], tags["lensflow.challenger"]
    summary = f"kept v{champion}, v{challenger} {state}: {why}"
    with promotion_log.lock(name, cfg.promote.lease_s) as held:
        current = promotion_log.champion(name)
        decision = Decision(
            name, "rollout", current, current, challenger, actor or f"rollout:{run.info.run_id}",
            summary, why, _gates(ev), ev,
        )  # fmt: skip
        promotion_log.decide(cfg, decision, held)
        if promotion_log._alias(name, CHALLENGER) == challenger:
            promotion_log.client().delete_registered_model_alias(name, CHALLENGER)
    _close(run, state, summary, ev)


def _ramp(cfg: Config, run, to_step: int, labelled: int) -> None:
    client, tags = promotion_log.client(), run.data.tags
    fraction = cfg.rollout.ramp[to_step]
    client.set_model_version_tag(
        cfg.registry.model_name, tags["lensflow.challenger"], FRACTION_TAG, str(fraction)
    )
    client.set_tag(run.info.run_id, "lensflow.rollout_step", str(to_step))
    client.set_tag(run.info.run_id, "lensflow.step_labels", str(labelled))
    client.log_metric(run.info.run_id, "canary_fraction", fraction, step=labelled)


def _close(run, state: str, summary: str, ev: dict) -> None:
    client = promotion_log.client()
    run_id = run.info.run_id
    client.set_tag(run_id, STATE, state)
    client.set_tag(run_id, "lensflow.summary", summary[:4000])
    client.log_text(run_id, json.dumps(ev, indent=2), "evidence.json")
    client.set_terminated(run_id, "FINISHED")


def _log_pass(run_id: str, ev: dict) -> None:
    numbers = {
        "pairs": ev["pairs"], "labelled": ev["labelled"], "agreement": ev["agreement"],
        "champion_accuracy": ev["champion_accuracy"],
        "challenger_accuracy": ev["challenger_accuracy"],
        "wins": ev["accuracy_test"]["wins"], "losses": ev["accuracy_test"]["losses"],
        "log_likelihood_ratio": ev["accuracy_test"]["log_likelihood_ratio"],
        "challenger_errors": ev["challenger_errors"],
    }  # fmt: skip
    client = promotion_log.client()
    for key, value in numbers.items():
        if value is not None:
            client.log_metric(run_id, key, float(value), step=ev["labelled"])


def _gates(ev: dict) -> dict:
    test = ev["accuracy_test"]
    return {"msprt": {"value": test["log_likelihood_ratio"], "threshold": test["threshold"],
                      "passed": test["decided"] == "challenger"}}  # fmt: skip


def _describe(run) -> dict:
    tags = run.data.tags
    return {
        "run_id": run.info.run_id, "state": tags.get(STATE), "mode": tags.get("lensflow.mode"),
        "champion": tags.get("lensflow.champion"), "challenger": tags.get("lensflow.challenger"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(run.info.start_time / 1000)),
        "canary_step": int(tags.get("lensflow.rollout_step", "0")),
    }  # fmt: skip


def _line(info: dict) -> str:
    ev = info.get("evidence")
    if ev is None:
        return f"rollout {info['state']}: {info.get('summary', '')}"
    test = ev["accuracy_test"]
    return (f"rollout running: {ev['pairs']} pairs, {ev['labelled']} labelled, "
            f"wins {test['wins']} / losses {test['losses']}, log LR "
            f"{test['log_likelihood_ratio']:.2f} of {test['threshold']:.2f}")  # fmt: skip


def _mean(values) -> float | None:
    values = np.asarray(values, bool)
    return round(float(values.mean()), 4) if len(values) else None


def _experiment_id(cfg: Config) -> str:
    name = f"{cfg.tracking.experiment}{EXPERIMENT_SUFFIX}"
    return tracking.experiment_named(name, tracking.LOCAL_ARTIFACTS / "rollouts").experiment_id


def _runs(cfg: Config, condition: str, limit: int):
    experiment = promotion_log.client().get_experiment_by_name(
        f"{cfg.tracking.experiment}{EXPERIMENT_SUFFIX}"
    )
    if experiment is None:
        return []
    where = f"tags.`lensflow.model_name` = '{cfg.registry.model_name}'"
    return promotion_log.client().search_runs(
        [experiment.experiment_id], f"{where} and {condition}" if condition else where,
        order_by=["attributes.start_time DESC"], max_results=limit,
    )  # fmt: skip
