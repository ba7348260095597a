"""lensflow's training loop vs a bare PyTorch loop: steady-state images/s, in one run.

Same model (the default SimpleCNN with preprocessing inside), same digits training tensors,
same batch size and optimiser. lensflow runs with augmentation off and with the `standard`
preset. Epochs alternate between the loops and the median epoch counts (machines are noisy).
Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

from lensflow.components import config, datasets, models, prepare, train
from lensflow.components.augment import BatchAugment

EPOCHS = 5


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
            images, labels = prepare.load_split("train")
            spec = models.model_spec(cfg.model, prepare.load_meta())
        finally:
            os.chdir(cwd)

    standard = cfg.augment.model_copy(update={"preset": "standard"})
    steps = (len(images) + cfg.train.batch_size - 1) // cfg.train.batch_size
    augmenters = {
        "lensflow_no_aug": None,
        "lensflow_standard": BatchAugment(standard, 10, False, cfg.seed),
    }
    epochs = {}
    for name in ("bare", *augmenters):
        train.seed_everything(cfg.seed)
        model = models.build(spec)
        if name == "bare":
            optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
            epoch = partial(bare_epoch, model, optimizer, images, labels, cfg.train.batch_size)
        else:
            loop = train.Loop(model, cfg, labels, steps, augmenters[name])
            epoch = partial(train._train_epoch, model, (images, labels), cfg.train.batch_size, loop)
        epoch()  # warm-up
        epochs[name] = (epoch, [])
    for _ in range(EPOCHS):
        for epoch, times in epochs.values():
            start = time.perf_counter()
            epoch()
            times.append(time.perf_counter() - start)
    rate = {name: len(images) / statistics.median(times) for name, (_, times) in epochs.items()}
    print(
        json.dumps(
            {
                "bench": "train_throughput",
                "dataset": "digits",
                "images": len(images),
                "batch_size": cfg.train.batch_size,
                "images_per_s": {name: round(r, 1) for name, r in rate.items()},
                "ratio_no_aug": round(rate["lensflow_no_aug"] / rate["bare"], 3),
                "ratio_standard": round(rate["lensflow_standard"] / rate["bare"], 3),
                "target_ratio_no_aug": 0.95,
                "target_ratio_standard": 0.80,
            }
        )
    )


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
