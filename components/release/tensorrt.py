"""TensorRT engines built from the exported ONNX, when the library and a CUDA GPU are present.

TensorRT is not on the package registries every machine reaches, so this is detected at run
time: without it (or without a GPU) each format is recorded as `skipped` with the reason and
the pipeline goes on. fp16 engines come from the fp32 ONNX (TensorRT 10's FP16 builder flag;
TensorRT 11 builds strongly typed networks, so there the engine keeps the ONNX's fp32), int8
engines from the Q/DQ ONNX that `quantize` writes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from components.core import paths
from components.scoring.backends import TENSORRT_MAX_BATCH, tensorrt_predictor
from components.scoring.metrics import score


def unavailable_reason() -> str | None:
    """None when TensorRT can run here, else why not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return (
            "the tensorrt Python package is not installed (pip install tensorrt on a CUDA machine)"
        )
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def build_and_score(
    onnx_path: Path,
    plan_path: Path,
    precision: str,
    images: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
) -> dict:
    """Build an engine and score it with the shared evaluator, or say why it was skipped."""
    reason = unavailable_reason()
    if reason:
        return {"status": "skipped", "reason": reason}
    build_engine(onnx_path, plan_path, precision, images.shape[1:])
    metrics, _ = score(tensorrt_predictor(plan_path), images, labels, classes)
    return {
        "status": "ok",
        "path": str(plan_path),
        "precision": precision,
        "accuracy": metrics["accuracy"],
        "size_bytes": plan_path.stat().st_size,
    }


def build_engine(onnx_path: Path, plan_path: Path, precision: str, image_shape) -> Path:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if precision == "fp16" and hasattr(trt.BuilderFlag, "FP16"):
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    shape = tuple(int(d) for d in image_shape)
    profile.set_shape("images", (1, *shape), (64, *shape), (TENSORRT_MAX_BATCH, *shape))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    with paths.atomic(plan_path) as partial:
        partial.write_bytes(bytes(serialized))
    return plan_path
