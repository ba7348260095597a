"""compare, for `task: detection`: the detector from scratch against the detector whose backbone
starts from a classifier lensflow trained (`detection.pretrained`), on the same data.

Each arm (`compare.scratch`, `compare.transfer`: detector, train and augment keys; see
`components.experiments.compare_arms`) trains with detection's own loop (`train.fit`) on every
fraction of the training split in `compare.fractions`: a seeded subset of the images (one
permutation for every fraction, so a smaller fraction's images are inside a larger one's; at
least two, a batch norm's minimum). Both arms are scored on the whole test split by the
evaluator's COCO mAP (`coco_map`); each regime compares them by the paired bootstrap over test
images that promotion runs (`promote.bootstrap_gate`: the transfer arm's mAP gain is
significant at p < 0.05 over `promote.bootstrap_samples` resamples).

Same MLflow layout and files as classification's compare (components/experiments/compare.py):
a child run per arm and fraction, tagged `compare.*`; reports/compare.json keyed on mAP,
plots/compare.png (training loss per epoch and against time), models/compare/<arm>@<pct>.pt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from components.core import config, paths, plots, tracking
from components.core.config import Config
from components.data.prepared import load_meta
from components.detection import coco_map, train
from components.detection_release import promote
from components.experiments.compare import SIGNIFICANCE, CompareResult, regime
from components.experiments.compare_arms import DETECTION_ARM_SECTIONS


@dataclass(frozen=True)
class ArmRun:
    row: dict  # one entry of the report's "arms"
    history: list[dict]  # train.fit's per-epoch rows
    matches: dict  # promote.matches of its test detections: what the bootstrap resamples


def subset(n_images: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded `fraction` of `n_images` (at least 2); one permutation for
    every fraction, so smaller subsets are nested in larger ones."""
    order = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed)).numpy()
    return np.sort(order[: min(n_images, max(2, round(fraction * n_images)))])


def run(arm: str, cfg: Config, fraction: float) -> ArmRun:
    """One arm on one fraction of the training split, scored on the whole test split, in an
    MLflow child run of its own."""
    import mlflow

    name = f"{arm}@{regime(fraction)}"
    train.use_threads(cfg)
    n_classes = len(load_meta()["classes"])
    images, targets, _ = train.split_data("train")
    index = subset(len(images), fraction, cfg.seed)
    images, targets = np.array(images[index]), [targets[i] for i in index]
    test_images, _, coco = train.split_data("test")
    with tracking.step_run(cfg, name) as child:
        mlflow.set_tags(_tags(arm, cfg, fraction, len(index)))
        mlflow.log_params(_params(cfg))
        start = time.perf_counter()
        fitted = train.fit(cfg, images, targets, n_classes)
        wall = time.perf_counter() - start
        found = train.predict(fitted.detector, test_images)
        detections = train.detections_as_coco(found, coco, test_images.shape[-1])
        metrics = coco_map.evaluate(coco, detections)
        checkpoint = paths.COMPARE_MODELS / f"{name}.pt"
        train.save(fitted, checkpoint)
        row = {
            "name": name,
            "arm": arm,
            "fraction": fraction,
            "backbone": fitted.backbone["arch"] if fitted.backbone else "detector",
            "pretrained": cfg.detection.pretrained,
            "pretrained_run_id": fitted.backbone["run_id"] if fitted.backbone else None,
            "strategy": cfg.train.strategy if fitted.backbone else None,
            "train_images": len(index),
            "epochs_run": len(fitted.history),
            "train_seconds": round(fitted.seconds, 2),
            "wall_seconds": round(wall, 2),
            "test_map": metrics["map"],
            "test_map_50": metrics["map_50"],
            "checkpoint": str(checkpoint),
            "mlflow_run_id": child.info.run_id,
        }
        mlflow.log_metrics(
            {"test/map": metrics["map"], "test/map_50": metrics["map_50"],
             "train/loop_seconds": fitted.seconds, "compare/train_images": len(index)}
        )  # fmt: skip
    print(
        f"{name}: test mAP {metrics['map']:.4f} (mAP@0.5 {metrics['map_50']:.4f}) after "
        f"{len(fitted.history)} epochs ({fitted.seconds:.1f} s training) on {len(index)} images"
    )
    return ArmRun(row, fitted.history, promote.matches(coco, detections))


def _params(cfg: Config) -> dict:
    """The arm's detector, train and augment keys: what the UI's compare view tells apart."""
    raw = cfg.as_dict()
    return {f"{s}.{k}": v for s in DETECTION_ARM_SECTIONS for k, v in raw[s].items()}


def _tags(arm: str, cfg: Config, fraction: float, n_images: int) -> dict[str, str]:
    return {
        "compare.arm": arm,
        "compare.task": "detection",
        "compare.fraction": str(fraction),
        "compare.regime": regime(fraction),
        "compare.pretrained": cfg.detection.pretrained or "none",
        "compare.train_images": str(n_images),
    }


def write_report(cfg: Config, runs: list[ArmRun], run_id: str) -> CompareResult:
    """reports/compare.json, plots/compare.png and the verdicts; logged to the active MLflow
    run (the compare flow's parent run `run_id`)."""
    meta = load_meta()
    by_key = {(r.row["arm"], r.row["fraction"]): r for r in runs}
    n_test = meta["n_per_split"]["test"]
    regimes = [
        _regime(cfg, by_key["scratch", f], by_key["transfer", f], n_test)
        for f in cfg.compare.fractions
    ]
    report = {
        "task": "detection",
        "dataset": meta["source"],
        "classes": len(meta["classes"]),
        "val_images": meta["n_per_split"]["val"],
        "test_images": n_test,
        "seed": cfg.seed,
        "mlflow_run_id": run_id,
        "arms": [r.row for r in runs],
        "regimes": regimes,
    }
    table = markdown_table(report)
    _write_outputs(report, table, runs)
    return CompareResult(str(paths.COMPARE_REPORT), str(paths.COMPARE_PLOT), table, regimes, run_id)


def _regime(cfg: Config, scratch: ArmRun, transfer: ArmRun, n_test: int) -> dict:
    s, t = scratch.row, transfer.row
    significance = config.with_values(cfg, {"promote.bootstrap_p": SIGNIFICANCE})
    bootstrap = promote.bootstrap_gate(significance, transfer.matches, scratch.matches, n_test)
    result = {
        "fraction": s["fraction"],
        "regime": regime(s["fraction"]),
        "train_images": s["train_images"],
        "scratch_map": s["test_map"],
        "transfer_map": t["test_map"],
        "map_gain": round(t["test_map"] - s["test_map"], 6),
        "map_50_gain": round(t["test_map_50"] - s["test_map_50"], 6),
        "bootstrap_p": bootstrap["value"],
        "bootstrap_samples": bootstrap["samples"],
        "map_gain_ci95": bootstrap["ci95"],
        "time_ratio": round(t["train_seconds"] / max(s["train_seconds"], 1e-9), 2),
    }
    result["transfer_beats_scratch"] = bool(
        result["map_gain"] > 0 and result["bootstrap_p"] < SIGNIFICANCE
    )
    result["verdict"] = verdict(result, s["train_seconds"], t["train_seconds"])
    return result


def verdict(r: dict, scratch_seconds: float, transfer_seconds: float) -> str:
    gain, p = r["map_gain"], r["bootstrap_p"]
    if r["transfer_beats_scratch"]:
        outcome = "transfer beats scratch"
    elif gain > 0:
        outcome = "transfer is ahead, but not significantly"
    elif gain == 0:
        outcome = "transfer ties with scratch"
    else:
        outcome = "transfer does not beat scratch"
    return (
        f"{r['regime']} ({r['train_images']} training images): {outcome}, test mAP "
        f"{r['transfer_map']:.4f} vs {r['scratch_map']:.4f} ({gain:+.4f}, paired bootstrap "
        f"p = {p:.2g}), in {transfer_seconds:.0f} s vs {scratch_seconds:.0f} s of training "
        f"({r['time_ratio']:g}x)"
    )


def markdown_table(report: dict) -> str:
    header = (
        "| run | train images | backbone | pretrained | strategy | epochs | train s "
        "| test mAP | mAP@0.5 |"
    )
    lines = [header, "|" + "---|" * 9]
    for a in report["arms"]:
        lines.append(
            f"| {a['name']} | {a['train_images']} | {a['backbone']} | {a['pretrained'] or '-'} "
            f"| {a['strategy'] or '-'} | {a['epochs_run']} | {a['train_seconds']:.1f} "
            f"| {a['test_map']:.4f} | {a['test_map_50']:.4f} |"
        )
    return "\n".join(lines)


def _write_outputs(report: dict, table: str, runs: list[ArmRun]) -> None:
    import mlflow

    paths.write_json(paths.COMPARE_REPORT, report)
    panels: dict[str, dict[str, list[dict]]] = {}
    for r in runs:
        panels.setdefault(regime(r.row["fraction"]), {})[r.row["arm"]] = r.history
    plots.comparison_curves(panels, paths.COMPARE_PLOT, ("train_loss", "training loss"))
    for r in report["regimes"]:
        key = f"{r['fraction'] * 100:g}pct"
        mlflow.log_metrics(
            {f"compare/map_gain_{key}": r["map_gain"],
             f"compare/map_50_gain_{key}": r["map_50_gain"],
             f"compare/time_ratio_{key}": r["time_ratio"]}
        )  # fmt: skip
    verdicts = "\n".join(f"- {r['verdict']}" for r in report["regimes"])
    mlflow.log_text(f"{table}\n\n{verdicts}\n", "compare.md")
    mlflow.log_artifact(str(paths.COMPARE_REPORT))
    mlflow.log_artifact(str(paths.COMPARE_PLOT), "plots")
