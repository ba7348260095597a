"""train: a CNN from scratch on the prepared uint8 shards.

AdamW (no weight decay on norms and biases), linear warmup then cosine decay per step,
label smoothing, early stopping on validation loss. The best epoch's weights are saved as a
state_dict; per-epoch metrics go to MLflow and to reports/training_curve.csv (a DVC plot).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import random
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from lensflow.components import augment, models, paths, plots, tracking
from lensflow.components.augment import BatchAugment
from lensflow.components.config import Config, GateFailed, UserError
from lensflow.components.prepare import load_meta, load_split
from lensflow.components.validate import require_passed


@dataclass(frozen=True)
class TrainResult:
    checkpoint: str
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    best_val_accuracy: float
    train_loop_seconds: float


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: Config, resume: bool = False) -> TrainResult:
    require_passed()
    seed_everything(cfg.seed)
    meta = load_meta()
    spec = models.model_spec(cfg.model, meta)
    model = models.build(spec)
    train_x, train_y = load_split("train")
    val_x, val_y = load_split("val")

    with tracking.step_run(cfg, "train"):
        import mlflow

        mlflow.set_tag("model.parameters", str(sum(p.numel() for p in model.parameters())))
        sanity = initial_loss_check(model, train_x, train_y, len(spec["classes"]))
        mlflow.log_metrics(
            {
                "sanity/initial_loss": sanity["initial_loss"],
                "sanity/expected_initial_loss": sanity["expected"],
            }
        )
        augmenter = _augmenter(cfg, len(spec["classes"]), seed=cfg.seed)
        if augmenter.active:
            mlflow.log_artifact(str(_augmentation_preview(cfg, train_x, train_y, spec)), "plots")
        best, history, seconds, diverged = fit(
            model, cfg, (train_x, train_y), (val_x, val_y), augmenter, resume
        )
        if best["state_dict"] is None:
            raise GateFailed(f"{diverged}; no epoch finished, so there is no checkpoint")
        model.load_state_dict(best["state_dict"])
        models.save_checkpoint(model, spec, paths.CHECKPOINT)
        _write_reports(history, best, seconds, len(train_x), sanity)
        mlflow.log_metrics({"best/epoch": best["epoch"], "train/loop_seconds": seconds})
        mlflow.log_artifact(str(paths.TRAINING_CURVE))
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


def initial_loss_check(model: nn.Module, images, labels, num_classes: int) -> dict:
    """A fresh classifier should predict ~uniformly: loss ~ ln(classes). Warns when not
    (a bad init, wrong labels, a broken preprocessing or a bias left in the head)."""
    loss, _ = evaluate_loss(model, images[:256], labels[:256])
    expected = math.log(num_classes)
    ok = abs(loss - expected) <= 0.25 * expected
    if not ok:
        warnings.warn(
            f"initial loss {loss:.3f} is far from ln({num_classes}) = {expected:.3f}: "
            "check the labels, the preprocessing and the weight init",
            stacklevel=2,
        )
    return {"initial_loss": loss, "expected": expected, "ok": ok}


def overfit_one_batch(cfg: Config, batch_size: int = 32, steps: int = 200) -> dict:
    """`lensflow doctor`: can the model memorise one small batch? If not, something between
    data, labels, model and optimiser is broken, and no amount of training will fix it."""
    seed_everything(cfg.seed)
    spec = models.model_spec(cfg.model, load_meta())
    model = models.build(spec)
    images, labels = (t[:batch_size] for t in load_split("train"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    final_loss, accuracy = evaluate_loss(model, images, labels)
    return {
        "batch_size": len(images),
        "steps": steps,
        "final_loss": round(final_loss, 5),
        "accuracy": accuracy,
        "passed": accuracy == 1.0,
        "initial_loss_check": initial_loss_check(
            models.build(spec), images, labels, len(spec["classes"])
        ),
    }


def fit(model: nn.Module, cfg: Config, train: tuple, val: tuple, augment=None, resume=False):
    """The training loop. Returns (best epoch state, per-epoch history, loop seconds, and why
    training stopped early on a non-finite loss, or None).

    After every epoch everything the next epoch depends on (weights, optimiser, schedule,
    random generators, early-stopping state) goes to models/last.pt, so `resume=True`
    continues a killed run and, on CPU, ends with the same weights as an uninterrupted one."""
    import mlflow

    images, labels = train
    steps_per_epoch = math.ceil(len(images) / cfg.train.batch_size)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr)
    scheduler = warmup_cosine(
        optimizer, cfg.train.warmup_epochs * steps_per_epoch, cfg.train.epochs * steps_per_epoch
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    generator = torch.Generator().manual_seed(cfg.seed)
    best = {"val_loss": math.inf, "epoch": 0, "val_accuracy": 0.0, "state_dict": None}
    history, bad_epochs, seconds, diverged = [], 0, 0.0, None
    first_epoch = 1
    if resume:
        state = _load_last(cfg, model, optimizer, scheduler, generator, augment)
        best, history, bad_epochs = state["best"], state["history"], state["bad_epochs"]
        first_epoch = state["epoch"] + 1

    bar = tqdm(
        range(first_epoch, cfg.train.epochs + 1),
        desc="train",
        unit="epoch",
        disable=not cfg.train.progress_bar,
    )
    for epoch in bar:
        start = time.perf_counter()
        train_loss, train_acc = _train_epoch(
            model,
            (images, labels),
            cfg.train.batch_size,
            optimizer,
            scheduler,
            criterion,
            generator,
            augment,
        )
        seconds += time.perf_counter() - start
        if not math.isfinite(train_loss):
            diverged = f"the training loss became {train_loss} in epoch {epoch}"
            break
        val_loss, val_acc = evaluate_loss(model, *val)
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_accuracy": train_acc,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "lr": optimizer.param_groups[0]["lr"],
        }
        history.append(row)
        mlflow.log_metrics(
            {
                "train/loss": train_loss,
                "train/accuracy": train_acc,
                "val/loss": val_loss,
                "val/accuracy": val_acc,
                "train/lr": row["lr"],
                "train/val_gap": train_acc - val_acc,
            },
            step=epoch,
        )
        bar.set_postfix(
            loss=f"{train_loss:.3f}", val_loss=f"{val_loss:.3f}", val_acc=f"{val_acc:.3f}"
        )
        if val_loss < best["val_loss"]:
            best = {
                "val_loss": val_loss,
                "epoch": epoch,
                "val_accuracy": val_acc,
                "state_dict": copy.deepcopy(model.state_dict()),
            }
            bad_epochs = 0
        else:
            bad_epochs += 1
        _save_last(
            cfg,
            epoch,
            model,
            optimizer,
            scheduler,
            generator,
            augment,
            {"best": best, "history": history, "bad_epochs": bad_epochs},
        )
        if bad_epochs >= cfg.train.patience:
            bar.write(f"early stop at epoch {epoch}: no better val loss for {bad_epochs} epochs")
            break
    bar.close()
    return best, history, seconds, diverged


def _save_last(cfg, epoch, model, optimizer, scheduler, generator, augment, loop_state) -> None:
    paths.LAST_CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "params_hash": cfg.params_hash(),
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "augment_rng": augment.generator.get_state() if augment is not None else None,
        **loop_state,
    }
    partial = paths.LAST_CHECKPOINT.with_suffix(".partial")
    torch.save(state, partial)
    partial.replace(paths.LAST_CHECKPOINT)  # atomic: a kill never leaves half a file


def _load_last(cfg, model, optimizer, scheduler, generator, augment) -> dict:
    if not paths.LAST_CHECKPOINT.exists():
        raise UserError(f"{paths.LAST_CHECKPOINT} not found: nothing to resume")
    state = torch.load(paths.LAST_CHECKPOINT, weights_only=True)
    if state["params_hash"] != cfg.params_hash():
        raise UserError(
            f"{paths.LAST_CHECKPOINT} was written with other params: train without --resume"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if augment is not None and state["augment_rng"] is not None:
        augment.generator.set_state(state["augment_rng"])
    return state


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup to the base LR, then cosine decay to zero; stepped once per batch."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate_loss(model: nn.Module, images, labels, batch_size: int = 256):
    model.eval()
    total_loss, correct = 0.0, 0
    for i in range(0, len(images), batch_size):
        logits = model(images[i : i + batch_size])
        target = labels[i : i + batch_size]
        total_loss += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        hard_target = target.argmax(1) if target.ndim == 2 else target  # MixUp/CutMix: soft
        correct += (logits.argmax(1) == hard_target).sum().item()
    return total_loss / len(images), correct / len(images)


def _train_epoch(model, data, batch_size, optimizer, scheduler, criterion, generator, augment):
    images, labels = data
    model.train()
    order = torch.randperm(len(images), generator=generator)
    total_loss, correct = 0.0, 0
    for i in range(0, len(images), batch_size):
        index = order[i : i + batch_size]
        batch, target = images[index], labels[index]
        if augment is not None and augment.active:
            batch, target = augment(batch, target)
        logits = model(batch)
        loss = criterion(logits, target)
        if not torch.isfinite(loss):  # stop before a NaN step poisons the weights
            return loss.item(), 0.0
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(index)
        hard_target = target.argmax(1) if target.ndim == 2 else target  # MixUp/CutMix: soft
        correct += (logits.argmax(1) == hard_target).sum().item()
    return total_loss / len(images), correct / len(images)


def _augmenter(cfg: Config, num_classes: int, seed: int) -> BatchAugment:
    allow_flips = augment.flips_allowed(cfg.augment, cfg.data.source)
    return BatchAugment(cfg.augment, num_classes, allow_flips, seed)


def _augmentation_preview(cfg: Config, images, labels, spec: dict):
    """16 augmented training images, from a generator of their own (training stays seeded)."""
    augmented, _ = _augmenter(cfg, len(spec["classes"]), seed=cfg.seed + 1)(
        images[:16], labels[:16]
    )
    titles = [spec["classes"][i] for i in labels[:16]]
    pixels = augmented.clamp(0, 255).to(torch.uint8).numpy()
    return plots.image_grid(pixels, titles, paths.PLOTS / "augmentation_preview.png")


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only: decaying norms and biases hurts accuracy."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _write_reports(history, best: dict, seconds: float, n_train: int, sanity: dict) -> None:
    paths.REPORTS.mkdir(parents=True, exist_ok=True)
    with paths.TRAINING_CURVE.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
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
    }
    paths.TRAINING_REPORT.write_text(json.dumps(report, indent=2))
