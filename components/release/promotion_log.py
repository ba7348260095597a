"""The promotion log: every decision about `@champion` as a record in MLflow, taken under the
promotion lease (lease.py), a mutex across every process that talks to the same tracking server.

MLflow keeps no alias history and has no compare-and-set on aliases, so:
- a decision is one run in the experiment `<tracking.experiment>-promotions`, written before
  any alias moves (tag `lensflow.record: incomplete`) and marked `complete` after the last
  alias write. A record a crash left incomplete is settled by the next decision, under the
  lease: finished (`@challenger` set or cleared, `complete`) when `@champion` did move to its
  version or the decision moved nothing, else `aborted`;
- read-decide-move runs holding the lease, and the lease is checked (renewed) right before the
  first alias write: a holder that lost it aborts its record and moves nothing.
"""

from __future__ import annotations

import getpass
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from components.core import tracking
from components.core.config import Config
from components.core.errors import UserError
from components.release import lease

EXPERIMENT_SUFFIX = "-promotions"
CHAMPION = "champion"
CHALLENGER = "challenger"
RECORD = "lensflow.record"  # incomplete | complete | aborted


@dataclass
class Decision:
    """One decision: where `@champion` points before and after, who decided and on what."""

    model_name: str
    action: str  # promote | keep | override | rollback
    from_version: str | None  # @champion before
    to_version: str | None  # @champion after (= from_version when it stays)
    candidate: str | None
    actor: str
    summary: str
    reason: str = ""
    gates: dict = field(default_factory=dict)
    evidence: dict = field(default_factory=dict)
    challenger: str | None = None  # the version that gets @challenger (a gated-out candidate)


def pause(point: str) -> None:
    """Fault injection for tests: LENSFLOW_PROMOTE_PAUSE_AFTER=<point>:<seconds or a file>
    sleeps there, or waits until the file exists (`read`: after reading @champion, holding the
    lease; `record`: after writing the decision record, before any alias moves; `moved`: after
    moving @champion), so a test can kill the process or race another one."""
    where, _, until = os.environ.get("LENSFLOW_PROMOTE_PAUSE_AFTER", "").partition(":")
    if where != point:
        return
    if until.replace(".", "", 1).isdigit():
        time.sleep(float(until))
        return
    while not os.path.exists(until):
        time.sleep(0.1)


def client():
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    return mlflow.MlflowClient()


def champion(name: str) -> str | None:
    return _alias(name, CHAMPION)


def person() -> str:
    return f"person:{getpass.getuser()}"


def pipeline_actor(cfg: Config) -> str:
    flow_run = tracking.lineage(cfg)["prefect.flow_run_id"]
    return f"flow-run:{flow_run}" if flow_run != "none" else "stage:lensflow stage promote"


@contextmanager
def lock(name: str, lease_s: float):
    """Hold `<name>.promotion-lock` across read-decide-move; yields the Lease for `decide`."""
    held = lease.Lease(client(), name, lease_s).acquire()
    try:
        yield held
    finally:
        held.release()


def decide(cfg: Config, decision: Decision, held: lease.Lease) -> str:
    """Record the decision, check the lease, move the aliases (the last writes), then mark the
    record complete. Returns the record's run id; LeaseLost (the record aborted, no alias
    moved) when the lease was lost."""
    record = _open_record(cfg, decision)
    pause("record")
    try:
        held.check()
    except lease.LeaseLost as lost:
        _close(record, "aborted", f"nothing moved: {lost}")
        raise
    name = decision.model_name
    if decision.to_version and decision.to_version != decision.from_version:
        client().set_registered_model_alias(name, CHAMPION, decision.to_version)
    pause("moved")
    _set_challenger(name, decision.to_version, decision.challenger)
    _close(record, "complete")
    return record


def _set_challenger(name: str, champion_now: str | None, challenger: str | None) -> None:
    """The step after `@champion` moved: `@challenger` on the gated-out candidate, or off the
    version that just became champion. Safe to repeat."""
    if challenger:
        client().set_registered_model_alias(name, CHALLENGER, challenger)
    elif champion_now and _alias(name, CHALLENGER) == champion_now:
        client().delete_registered_model_alias(name, CHALLENGER)


def _close(record: str, state: str, settled: str = "") -> None:
    mlflow_client = client()
    mlflow_client.set_tag(record, RECORD, state)
    if settled:
        mlflow_client.set_tag(record, "lensflow.settled", settled)
    mlflow_client.set_terminated(record, "FINISHED" if state == "complete" else "KILLED")


def settle_incomplete(cfg: Config) -> list[str]:
    """Records a crash left incomplete, oldest first (call it holding the lease): where
    @champion points to their version (the move happened) or they moved nothing, the steps
    after the move are done again and they are `complete`; else `aborted`."""
    name = cfg.registry.model_name
    now = champion(name)
    settled = []
    for run in reversed(_records(cfg, f"tags.`{RECORD}` = 'incomplete'")):
        tags = run.data.tags
        to_version = tags.get("lensflow.to_version") or None
        moved = to_version == now
        if moved or to_version == (tags.get("lensflow.from_version") or None):
            _set_challenger(name, to_version, tags.get("lensflow.challenger") or None)
            _close(run.info.run_id, "complete", "finished by the next decision")
        else:
            _close(run.info.run_id, "aborted", "by the next decision: @champion never moved")
        settled.append(run.info.run_id)
    return settled


def break_lock(cfg: Config, reason: str) -> dict:
    """`lensflow promote --break-lock --reason`: a person clears the promotion lock; the act
    goes into the promotion log (action `break-lock`, who held it as evidence)."""
    _require_reason(reason)
    name = cfg.registry.model_name
    held = lease.break_by_hand(client(), name)
    if held is None:
        raise UserError(f"no promotion lock on {name} is held: nothing to break")
    current = champion(name)
    summary = f"broke the promotion lock held by pid {held['pid']} on {held['host']}"
    decision = Decision(
        name, "break-lock", current, current, None, person(), summary, reason, evidence=held
    )
    _close(_open_record(cfg, decision), "complete")
    return {"summary": summary, **held}


def history(cfg: Config, limit: int = 100) -> list[dict]:
    """The decisions about registry.model_name, newest first."""
    return [
        {
            "time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.info.start_time / 1000)),
            "action": run.data.tags.get("lensflow.action"),
            "from_version": run.data.tags.get("lensflow.from_version") or None,
            "to_version": run.data.tags.get("lensflow.to_version") or None,
            "candidate": run.data.tags.get("lensflow.candidate") or None,
            "actor": run.data.tags.get("lensflow.actor"),
            "reason": run.data.tags.get("lensflow.reason", ""),
            "summary": run.data.tags.get("lensflow.summary", ""),
            "record": run.data.tags.get(RECORD),
            "gates": json.loads(run.data.tags.get("lensflow.gates", "{}")),
            "run_id": run.info.run_id,
        }
        for run in _records(cfg, max_results=limit)
    ]


def previous_champion(cfg: Config, current: str | None) -> str | None:
    """The champion before the current one: the newest complete decision that moved
    @champion to `current` came from it."""
    for entry in history(cfg, limit=1000):
        moved = entry["from_version"] and entry["from_version"] != entry["to_version"]
        if entry["record"] == "complete" and entry["to_version"] == current and moved:
            return entry["from_version"]
    return None


def _open_record(cfg: Config, decision: Decision) -> str:
    mlflow_client = client()
    tags = {
        RECORD: "incomplete",
        "lensflow.model_name": decision.model_name,
        "lensflow.action": decision.action,
        "lensflow.from_version": decision.from_version or "",
        "lensflow.to_version": decision.to_version or "",
        "lensflow.candidate": decision.candidate or "",
        "lensflow.challenger": decision.challenger or "",
        "lensflow.actor": decision.actor,
        "lensflow.reason": decision.reason,
        "lensflow.summary": decision.summary,
        "lensflow.gates": json.dumps(decision.gates),
        **tracking.process_tags(),
    }
    run = mlflow_client.create_run(
        _experiment_id(cfg), run_name=f"{decision.action}: {decision.summary}"[:250], tags=tags
    )
    run_id = run.info.run_id
    numbers = {
        f"gate/{gate}": float(values["value"])
        for gate, values in decision.gates.items()
        if isinstance(values.get("value"), int | float)
    }
    numbers["promoted"] = float(decision.to_version != decision.from_version)
    for key, value in numbers.items():
        mlflow_client.log_metric(run_id, key, value)
    evidence = {**decision.__dict__}
    mlflow_client.log_text(run_id, json.dumps(evidence, indent=2), "decision.json")
    return run_id


def _experiment_id(cfg: Config) -> str:
    name = f"{cfg.tracking.experiment}{EXPERIMENT_SUFFIX}"
    return tracking.experiment_named(name, tracking.LOCAL_ARTIFACTS / "promotions").experiment_id


def _records(cfg: Config, condition: str = "", max_results: int = 1000):
    experiment = client().get_experiment_by_name(f"{cfg.tracking.experiment}{EXPERIMENT_SUFFIX}")
    if experiment is None:
        return []
    where = f"tags.`lensflow.model_name` = '{cfg.registry.model_name}'"
    return client().search_runs(
        [experiment.experiment_id],
        f"{where} and {condition}" if condition else where,
        order_by=["attributes.start_time DESC"],
        max_results=max_results,
    )


def _alias(name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def require_version(name: str, version: str) -> None:
    """A UserError unless `version` is a version of `name` whose ONNX model loads."""
    from mlflow.exceptions import MlflowException

    if not version.isdigit():
        raise UserError(f"VERSION: expected a version number of {name}, got {version!r}")
    try:
        client().get_model_version(name, version)
    except MlflowException:
        raise UserError(f"{name} has no version {version}") from None
    from components.release import registry

    try:
        registry.load_onnx_session(f"models:/{name}/{version}")
    except Exception as exc:  # a broken or missing ONNX file: never make it the champion
        raise UserError(f"models:/{name}/{version}: its ONNX model does not load ({exc})") from None


def override(cfg: Config, version: str, reason: str, action: str = "override") -> Decision:
    """`lensflow promote VERSION --reason`: a person moves @champion to `version`, no gates
    asked (its last gate results go into the record as evidence); logged like any decision."""
    name = cfg.registry.model_name
    _require_reason(reason)
    require_version(name, version)
    with lock(name, cfg.promote.lease_s) as held:
        settle_incomplete(cfg)
        current = champion(name)
        if current == version:
            raise UserError(f"version {version} is already {name}@{CHAMPION}")
        gates = json.loads(
            client().get_model_version(name, version).tags.get("lensflow.gates", "{}")
        )
        decision = Decision(
            name, action, current, version, version, person(),
            f"@{CHAMPION} {_v(current)} -> {_v(version)} by hand", reason, gates,
        )  # fmt: skip
        decide(cfg, decision, held)
    return decision


def rollback(cfg: Config, to: str | None, reason: str) -> Decision:
    """`lensflow rollback [--to VERSION] --reason`: @champion back to the champion before the
    current one (from the log), or to `to`."""
    name = cfg.registry.model_name
    _require_reason(reason)
    target = to or previous_champion(cfg, champion(name))
    if target is None:
        raise UserError(
            f"the promotion log names no champion of {name} before the current one "
            f"({_v(champion(name))}): say which with --to VERSION"
        )
    return override(cfg, target, reason, action="rollback")


def _require_reason(reason: str) -> None:
    if not reason.strip():
        raise UserError("--reason: say why (it goes into the promotion log)")


def _v(version: str | None) -> str:
    return f"v{version}" if version else "none"


def lineage(cfg: Config, ref: str) -> dict:
    """`lensflow lineage NAME@ALIAS|NAME/VERSION`: where a registered version came from (data,
    code, params as trained, flow run, train run and its metrics) and the decisions about it."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client()
    name, at, alias = ref.removeprefix("models:/").partition("@")
    if not at:
        name, _, alias = name.rpartition("/")
    try:
        if at:
            version = mlflow_client.get_model_version_by_alias(name, alias)
        elif alias.isdigit():
            version = mlflow_client.get_model_version(name, alias)
        else:
            raise UserError(f"{ref}: expected NAME@ALIAS or NAME/VERSION")
        tags = version.tags
        train_run = tags.get("lensflow.train_run_id")
        metrics = mlflow_client.get_run(train_run).data.metrics if train_run else {}
    except MlflowException as exc:
        raise UserError(f"{ref}: {exc.message.splitlines()[0]}") from None
    number = str(version.version)
    by_name = cfg.model_copy(
        update={"registry": cfg.registry.model_copy(update={"model_name": name})}
    )
    decisions = [e for e in history(by_name, 1000) if number in (e["candidate"], e["to_version"])]
    return {
        "name": name,
        "version": number,
        "aliases": list(getattr(version, "aliases", [])),
        "data.md5": tags.get("data.md5"),
        "git.commit": tags.get("git.commit"),
        "git.dirty": tags.get("git.dirty"),
        "params.hash": tags.get("params.hash"),
        "trained_params": json.loads(tags.get("lensflow.trained_params", "null")),
        "prefect.flow_run_id": tags.get("prefect.flow_run_id"),
        "train_run_id": train_run,
        "train_metrics": metrics,
        "register_run_id": version.run_id,
        "checkpoint_sha256": tags.get("lensflow.checkpoint_sha256"),
        "export_parity": json.loads(tags.get("lensflow.export_parity", "null")),
        "gates": json.loads(tags.get("lensflow.gates", "null")),
        "decisions": decisions,
    }
