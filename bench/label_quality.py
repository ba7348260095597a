"""Label-error detection (`lensflow labels`) against known wrong labels, and what fixing them
is worth.

Digits (scikit-learn's 1,797 real handwritten digits, default params): 5 % of the training
split's images are filed under another class, chosen at random (seeded), in a copy of the
data. `lensflow labels` (K = 3 folds, the default recipe) ranks the suspects; the top N, N
being cleanlab's own count, are scored against the flipped set (precision, recall). Then the
model is trained on the noisy labels and, after ingesting every suggestion as a relabel
(`lensflow ingest`, raw files untouched), trained again: both test accuracies (the test split
is never flipped). Time: `lensflow labels` with K = 3 against one training run, on digits and
on 10,000 shapes (1,000 a class, 16 px RGB). Prints one JSON line.

    python bench/label_quality.py [--flip 0.05] [--folds 3] [--shapes-per-class 1000]
                                  [--no-digits]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from components.core import config, paths  # noqa: E402
from components.data import datasets, prepare, prepared, validate  # noqa: E402
from components.evaluation import evaluate  # noqa: E402
from components.labelling import ingest, labels  # noqa: E402
from components.training import train  # noqa: E402

QUIET = {"train": {"progress_bar": False}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flip", type=float, default=0.05)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shapes-per-class", type=int, default=1000, help="0: skip shapes")
    parser.add_argument("--no-digits", action="store_true", help="only the shapes timing")
    args = parser.parse_args()
    result = {"bench": "label_quality", "flip": args.flip, "folds": args.folds}
    with tempfile.TemporaryDirectory(prefix="lensflow-label-quality-") as tmp:
        os.chdir(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        if not args.no_digits:
            result["digits"] = digits(args)
        if args.shapes_per_class:
            result["shapes"] = timing(
                {"data": {"source": "shapes", "shapes_per_class": args.shapes_per_class},
                 "prepare": {"channels": 3}}, args.folds)  # fmt: skip
    print(json.dumps(result))


def _cfg(values: dict, folds: int = 3):
    return config.from_dict({**QUIET, **values, "labels": {"folds": folds}})


def _prepared(cfg) -> None:
    datasets.run(cfg)
    prepare.run(cfg)
    assert validate.run(cfg).success, "the data failed validation"


def _trained(cfg) -> tuple[float, float]:
    """(seconds of one training run, its test accuracy)."""
    start = time.perf_counter()
    train.run(cfg)
    seconds = time.perf_counter() - start
    return seconds, evaluate.run(cfg).accuracy


def digits(args) -> dict:
    clean = Path("data/raw/digits")
    datasets.write("digits", clean)
    _prepared(_cfg({"data": {"source": str(clean)}}))
    train_paths = prepared.load_manifest(["path", "split"])
    train_paths = train_paths.loc[train_paths["split"] == "train", "path"].astype(str).tolist()
    noisy = Path("data/raw/noisy")
    shutil.copytree(clean, noisy)
    flipped = _flip(noisy, train_paths, args.flip, np.random.default_rng(args.seed))

    cfg = _cfg({"data": {"source": str(noisy)}}, args.folds)
    _prepared(cfg)
    train_s, noisy_accuracy = _trained(cfg)
    start = time.perf_counter()
    found = labels.run(cfg)
    labels_s = time.perf_counter() - start
    with paths.LABEL_ISSUES.open() as f:
        issues = list(csv.DictReader(f))
    suspects = {row["path"] for row in issues[: found.n_issues]}
    hits = len(suspects & set(flipped))

    answers = Path("answers.csv")
    with answers.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "kind", "given", "label", "who", "when"])
        for row in issues:
            writer.writerow([row["path"], "relabel", row["given"], row["suggested"], "bench", ""])
    ingest.run(cfg, answers)
    _prepared(cfg)
    _, fixed_accuracy = _trained(cfg)
    right = sum(flipped.get(row["path"]) == row["suggested"] for row in issues)
    return {
        "images": len(train_paths),
        "flipped": len(flipped),
        "suspects": found.n_issues,
        "precision": round(hits / max(1, len(suspects)), 4),
        "recall": round(hits / max(1, len(flipped)), 4),
        "suggested_true_class": right,
        "estimated_noise_rate": found.noise_rate,
        "test_accuracy_noisy": round(noisy_accuracy, 4),
        "test_accuracy_after_ingest": round(fixed_accuracy, 4),
        "train_s": round(train_s, 1),
        "labels_s": round(labels_s, 1),
        "labels_over_train": round(labels_s / train_s, 2),
    }


def _flip(root: Path, train_paths: list[str], share: float, rng) -> dict[str, str]:
    """Move a random `share` of the training images into another class folder (of this copy);
    returns {new path: true class}."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    chosen = rng.choice(len(train_paths), size=round(share * len(train_paths)), replace=False)
    flipped = {}
    for i in sorted(chosen):
        true, name = train_paths[i].split("/")
        wrong = rng.choice([c for c in classes if c != true])
        os.replace(root / true / name, root / wrong / name)
        flipped[f"{wrong}/{name}"] = true
    return flipped


def timing(values: dict, folds: int) -> dict:
    shutil.rmtree(paths.PREPARED, ignore_errors=True)
    cfg = _cfg(values, folds)
    _prepared(cfg)
    train_s, _ = _trained(cfg)
    start = time.perf_counter()
    found = labels.run(cfg)
    labels_s = time.perf_counter() - start
    return {
        "images": found.n_images,
        "train_s": round(train_s, 1),
        "labels_s": round(labels_s, 1),
        "labels_over_train": round(labels_s / train_s, 2),
        "estimated_noise_rate": found.noise_rate,
    }


if __name__ == "__main__":
    main()
