"""The training recipe: which parameters learn when, at which learning rate, under which
optimiser, LR schedule and loss (params.train). The loop (`loop.py`) applies it."""

from __future__ import annotations

import math

import torch
from torch import nn

from components.training import models


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


def optimizer(groups: list[dict], t) -> torch.optim.Optimizer:
    if t.optimizer == "sgd":
        nesterov = t.momentum > 0  # torch refuses Nesterov without momentum
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=nesterov)
    return torch.optim.AdamW(groups, lr=t.lr)


def scheduler(optimizer, t, steps_per_epoch: int):
    total = t.epochs * steps_per_epoch
    if t.schedule == "onecycle":
        peaks = [group["lr"] for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=total)
    if t.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=t.step_epochs, gamma=0.1)
    if t.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=2)
    return warmup_cosine(optimizer, t.warmup_epochs * steps_per_epoch, total)


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup to the base LR, then cosine decay to zero; stepped once per batch."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def criterion(t, labels: torch.Tensor, model: nn.Module) -> nn.Module:
    """Cross-entropy with label smoothing, weighted by inverse class frequency when asked."""
    weights = class_weights(labels, model) if t.class_weights else None
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=t.label_smoothing)


def class_weights(labels: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Inverse class frequency, mean 1: rare classes weigh more in the loss."""
    num_classes = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    counts = torch.bincount(labels, minlength=num_classes).float().clamp_min(1)
    weights = counts.sum() / counts
    return weights / weights.mean()
