"""labels: find the images whose label is probably wrong (`lensflow labels`).

Out-of-sample probabilities for every image of `labels.splits` (K-fold cross-fitting with the
training recipe, `crossfit`), then cleanlab's confident learning (`find_label_issues`) ranks
the suspects and estimates how often each class's label is wrong. Writes
reports/label_issues.csv (worst first), reports/labels.json, plots/label_suspects.png and logs
them to MLflow; with `labels.max_noise_rate` set, a noisier dataset fails the gate.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numpy as np

from components.core import config, paths, plots, tracking
from components.core.config import Config
from components.core.errors import GateFailed, UserError
from components.data import prepared
from components.data.validate import require_passed
from components.labelling import crossfit
from components.training import models, tuned

METRIC_UNSAFE = re.compile(r"[^\w\-. /]")  # what an MLflow metric name may not hold
ISSUE_COLUMNS = ("path", "split", "given", "suggested", "score", "suggested_probability")


@dataclass(frozen=True)
class LabelsResult:
    n_images: int
    n_issues: int
    noise_rate: float
    noise_rate_per_class: dict[str, float]
    gate_passed: bool
    seconds: float
    issues: str


def run(cfg: Config) -> LabelsResult:
    require_passed()
    start = time.perf_counter()
    if cfg.train.use_tuned:  # the recipe train would use
        cfg = tuned.apply_tuned(cfg)
    if cfg.labels.epochs is not None:
        cfg = config.with_values(cfg, {"train.epochs": cfg.labels.epochs})
    meta = prepared.load_meta()
    classes = meta["classes"]
    pool, labels, where = _pool(cfg.labels.splits)
    _check_enough(labels, classes, cfg.labels.folds)
    spec = models.model_spec(cfg.model, meta)
    with tracking.step_run(cfg, "labels"):
        probs = crossfit.probabilities(cfg, pool, labels, spec, cfg.labels.folds)
        found = confident_learning(labels, probs, classes)
        issues = _issue_rows(found["ranked"], where, labels, probs, found["scores"], classes)
        _write_issues(issues)
        grid = _suspects_grid(pool, found["ranked"][: cfg.labels.grid], issues)
        result = LabelsResult(
            n_images=len(labels),
            n_issues=len(issues),
            noise_rate=found["noise_rate"],
            noise_rate_per_class=found["per_class"],
            gate_passed=_passes(cfg, found["noise_rate"]),
            seconds=round(time.perf_counter() - start, 3),
            issues=str(paths.LABEL_ISSUES),
        )
        _write_report(cfg, result)
        _log(result, grid)
    if not result.gate_passed:
        raise GateFailed(
            f"estimated label noise {result.noise_rate:.3f} is over labels.max_noise_rate "
            f"{cfg.labels.max_noise_rate}: review {paths.LABEL_ISSUES}"
        )
    return result


def summary(result: LabelsResult) -> str:
    worst = sorted(result.noise_rate_per_class.items(), key=lambda kv: -kv[1])[:3]
    noisiest = ", ".join(f"{name} {rate:.3f}" for name, rate in worst)
    return (
        f"labels: {result.n_issues} suspected label errors among {result.n_images} images "
        f"(estimated noise {result.noise_rate:.3f}; noisiest classes: {noisiest}), "
        f"{result.seconds:.1f} s: {result.issues}"
    )


def confident_learning(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """cleanlab's suspects (indices, worst first: lowest self-confidence), every image's label
    quality score, and the estimated noise rates: overall and, per given class, the share of
    its images whose true class is another (from the confident joint)."""
    from cleanlab.count import estimate_joint
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    ranked = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    joint = estimate_joint(labels, probs)  # [given, true], sums to 1
    given = joint.sum(axis=1)
    per_class = {
        name: round(float(1 - joint[i, i] / given[i]) if given[i] > 0 else 0.0, 6)
        for i, name in enumerate(classes)
    }
    return {
        "ranked": np.asarray(ranked, dtype=np.int64),
        "scores": get_label_quality_scores(labels, probs, method="self_confidence"),
        "noise_rate": round(float(1 - np.trace(joint)), 6),
        "per_class": per_class,
    }


def _pool(splits: list[str]):
    """(the splits' images as one Pool, their labels, each row's (path, split))."""
    manifest = prepared.load_manifest(["path", "split"])
    arrays, labels, where = [], [], []
    for split in splits:
        images, split_labels = prepared.load_split(split)
        split_paths = manifest.loc[manifest["split"] == split, "path"].astype(str).tolist()
        if len(split_paths) != len(images):
            raise UserError(f"{paths.MANIFEST} does not match the {split} shard: run prepare")
        arrays.append(images)
        labels.append(split_labels)
        where += [(path, split) for path in split_paths]
    return crossfit.Pool(arrays), np.concatenate(labels), where


def _check_enough(labels: np.ndarray, classes: list[str], k: int) -> None:
    counts = np.bincount(labels, minlength=len(classes))
    if len(labels) < 2 * k or (counts > 0).sum() < 2:
        raise UserError(
            f"labels: {len(labels)} images in {(counts > 0).sum()} classes: cross-fitting "
            f"{k} folds needs at least {2 * k} images of at least 2 classes"
        )


def _issue_rows(ranked, where, labels, probs, scores, classes) -> list[dict]:
    suggested = probs.argmax(1)
    return [
        {
            "path": where[i][0],
            "split": where[i][1],
            "given": classes[labels[i]],
            "suggested": classes[suggested[i]],
            "score": round(float(scores[i]), 6),
            "suggested_probability": round(float(probs[i, suggested[i]]), 6),
        }
        for i in ranked
    ]


def _write_issues(issues: list[dict]) -> None:
    paths.write_csv(paths.LABEL_ISSUES, issues, ISSUE_COLUMNS)


def _suspects_grid(pool, top: np.ndarray, issues: list[dict]):
    titles = [f"{row['given']} -> {row['suggested']}?" for row in issues[: len(top)]]
    images = pool.take(top) if len(top) else np.zeros((1, *pool.arrays[0].shape[1:]), np.uint8)
    return plots.image_grid(images, titles or ["no suspects"], paths.LABEL_SUSPECTS_PLOT)


def _passes(cfg: Config, noise_rate: float) -> bool:
    limit = cfg.labels.max_noise_rate
    return limit is None or noise_rate <= limit


def _write_report(cfg: Config, result: LabelsResult) -> None:
    paths.write_json(
        paths.LABELS_REPORT,
        {
            "n_images": result.n_images,
            "splits": list(cfg.labels.splits),
            "folds": cfg.labels.folds,
            "n_issues": result.n_issues,
            "noise_rate": result.noise_rate,
            "noise_rate_per_class": result.noise_rate_per_class,
            "gate": {"max_noise_rate": cfg.labels.max_noise_rate, "passed": result.gate_passed},
            "seconds": result.seconds,
            "issues": str(paths.LABEL_ISSUES),
        },
    )


def _log(result: LabelsResult, grid) -> None:
    import mlflow

    mlflow.log_metrics(
        {
            "labels/issues": result.n_issues,
            "labels/noise_rate": result.noise_rate,
            "labels/seconds": result.seconds,
        }
    )
    for name, rate in result.noise_rate_per_class.items():
        mlflow.log_metric("labels/noise_rate/" + METRIC_UNSAFE.sub("_", name), rate)
    mlflow.log_artifact(str(paths.LABEL_ISSUES), "labels")
    mlflow.log_artifact(str(paths.LABELS_REPORT), "labels")
    mlflow.log_artifact(str(grid), "labels")
