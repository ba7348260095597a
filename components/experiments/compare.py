"""compare: training from scratch against transfer learning, on the same data.

Two arms: `scratch` (params.yaml with random initial weights, plus `compare.scratch`) and
`transfer` (params.yaml plus `compare.transfer`, e.g. ImageNet EfficientNet-Lite0). Each trains
with the pipeline's own loop (`loop.fit`) on every fraction of the training split in
`compare.fractions`: a seeded, stratified subset that keeps every class (a smaller fraction's
images are inside a larger one's). Validation and test splits are the same for every arm, and
the pipeline's one evaluator scores each arm on the test split.

MLflow: a parent run `compare` with one child run per arm and fraction (`scratch@100%`,
`transfer@10%`, ...), tagged `compare.arm`, `compare.fraction`, `compare.regime`,
`compare.arch`, `compare.pretrained`, so the UI's compare view lines them up. Outputs:
reports/compare.json, plots/compare.png and each arm's best weights in models/compare/.
`flows/compare.py` wires it: the data steps, each arm as a task (`run`), then `write_report`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from components.core import paths, plots, tracking
from components.core.config import Config
from components.core.errors import GateFailed
from components.data import prepared
from components.experiments.compare_arms import ARM_SECTIONS
from components.scoring import backends
from components.scoring.metrics import mcnemar_p, score
from components.training import augment, loop, models

SIGNIFICANCE = 0.05  # McNemar p-value under which a difference is called significant


@dataclass(frozen=True)
class CompareResult:
    report: str
    plot: str
    table: str
    regimes: list[dict]
    mlflow_run_id: str


@dataclass(frozen=True)
class ArmRun:
    row: dict  # one entry of the report's "arms"
    history: list[dict]  # loop.fit's per-epoch rows
    correct: np.ndarray  # per test image: predicted right


def stratified_subset(labels, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded `fraction` of each class (at least one image per class).
    One permutation per class, the same for every fraction: smaller subsets are nested."""
    labels = torch.as_tensor(labels)
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in labels.unique(sorted=True):
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        chosen.append(members[: max(1, round(fraction * len(members)))])
    return torch.cat(chosen).sort().values


def regime(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def run(arm: str, cfg: Config, fraction: float) -> ArmRun:
    """One arm on one fraction of the training split: train it with the pipeline's loop,
    score it on the whole test split, in an MLflow child run of its own."""
    import mlflow

    name = f"{arm}@{regime(fraction)}"
    meta = prepared.load_meta()
    train_x, train_y = prepared.load_split("train")
    index = stratified_subset(train_y, fraction, cfg.seed).numpy()
    if len(index) < len(train_y):  # a fraction: read its images once, into memory
        train_x, train_y = train_x[index], train_y[index]
    test_x, test_y = prepared.load_split("test")
    loop.seed_everything(cfg.seed)
    spec = models.model_spec(cfg.model, meta)
    model = models.build(spec, cfg.model.pretrained)
    augmenter = augment.batch_augmenter(cfg, len(spec["classes"]), cfg.seed)
    with tracking.step_run(cfg, name) as child:
        mlflow.set_tags(_tags(arm, cfg, fraction, len(index)))
        mlflow.log_params(_params(cfg))
        start = time.perf_counter()
        best, history, seconds, diverged = loop.fit(
            model, cfg, (train_x, train_y), prepared.load_split("val"), augmenter, last_path=None
        )
        wall = time.perf_counter() - start
        if best["state_dict"] is None:
            raise GateFailed(f"{name}: {diverged}; no epoch finished")
        model.load_state_dict(best["state_dict"])
        model.cpu()
        metrics, probabilities = score(
            backends.torch_predictor(model), test_x, test_y, spec["classes"]
        )
        checkpoint = paths.COMPARE_MODELS / f"{name}.pt"
        models.save_checkpoint(model, spec, checkpoint)
        row = {
            "name": name,
            "arm": arm,
            "fraction": fraction,
            "arch": cfg.model.arch,
            "pretrained": cfg.model.pretrained,
            "input_size": spec["input_size"],
            "strategy": cfg.train.strategy,
            "train_images": len(index),
            "epochs_run": len(history),
            "best_epoch": best["epoch"],
            "best_val_accuracy": best["val_accuracy"],
            "train_seconds": round(seconds, 2),
            "wall_seconds": round(wall, 2),
            "test_accuracy": metrics["accuracy"],
            "test_macro_f1": metrics["macro_f1"],
            "diverged": diverged,
            "checkpoint": str(checkpoint),
            "mlflow_run_id": child.info.run_id,
        }
        mlflow.log_metrics(
            {
                "test/accuracy": metrics["accuracy"],
                "test/macro_f1": metrics["macro_f1"],
                "best/epoch": best["epoch"],
                "train/loop_seconds": seconds,
                "compare/train_images": len(index),
            }
        )
    print(
        f"{name}: test accuracy {metrics['accuracy']:.4f} after {len(history)} epochs "
        f"({seconds:.1f} s training) on {len(index)} images"
    )
    return ArmRun(row, history, probabilities.argmax(1) == test_y)


def _params(cfg: Config) -> dict:
    """The arm's augment, model and train keys: what the UI's compare view tells apart."""
    raw = cfg.as_dict()
    return {f"{s}.{k}": v for s in ARM_SECTIONS for k, v in raw[s].items()}


def _tags(arm: str, cfg: Config, fraction: float, n_images: int) -> dict[str, str]:
    return {
        "compare.arm": arm,
        "compare.fraction": str(fraction),
        "compare.regime": regime(fraction),
        "compare.arch": cfg.model.arch,
        "compare.pretrained": cfg.model.pretrained or "none",
        "compare.train_images": str(n_images),
    }


def write_report(cfg: Config, runs: list[ArmRun], run_id: str) -> CompareResult:
    """reports/compare.json, plots/compare.png and the verdicts, from every arm's run; logged
    to the active MLflow run (the compare flow's parent run `run_id`)."""
    report = _report(cfg, runs, prepared.load_meta(), run_id)
    table = markdown_table(report)
    _write_outputs(report, table, runs)
    return CompareResult(
        str(paths.COMPARE_REPORT), str(paths.COMPARE_PLOT), table, report["regimes"], run_id
    )


def _report(cfg: Config, runs: list[ArmRun], meta: dict, run_id: str) -> dict:
    by_key = {(r.row["arm"], r.row["fraction"]): r for r in runs}
    regimes = [_regime(by_key["scratch", f], by_key["transfer", f]) for f in cfg.compare.fractions]
    return {
        "dataset": meta["source"],
        "classes": len(meta["classes"]),
        "val_images": meta["n_per_split"]["val"],
        "test_images": meta["n_per_split"]["test"],
        "seed": cfg.seed,
        "mlflow_run_id": run_id,
        "arms": [r.row for r in runs],
        "regimes": regimes,
    }


def _regime(scratch: ArmRun, transfer: ArmRun) -> dict:
    s, t = scratch.row, transfer.row
    only_transfer = int((transfer.correct & ~scratch.correct).sum())
    only_scratch = int((scratch.correct & ~transfer.correct).sum())
    result = {
        "fraction": s["fraction"],
        "regime": regime(s["fraction"]),
        "train_images": s["train_images"],
        "scratch_accuracy": s["test_accuracy"],
        "transfer_accuracy": t["test_accuracy"],
        "accuracy_gain": round(t["test_accuracy"] - s["test_accuracy"], 6),
        "macro_f1_gain": round(t["test_macro_f1"] - s["test_macro_f1"], 6),
        "only_transfer_right": only_transfer,
        "only_scratch_right": only_scratch,
        "mcnemar_p": mcnemar_p(only_transfer, only_scratch),
        "time_ratio": round(t["train_seconds"] / max(s["train_seconds"], 1e-9), 2),
    }
    result["transfer_beats_scratch"] = bool(
        result["accuracy_gain"] > 0 and result["mcnemar_p"] < SIGNIFICANCE
    )
    result["verdict"] = verdict(result, s["train_seconds"], t["train_seconds"])
    return result


def verdict(r: dict, scratch_seconds: float, transfer_seconds: float) -> str:
    points, p = 100 * r["accuracy_gain"], r["mcnemar_p"]
    if r["transfer_beats_scratch"]:
        outcome = "transfer beats scratch"
    elif points > 0:
        outcome = "transfer is ahead, but not significantly"
    elif points == 0:
        outcome = "transfer ties with scratch"
    elif p < SIGNIFICANCE:
        outcome = "transfer does not beat scratch: scratch is better"
    else:
        outcome = "transfer does not beat scratch (behind, not significantly)"
    return (
        f"{r['regime']} ({r['train_images']} training images): {outcome}, "
        f"{r['transfer_accuracy']:.4f} vs {r['scratch_accuracy']:.4f} test accuracy "
        f"({points:+.1f} points, McNemar p = {p:.2g}), in {transfer_seconds:.0f} s vs "
        f"{scratch_seconds:.0f} s of training ({r['time_ratio']:g}x)"
    )


def markdown_table(report: dict) -> str:
    header = (
        "| run | train images | arch | pretrained | input | strategy | epochs (best) "
        "| train s | test accuracy | macro-F1 |"
    )
    lines = [header, "|" + "---|" * 10]
    for a in report["arms"]:
        lines.append(
            f"| {a['name']} | {a['train_images']} | {a['arch']} | {a['pretrained'] or '-'} "
            f"| {a['input_size']} | {a['strategy']} | {a['epochs_run']} ({a['best_epoch']}) "
            f"| {a['train_seconds']:.1f} | {a['test_accuracy']:.4f} | {a['test_macro_f1']:.4f} |"
        )
    return "\n".join(lines)


def summary(result: CompareResult) -> str:
    verdicts = [r["verdict"] for r in result.regimes]
    return "\n".join([result.table, "", *verdicts, "", f"reports: {result.report} {result.plot}"])


def _write_outputs(report: dict, table: str, runs: list[ArmRun]) -> None:
    import mlflow

    paths.write_json(paths.COMPARE_REPORT, report)
    panels: dict[str, dict[str, list[dict]]] = {}
    for r in runs:
        panels.setdefault(regime(r.row["fraction"]), {})[r.row["arm"]] = r.history
    plots.comparison_curves(panels, paths.COMPARE_PLOT)
    for r in report["regimes"]:
        key = f"{r['fraction'] * 100:g}pct"
        mlflow.log_metrics(
            {
                f"compare/accuracy_gain_{key}": r["accuracy_gain"],
                f"compare/macro_f1_gain_{key}": r["macro_f1_gain"],
                f"compare/time_ratio_{key}": r["time_ratio"],
            }
        )
    verdicts = "\n".join(f"- {r['verdict']}" for r in report["regimes"])
    mlflow.log_text(f"{table}\n\n{verdicts}\n", "compare.md")
    mlflow.log_artifact(str(paths.COMPARE_REPORT))
    mlflow.log_artifact(str(paths.COMPARE_PLOT), "plots")
