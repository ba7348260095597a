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

MAX_BATCH = 256


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
    from components.evaluate import score

    build_engine(onnx_path, plan_path, precision, images.shape[1:])
    metrics, _ = score(predictor(plan_path), images, labels, classes)
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
    profile.set_shape("images", (1, *shape), (64, *shape), (MAX_BATCH, *shape))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    return plan_path


def predictor(plan_path: Path):
    """A Predictor (uint8 images -> probabilities) running the engine on the GPU."""
    import tensorrt as trt
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    context = engine.create_execution_context()

    def predict(images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), MAX_BATCH):
            batch = torch.from_numpy(np.ascontiguousarray(images[i : i + MAX_BATCH])).cuda()
            context.set_input_shape("images", tuple(batch.shape))
            outputs = {
                name: torch.empty(
                    tuple(context.get_tensor_shape(name)), dtype=torch.float32, device="cuda"
                )
                for name in ("logits", "probabilities")
            }
            context.set_tensor_address("images", batch.data_ptr())
            for name, tensor in outputs.items():
                context.set_tensor_address(name, tensor.data_ptr())
            stream = torch.cuda.current_stream()
            context.execute_async_v3(stream.cuda_stream)
            stream.synchronize()
            out.append(outputs["probabilities"].cpu().numpy())
        return np.concatenate(out)

    return predict
