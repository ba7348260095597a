"""export: the trained classifier as one ONNX file with preprocessing inside, parity-gated.

Input `images`: uint8 [batch, channels, height, width] (any height/width: resized inside).
Outputs `logits`, `probabilities` and `embeddings` (the penultimate layer, the head's input:
continuous validation compares them; readers take outputs by name, so others ignore it).
Class names and the input spec are model metadata. The parity gate compares ONNX Runtime with
PyTorch on the whole test split (probabilities, top-1 class and embeddings). A model that
passes gets its reference profile (components/drift/profile.py), models/profile.npz.
models/golden.npz holds the golden inputs registered with the model: the first GOLDEN_IMAGES
test images and the probabilities ONNX Runtime gives them (serving checks a version on them).
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from components.core import paths, tracking
from components.core.config import Config
from components.core.errors import GateFailed
from components.data import prepared
from components.data.prepared import load_split
from components.drift import profile as reference_profile
from components.release import tensorrt
from components.scoring.backends import onnx_predictor, ort_session, torch_predictor
from components.scoring.metrics import score
from components.training import models

GOLDEN_IMAGES = 8


@dataclass(frozen=True)
class ExportResult:
    onnx: str
    accuracy: float
    max_abs_diff: float
    top1_agreement: float


class WithProbabilities(nn.Module):
    """logits, probabilities and embeddings: the classifier with its head split off (a copy
    whose head is an identity), so the head's input comes out as well."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.features = copy.deepcopy(classifier)
        self.head = models.head(self.features)
        name = next(n for n, m in self.features.named_modules() if m is self.head)
        parent, _, attribute = name.rpartition(".")
        setattr(self.features.get_submodule(parent), attribute, nn.Identity())

    def forward(self, images: torch.Tensor):
        embeddings = self.features(images)
        logits = self.head(embeddings)
        return logits, torch.softmax(logits, dim=1), embeddings


def run(cfg: Config) -> ExportResult:
    model, spec = models.load_checkpoint(paths.CHECKPOINT)
    metadata = {
        **tracking.lineage(cfg),
        "lensflow.version": _version(),
        "classes": json.dumps(spec["classes"]),
        "image_size": str(spec["image_size"]),
        "channels": str(spec["channels"]),
        "input": f"images: uint8 [batch, {spec['channels']}, height, width], best at "
        f"image_size (as trained); resized to {models.input_size(spec)} px and normalised inside",
    }
    to_onnx(model, spec, paths.ONNX, cfg.export.opset, metadata)
    images, labels = load_split("test")
    parity = check_parity(model, paths.ONNX, images, cfg.export.parity_atol)
    session = ort_session(paths.ONNX)
    metrics, _ = score(onnx_predictor(session), images, labels, spec["classes"])
    write_golden(paths.GOLDEN, images[:GOLDEN_IMAGES], onnx_predictor(session))
    report = {
        "onnx": {
            "status": "ok" if parity["passed"] else "failed",
            "path": str(paths.ONNX),
            "opset": cfg.export.opset,
            "size_bytes": paths.ONNX.stat().st_size,
            "accuracy": metrics["accuracy"],
            "parity": parity,
        },
        "tensorrt_fp16": tensorrt.build_and_score(
            paths.ONNX, paths.PLAN_FP16, "fp16", images, labels, spec["classes"]
        ),
    }
    if parity["passed"]:
        report["profile"] = reference_profile.run(cfg, metrics["accuracy"])
    paths.write_json(paths.EXPORT_REPORT, report)
    paths.write_metrics(paths.EXPORT_METRICS, {"onnx_accuracy": metrics["accuracy"]})

    with tracking.step_run(cfg, "export"):
        import mlflow

        mlflow.log_metrics(
            {
                "export/onnx_accuracy": metrics["accuracy"],
                "export/onnx_max_abs_diff": parity["max_abs_diff"],
                "export/onnx_top1_agreement": parity["top1_agreement"],
                "export/onnx_embeddings_max_abs_diff": parity["embeddings_max_abs_diff"],
            }
        )
        if "profile" in report:
            mlflow.log_metric("export/profile_seconds", report["profile"]["seconds"])
        mlflow.log_artifact(str(paths.EXPORT_REPORT))
    if not parity["passed"]:
        raise GateFailed(
            f"ONNX parity gate failed: max |p_onnx - p_torch| = {parity['max_abs_diff']:.2e} "
            f"(limit {parity['atol']:.0e}), top-1 agreement {parity['top1_agreement']:.4f} "
            f"(needs 1.0), max |e_onnx - e_torch| = {parity['embeddings_max_abs_diff']:.2e} "
            f"(limit {parity['atol'] * parity['embeddings_scale']:.0e}); see {paths.EXPORT_REPORT}"
        )
    return ExportResult(
        str(paths.ONNX), metrics["accuracy"], parity["max_abs_diff"], parity["top1_agreement"]
    )


def to_onnx(model: nn.Module, spec: dict, path: Path, opset: int, metadata: dict) -> None:
    import onnx

    size = spec["image_size"]
    example = torch.zeros(2, spec["channels"], size, size, dtype=torch.uint8)
    batch, height, width = (torch.export.Dim(n, min=1, max=8192) for n in ("batch", "h", "w"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter is chatty about internals we do not use
        program = torch.onnx.export(
            WithProbabilities(model.eval()),
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=["images"],
            output_names=["logits", "probabilities", "embeddings"],
            dynamic_shapes={"images": {0: batch, 2: height, 3: width}},
            verbose=False,
        )
    proto = program.model_proto
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with paths.atomic(path) as partial:
        onnx.save(proto, partial)


def write_golden(path: Path, images: np.ndarray, predict) -> None:
    images = np.ascontiguousarray(images)
    with paths.atomic(path) as partial, partial.open("wb") as file:
        np.savez(file, images=images, probabilities=predict(images))


def check_parity(model: nn.Module, onnx_path: Path, images: np.ndarray, atol: float) -> dict:
    """Compare ONNX Runtime with PyTorch on `images`: probabilities, top-1 class, and the
    embeddings (within atol times their largest magnitude, at least 1)."""
    expected = torch_predictor(model)(images)
    session = ort_session(onnx_path)
    actual = onnx_predictor(session)(images)
    max_abs_diff = float(np.abs(expected - actual).max()) if len(images) else 0.0
    agreement = float((expected.argmax(1) == actual.argmax(1)).mean()) if len(images) else 1.0
    expected_embeddings = _torch_embeddings(model, images)
    _, actual_embeddings = reference_profile.model_outputs(session, images)
    embeddings_diff, scale = 0.0, 1.0
    if actual_embeddings is None:
        embeddings_diff = float("inf")
    elif len(images):
        embeddings_diff = float(np.abs(expected_embeddings - actual_embeddings).max())
        scale = max(1.0, float(np.abs(expected_embeddings).max()))
    return {
        "n_images": int(len(images)),
        "max_abs_diff": max_abs_diff,
        "top1_agreement": agreement,
        "embeddings_max_abs_diff": embeddings_diff,
        "embeddings_scale": scale,
        "atol": atol,
        "passed": max_abs_diff <= atol and agreement == 1.0 and embeddings_diff <= atol * scale,
    }


@torch.no_grad()
def _torch_embeddings(model: nn.Module, images: np.ndarray) -> np.ndarray:
    wrapped = WithProbabilities(model.eval()).eval()
    parts = [wrapped(prepared.batch(images, part))[2] for part in prepared.chunks(len(images), 256)]
    return torch.cat(parts).numpy() if parts else np.zeros((0, 0), np.float32)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lensflow")
    except PackageNotFoundError:
        return "unknown"
