"""quantize, for `task: detection`: ONNX Runtime static int8 quantization of the exported
detector (classification's `quantize_onnx`: QDQ, per-channel int8 weights of the Conv layers,
calibrated on training images), shipped under classification's gate.

Both graphs are scored on the test split through the same decoder (`model.Decoder`: score
threshold, NMS): the int8 model ships only when it is at least `quantize.min_speedup` times
faster than fp32 ONNX Runtime at batch 64, loses at most `quantize.max_drop` points of COCO
mAP@[.5:.95] (x 100) on the test split, and its boxes on the golden images agree with the fp32
ones at least `serve.int8_min_agreement` of the time (`export.golden_box_agreement`, what
`lensflow serve --int8` checks before it serves the variant). A quantization that fails (an
operator the quantizer or ONNX Runtime cannot take) is reported as not shipped with its reason,
and models/model.int8.onnx is then left empty (dvc.yaml declares it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from components.core import paths, tracking
from components.core.config import Config
from components.detection import coco_map, model, train
from components.detection_release import export
from components.release import quantize
from components.scoring import speed
from components.scoring.backends import ort_session


@dataclass(frozen=True)
class QuantizeResult:
    shipped: bool
    speedup: float
    map_drop_points: float
    reasons: list[str]
    report: str


def run(cfg: Config) -> QuantizeResult:
    cfg = train.settings(cfg)
    train.use_threads(cfg)
    images, _, coco = train.split_data("test")
    calibration = _calibration_images(cfg)
    detector = train.load(cfg)
    try:
        excluded = quantize.quantize_onnx(export.ONNX, paths.ONNX_INT8, calibration, False)
        formats = {name: _measure(cfg, detector, path, images, coco) for name, path in _formats()}
    except Exception as exc:  # an operator int8 cannot take: not shipped, and why
        return _failed(cfg, f"quantization failed: {type(exc).__name__}: {exc}"[:500])
    speedup = formats["int8"]["images_per_s"] / formats["fp32"]["images_per_s"]
    drop = 100 * (formats["fp32"]["map"] - formats["int8"]["map"])
    golden = _golden_box_agreement(cfg, detector)
    reasons = quantize._gate_reasons(cfg, speedup, drop)
    reasons = [r.replace("accuracy drop", "mAP drop") for r in reasons]
    measured = f"box agreement with the golden boxes (same class, IoU >= {export.GOLDEN_BOX_IOU})"
    reasons += quantize._golden_reasons(cfg, golden, measured)
    report = {
        "task": "detection",
        "status": "shipped" if not reasons else "not_shipped",
        "reasons": reasons,
        "speedup": round(speedup, 3),
        "map_drop_points": round(drop, 3),
        "golden_box_agreement": round(golden, 3),
        "thresholds": {
            "min_speedup": cfg.quantize.min_speedup,
            "max_drop_points": cfg.quantize.max_drop,
            "int8_min_agreement": cfg.serve.int8_min_agreement,
        },
        "calibration_images": len(calibration),
        "excluded_nodes": excluded,
        "formats": formats,
    }
    return _write(cfg, report)


def _formats():
    return (("fp32", export.ONNX), ("int8", paths.ONNX_INT8))


def _measure(cfg: Config, detector, path, images: np.ndarray, coco: dict) -> dict:
    """COCO mAP on the test split through the evaluator's decoder, and speed, of one graph."""
    session = ort_session(path)
    found = train.predict(detector, images, session=session)
    metrics = coco_map.evaluate(coco, train.detections_as_coco(found, coco, images.shape[-1]))

    names = list(model.OUTPUTS[cfg.detection.architecture])  # the boxes', not `embeddings`

    def graph(batch: np.ndarray):
        return session.run(names, {"images": np.ascontiguousarray(batch)})

    return {
        "path": str(path),
        "map": metrics["map"],
        "map_50": metrics["map_50"],
        "size_bytes": path.stat().st_size,
        **speed.measure(graph, np.asarray(images)),
    }


def _golden_box_agreement(cfg: Config, detector) -> float:
    """The int8 graph's boxes on the golden images (models/golden.npz, export's) against the
    fp32 graph's recorded there, decoded by the evaluator's decoder."""
    decode = model.Decoder(detector, cfg.detection.image_size)
    with np.load(paths.GOLDEN) as saved:
        golden = dict(saved)
    checked = export.golden_box_agreement(ort_session(paths.ONNX_INT8), golden, decode)
    return checked["box_agreement"]


def _calibration_images(cfg: Config) -> np.ndarray:
    images, _, _ = train.split_data("train")
    order = np.random.default_rng(cfg.seed).permutation(len(images))
    return np.asarray(images[np.sort(order[: cfg.quantize.calibration_images])])


def _failed(cfg: Config, reason: str) -> QuantizeResult:
    with paths.atomic(paths.ONNX_INT8) as partial:
        partial.write_bytes(b"")
    report = {
        "task": "detection",
        "status": "not_shipped",
        "reasons": [reason],
        "speedup": None,
        "map_drop_points": None,
        "thresholds": {
            "min_speedup": cfg.quantize.min_speedup,
            "max_drop_points": cfg.quantize.max_drop,
        },
        "formats": {},
    }
    return _write(cfg, report)


def _write(cfg: Config, report: dict) -> QuantizeResult:
    shipped = report["status"] == "shipped"
    paths.write_json(paths.QUANTIZE_REPORT, report)
    paths.write_metrics(
        paths.QUANTIZE_METRICS,
        {
            "int8_shipped": shipped,
            "int8_speedup": report["speedup"],
            "int8_map_drop_points": report["map_drop_points"],
        },
    )
    with tracking.step_run(cfg, "quantize"):
        import mlflow

        metrics = {"quantize/shipped": float(shipped)}
        if report["speedup"] is not None:
            metrics |= {
                "quantize/speedup": report["speedup"],
                "quantize/map_drop_points": report["map_drop_points"],
                "quantize/int8_map": report["formats"]["int8"]["map"],
            }
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(paths.QUANTIZE_REPORT))
    return QuantizeResult(
        shipped,
        report["speedup"] or 0.0,
        report["map_drop_points"] or 0.0,
        report["reasons"],
        str(paths.QUANTIZE_REPORT),
    )


def summary(result: QuantizeResult) -> str:
    if result.shipped:
        return (
            f"quantize: int8 shipped ({result.speedup:.2f}x faster, mAP drop "
            f"{result.map_drop_points:.2f} points): {paths.ONNX_INT8}"
        )
    return f"quantize: int8 not shipped: {'; '.join(result.reasons)} ({result.report})"
