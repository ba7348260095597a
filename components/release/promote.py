"""promote: decide whether the version `register` made becomes `@champion`, and log why.

Holding the promotion lease (see lease.py), the candidate and the current champion are scored
by the same evaluator on the same raw files of the test split, each decoded for its own input
spec, and the gates of params.yaml's `promote` section decide:
- absolute: `min_accuracy`, `min_macro_f1` (the candidate's, re-scored here, never read from a
  report); `export_parity` (the export's parity gate passed); `max_latency_ms_p95` (batch 1,
  ONNX Runtime; off by default);
- relative to the champion: `same_classes` (another class set needs a person: `lensflow
  promote`), `no_leakage` (neither model trained on an image of the test split),
  `beats_champion` (accuracy gained > `min_improvement`) and `mcnemar` (exact test on the
  paired predictions, p <= `mcnemar_p`), so a tie never moves the alias.
Every gate passes: `@champion` moves to the candidate; otherwise the candidate gets
`@challenger`. Gates go onto the version's tags, the decision into the promotion log, then the
alias moves (the last write). Writes reports/promotion.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from components.core import paths, tracking
from components.core.config import Config
from components.core.errors import UserError
from components.data.prepared import load_meta
from components.release import promotion_log, registry
from components.release.promotion_log import CHALLENGER, CHAMPION, Decision
from components.scoring.backends import onnx_predictor
from components.scoring.metrics import mcnemar_p, score


@dataclass(frozen=True)
class PromotionResult:
    name: str
    candidate: str
    promoted: bool
    champion_version: str | None
    decision: str
    record_run_id: str
    report: str


def run(cfg: Config, version: str | None = None, gates=None) -> PromotionResult:
    """Decide about `version` (default: the one reports/registry.json names) by `gates`
    (default `gate_results`; components/detection_release/promote.py passes its own)."""
    name = cfg.registry.model_name
    candidate = version or registry.read_report(paths.REGISTRY_REPORT)["version"]
    with tracking.step_run(cfg, "promote"):
        import mlflow

        with promotion_log.lock(name, cfg.promote.lease_s) as held:
            promotion_log.settle_incomplete(cfg)
            champion = promotion_log.champion(name)
            promotion_log.pause("read")
            decision = _decide(cfg, name, candidate, champion, gates or gate_results)
            if decision.gates:
                promotion_log.client().set_model_version_tag(
                    name, candidate, "lensflow.gates", json.dumps(decision.gates)
                )
            record = promotion_log.decide(cfg, decision, held)
        promoted = decision.to_version == candidate and champion != candidate
        report = {
            "name": name,
            "candidate": candidate,
            "champion_before": champion,
            "champion_version": decision.to_version,
            "promoted": promoted,
            "action": decision.action,
            "decision": decision.summary,
            "gates": decision.gates,
            "evidence": decision.evidence,
            "actor": decision.actor,
            "record_run_id": record,
        }
        paths.write_json(paths.PROMOTION_REPORT, report)
        mlflow.log_artifact(str(paths.PROMOTION_REPORT))
        mlflow.log_metric("promote/promoted", float(promoted))
    return PromotionResult(
        name, candidate, promoted, decision.to_version, decision.summary, record,
        str(paths.PROMOTION_REPORT),
    )  # fmt: skip


def summary(result: PromotionResult) -> str:
    return f"promote: {result.decision} (record {result.record_run_id}; {result.report})"


def _decide(cfg: Config, name: str, candidate: str, champion: str | None, gates_of) -> Decision:
    actor = promotion_log.pipeline_actor(cfg)
    if champion == candidate:
        return Decision(
            name, "keep", champion, champion, candidate, actor,
            f"v{candidate} is already @{CHAMPION}",
        )  # fmt: skip
    gates, evidence = gates_of(cfg, name, candidate, champion)
    failed = [gate for gate, result in gates.items() if not result["passed"]]
    if not failed:
        moved = f"@{CHAMPION} {_v(champion)} -> v{candidate}: every gate passed"
        return Decision(
            name, "promote", champion, candidate, candidate, actor, moved, "", gates, evidence
        )
    kept = (
        f"@{CHAMPION} stays {_v(champion)}; v{candidate} is @{CHALLENGER} "
        f"(failed: {', '.join(failed)})"
    )
    return Decision(
        name, "keep", champion, champion, candidate, actor, kept, "", gates, evidence, candidate
    )


def gate_results(cfg: Config, name: str, candidate: str, champion: str | None):
    """{gate: {value, threshold, passed[, note]}} and the evidence they were decided on."""
    limits = cfg.promote
    test_shas = holdout_shas()
    mine = _scored(cfg, name, candidate)
    leaked = images_seen(name, candidate, test_shas)
    parity = json.loads(version_tag(name, candidate, "lensflow.export_parity") or "null")
    gates = {
        "min_accuracy": at_least(mine["accuracy"], limits.min_accuracy),
        "min_macro_f1": at_least(mine["macro_f1"], limits.min_macro_f1),
        "export_parity": {
            "value": parity["max_abs_diff"] if parity else None,
            "threshold": parity["atol"] if parity else None,
            "passed": bool(parity and parity["passed"]),
            **({} if parity else {"note": "the version has no parity evidence"}),
        },
        "no_leakage": leakage_gate(candidate, leaked),
    }
    if limits.max_latency_ms_p95 is None:
        gates["max_latency_ms_p95"] = {"passed": True, "note": "off"}
    else:
        from components.scoring import speed

        p95 = speed.measure(mine.pop("predict"), mine["images"], seconds=0)["latency_ms_p95"]
        gates["max_latency_ms_p95"] = {
            "value": p95, "threshold": limits.max_latency_ms_p95,
            "passed": p95 <= limits.max_latency_ms_p95,
        }  # fmt: skip
    evidence = {"candidate": _public(mine), "test_images": len(mine["correct"])}
    gates.update(_relative_gates(cfg, name, mine, champion, test_shas, evidence))
    return gates, evidence


def _relative_gates(cfg, name, mine: dict, champion, test_shas: set, evidence: dict) -> dict:
    limits = cfg.promote
    if champion is None:
        note = {"passed": True, "note": "there is no champion yet"}
        return {g: dict(note) for g in ("same_classes", "beats_champion", "mcnemar")}
    gates = {"same_classes": same_classes(name, champion, mine["classes"])}
    same = gates["same_classes"]["passed"]
    leaked = images_seen(name, champion, test_shas)
    refused = None
    if not same:
        refused = f"the champion v{champion} predicts other classes"
    elif leaked is None or leaked:
        refused = leakage_gate(champion, leaked)["note"].replace("this version", f"v{champion}")
    if refused:
        evidence["comparison_refused"] = refused
        for gate in ("beats_champion", "mcnemar"):
            gates[gate] = {"passed": False, "note": f"not comparable: {refused}"}
        return gates
    theirs = _scored(cfg, name, champion)
    evidence["champion"] = _public(theirs)
    if theirs.get("unreadable"):
        note = f"not comparable: {theirs['unreadable']}"
        return gates | {g: {"passed": False, "note": note} for g in ("beats_champion", "mcnemar")}
    gained = mine["accuracy"] - theirs["accuracy"]
    only_mine = int((mine["correct"] & ~theirs["correct"]).sum())
    only_theirs = int((theirs["correct"] & ~mine["correct"]).sum())
    gates["beats_champion"] = {
        "value": gained, "threshold": limits.min_improvement,
        "passed": gained > limits.min_improvement, "champion_version": champion,
        "champion_accuracy": theirs["accuracy"], "champion_input": theirs["input"],
    }  # fmt: skip
    p = mcnemar_p(only_mine, only_theirs)
    gates["mcnemar"] = {
        "value": p, "threshold": limits.mcnemar_p, "only_candidate_right": only_mine,
        "only_champion_right": only_theirs,
        "passed": limits.mcnemar_p is None or (only_mine > only_theirs and p <= limits.mcnemar_p),
    }  # fmt: skip
    if limits.mcnemar_p is None:
        gates["mcnemar"]["note"] = "off"
    return gates


def _scored(cfg: Config, name: str, version: str) -> dict:
    """A version scored on the test split's raw files, decoded for its own input spec."""
    session, meta = registry.load_onnx_session(f"models:/{name}/{version}")
    if sorted(meta["classes"]) != sorted(load_meta()["classes"]):
        raise UserError(
            f"v{version} of {name} predicts other classes than {paths.PREPARED} holds: "
            "it cannot be scored on this test split"
        )
    channels, size = int(meta["channels"]), int(meta["image_size"])
    result = {"version": version, "classes": meta["classes"]}
    result["input"] = {"channels": channels, "image_size": size}
    images, labels, unreadable = registry.test_split(
        meta["classes"], channels, size, cfg.prepare.max_pixels
    )
    if unreadable or labels is None or not len(labels):
        result["unreadable"] = (
            f"{unreadable}: no longer readable" if unreadable else "no test images"
        )
        return result
    predict = onnx_predictor(session)
    metrics, probabilities = score(predict, images, labels, meta["classes"])
    result |= {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}
    result |= {"correct": probabilities.argmax(1) == labels, "predict": predict, "images": images}
    return result


def _public(scored: dict) -> dict:
    return {k: v for k, v in scored.items() if k not in ("correct", "predict", "images")}


def images_seen(name: str, version: str, test_shas: set) -> int | None:
    """How many test-split images `version` trained on; None when its run has no record."""
    import mlflow

    run_id = promotion_log.client().get_model_version(name, version).run_id
    try:
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/{registry.TRAINED_ON_ARTIFACT}")
    except Exception:  # no such artifact: a version registered before lensflow kept one
        return None
    return len(set(text.split()) & test_shas)


def leakage_gate(version: str, leaked: int | None) -> dict:
    if leaked is None:
        note = "this version's run records no training images (lineage/trained_on.txt)"
        return {"value": None, "threshold": 0, "passed": False, "note": note}
    gate = {"value": leaked, "threshold": 0, "passed": leaked == 0}
    if leaked:
        gate["note"] = f"this version trained on {leaked} image(s) of the test split"
    return gate


def holdout_shas() -> set[str]:
    import pandas as pd

    manifest = pd.read_parquet(paths.MANIFEST, columns=["sha256", "split"])
    return set(manifest.loc[manifest["split"] == "test", "sha256"])


def same_classes(name: str, champion: str, classes: list[str]) -> dict:
    """The `same_classes` gate: does a model predicting `classes` (in any order) predict what
    version `champion` of `name` does? (Promotion and `lensflow rollout start` ask it.)"""
    theirs = classes_of(name, champion)
    same = sorted(theirs) == sorted(classes)
    return {
        "value": classes, "threshold": theirs, "passed": same,
        **({} if same else {"note": "another class set: a person decides (lensflow promote)"}),
    }  # fmt: skip


def classes_of(name: str, version: str) -> list[str]:
    return registry.load_onnx_session(f"models:/{name}/{version}")[1]["classes"]


def version_tag(name: str, version: str, key: str) -> str | None:
    return promotion_log.client().get_model_version(name, version).tags.get(key)


def at_least(value: float, threshold: float) -> dict:
    return {"value": value, "threshold": threshold, "passed": value >= threshold}


def _v(version: str | None) -> str:
    return f"v{version}" if version else "none"
