"""register: log the ONNX model and checkpoint to MLflow, register a version, gate `@champion`.

The alias moves only when every gate passes:
- min_accuracy: candidate test accuracy (ONNX Runtime) >= registry.min_accuracy;
- not_worse_than_champion: the current champion, re-scored by the same evaluator on this
  test split, is not more accurate than the candidate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from lensflow.components import models, paths, tracking
from lensflow.components.config import Config, UserError
from lensflow.components.evaluate import onnx_predictor, score
from lensflow.components.export import ort_session
from lensflow.components.prepare import load_split

CHAMPION = "champion"


@dataclass(frozen=True)
class RegistryResult:
    name: str
    version: str
    promoted: bool
    champion_version: str | None
    report: str


def run(cfg: Config) -> RegistryResult:
    export_report = _read_json(paths.EXPORT_REPORT)
    if export_report["onnx"]["status"] != "ok":
        raise UserError(f"the ONNX export did not pass its gate; see {paths.EXPORT_REPORT}")
    _, spec = models.load_checkpoint(paths.CHECKPOINT)
    images, labels = load_split("test")
    name = cfg.registry.model_name
    candidate_accuracy = export_report["onnx"]["accuracy"]

    with tracking.step_run(cfg, "register") as run:
        import mlflow

        version = _log_and_register(cfg, spec, name, run.info.run_id, images.numpy())
        champion = _current_champion(name)
        champion_eval = _rescore(champion, spec["classes"], images.numpy(), labels.numpy())
        gates = _gates(cfg, candidate_accuracy, champion, champion_eval)
        promoted = all(g["passed"] for g in gates.values())
        if promoted:
            mlflow.MlflowClient().set_registered_model_alias(name, CHAMPION, version)
        decision = (
            f"{CHAMPION} -> version {version}"
            if promoted
            else f"{CHAMPION} stays at version {champion.version}"
            if champion
            else f"no {CHAMPION}: version {version} failed its gates"
        )
        report = {
            "name": name,
            "version": version,
            "model_uri": f"models:/{name}/{version}",
            "candidate_accuracy": candidate_accuracy,
            "gates": gates,
            "promoted": promoted,
            "decision": decision,
            "champion_version": version
            if promoted
            else (str(champion.version) if champion else None),
        }
        client = mlflow.MlflowClient()
        client.set_model_version_tag(name, version, "lensflow.gates", json.dumps(gates))
        client.set_model_version_tag(name, version, "lensflow.decision", decision)
        paths.REPORTS.mkdir(parents=True, exist_ok=True)
        paths.REGISTRY_REPORT.write_text(json.dumps(report, indent=2))
        mlflow.log_artifact(str(paths.REGISTRY_REPORT))
        mlflow.log_metric("registry/promoted", float(promoted))
    return RegistryResult(
        name, version, promoted, report["champion_version"], str(paths.REGISTRY_REPORT)
    )


def champion_uri(name: str) -> str:
    return f"models:/{name}@{CHAMPION}"


def load_onnx_session(model_uri: str):
    """An ONNX Runtime session of a registered lensflow model, plus its class names."""
    import mlflow

    proto = mlflow.onnx.load_model(model_uri)
    meta = {p.key: p.value for p in proto.metadata_props}
    return ort_session(proto.SerializeToString()), json.loads(meta.get("classes", "[]"))


def _log_and_register(cfg: Config, spec: dict, name: str, run_id: str, images: np.ndarray) -> str:
    import mlflow
    import onnx
    from mlflow.models import infer_signature

    example = images[:2]
    probabilities = onnx_predictor(ort_session(paths.ONNX))(example)
    signature = infer_signature(
        example, {"logits": np.log(probabilities + 1e-12), "probabilities": probabilities}
    )
    info = mlflow.onnx.log_model(
        onnx.load(paths.ONNX),
        name="model",
        signature=signature,
        pip_requirements=["onnxruntime", "onnx"],
        metadata={
            "classes": spec["classes"],
            "image_size": spec["image_size"],
            "channels": spec["channels"],
        },
    )
    mlflow.log_artifact(str(paths.CHECKPOINT), "checkpoint")
    tags = {**tracking.lineage(cfg), "mlflow.run_id": run_id}
    version = mlflow.register_model(info.model_uri, name, tags=tags)
    return str(version.version)


def _current_champion(name: str):
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _rescore(champion, classes: list[str], images: np.ndarray, labels: np.ndarray) -> dict:
    if champion is None:
        return {"status": "none"}
    session, champion_classes = load_onnx_session(f"models:/{champion.name}/{champion.version}")
    if champion_classes != classes:
        return {"status": "incomparable", "reason": "the champion predicts another class set"}
    metrics, _ = score(onnx_predictor(session), images, labels, classes)
    return {"status": "scored", "accuracy": metrics["accuracy"]}


def _gates(cfg: Config, accuracy: float, champion, champion_eval: dict) -> dict:
    gates = {
        "min_accuracy": {
            "value": accuracy,
            "threshold": cfg.registry.min_accuracy,
            "passed": accuracy >= cfg.registry.min_accuracy,
        }
    }
    if champion_eval["status"] == "scored":
        gates["not_worse_than_champion"] = {
            "value": accuracy,
            "threshold": champion_eval["accuracy"],
            "champion_version": str(champion.version),
            "passed": accuracy >= champion_eval["accuracy"],
        }
    else:
        reason = champion_eval.get("reason", "there is no champion yet")
        gates["not_worse_than_champion"] = {"passed": True, "note": reason}
    return gates


def _read_json(path) -> dict:
    if not path.exists():
        raise UserError(f"{path} is missing: run the stage that writes it first")
    return json.loads(path.read_text())
