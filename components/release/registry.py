"""register: log the ONNX model and checkpoint to MLflow and register them as a model version.

Registering decides nothing: `promote` (components/release/promote.py) gates `@champion`. A
version is tagged with what promotion and lineage need: the checkpoint's sha256 (a rerun on the
same checkpoint, `dvc repro --force` included, reuses its version instead of making another),
the export's parity evidence, the train run and the params the model was trained with, and the
lineage tags. Its run holds the sha256 of every image it trained on (train and validation
splits, `lineage/trained_on.txt`), so promotion can refuse a comparison on images it has seen.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.core import paths, tracking
from components.core.config import Config
from components.core.errors import UserError
from components.data import imagefacts
from components.data.prepared import load_meta, load_split
from components.release import quantize
from components.scoring.backends import ort_session
from components.training import models

CHAMPION = "champion"
CHECKPOINT_SHA_TAG = "lensflow.checkpoint_sha256"
TRAINED_ON_ARTIFACT = "lineage/trained_on.txt"  # sha256 of each train + val image, one a line


@dataclass(frozen=True)
class RegistryResult:
    name: str
    version: str
    reused: bool
    report: str


def run(cfg: Config) -> RegistryResult:
    export_report = read_report(paths.EXPORT_REPORT)
    if not paths.ONNX.exists():
        raise UserError(f"{paths.ONNX} is missing: run the export stage first")
    _, spec = models.load_checkpoint(paths.CHECKPOINT)
    training = read_report(paths.TRAINING_REPORT)
    name = cfg.registry.model_name
    checkpoint_sha = hashlib.sha256(paths.CHECKPOINT.read_bytes()).hexdigest()

    with tracking.step_run(cfg, "register") as run:
        import mlflow

        existing = version_of_checkpoint(name, checkpoint_sha)
        if existing:
            version = existing
            mlflow.set_tag("lensflow.reused_version", version)
        else:
            tags = {
                **tracking.lineage(cfg),
                "params.hash": training.get("params_hash", cfg.params_hash()),
                "mlflow.run_id": run.info.run_id,
                CHECKPOINT_SHA_TAG: checkpoint_sha,
                "lensflow.train_run_id": str(training.get("mlflow_run_id")),
                "lensflow.trained_params": json.dumps(training.get("params", {})),
                "lensflow.export_parity": json.dumps(export_report["onnx"]["parity"]),
            }
            version = _log_and_register(spec, name, tags)
        card = model_card(cfg, spec, version, export_report)
        paths.write_text(paths.MODEL_CARD, card)
        report = {
            "name": name,
            "version": version,
            "model_uri": f"models:/{name}/{version}",
            "reused": bool(existing),
            "checkpoint_sha256": checkpoint_sha,
            "train_run_id": training.get("mlflow_run_id"),
            "export_parity": export_report["onnx"]["parity"],
        }
        if not existing:
            mlflow.log_artifact(str(paths.MODEL_CARD))
            mlflow.MlflowClient().update_model_version(name, version, description=card)
        paths.write_json(paths.REGISTRY_REPORT, report)
        mlflow.log_artifact(str(paths.REGISTRY_REPORT))
    return RegistryResult(name, version, bool(existing), str(paths.REGISTRY_REPORT))


def summary(result: RegistryResult) -> str:
    how = "the version of this checkpoint, reused" if result.reused else "registered"
    return f"register: models:/{result.name}/{result.version} ({how}); promote decides @champion"


def version_of_checkpoint(name: str, checkpoint_sha: str) -> str | None:
    """The version already registered for this checkpoint (the oldest), or None."""
    import mlflow

    found = mlflow.MlflowClient().search_model_versions(
        f"name = '{name}' and tags.`{CHECKPOINT_SHA_TAG}` = '{checkpoint_sha}'"
    )
    return str(min(int(v.version) for v in found)) if found else None


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


def _log_and_register(spec: dict, name: str, tags: dict) -> str:
    import mlflow
    import onnx
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import Schema, TensorSpec

    images, _ = load_split("test")
    example = np.array(images[:2])  # the shard is memory-mapped
    session = ort_session(paths.ONNX)
    outputs = session.run(None, {"images": example})  # logits, probabilities, embeddings
    named = {o.name: v for o, v in zip(session.get_outputs(), outputs, strict=True)}
    # images of any height and width (the model resizes inside), as `mlflow models serve` checks
    images_spec = TensorSpec(np.dtype(np.uint8), (-1, example.shape[1], -1, -1))
    signature = ModelSignature(
        inputs=Schema([images_spec]), outputs=infer_signature(example, named).outputs
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
    mlflow.log_text("\n".join(trained_on()) + "\n", TRAINED_ON_ARTIFACT)
    if paths.GOLDEN.exists():  # what serving checks a version on before it serves it
        mlflow.log_artifact(str(paths.GOLDEN), paths.GOLDEN_ARTIFACT.rpartition("/")[0])
    if paths.PROFILE.exists():  # continuous validation's reference (components/drift/profile.py)
        mlflow.log_artifact(str(paths.PROFILE), tracking.PROFILE_ARTIFACT.rpartition("/")[0])
    int8 = "shipped" if quantize.int8_shipped() else "not_shipped"
    if int8 == "shipped":
        mlflow.log_artifact(str(paths.ONNX_INT8), "int8")
    version = mlflow.register_model(info.model_uri, name, tags={**tags, "lensflow.int8": int8})
    return str(version.version)


def trained_on() -> list[str]:
    """The sha256 of every image the prepared data's train and validation splits hold, sorted."""
    import pandas as pd

    manifest = pd.read_parquet(paths.MANIFEST, columns=["sha256", "split"])
    return sorted(set(manifest.loc[manifest["split"].isin(["train", "val"]), "sha256"]))


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


def read_report(path) -> dict:
    """A JSON report an earlier stage wrote, or a UserError saying to run that stage."""
    if not path.exists():
        raise UserError(f"{path} is missing: run the stage that writes it first")
    return json.loads(path.read_text())


def model_card(cfg: Config, spec: dict, version: str, export_report: dict) -> str:
    """A markdown model card: intended use, data version, metrics, limits, formats."""
    evaluation = read_report(paths.EVALUATION_REPORT)
    lineage = tracking.lineage(cfg)
    quantized = read_report(paths.QUANTIZE_REPORT) if paths.QUANTIZE_REPORT.exists() else None
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
