"""train: a CNN from scratch or by transfer, on the prepared uint8 shards.

The stage: it builds the model (`models`), runs the loop (`loop`) with the recipe of
params.train (`recipe`), saves the best epoch's weights as a state_dict and writes the
reports: per-epoch metrics to MLflow and to reports/training_curve.csv (a DVC plot),
reports/training.json, the learning curves and an augmentation preview. Under `torchrun` the
same code trains with DistributedDataParallel; only rank 0 logs and writes files.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from itertools import zip_longest

import torch

from components.core import paths, plots, tracking
from components.core.config import Config
from components.core.errors import GateFailed
from components.data import prepared
from components.data.prepared import load_meta, load_split
from components.data.validate import require_passed
from components.training import augment, distributed, doctor, loop, models, tuned


@dataclass(frozen=True)
class TrainResult:
    checkpoint: str
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    best_val_accuracy: float
    train_loop_seconds: float


def run(cfg: Config, resume: bool = False) -> TrainResult:
    require_passed()
    if cfg.train.use_tuned:
        cfg = tuned.apply_tuned(cfg)
    loop.seed_everything(cfg.seed)
    spec = models.model_spec(cfg.model, load_meta())
    model = models.build(spec, cfg.model.pretrained)
    train_x, train_y = load_split("train")
    val_x, val_y = load_split("val")
    with distributed.process_group(cfg.train.device):
        with tracking.step_run(cfg, "train") if distributed.is_main() else nullcontext():
            sanity = doctor.initial_loss_check(model, train_x, train_y, len(spec["classes"]))
            augmenter = augment.batch_augmenter(
                cfg, len(spec["classes"]), cfg.seed + distributed.rank()
            )
            if distributed.is_main():
                _log_start(cfg, model, sanity, (train_x, train_y), spec)
            best, history, seconds, diverged = loop.fit(
                model, cfg, (train_x, train_y), (val_x, val_y), augmenter, resume
            )
            if best["state_dict"] is None:
                raise GateFailed(f"{diverged}; no epoch finished, so there is no checkpoint")
            model.to("cpu").load_state_dict(best["state_dict"])
            if distributed.is_main():
                models.save_checkpoint(model, spec, paths.CHECKPOINT)
                _write_reports(cfg, history, best, seconds, len(train_x), sanity)
                _log_end(best, seconds)
    if diverged:
        raise GateFailed(
            f"{diverged}; kept the last good checkpoint ({paths.CHECKPOINT}, epoch "
            f"{best['epoch']}). Lower train.lr or add gradient clipping."
        )
    return TrainResult(
        str(paths.CHECKPOINT),
        len(history),
        best["epoch"],
        best["val_loss"],
        best["val_accuracy"],
        seconds,
    )


def summary(result: TrainResult) -> str:
    return (
        f"train: best epoch {result.best_epoch} of {result.epochs_run}, validation accuracy "
        f"{result.best_val_accuracy:.4f} (loss {result.best_val_loss:.4f}), "
        f"{result.train_loop_seconds:.1f} s in the loop: {result.checkpoint}"
    )


def _log_start(cfg, model, sanity: dict, train: tuple, spec: dict) -> None:
    import mlflow

    mlflow.set_tag("model.parameters", str(sum(p.numel() for p in model.parameters())))
    mlflow.set_tag("train.world_size", str(distributed.world_size()))
    mlflow.log_metrics(
        {
            "sanity/initial_loss": sanity["initial_loss"],
            "sanity/expected_initial_loss": sanity["expected"],
        }
    )
    mlflow.log_artifact(str(_augmentation_preview(cfg, *train, spec)), "plots")


def _log_end(best: dict, seconds: float) -> None:
    import mlflow

    mlflow.log_metrics({"best/epoch": best["epoch"], "train/loop_seconds": seconds})
    mlflow.log_artifact(str(paths.TRAINING_CURVE))
    mlflow.log_artifact(str(_curves_plot()), "plots")


def preview_indices(labels, n: int = 16) -> list[int]:
    """n training images from as many classes as there are: the first image of every class,
    then the second of every class, and so on (the shards hold one class after another)."""
    labels = torch.as_tensor(labels)
    by_class = [(labels == c).nonzero().flatten().tolist() for c in labels.unique().tolist()]
    ranks = zip_longest(*by_class)
    return [index for rank in ranks for index in rank if index is not None][:n]


def _augmentation_preview(cfg: Config, images, labels, spec: dict):
    """16 training images of several classes as the model sees them (titled with their
    original labels), from a generator of their own, so training stays seeded."""
    index = preview_indices(labels)
    images, labels = prepared.batch(images, index), prepared.batch(labels, index)
    augmented, _ = augment.batch_augmenter(cfg, len(spec["classes"]), seed=cfg.seed + 1)(
        images, labels
    )
    titles = [spec["classes"][i] for i in labels]
    pixels = augmented.clamp(0, 255).to(torch.uint8).numpy()
    return plots.image_grid(pixels, titles, paths.PLOTS / "augmentation_preview.png")


def _write_reports(cfg, history, best: dict, seconds: float, n_train: int, sanity: dict):
    paths.write_csv(paths.TRAINING_CURVE, history, list(history[0]))
    report = {
        "epochs_run": len(history),
        "best_epoch": best["epoch"],
        "best_val_loss": best["val_loss"],
        "best_val_accuracy": best["val_accuracy"],
        "train_loop_seconds": round(seconds, 3),
        "images_per_second": round(n_train * len(history) / seconds, 1) if seconds else None,
        "initial_loss": sanity["initial_loss"],
        "expected_initial_loss": sanity["expected"],
        "initial_loss_ok": sanity["ok"],
        "strategy": cfg.train.strategy,
        "device": str(loop.device(cfg.train.device)),
        "amp": cfg.train.amp,
        "world_size": distributed.world_size(),
        # lineage of the model version register makes of this checkpoint: what it was trained with
        "mlflow_run_id": _active_run_id(),
        "params_hash": cfg.params_hash(),
        "params": {key: cfg.as_dict()[key] for key in ("seed", "augment", "model", "train")},
    }
    paths.write_json(paths.TRAINING_REPORT, report)
    paths.write_metrics(
        paths.TRAINING_METRICS,
        {k: report[k] for k in ("epochs_run", "best_val_accuracy", "train_loop_seconds")},
    )


def _active_run_id() -> str | None:
    import mlflow

    run = mlflow.active_run()
    return run.info.run_id if run else None


def _curves_plot():
    """Learning curves and the learning-rate curve, from reports/training_curve.csv."""
    import pandas as pd

    return plots.training_curves(pd.read_csv(paths.TRAINING_CURVE), paths.PLOTS / "training.png")
