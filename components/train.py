"""train: a CNN from scratch or by transfer, on the prepared uint8 shards.

The recipe of params.train (optimiser, LR schedule, label smoothing, EMA, mixed precision, the
transfer strategy that decides which backbone stages learn in which epoch), early stopping on
validation loss. The best epoch's weights are saved as a state_dict; per-epoch metrics go to
MLflow and to reports/training_curve.csv (a DVC plot). Under `torchrun` the same code trains
with DistributedDataParallel; only rank 0 logs and writes files.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from components import augment, distributed, models, paths, plots, tracking
from components.augment import BatchAugment
from components.config import Config, GateFailed, UserError
from components.prepare import load_meta, load_split
from components.validate import require_passed


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
    if cfg.train.use_tuned:
        from components import tune  # here: tune imports train

        cfg = tune.apply_tuned(cfg)
    seed_everything(cfg.seed)
    spec = models.model_spec(cfg.model, load_meta())
    model = models.build(spec, cfg.model.pretrained)
    train_x, train_y = load_split("train")
    val_x, val_y = load_split("val")
    with distributed.process_group(cfg.train.device):
        with tracking.step_run(cfg, "train") if distributed.is_main() else nullcontext():
            sanity = initial_loss_check(model, train_x, train_y, len(spec["classes"]))
            augmenter = batch_augmenter(cfg, len(spec["classes"]), cfg.seed + distributed.rank())
            if distributed.is_main():
                _log_start(cfg, model, sanity, (train_x, train_y), spec)
            best, history, seconds, diverged = fit(
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


def fit(
    model: nn.Module,
    cfg: Config,
    train: tuple,
    val: tuple,
    augment=None,
    resume=False,
    on_epoch=None,
    last_path: Path | None = paths.LAST_CHECKPOINT,
):
    """The training loop. Returns (best epoch state, per-epoch history, loop seconds, and why
    training stopped early on a non-finite loss, or None).

    After every epoch everything the next epoch depends on (weights, optimiser, schedule,
    random generators, early-stopping state) goes to `last_path` (None: nowhere), so
    `resume=True` continues a killed run and, on CPU, ends with the same weights as an
    uninterrupted one. `on_epoch(row)` sees each epoch's history row; it may raise to stop
    training (Optuna's TrialPruned does)."""
    images, labels = train
    steps = math.ceil(len(images) / cfg.train.batch_size)
    loop = Loop(model, cfg, labels, steps, augment)
    best = {"val_loss": math.inf, "epoch": 0, "val_accuracy": 0.0, "state_dict": None}
    history, bad_epochs, seconds, diverged = [], 0, 0.0, None
    first_epoch = 1
    if resume:
        state = _load_last(cfg, model, loop, last_path)
        best, history, bad_epochs = state["best"], state["history"], state["bad_epochs"]
        first_epoch = state["epoch"] + 1
        seconds = history[-1]["seconds"] if history else 0.0

    bar = tqdm(
        range(first_epoch, cfg.train.epochs + 1),
        desc="train",
        unit="epoch",
        disable=not (cfg.train.progress_bar and distributed.is_main()),
    )
    for epoch in bar:
        loop.start_epoch(model, epoch)
        start = time.perf_counter()
        train_loss, train_acc = _train_epoch(model, (images, labels), cfg.train.batch_size, loop)
        seconds += time.perf_counter() - start
        if not math.isfinite(train_loss):
            diverged = f"the training loss became {train_loss} in epoch {epoch}"
            break
        distributed.sync_buffers(loop.evaluated_model)
        val_loss, val_acc = evaluate_loss(loop.evaluated_model, *val)
        lr = loop.optimizer.param_groups[-1]["lr"]  # the head's
        loop.after_epoch(val_loss)
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_accuracy": train_acc,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "lr": lr,
            "seconds": round(seconds, 3),
            "trainable_parameters": loop.trainable_parameters(model),
        }
        history.append(row)
        _log_epoch(row)
        bar.set_postfix(
            loss=f"{train_loss:.3f}", val_loss=f"{val_loss:.3f}", val_acc=f"{val_acc:.3f}"
        )
        if val_loss < best["val_loss"]:
            best = {
                "val_loss": val_loss,
                "epoch": epoch,
                "val_accuracy": val_acc,
                "state_dict": copy.deepcopy(loop.evaluated_model.state_dict()),
            }
            bad_epochs = 0
        else:
            bad_epochs += 1
        if last_path is not None and distributed.is_main():
            loop_state = {"best": best, "history": history, "bad_epochs": bad_epochs}
            _save_last(cfg, epoch, model, loop, loop_state, last_path)
        if on_epoch is not None:
            on_epoch(row)
        if bad_epochs >= cfg.train.patience:
            bar.write(f"early stop at epoch {epoch}: no better val loss for {bad_epochs} epochs")
            break
    bar.close()
    return best, history, seconds, diverged


def _log_epoch(row: dict) -> None:
    import mlflow

    if not distributed.is_main():
        return
    metrics = {
        "train/loss": row["train_loss"],
        "train/accuracy": row["train_accuracy"],
        "val/loss": row["val_loss"],
        "val/accuracy": row["val_accuracy"],
        "train/lr": row["lr"],
        "train/val_gap": row["train_accuracy"] - row["val_accuracy"],
        "train/trainable_parameters": row["trainable_parameters"],
    }
    mlflow.log_metrics(metrics, step=row["epoch"])


def trainable_stages(t, epoch: int, stages: int) -> int | None:
    """How many backbone stages (counted from the head) learn in this epoch; None: all.
    feature_extraction: none, ever. two_stage: the head alone for head_epochs, then the last
    unfreeze_stages (0: all). gradual_unfreeze: the head alone for head_epochs, then one more
    stage every unfreeze_every epochs, top down."""
    if t.strategy == "fine_tune":
        return None
    if t.strategy == "feature_extraction" or epoch <= t.head_epochs:
        return 0
    if t.strategy == "two_stage":
        return min(t.unfreeze_stages or stages, stages)
    return min(1 + (epoch - t.head_epochs - 1) // t.unfreeze_every, stages)


class Loop:
    """Optimiser, LR schedule, loss, EMA, gradient clipping, mixed precision, the device and
    the random generators: everything one training step needs besides the model and data.

    Every parameter that learns in any epoch of the strategy is in the optimiser from the
    start (so one LR schedule spans the run and resume restores one state); a frozen one has
    requires_grad off, gets no gradient, and the optimiser leaves it untouched."""

    def __init__(self, model: nn.Module, cfg: Config, labels, steps_per_epoch: int, augment):
        t = self.recipe = cfg.train
        self.device = _device(t.device)
        memory_format = torch.channels_last if t.channels_last else torch.preserve_format
        model.to(self.device, memory_format=memory_format)
        stages = len(model.stages())
        self.stages, self.trainable = stages, "unset"
        groups = param_groups(model, t, trainable_stages(t, t.epochs, stages))
        if t.optimizer == "sgd":
            nesterov = t.momentum > 0  # torch refuses Nesterov without momentum
            self.optimizer = torch.optim.SGD(
                groups, lr=t.lr, momentum=t.momentum, nesterov=nesterov
            )
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=t.lr)
        self.schedule = t.schedule
        self.scheduler = _scheduler(self.optimizer, t, steps_per_epoch)
        weights = _class_weights(labels, model) if t.class_weights else None
        self.criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=t.label_smoothing)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.augment = augment
        self.grad_clip_norm = t.grad_clip_norm
        # bf16 needs no loss scaling; fp16 does (its small gradients underflow)
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler(enabled=t.amp and self.device.type == "cuda")
        self.ema = None
        if t.ema_decay > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            ema_fn = get_ema_multi_avg_fn(t.ema_decay)
            self.ema = AveragedModel(model, multi_avg_fn=ema_fn, use_buffers=True)
        self.evaluated_model = self.ema.module if self.ema is not None else model
        self.forward = model

    def start_epoch(self, model: nn.Module, epoch: int) -> None:
        """Apply the strategy's trainable stages for this epoch; rewrap for DDP and compile
        when they change (DDP registers the parameters that need gradients once)."""
        trainable = trainable_stages(self.recipe, epoch, self.stages)
        if trainable == self.trainable:
            return
        self.trainable = trainable
        model.set_trainable_stages(trainable)
        self.forward = distributed.wrap(model)
        if self.recipe.compile:
            self.forward = torch.compile(self.forward)

    def trainable_parameters(self, model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def autocast(self):
        if not self.recipe.amp:  # entering a disabled autocast still costs per batch
            return nullcontext()
        return torch.autocast(self.device.type, self.amp_dtype)

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.recipe.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def step(self, model: nn.Module, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip_norm)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.schedule in ("cosine", "onecycle"):  # stepped per batch
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(model)

    def after_epoch(self, val_loss: float) -> None:
        if self.schedule == "plateau":
            self.scheduler.step(val_loss)
        elif self.schedule == "step":
            self.scheduler.step()

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "augment_rng": self.augment.generator.get_state() if self.augment else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if self.augment is not None and state["augment_rng"] is not None:
            self.augment.generator.set_state(state["augment_rng"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: cuda, but torch sees no CUDA GPU (use auto or cpu)")
    if distributed.world_size() > 1 and torch.cuda.is_available() and name != "cpu":
        return torch.device("cuda", distributed.local_rank())
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def _scheduler(optimizer, t, steps_per_epoch: int):
    total = t.epochs * steps_per_epoch
    if t.schedule == "onecycle":
        peaks = [group["lr"] for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=total)
    if t.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=t.step_epochs, gamma=0.1)
    if t.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=2)
    return warmup_cosine(optimizer, t.warmup_epochs * steps_per_epoch, total)


def _class_weights(labels: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Inverse class frequency, mean 1: rare classes weigh more in the loss."""
    num_classes = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    counts = torch.bincount(labels, minlength=num_classes).float().clamp_min(1)
    weights = counts.sum() / counts
    return weights / weights.mean()


def _save_last(cfg, epoch: int, model, loop: Loop, loop_state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "params_hash": cfg.params_hash(),
        "epoch": epoch,
        "model": model.state_dict(),
        **loop.state_dict(),
        **loop_state,
    }
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    partial.replace(path)  # atomic: a kill never leaves half a file


def _load_last(cfg, model, loop: Loop, path: Path | None) -> dict:
    if path is None or not path.exists():
        raise UserError(f"{path} not found: nothing to resume")
    state = torch.load(path, weights_only=True)
    if state["params_hash"] != cfg.params_hash():
        raise UserError(f"{path} was written with other params: train without --resume")
    model.load_state_dict(state["model"])
    loop.load_state_dict(state)
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
    device = next(model.parameters()).device
    total_loss, correct = 0.0, 0
    for i in range(0, len(images), batch_size):
        logits = model(images[i : i + batch_size].to(device))
        target = labels[i : i + batch_size].to(device)
        total_loss += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        hard_target = target.argmax(1) if target.ndim == 2 else target  # MixUp/CutMix: soft
        correct += (logits.argmax(1) == hard_target).sum().item()
    return total_loss / len(images), correct / len(images)


def _train_epoch(model, data, batch_size: int, loop: Loop):
    """One pass over the training set in a seeded order. Under DDP every process draws the
    same order and takes its share of each batch, so the global batch is batch_size.

    Losses stay on the device until the epoch ends (no per-batch sync): a non-finite loss
    shows as a non-finite epoch loss, the same in every process, and `fit` stops there, before
    anything is saved from the poisoned weights."""
    images, labels = data
    model.train()
    order = torch.randperm(len(images), generator=loop.generator)
    rank, world = distributed.rank(), distributed.world_size()
    total_loss = torch.zeros((), device=loop.device)
    correct = torch.zeros((), device=loop.device, dtype=torch.long)
    seen = 0
    for i in range(0, len(images), batch_size):
        index = order[i : i + batch_size]
        if len(index) < world:  # a last sliver that cannot give every process an image
            continue
        index = index[rank::world]
        batch, target = images[index], labels[index]
        if loop.augment is not None and loop.augment.active:
            batch, target = loop.augment(batch, target)
        batch, target = loop.batch(batch), target.to(loop.device, non_blocking=True)
        with loop.autocast():
            logits = loop.forward(batch)
            loss = loop.criterion(logits.float(), target)
        loop.step(model, loss)
        total_loss += loss.detach() * len(index)
        hard_target = target.argmax(1) if target.ndim == 2 else target  # MixUp/CutMix: soft
        correct += (logits.argmax(1) == hard_target).sum()
        seen += len(index)
    total_loss, correct, seen = distributed.sum_over_processes(total_loss, correct, seen)
    return total_loss / seen, correct / seen


def batch_augmenter(cfg: Config, num_classes: int, seed: int) -> BatchAugment:
    allow_flips = augment.flips_allowed(cfg.augment, cfg.data.source)
    return BatchAugment(cfg.augment, num_classes, allow_flips, seed)


def _augmentation_preview(cfg: Config, images, labels, spec: dict):
    """16 training images as the model sees them (titled with their original labels), from a
    generator of their own, so training stays seeded."""
    augmented, _ = batch_augmenter(cfg, len(spec["classes"]), seed=cfg.seed + 1)(
        images[:16], labels[:16]
    )
    titles = [spec["classes"][i] for i in labels[:16]]
    pixels = augmented.clamp(0, 255).to(torch.uint8).numpy()
    return plots.image_grid(pixels, titles, paths.PLOTS / "augmentation_preview.png")


def param_groups(model: nn.Module, t, stages_learning: int | None) -> list[dict]:
    """Every parameter that learns in some epoch in exactly one group; the others in none.
    Weight decay on conv/linear weights only (decaying norms and biases hurts accuracy).
    Discriminative LRs: the head at lr, the backbone's top stage at lr x backbone_lr_factor,
    each stage below it x layer_lr_decay once more."""
    stages = model.stages()
    if stages_learning is not None:
        stages = stages[len(stages) - stages_learning :]
    base = t.lr * t.backbone_lr_factor
    if t.layer_lr_decay == 1.0:  # one backbone group: fewer groups, a faster optimiser step
        parts = [("backbone", base, [p for stage in stages for p in stage.parameters()])]
    else:
        parts = [
            (f"stage{i}", base * t.layer_lr_decay ** (len(stages) - 1 - i), list(s.parameters()))
            for i, s in enumerate(stages)
        ]
    parts.append(("head", t.lr, list(models.head(model.network).parameters())))
    groups = []
    for name, lr, params in parts:
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim > 1) == decay]
            if chosen:
                groups.append(
                    {
                        "params": chosen,
                        "lr": lr,
                        "weight_decay": t.weight_decay if decay else 0.0,
                        "name": name if decay else f"{name}/no_decay",
                    }
                )
    return groups


def _write_reports(cfg, history, best: dict, seconds: float, n_train: int, sanity: dict):
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
        "strategy": cfg.train.strategy,
        "device": str(_device(cfg.train.device)),
        "amp": cfg.train.amp,
        "world_size": distributed.world_size(),
    }
    paths.TRAINING_REPORT.write_text(json.dumps(report, indent=2))


def _curves_plot():
    """Learning curves and the learning-rate curve, from reports/training_curve.csv."""
    import pandas as pd

    return plots.training_curves(pd.read_csv(paths.TRAINING_CURVE), paths.PLOTS / "training.png")
