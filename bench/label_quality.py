"""Label-error detection (`lensflow labels`) against known wrong labels, and what fixing them
is worth.

Digits (scikit-learn's 1,797 real handwritten digits, default params): 5 % of the training
split's images are filed under another class, chosen at random (seeded), in a copy of the
data. `lensflow labels` (K = 3 folds, the default recipe) ranks the suspects; the top N, N
being cleanlab's own count, are scored against the flipped set (precision, recall). Then the
model is trained on the noisy labels and, after ingesting every suggestion as a relabel
(`lensflow ingest`, raw files untouched), trained again: both test accuracies (the test split
is never flipped), each the mean over `--seeds` training seeds (the same split, the same
seeds for both: a paired comparison, so one seed's luck on a few test images decides
nothing), with every seed's number and the paired differences. Time: `lensflow labels` with
K = 3 against one training run (the median of the noisy runs on digits), on digits and on
10,000 shapes (1,000 a class, 16 px RGB). Prints one JSON line, `targets_met` saying which
of the issue's targets hold.

Defaults: 20 digits trainings + one `lensflow labels`, then one 10k-shapes training + one
`lensflow labels`: about 15 minutes on 2 cores (see bench/README.md).
A smoke run (minutes, numbers meaningless): `--seeds 2 --shapes-per-class 30 --set
train.epochs=2`.

    python bench/label_quality.py [--flip 0.05] [--folds 3] [--seeds 10]
                                  [--shapes-per-class 1000] [--no-digits]
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
import yaml

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
    parser.add_argument("--seed", type=int, default=0, help="which labels are flipped")
    parser.add_argument(
        "--seeds", type=int, default=10, help="training seeds averaged, noisy and after ingest"
    )
    parser.add_argument("--shapes-per-class", type=int, default=1000, help="0: skip shapes")
    parser.add_argument("--no-digits", action="store_true", help="only the shapes timing")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a params override for every run, e.g. train.epochs=2 (smoke runs only)",
    )  # fmt: skip
    args = parser.parse_args()
    result = {"bench": "label_quality", "flip": args.flip, "folds": args.folds}
    result.update(seeds=args.seeds, overrides=args.set)
    with tempfile.TemporaryDirectory(prefix="lensflow-label-quality-") as tmp:
        os.chdir(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        if not args.no_digits:
            result["digits"] = digits(args)
        if args.shapes_per_class:
            result["shapes"] = timing(
                {"data": {"source": "shapes", "shapes_per_class": args.shapes_per_class},
                 "prepare": {"channels": 3}}, args.folds, args.set)  # fmt: skip
    print(json.dumps(result))


def _cfg(values: dict, folds: int = 3, overrides: list[str] = ()):
    cfg = config.from_dict({**QUIET, **values, "labels": {"folds": folds}})
    key_values = (item.partition("=") for item in overrides)
    return config.with_values(cfg, {key: yaml.safe_load(value) for key, _, value in key_values})


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


def _trained_seeds(cfg, n: int) -> tuple[list[float], list[float]]:
    """Seconds and test accuracies of `n` training runs on the data prepared now, seeds
    cfg.seed, cfg.seed + 1, …: the split stays (prepare made it), the initial weights, batch
    order and augmentations change."""
    runs = [_trained(cfg.model_copy(update={"seed": cfg.seed + i})) for i in range(n)]
    return [s for s, _ in runs], [a for _, a in runs]


def digits(args) -> dict:
    clean = Path("data/raw/digits")
    datasets.write("digits", clean)
    _prepared(_cfg({"data": {"source": str(clean)}}, overrides=args.set))
    train_paths = prepared.load_manifest(["path", "split"])
    train_paths = train_paths.loc[train_paths["split"] == "train", "path"].astype(str).tolist()
    noisy = Path("data/raw/noisy")
    shutil.copytree(clean, noisy)
    flipped = _flip(noisy, train_paths, args.flip, np.random.default_rng(args.seed))

    cfg = _cfg({"data": {"source": str(noisy)}}, args.folds, args.set)
    _prepared(cfg)
    train_times, noisy = _trained_seeds(cfg, args.seeds)
    train_s = float(np.median(train_times))
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
    _, fixed = _trained_seeds(cfg, args.seeds)
    differences = np.subtract(fixed, noisy)
    right = sum(flipped.get(row["path"]) == row["suggested"] for row in issues)
    return {
        "images": len(train_paths),
        "flipped": len(flipped),
        "suspects": found.n_issues,
        "precision": round(hits / max(1, len(suspects)), 4),
        "recall": round(hits / max(1, len(flipped)), 4),
        "suggested_true_class": right,
        "estimated_noise_rate": found.noise_rate,
        "test_images": int((prepared.load_manifest(["split"])["split"] == "test").sum()),
        "test_accuracy_noisy": round(float(np.mean(noisy)), 4),
        "test_accuracy_after_ingest": round(float(np.mean(fixed)), 4),
        "test_accuracy_noisy_per_seed": [round(a, 4) for a in noisy],
        "test_accuracy_after_ingest_per_seed": [round(a, 4) for a in fixed],
        "paired_difference_mean": round(float(differences.mean()), 4),
        "paired_difference_sd": round(float(np.std(differences, ddof=min(1, len(noisy) - 1))), 4),
        "train_s": round(train_s, 1),
        "labels_s": round(labels_s, 1),
        "labels_over_train": round(labels_s / train_s, 2),
        "targets_met": {
            "precision >= 0.8": hits / max(1, len(suspects)) >= 0.8,
            "recall >= 0.7": hits / max(1, len(flipped)) >= 0.7,
            "accuracy after ingest >= noisy (means)": bool(np.mean(fixed) >= np.mean(noisy)),
            "labels <= 3x train": labels_s <= 3 * train_s,
        },
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


def timing(values: dict, folds: int, overrides: list[str]) -> dict:
    shutil.rmtree(paths.PREPARED, ignore_errors=True)
    cfg = _cfg(values, folds, overrides)
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
        "targets_met": {"labels <= 3x train": labels_s <= 3 * train_s},
    }


if __name__ == "__main__":
    main()
