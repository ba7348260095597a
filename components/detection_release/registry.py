"""register, for `task: detection`, and a registered detector as its users run it.

`run` logs the detector's ONNX export (components/detection_release/export.py: heads only, NMS after
the graph) to MLflow with the metadata its users need to decode it, and registers it as a
version of `registry.model_name` (`lensflow-detector` under `task: detection` by default). As
in classification (components/release/registry.py, whose helpers it reuses), registering
decides nothing, a checkpoint already registered reuses its version, and the version carries
the lineage tags, the export's parity evidence and, in its run, the sha256 of every image it
trained on (so promotion can refuse a test split it has seen), golden inputs: a few test
images with their raw outputs, which serving checks a version on before it serves it, and the
reference profile of its box statistics that `lensflow monitor` compares batches with
(components/detection/monitor.py).

The ONNX metadata (`metadata_props`): `task` (detection), `classes`, `category_ids`,
`image_size` and `detector` (the JSON of what `model.Decoder` needs: architecture, widths, FPN
channels, anchor sizes, score threshold, NMS IoU, detections per image; `backbone`: null, or the
arch and widths of the classifier, or EfficientNet-Lite0, a transferred backbone came from: the
module is rebuilt without weights, for its feature sizes). `decoder(meta)` rebuilds that
decoder from it: the same postprocessing for the evaluator, promotion, the server and batch
scoring.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np

from components.core import paths, tracking
from components.core.config import Config
from components.core.errors import UserError
from components.data.prepared import load_meta
from components.detection import model, train
from components.detection import monitor as box_monitor
from components.detection_release import export
from components.release import quantize, registry
from components.release.registry import RegistryResult

TASK = "detection"
DECODER_KEYS = (
    "architecture", "image_size", "widths", "fpn_channels", "anchor_sizes", "score_threshold",
    "nms_iou", "max_detections",
)  # fmt: skip
GOLDEN_IMAGES = 4


def run(cfg: Config) -> RegistryResult:
    cfg = train.settings(cfg)  # the decoder's settings in the metadata: as evaluated
    export_report = registry.read_report(export.REPORT)
    evaluation = registry.read_report(paths.EVALUATION_REPORT)
    if not export.ONNX.exists() or not train.CHECKPOINT.exists():
        raise UserError(f"{export.ONNX} or {train.CHECKPOINT} is missing: run train and export")
    if evaluation.get("task") != TASK:
        raise UserError(f"{paths.EVALUATION_REPORT} is not a detection report: run evaluate")
    name = cfg.registry.model_name
    checkpoint_sha = hashlib.sha256(train.CHECKPOINT.read_bytes()).hexdigest()
    parity = {k: export_report[k] for k in ("parity", "parity_iou", "n_images")}
    parity["mismatched_images"] = export_report["mismatched_images"]
    with tracking.step_run(cfg, "register") as run:
        import mlflow

        existing = registry.version_of_checkpoint(name, checkpoint_sha)
        if existing:
            version = existing
            mlflow.set_tag("lensflow.reused_version", version)
        else:
            tags = {
                **tracking.lineage(cfg),
                "mlflow.run_id": run.info.run_id,
                "lensflow.task": TASK,
                registry.CHECKPOINT_SHA_TAG: checkpoint_sha,
                "lensflow.export_parity": json.dumps(parity),
                **_pretrained_tags(),
            }
            mlflow.log_metrics({"test/map": evaluation["map"], "test/map_50": evaluation["map_50"]})
            version = _log_and_register(cfg, name, tags)
        report = {
            "task": TASK,
            "name": name,
            "version": version,
            "model_uri": f"models:/{name}/{version}",
            "reused": bool(existing),
            "checkpoint_sha256": checkpoint_sha,
            "export_parity": parity,
            "test_map": evaluation["map"],
            "test_map_50": evaluation["map_50"],
        }
        paths.write_json(paths.REGISTRY_REPORT, report)
        paths.write_text(paths.MODEL_CARD, model_card(cfg, version, evaluation, parity))
        mlflow.log_artifact(str(paths.REGISTRY_REPORT))
        mlflow.log_artifact(str(paths.MODEL_CARD))
    return RegistryResult(name, version, bool(existing), str(paths.REGISTRY_REPORT))


summary = registry.summary


def model_card(cfg: Config, version: str, evaluation: dict, parity: dict) -> str:
    """reports/model_card.md (dvc.yaml's register declares it): use, data, metrics, formats."""
    lineage = tracking.lineage(cfg)
    quantized = (
        registry.read_report(paths.QUANTIZE_REPORT) if paths.QUANTIZE_REPORT.exists() else None
    )
    int8 = "not made"
    if quantized:
        int8 = f"{quantized['status']}: {'; '.join(quantized['reasons']) or 'gates passed'}"
    d = cfg.detection
    return "\n".join(
        [
            f"# {cfg.registry.model_name} version {version}",
            "",
            "## Intended use",
            f"Detect {', '.join(load_meta()['classes'])}: boxes (x1, y1, x2, y2 in the input's "
            f"pixels), scores and classes. Input: uint8 images [batch, 3, H, W], resized to "
            f"{d.image_size} px inside; score threshold {d.score_threshold}, per-class NMS at "
            f"IoU {d.nms_iou}, at most {d.max_detections} boxes, after the graph.",
            "",
            "## Data",
            f"Source `{cfg.data.source}`, DVC hash `{lineage['data.md5']}`; "
            f"code `{lineage['git.commit']}` (dirty: {lineage['git.dirty']}); "
            f"params hash `{lineage['params.hash']}`.",
            "",
            "## Metrics (test split)",
            f"COCO mAP@[.5:.95] {evaluation['map']:.4f}, mAP@0.5 {evaluation['map_50']:.4f}.",
            "",
            "## Formats",
            f"- fp32 ONNX up to the heads (box parity with PyTorch: {parity['parity']}, "
            f"{parity['mismatched_images']} of {parity['n_images']} test images mismatched)",
            f"- int8 ONNX ({int8})",
            "",
        ]
    )


def metadata(cfg: Config) -> dict[str, str]:
    """The ONNX metadata of this project's detector (all values strings, as ONNX keeps them)."""
    meta = load_meta()
    detection = cfg.detection.model_dump(mode="json")
    return {
        "task": TASK,
        "classes": json.dumps(meta["classes"]),
        "category_ids": json.dumps(meta["category_ids"]),
        "image_size": str(cfg.detection.image_size),
        "detector": json.dumps(
            {**{key: detection[key] for key in DECODER_KEYS}, "backbone": _backbone()}
        ),
    }


def _pretrained_tags() -> dict[str, str]:
    """Lineage: the classifier the detector's backbone started from (`none`: from scratch)."""
    backbone, _ = train.read_checkpoint()
    if backbone is None:
        return {"lensflow.pretrained": "none"}
    tags = {"lensflow.pretrained": backbone["source"]}
    if backbone["run_id"]:  # none for efficientnet-lite0's packaged weights
        tags["lensflow.pretrained_run_id"] = backbone["run_id"]
    return tags


def _backbone() -> dict | None:
    """What the anchors need of a transferred backbone: its classifier's (or
    EfficientNet-Lite0's) stages; no weights."""
    backbone, _ = train.read_checkpoint()
    return backbone and {k: backbone[k] for k in ("arch", "widths", "se", "mean", "std")}


def decoder(meta: dict) -> model.Decoder:
    """`model.Decoder` of a registered detector, from its ONNX metadata."""
    return model.decoder_from_metadata(meta)


def detect(session, decode: model.Decoder, images: np.ndarray) -> list[dict]:
    """Boxes (x1, y1, x2, y2 in the images' pixels), scores and labels (class indices) of
    uint8 images [N, 3, H, W] of one size, by the ONNX Runtime `session` then `decode`."""
    outputs = session.run(list(decode.outputs), {"images": images})
    return decode(*outputs, [images.shape[-2:]] * len(images))


def _log_and_register(cfg: Config, name: str, tags: dict) -> str:
    import mlflow
    import onnx

    proto = onnx.load(export.ONNX)
    onnx.helper.set_model_props(proto, metadata(cfg))
    images, _, _ = train.split_data("test")
    example = np.array(images[:GOLDEN_IMAGES])
    # before log_model, which moves the weights of `proto` out to external data
    onnx_bytes = proto.SerializeToString()
    golden_arrays = golden_outputs(onnx_bytes, example)
    profile = box_monitor.write_profile(cfg, onnx_bytes, metadata(cfg))
    info = mlflow.onnx.log_model(
        proto, name="model", pip_requirements=["onnxruntime", "onnx"],
        metadata={"task": TASK, "classes": load_meta()["classes"]},
    )  # fmt: skip
    mlflow.log_artifact(str(train.CHECKPOINT), tracking.CHECKPOINT_ARTIFACT.rpartition("/")[0])
    mlflow.log_text("\n".join(registry.trained_on()) + "\n", registry.TRAINED_ON_ARTIFACT)
    mlflow.log_artifact(str(profile), box_monitor.PROFILE_ARTIFACT.rpartition("/")[0])
    int8 = "shipped" if quantize.int8_shipped() else "not_shipped"  # quantize's gate
    with tempfile.TemporaryDirectory() as tmp:
        golden = Path(tmp) / Path(paths.GOLDEN_ARTIFACT).name
        np.savez(golden, images=example, **golden_arrays)
        mlflow.log_artifact(str(golden), paths.GOLDEN_ARTIFACT.rpartition("/")[0])
        if int8 == "shipped":  # with the fp32 graph's metadata: served, it decodes the same
            quantized = onnx.load(paths.ONNX_INT8)
            onnx.helper.set_model_props(quantized, metadata(cfg))
            onnx.save(quantized, Path(tmp) / paths.ONNX_INT8.name)
            mlflow.log_artifact(str(Path(tmp) / paths.ONNX_INT8.name), "int8")
    found = mlflow.register_model(info.model_uri, name, tags={**tags, "lensflow.int8": int8})
    return str(found.version)


def golden_outputs(onnx_bytes: bytes, images: np.ndarray) -> dict[str, np.ndarray]:
    """The graph's outputs on the golden images: what serving compares a download with."""
    from components.scoring.backends import ort_session

    session = ort_session(onnx_bytes)
    names = [output.name for output in session.get_outputs()]  # fcos's or ssdlite's
    return dict(zip(names, session.run(names, {"images": images}), strict=True))
