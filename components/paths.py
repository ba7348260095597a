"""Where the pipeline reads and writes, relative to the project directory (the cwd).

dvc.yaml names the same paths; keep the two in step.
"""

import json
from pathlib import Path

RAW = Path("data/raw")
PREPARED = Path("data/prepared")
MANIFEST = PREPARED / "manifest.parquet"
META = PREPARED / "meta.json"
MODELS = Path("models")
CHECKPOINT = MODELS / "checkpoint.pt"
LAST_CHECKPOINT = MODELS / "last.pt"  # every epoch, for --resume
ONNX = MODELS / "model.onnx"
ONNX_INT8 = MODELS / "model.int8.onnx"
PLAN_FP16 = MODELS / "model.fp16.plan"
PLAN_INT8 = MODELS / "model.int8.plan"
REPORTS = Path("reports")
PLOTS = Path("plots")
VALIDATION_REPORT = REPORTS / "validation.json"
TRAINING_REPORT = REPORTS / "training.json"
TRAINING_CURVE = REPORTS / "training_curve.csv"
TUNING_REPORT = REPORTS / "tuning.json"  # best params of the Optuna study
EVALUATION_REPORT = REPORTS / "evaluation.json"
COMPARE_REPORT = REPORTS / "compare.json"  # lensflow compare: scratch vs transfer
COMPARE_PLOT = PLOTS / "compare.png"
COMPARE_MODELS = MODELS / "compare"  # each arm's best weights, <arm>@<percent>.pt
PREDICTIONS = REPORTS / "predictions.csv"
EXPORT_REPORT = REPORTS / "export.json"
QUANTIZE_REPORT = REPORTS / "quantize.json"
MODEL_CARD = REPORTS / "model_card.md"
REGISTRY_REPORT = REPORTS / "registry.json"
# The few numbers `dvc exp show` and `dvc metrics diff` compare: small files git keeps
METRICS = Path("metrics")
TRAINING_METRICS = METRICS / "training.json"
EVALUATION_METRICS = METRICS / "evaluation.json"
EXPORT_METRICS = METRICS / "export.json"
QUANTIZE_METRICS = METRICS / "quantize.json"


def shard(split: str) -> Path:
    return PREPARED / f"{split}.pt"


def write_metrics(path: Path, values: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values, indent=2) + "\n")
