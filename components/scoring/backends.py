"""Backends: every model format as one Predictor, a function from uint8 images [N, C, H, W]
(numpy) to class probabilities [N, K]. PyTorch modules, ONNX Runtime sessions (fp32 or int8)
and TensorRT engines all become one, so every format is scored on the same data by the same
evaluator (`metrics.score`) and gates compare like with like."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from components.data import prepared

Predictor = Callable[[np.ndarray], np.ndarray]
TENSORRT_MAX_BATCH = 256


def torch_predictor(model: torch.nn.Module, batch_size: int = 256) -> Predictor:
    model.eval()

    @torch.no_grad()
    def predict(images: np.ndarray) -> np.ndarray:
        batches = prepared.chunks(len(images), batch_size)
        out = [torch.softmax(model(prepared.batch(images, part)), 1) for part in batches]
        return torch.cat(out).numpy()

    return predict


def ort_session(model: Path | bytes):
    import onnxruntime as ort

    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def onnx_predictor(session, batch_size: int = 256) -> Predictor:
    """An onnxruntime.InferenceSession of a lensflow export (`images` in, `probabilities` out)."""

    def predict(images: np.ndarray) -> np.ndarray:
        batches = range(0, len(images), batch_size)
        out = [
            session.run(["probabilities"], {"images": images[i : i + batch_size]})[0]
            for i in batches
        ]
        return np.concatenate(out)

    return predict


def tensorrt_predictor(plan_path: Path) -> Predictor:
    """A Predictor (uint8 images -> probabilities) running the engine on the GPU."""
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    # every output needs an address (embeddings too, since export added it); we read one
    output_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def predict(images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), TENSORRT_MAX_BATCH):
            batch = prepared.batch(images, slice(i, i + TENSORRT_MAX_BATCH)).cuda()
            context.set_input_shape("images", tuple(batch.shape))
            outputs = {
                name: torch.empty(
                    tuple(context.get_tensor_shape(name)), dtype=torch.float32, device="cuda"
                )
                for name in output_names
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
