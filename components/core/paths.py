"""Where the pipeline reads and writes, relative to the project directory (the cwd).

dvc.yaml names the same paths; keep the two in step.
"""

import csv
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RAW = Path("data/raw")
BUILTIN = ("digits", "shapes", "detection_shapes")  # datasets lensflow writes (lensflow data)
PREPARED = Path("data/prepared")
MANIFEST = PREPARED / "manifest.parquet"
META = PREPARED / "meta.json"
MODELS = Path("models")
CHECKPOINT = MODELS / "checkpoint.pt"
LAST_CHECKPOINT = MODELS / "last.pt"  # every epoch, for --resume
ONNX = MODELS / "model.onnx"
ONNX_INT8 = MODELS / "model.int8.onnx"
GOLDEN = MODELS / "golden.npz"  # a few test images + their ONNX probabilities (serving checks)
GOLDEN_ARTIFACT = "golden/golden.npz"  # where register logs it in the version's run
PLAN_FP16 = MODELS / "model.fp16.plan"
PLAN_INT8 = MODELS / "model.int8.plan"
PROFILE = MODELS / "profile.npz"  # the reference profile continuous validation compares with
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
PROMOTION_REPORT = REPORTS / "promotion.json"  # promote: the gates and the decision
MONITORING_REPORT = REPORTS / "monitoring.json"  # lensflow monitor
MONITORING_VALIDATION = REPORTS / "monitoring_validation.json"  # the batch's data gate
MONITORING_IMAGES = REPORTS / "monitoring_images.csv"  # lensflow monitor: one row per image
LABELS_REPORT = REPORTS / "labels.json"  # lensflow labels: noise rates, gate
LABEL_ISSUES = REPORTS / "label_issues.csv"  # lensflow labels: the suspects, worst first
LABEL_SUSPECTS_PLOT = PLOTS / "label_suspects.png"
REVIEW = Path("review")  # lensflow review export: the Label Studio import file, the queue
# Beside the class folders, versioned with them: the relabels prepare applies (path,label),
# and lensflow ingest's record of every change (who, when). Prepare reads no image from them.
OVERRIDES = "labels.csv"
INGEST_AUDIT = "ingest_audit.csv"
# The few numbers `dvc exp show` and `dvc metrics diff` compare: small files git keeps
METRICS = Path("metrics")
TRAINING_METRICS = METRICS / "training.json"
EVALUATION_METRICS = METRICS / "evaluation.json"
EXPORT_METRICS = METRICS / "export.json"
QUANTIZE_METRICS = METRICS / "quantize.json"


def shard_images(split: str) -> Path:
    """uint8 images [N, C, S, S] of one split, a .npy file read memory-mapped."""
    return PREPARED / f"{split}-images.npy"


def shard_labels(split: str) -> Path:
    return PREPARED / f"{split}-labels.npy"


@contextmanager
def atomic(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write to, renamed to `path` when the block succeeds:
    a reader (or the next stage after a kill) sees the old file or the whole new one."""
    partial = path.with_name(f"{path.stem}.partial{path.suffix}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """`path.write_text(text)`, atomically (see `atomic`), making the folder when needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic(path) as partial:
        partial.write_text(text)


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2))


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """`rows` as CSV with a header of `columns`, atomically, making the folder when needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic(path) as partial, partial.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_metrics(path: Path, values: dict) -> None:
    """A small metrics file for `dvc exp show` / `dvc metrics diff` (git keeps it)."""
    write_text(path, json.dumps(values, indent=2) + "\n")


def overrides_file(root: Path) -> Path:
    """<root>/labels.csv: the relabels of a dataset, versioned with it (`dvc add <root>`)."""
    return root / OVERRIDES


def audit_file(root: Path) -> Path:
    """<root>/ingest_audit.csv: every change lensflow ingest made to the dataset."""
    return root / INGEST_AUDIT


def source_dir(cfg) -> Path:
    """The raw ImageFolder: data/raw/<name> for a built-in dataset, else data.source itself."""
    if cfg.data.source in BUILTIN:
        return RAW / cfg.data.source
    return Path(cfg.data.source).expanduser()
