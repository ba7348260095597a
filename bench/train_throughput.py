"""lensflow's training loop vs a bare PyTorch loop on digits, in one run. Prints one JSON line.

1. Steady-state images/s: same model (the default SimpleCNN with preprocessing inside), same
   training tensors, batch size and optimiser; lensflow with augmentation off and with the
   `standard` preset. Epochs alternate between the loops; the median epoch counts.
2. Time to 98.5 % validation accuracy, wall clock: `loop.fit` with the default recipe (what
   `lensflow stage train` runs, MLflow logging and the per-epoch checkpoint included) against
   the bare loop (AdamW at the same lr, validated after every epoch).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import mlflow
import torch
from torch import nn

from components.core import config
from components.data import datasets, prepare, prepared
from components.training import loop, models
from components.training.augment import BatchAugment

EPOCHS = 10
TARGET = 0.985
MAX_EPOCHS = 40


def main() -> None:
    cfg = config.load(Path(__file__).resolve().parents[1] / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "digits"
        datasets.write("digits", root)
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": str(root)})})
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            prepare.run(cfg)
            images, labels = prepared.load_split("train")
            val = prepared.load_split("val")
            spec = models.model_spec(cfg.model, prepared.load_meta())
            throughput = images_per_second(cfg, spec, images, labels)
            mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
            with mlflow.start_run():
                data = (images, labels)
                lensflow_seconds, lensflow_epochs = lensflow_time_to_target(cfg, spec, data, val)
            bare_seconds, bare_epochs = bare_time_to_target(cfg, spec, data, val)
        finally:
            os.chdir(cwd)
    ratio = lensflow_seconds / bare_seconds if lensflow_seconds and bare_seconds else None
    print(
        json.dumps(
            {
                "bench": "train_throughput",
                "dataset": "digits",
                "images": len(images),
                "batch_size": cfg.train.batch_size,
                **throughput,
                "time_to_target": {
                    "target_val_accuracy": TARGET,
                    "lensflow_s": lensflow_seconds,
                    "lensflow_epochs": lensflow_epochs,
                    "bare_s": bare_seconds,
                    "bare_epochs": bare_epochs,
                    "ratio": round(ratio, 3) if ratio else None,
                    "target_ratio": 1.25,
                },
            }
        )
    )


def images_per_second(cfg, spec, images, labels) -> dict:
    standard = cfg.augment.model_copy(update={"preset": "standard"})
    steps = (len(images) + cfg.train.batch_size - 1) // cfg.train.batch_size
    augmenters = {
        "lensflow_no_aug": None,
        "lensflow_standard": BatchAugment(standard, 10, False, cfg.seed),
    }
    epochs = {}
    for name in ("bare", *augmenters):
        loop.seed_everything(cfg.seed)
        model = models.build(spec)
        if name == "bare":
            optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
            in_memory = prepared.batch(images), prepared.batch(labels)  # the bare loop's tensors
            epoch = partial(bare_epoch, model, optimizer, *in_memory, cfg.train.batch_size)
        else:
            recipe = loop.Loop(model, cfg, labels, steps, augmenters[name])
            data = (images, labels)
            epoch = partial(loop._train_epoch, model, data, cfg.train.batch_size, recipe)
        epoch()  # warm-up
        epochs[name] = (epoch, [])
    for _ in range(EPOCHS):
        for epoch, times in epochs.values():
            start = time.perf_counter()
            epoch()
            times.append(time.perf_counter() - start)
    rate = {name: len(images) / statistics.median(times) for name, (_, times) in epochs.items()}
    return {
        "images_per_s": {name: round(r, 1) for name, r in rate.items()},
        "ratio_no_aug": round(rate["lensflow_no_aug"] / rate["bare"], 3),
        "ratio_standard": round(rate["lensflow_standard"] / rate["bare"], 3),
        "target_ratio_no_aug": 0.95,
        "target_ratio_standard": 0.80,
    }


class TargetReached(Exception):
    pass


def lensflow_time_to_target(cfg, spec, train_data, val):
    recipe = cfg.train.model_copy(update={"epochs": MAX_EPOCHS, "progress_bar": False})
    cfg = cfg.model_copy(update={"train": recipe})
    loop.seed_everything(cfg.seed)
    model = models.build(spec)
    start = time.perf_counter()

    def stop_at_target(row):
        if row["val_accuracy"] >= TARGET:
            raise TargetReached(row["epoch"])

    try:
        last = Path("last.pt")  # in the temporary project, like a real run
        loop.fit(model, cfg, train_data, val, on_epoch=stop_at_target, last_path=last)
    except TargetReached as reached:
        return round(time.perf_counter() - start, 2), reached.args[0]
    return None, None


def bare_time_to_target(cfg, spec, train_data, val):
    loop.seed_everything(cfg.seed)
    model = models.build(spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    train_data, val = [tuple(prepared.batch(a) for a in pair) for pair in (train_data, val)]
    start = time.perf_counter()
    for epoch in range(1, MAX_EPOCHS + 1):
        bare_epoch(model, optimizer, *train_data, cfg.train.batch_size)
        model.eval()
        with torch.no_grad():
            accuracy = (model(val[0]).argmax(1) == val[1]).float().mean().item()
        if accuracy >= TARGET:
            return round(time.perf_counter() - start, 2), epoch
    return None, None


def bare_epoch(model, optimizer, images, labels, batch_size):
    model.train()
    order = torch.randperm(len(images))
    for i in range(0, len(images), batch_size):
        index = order[i : i + batch_size]
        loss = nn.functional.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


if __name__ == "__main__":
    main()
