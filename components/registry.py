"""register: log the ONNX model and checkpoint to MLflow, register a version, gate `@champion`.

The alias moves only when every gate passes:
- min_accuracy: candidate test accuracy (ONNX Runtime) >= registry.min_accuracy;
- not_worse_than_champion: the current champion, re-scored by the same evaluator on the raw
  files of this test split (decoded for its own input spec), is not more accurate than the
  candidate; a champion of another class set is not comparable, and then stays.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components import imagefacts, models, paths, quantize, tracking
from components.backends import onnx_predictor, ort_session
from components.config import Config, UserError
from components.metrics import score
from components.prepared import load_meta, load_split

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
    images, _ = load_split("test")
    name = cfg.registry.model_name
    candidate_accuracy = export_report["onnx"]["accuracy"]

    with tracking.step_run(cfg, "register") as run:
        import mlflow

        version = _log_and_register(cfg, spec, name, run.info.run_id, images)
        champion = _current_champion(name)
        champion_eval = _rescore(cfg, champion, spec["classes"])
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
        card = model_card(cfg, spec, version, export_report)
        paths.write_text(paths.MODEL_CARD, card)
        mlflow.log_artifact(str(paths.MODEL_CARD))
        client.update_model_version(name, version, description=card)
        paths.write_json(paths.REGISTRY_REPORT, report)
        mlflow.log_artifact(str(paths.REGISTRY_REPORT))
        mlflow.log_metric("registry/promoted", float(promoted))
    return RegistryResult(
        name, version, promoted, report["champion_version"], str(paths.REGISTRY_REPORT)
    )


def champion_uri(name: str) -> str:
    return f"models:/{name}@{CHAMPION}"


def load_onnx_session(model_uri: str):
    """An ONNX Runtime session of a lensflow model (registry URI or .onnx file) + its metadata."""
    import onnx

    if model_uri.endswith(".onnx") and not model_uri.startswith(("models:/", "runs:/")):
        if not Path(model_uri).is_file():
            raise UserError(f"{model_uri}: ONNX file not found")
        proto = onnx.load(model_uri)
    else:
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            proto = mlflow.onnx.load_model(model_uri)
        except MlflowException as exc:
            raise UserError(f"{model_uri}: {exc.message.splitlines()[0]}") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    meta["classes"] = json.loads(meta.get("classes", "[]"))
    return ort_session(proto.SerializeToString()), meta


def _log_and_register(cfg: Config, spec: dict, name: str, run_id: str, images: np.ndarray) -> str:
    import mlflow
    import onnx
    from mlflow.models import infer_signature

    example = np.array(images[:2])  # the shard is memory-mapped
    session = ort_session(paths.ONNX)
    outputs = session.run(None, {"images": example})  # logits, probabilities, embeddings
    signature = infer_signature(
        example, {o.name: v for o, v in zip(session.get_outputs(), outputs, strict=True)}
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
    mlflow.log_artifact(str(paths.CHECKPOINT), tracking.CHECKPOINT_ARTIFACT.rpartition("/")[0])
    if paths.PROFILE.exists():  # continuous validation's reference (components/profile.py)
        mlflow.log_artifact(str(paths.PROFILE), tracking.PROFILE_ARTIFACT.rpartition("/")[0])
    int8 = "shipped" if quantize.int8_shipped() else "not_shipped"
    if int8 == "shipped":
        mlflow.log_artifact(str(paths.ONNX_INT8), "int8")
    tags = {**tracking.lineage(cfg), "mlflow.run_id": run_id, "lensflow.int8": int8}
    version = mlflow.register_model(info.model_uri, name, tags=tags)
    return str(version.version)


def _current_champion(name: str):
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _rescore(cfg: Config, champion, classes: list[str]) -> dict:
    """The champion's accuracy on this run's test files, decoded for the champion's own input
    (its channels and image size), so a champion trained on other settings is scored as its
    clients use it. A champion of another class set cannot be compared."""
    if champion is None:
        return {"status": "none"}
    session, meta = load_onnx_session(f"models:/{champion.name}/{champion.version}")
    if sorted(meta["classes"]) != sorted(classes):
        return {
            "status": "not_comparable",
            "reason": f"the champion (version {champion.version}) predicts other classes "
            f"({', '.join(meta['classes'])}); register this model under another "
            "registry.model_name",
        }
    if "image_size" not in meta or "channels" not in meta:
        return {"status": "not_comparable", "reason": "the champion's metadata has no input spec"}
    channels, size = int(meta["channels"]), int(meta["image_size"])
    images, labels, unreadable = test_split(meta["classes"], channels, size, cfg.prepare.max_pixels)
    if unreadable or not len(labels):
        reason = f"{unreadable}: no longer readable" if unreadable else "no test images"
        return {"status": "not_comparable", "reason": reason}
    metrics, _ = score(onnx_predictor(session), images, labels, meta["classes"])
    spec = {"channels": channels, "image_size": size}
    return {"status": "scored", "accuracy": metrics["accuracy"], "input": spec}


def test_split(classes: list[str], channels: int, size: int, max_pixels: int):
    """This project's test split as a model made for `channels`, `size` and `classes` takes it:
    (images, labels in `classes`' order, the first file that no longer decodes or None). The
    shard when it was prepared so; otherwise the same raw files (the manifest's test rows, in
    shard order), decoded as prepare decodes them."""
    prepared = load_meta()
    if [prepared[k] for k in ("classes", "channels", "image_size")] == [classes, channels, size]:
        images, labels = load_split("test")
        return images, labels, None
    import pandas as pd

    manifest = pd.read_parquet(paths.MANIFEST, columns=["path", "label", "split"])
    test = manifest[manifest["split"] == "test"]
    root = Path(prepared["source"])
    files = [str(root / rel) for rel in test["path"]]
    options = imagefacts.ReadOptions(channels, size, max_pixels)
    decoded = imagefacts.read_many(files, options)
    for file, (_, pixels) in zip(files, decoded, strict=True):
        if pixels is None:
            return None, None, file
    images = [pixels for _, pixels in decoded] or [np.zeros((0, channels, size, size), np.uint8)]
    labels = np.array([classes.index(label) for label in test["label"]], dtype=np.int64)
    return np.stack(images) if files else images[0], labels, None


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
            "champion_input": champion_eval["input"],
            "passed": accuracy >= champion_eval["accuracy"],
        }
    elif champion_eval["status"] == "not_comparable":  # no evidence: the champion stays
        gates["not_worse_than_champion"] = {
            "champion_version": str(champion.version),
            "passed": False,
            "note": f"not comparable: {champion_eval['reason']}",
        }
    else:
        gates["not_worse_than_champion"] = {"passed": True, "note": "there is no champion yet"}
    return gates


def _read_json(path) -> dict:
    if not path.exists():
        raise UserError(f"{path} is missing: run the stage that writes it first")
    return json.loads(path.read_text())


def model_card(cfg: Config, spec: dict, version: str, export_report: dict) -> str:
    """A markdown model card: intended use, data version, metrics, limits, formats."""
    evaluation = _read_json(paths.EVALUATION_REPORT)
    lineage = tracking.lineage(cfg)
    quantized = _read_json(paths.QUANTIZE_REPORT) if paths.QUANTIZE_REPORT.exists() else None
    corruptions = evaluation.get("corruptions", {})
    robustness = ", ".join(f"{name} {values[-1]:.3f}" for name, values in corruptions.items())
    int8 = "int8 ONNX (not made)"
    if quantized:
        why = "; ".join(quantized["reasons"]) or "gates passed"
        int8 = f"int8 ONNX ({quantized['status']}: {why})"
    return "\n".join(
        [
            f"# {cfg.registry.model_name} version {version}",
            "",
            "## Intended use",
            f"Classify {spec['channels']}-channel images into {len(spec['classes'])} classes: "
            f"{', '.join(spec['classes'])}. Input: uint8 images [batch, {spec['channels']}, H, W]; "
            f"best at {spec['image_size']}x{spec['image_size']} (as trained); resized to "
            f"{models.input_size(spec)} px and normalised inside.",
            "",
            "## Data",
            f"Source `{cfg.data.source}`, DVC hash `{lineage['data.md5']}`; "
            f"code `{lineage['git.commit']}` (dirty: {lineage['git.dirty']}); "
            f"params hash `{lineage['params.hash']}`.",
            "",
            "## Metrics (test split)",
            f"accuracy {evaluation['accuracy']:.4f}, macro-F1 {evaluation['macro_f1']:.4f}, "
            f"top-{evaluation['top_k']} {evaluation['top_k_accuracy']:.4f}, "
            f"ECE {evaluation['ece']:.4f} on {evaluation['n_images']} images.",
            "",
            "## Limits",
            f"Trained only on `{cfg.data.source}`; images unlike it are out of scope. "
            f"Accuracy at the strongest corruption tested: {robustness or 'not measured'}.",
            "",
            "## Formats",
            f"- fp32 ONNX (ONNX Runtime accuracy {export_report['onnx']['accuracy']:.4f}, "
            f"parity max diff {export_report['onnx']['parity']['max_abs_diff']:.1e})",
            f"- {int8}",
            f"- TensorRT fp16: {export_report.get('tensorrt_fp16', {}).get('status', 'not tried')}",
            "",
        ]
    )
