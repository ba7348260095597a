"""Every format of the current model side by side, on the same test split, in one run.

PyTorch eager, ONNX Runtime fp32, ONNX Runtime int8 and TensorRT (fp16/int8, when the library
and a GPU are present): accuracy, file size, p50/p95 latency at batch 1, images/s at batch 64.
Needs the outputs of a pipeline run in this project (`make demo`). Prints one JSON line,
writes reports/formats.md and logs both to MLflow (run `bench-formats`).
"""

from __future__ import annotations

import json
import sys

from components.core import config, paths, tracking
from components.data.prepared import load_split
from components.release import tensorrt
from components.scoring import backends, speed
from components.scoring.metrics import score
from components.training import models


def main() -> int:
    needed = [paths.CHECKPOINT, paths.ONNX, paths.ONNX_INT8]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        print(f"formats: missing {', '.join(missing)}: run `make demo` first", file=sys.stderr)
        return 2
    cfg = config.load("params.yaml")
    model, spec = models.load_checkpoint(paths.CHECKPOINT)
    images, labels = load_split("test")
    formats = {
        "pytorch_eager": (backends.torch_predictor(model), paths.CHECKPOINT),
        "onnxruntime_fp32": (
            backends.onnx_predictor(backends.ort_session(paths.ONNX)),
            paths.ONNX,
        ),
        "onnxruntime_int8": (
            backends.onnx_predictor(backends.ort_session(paths.ONNX_INT8)),
            paths.ONNX_INT8,
        ),
    }
    skipped = {}
    reason = tensorrt.unavailable_reason()
    for precision, source, plan in (
        ("fp16", paths.ONNX, paths.PLAN_FP16),
        ("int8", paths.ONNX_INT8, paths.PLAN_INT8),
    ):
        if reason:
            skipped[f"tensorrt_{precision}"] = reason
            continue
        tensorrt.build_engine(source, plan, precision, images.shape[1:])
        formats[f"tensorrt_{precision}"] = (backends.tensorrt_predictor(plan), plan)

    results = {}
    for name, (predict, file) in formats.items():
        metrics, _ = score(predict, images, labels, spec["classes"])
        results[name] = {
            "accuracy": round(metrics["accuracy"], 4),
            "size_bytes": file.stat().st_size,
            **speed.measure(predict, images),
        }
    eager = results["pytorch_eager"]["images_per_s"]
    fp32 = results["onnxruntime_fp32"]["images_per_s"]
    summary = {
        "bench": "formats",
        "dataset": cfg.data.source,
        "n_test_images": int(len(labels)),
        "formats": results,
        "skipped": skipped,
        "onnxruntime_fp32_vs_eager": round(fp32 / eager, 2),
        "int8_vs_fp32": round(results["onnxruntime_int8"]["images_per_s"] / fp32, 2),
    }
    paths.REPORTS.mkdir(parents=True, exist_ok=True)
    (paths.REPORTS / "formats.md").write_text(markdown(results, skipped))
    _log_to_mlflow(cfg, summary)
    print(json.dumps(summary))
    return 0


def markdown(results: dict, skipped: dict) -> str:
    lines = [
        "| format | accuracy | size (KB) | p50 ms (b=1) | p95 ms (b=1) | images/s (b=64) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['accuracy']:.4f} | {r['size_bytes'] / 1024:.0f} | "
            f"{r['latency_ms_p50']:.3f} | {r['latency_ms_p95']:.3f} | "
            f"{r['images_per_s']:.0f} |"
        )
    lines += [f"| {name} | skipped: {why} | | | | |" for name, why in skipped.items()]
    return "\n".join(lines) + "\n"


def _log_to_mlflow(cfg, summary: dict) -> None:
    import mlflow

    with tracking.step_run(cfg, "bench-formats"):
        for name, r in summary["formats"].items():
            mlflow.log_metrics({f"formats/{name}/{k}": v for k, v in r.items()})
        mlflow.log_dict(summary, "formats.json")
        mlflow.log_artifact(str(paths.REPORTS / "formats.md"))


if __name__ == "__main__":
    sys.exit(main())
