"""doctor: sanity checks to run before trusting a training run (`lensflow doctor`).

A fresh classifier's loss should be about ln(classes); a model that cannot memorise one small
batch has a bug between data, labels, model and optimiser that no amount of training fixes.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from components.core.config import Config
from components.data import prepared
from components.data.prepared import load_meta, load_split
from components.training import loop, models


def initial_loss_check(model: nn.Module, images, labels, num_classes: int) -> dict:
    """A fresh classifier should predict ~uniformly: loss ~ ln(classes). Warns when not
    (a bad init, wrong labels, a broken preprocessing or a bias left in the head)."""
    loss, _ = loop.evaluate_loss(model, images[:256], labels[:256])
    expected = math.log(num_classes)
    ok = abs(loss - expected) <= 0.25 * expected
    if not ok:
        warnings.warn(
            f"initial loss {loss:.3f} is far from ln({num_classes}) = {expected:.3f}: "
            "check the labels, the preprocessing and the weight init",
            stacklevel=2,
        )
    return {"initial_loss": loss, "expected": expected, "ok": ok}


def run(cfg: Config, batch_size: int = 32, steps: int = 200) -> dict:
    """`lensflow doctor`: can the model memorise one small batch? If not, something between
    data, labels, model and optimiser is broken, and no amount of training will fix it."""
    loop.seed_everything(cfg.seed)
    spec = models.model_spec(cfg.model, load_meta())
    model = models.build(spec)
    images, labels = (prepared.batch(a, slice(batch_size)) for a in load_split("train"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    final_loss, accuracy = loop.evaluate_loss(model, images, labels)
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


def summary(result: dict) -> str:
    verdict = "can" if result["passed"] else "CANNOT"
    return (
        f"doctor: the model {verdict} overfit one batch of {result['batch_size']} images "
        f"(accuracy {result['accuracy']:.3f} after {result['steps']} steps)"
    )
