"""quantize: ONNX Runtime static quantization (QDQ, per-channel int8), shipped only if it pays.

Calibration uses training images (never the test split it is judged on). The int8 model
ships (is registered with the version, usable by serving) only when, measured here, it is at
least `quantize.min_speedup` times faster than fp32 ONNX Runtime at batch 64, loses at most
`quantize.max_drop` accuracy points on the test split, and passes the check `lensflow serve
--int8` makes before serving it (top-1 agreement with the golden classes, models/golden.npz,
at least `serve.int8_min_agreement`): a shipped int8 is never one serving refuses. Otherwise
the report says why not.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.core import paths, tracking
from components.core.config import Config
from components.data.prepared import load_meta, load_split
from components.release import tensorrt
from components.scoring import speed
from components.scoring.backends import onnx_predictor, ort_session
from components.scoring.metrics import score


@dataclass(frozen=True)
class QuantizeResult:
    shipped: bool
    speedup: float
    accuracy_drop_points: float
    reasons: list[str]
    report: str


def run(cfg: Config) -> QuantizeResult:
    classes = load_meta()["classes"]
    calibration = _calibration_images(cfg)
    excluded = quantize_onnx(paths.ONNX, paths.ONNX_INT8, calibration, cfg.quantize.exclude_head)
    test_images, test_labels = load_split("test")

    formats, predictors = {}, {}
    for name, model_path in (("fp32", paths.ONNX), ("int8", paths.ONNX_INT8)):
        predict = predictors[name] = onnx_predictor(ort_session(model_path))
        metrics, _ = score(predict, test_images, test_labels, classes)
        formats[name] = {
            "path": str(model_path),
            "accuracy": metrics["accuracy"],
            "size_bytes": model_path.stat().st_size,
            **speed.measure(predict, test_images),
        }

    speedup = formats["int8"]["images_per_s"] / formats["fp32"]["images_per_s"]
    drop = 100 * (formats["fp32"]["accuracy"] - formats["int8"]["accuracy"])
    golden = _golden_agreement(paths.GOLDEN, predictors["int8"])
    reasons = _gate_reasons(cfg, speedup, drop) + _golden_reasons(cfg, golden)
    report = {
        "status": "shipped" if not reasons else "not_shipped",
        "reasons": reasons,
        "speedup": round(speedup, 3),
        "accuracy_drop_points": round(drop, 3),
        "golden_top1_agreement": round(golden, 3),
        "thresholds": {
            "min_speedup": cfg.quantize.min_speedup,
            "max_drop_points": cfg.quantize.max_drop,
            "int8_min_agreement": cfg.serve.int8_min_agreement,
        },
        "calibration_images": len(calibration),
        "excluded_nodes": excluded,
        "formats": formats,
        "tensorrt_int8": tensorrt.build_and_score(
            paths.ONNX_INT8, paths.PLAN_INT8, "int8", test_images, test_labels, classes
        ),
    }
    paths.write_json(paths.QUANTIZE_REPORT, report)
    paths.write_metrics(
        paths.QUANTIZE_METRICS,
        {
            "int8_shipped": not reasons,
            "int8_speedup": report["speedup"],
            "int8_accuracy_drop_points": report["accuracy_drop_points"],
        },
    )

    with tracking.step_run(cfg, "quantize"):
        import mlflow

        mlflow.log_metrics(
            {
                "quantize/speedup": speedup,
                "quantize/accuracy_drop_points": drop,
                "quantize/int8_accuracy": formats["int8"]["accuracy"],
                "quantize/shipped": float(not reasons),
            }
        )
        mlflow.log_artifact(str(paths.QUANTIZE_REPORT))
    return QuantizeResult(not reasons, speedup, drop, reasons, str(paths.QUANTIZE_REPORT))


def int8_shipped() -> bool:
    if not paths.QUANTIZE_REPORT.exists():
        return False
    return json.loads(paths.QUANTIZE_REPORT.read_text())["status"] == "shipped"


def quantize_onnx(source: Path, target: Path, calibration: np.ndarray, exclude_head: bool):
    """Static QDQ quantization, per-channel int8 weights, uint8 activations. Returns the
    names of nodes left in float (the classifier head, when asked)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Batches(CalibrationDataReader):
        def __init__(self):
            self._batches = iter(calibration[i : i + 32] for i in range(0, len(calibration), 32))

        def get_next(self):
            batch = next(self._batches, None)
            return None if batch is None else {"images": batch}

    excluded = _head_nodes(source) if exclude_head else []
    with tempfile.TemporaryDirectory() as tmp, paths.atomic(target) as partial:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(partial),
            Batches(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["Conv", "Gemm", "MatMul"],
            nodes_to_exclude=excluded,
        )
    return excluded


def _calibration_images(cfg: Config) -> np.ndarray:
    images, _ = load_split("train")
    order = np.random.default_rng(cfg.seed).permutation(len(images))
    return images[order[: cfg.quantize.calibration_images]]


def _head_nodes(model_path: Path) -> list[str]:
    """The last Gemm/MatMul: quantizing the classifier head costs the most accuracy."""
    import onnx

    graph = onnx.load(model_path).graph
    heads = [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")]
    return heads[-1:]


def _golden_agreement(golden: Path, predict_int8) -> float:
    """How often the int8 model's top-1 class on the golden inputs is the golden one: what
    serving checks (serving/model.py) before it serves an int8 variant."""
    with np.load(golden) as saved:
        images, expected = saved["images"], saved["probabilities"]
    actual = predict_int8(images)
    return float((actual.argmax(1) == expected.argmax(1)).mean()) if len(images) else 1.0


def _gate_reasons(cfg: Config, speedup: float, drop: float) -> list[str]:
    """The speed and accuracy gates (a detector's quantize shares them, drop in mAP points)."""
    reasons = []
    if speedup < cfg.quantize.min_speedup:
        reasons.append(f"speedup {speedup:.2f}x < quantize.min_speedup {cfg.quantize.min_speedup}")
    if drop > cfg.quantize.max_drop:
        reasons.append(
            f"accuracy drop {drop:.2f} points > quantize.max_drop {cfg.quantize.max_drop}"
        )
    return reasons


def _golden_reasons(
    cfg: Config, agreement: float, measured: str = "top-1 agreement with the golden classes"
) -> list[str]:
    """The golden check serving makes of an int8 variant (a detector's quantize shares it,
    with its box agreement)."""
    if agreement >= cfg.serve.int8_min_agreement:
        return []
    return [
        f"{measured} {agreement:.3f} < serve.int8_min_agreement "
        f"{cfg.serve.int8_min_agreement:g} (lensflow serve --int8 would refuse it)"
    ]
