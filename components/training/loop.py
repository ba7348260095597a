"""The training loop: epochs over the prepared shards in a seeded order, mixed precision,
EMA, gradient clipping, early stopping on validation loss, and `models/last.pt` after every
epoch so `--resume` continues a killed run. Under `torchrun` each process takes its share of
every batch (DistributedDataParallel). The recipe it applies lives in `recipe.py`."""

from __future__ import annotations

import copy
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from components.core import paths
from components.core.config import Config
from components.core.errors import UserError
from components.data import prepared
from components.training import distributed, recipe


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


class Loop:
    """Optimiser, LR schedule, loss, EMA, gradient clipping, mixed precision, the device and
    the random generators: everything one training step needs besides the model and data.

    Every parameter that learns in any epoch of the strategy is in the optimiser from the
    start (so one LR schedule spans the run and resume restores one state); a frozen one has
    requires_grad off, gets no gradient, and the optimiser leaves it untouched."""

    def __init__(self, model: nn.Module, cfg: Config, labels, steps_per_epoch: int, augment):
        t = self.params = cfg.train
        self.device = device(t.device)
        memory_format = torch.channels_last if t.channels_last else torch.preserve_format
        model.to(self.device, memory_format=memory_format)
        stages = len(model.stages())
        self.stages, self.trainable = stages, "unset"
        groups = recipe.param_groups(model, t, recipe.trainable_stages(t, t.epochs, stages))
        self.optimizer = recipe.optimizer(groups, t)
        self.schedule = t.schedule
        self.scheduler = recipe.scheduler(self.optimizer, t, steps_per_epoch)
        self.criterion = recipe.criterion(t, torch.as_tensor(labels), model).to(self.device)
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
        trainable = recipe.trainable_stages(self.params, epoch, self.stages)
        if trainable == self.trainable:
            return
        self.trainable = trainable
        model.set_trainable_stages(trainable)
        self.forward = distributed.wrap(model)
        if self.params.compile:
            self.forward = torch.compile(self.forward)

    def trainable_parameters(self, model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def autocast(self):
        if not self.params.amp:  # entering a disabled autocast still costs per batch
            return nullcontext()
        return torch.autocast(self.device.type, self.amp_dtype)

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.params.channels_last:
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


def device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: cuda, but torch sees no CUDA GPU (use auto or cpu)")
    if distributed.world_size() > 1 and torch.cuda.is_available() and name != "cpu":
        return torch.device("cuda", distributed.local_rank())
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


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
    # on the CPU first, whatever device wrote it: load_state_dict copies to the model's and
    # optimiser's device, and the random generators' states must be CPU tensors
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["params_hash"] != cfg.params_hash():
        raise UserError(f"{path} was written with other params: train without --resume")
    model.load_state_dict(state["model"])
    loop.load_state_dict(state)
    return state


@torch.no_grad()
def evaluate_loss(model: nn.Module, images, labels, batch_size: int = 256):
    """(mean loss, accuracy) over a split (`prepared.load_split`'s arrays, or tensors)."""
    model.eval()
    device = next(model.parameters()).device
    total_loss, correct = 0.0, 0
    for part in prepared.chunks(len(images), batch_size):
        logits = model(prepared.batch(images, part).to(device))
        target = prepared.batch(labels, part).to(device)
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
        # a last sliver that cannot give every process two images: batch norm over a 1x1
        # feature map (e.g. resnet18 at 32 px) cannot train on one
        if len(index) < 2 * world:
            continue
        index = index[rank::world]
        batch, target = prepared.batch(images, index), prepared.batch(labels, index)
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
