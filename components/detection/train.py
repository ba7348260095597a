"""train, for `task: detection`: the FCOS of `model` on the prepared shards, from scratch or,
with `detection.pretrained`, on the stages of a lensflow classifier (its weights, at
`train.backbone_lr_factor` x the LR; which of them learn in which epoch by classification's
`train.strategy` schedule, frozen ones with their batch-norm statistics held), then COCO mAP
on the validation split.

Reads `<split>-images.npy` and `<split>-annotations.json` (boxes scaled from each image's own
pixels to the shard's size); box-aware augmentation per image (`detection.augment`,
`components.training.box_augment`; plots/augmentation_preview.png shows 16 training
images as the detector sees them, with their boxes, and is logged to the active MLflow run);
AdamW at `detection.lr` with `train.weight_decay`, a linear warmup of `train.warmup_epochs`
then cosine decay, `detection.batch_size` images a step, `detection.epochs` epochs, on
`detection.threads` torch threads, gradient norm clipped to `train.grad_clip_norm` (10 when
0: focal loss from scratch spikes early). Writes what dvc.yaml's train stage declares:
models/checkpoint.pt ({backbone: None or the classifier backbone's description, with its
`source` and `run_id`; state_dict}), reports/training.json (per-epoch loss and seconds, the
validation mAP, `pretrained`), metrics/training.json, reports/training_curve.csv and
plots/training.png.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from components.core import paths, plots
from components.core.config import Config
from components.data import validate
from components.data.prepared import load_meta
from components.detection import coco_map, model
from components.detection import prepare as detection_prepare
from components.training import box_augment, models, pretrained, recipe, tuned

# the paths dvc.yaml's train stage declares, as classification's train writes them
CHECKPOINT = paths.CHECKPOINT
REPORT = paths.TRAINING_REPORT
PREVIEW = paths.PLOTS / "augmentation_preview.png"
CURVE_PLOT = paths.PLOTS / "training.png"


@dataclass(frozen=True)
class TrainResult:
    epochs: int
    val_map: float
    val_map_50: float
    seconds: float
    checkpoint: str


def split_data(split: str) -> tuple[np.ndarray, list[dict], dict]:
    """(uint8 images [N, 3, S, S], per image {boxes [k, 4] xyxy in shard pixels, labels [k]},
    the split's COCO ground truth)."""
    images = np.load(paths.shard_images(split), mmap_mode="r")
    coco = json.loads(detection_prepare.split_annotations(split).read_text())
    label_of = {c["id"]: i for i, c in enumerate(coco["categories"])}
    size = images.shape[-1]
    targets = [{"boxes": [], "labels": []} for _ in coco["images"]]
    scale = {im["id"]: (size / im["width"], size / im["height"]) for im in coco["images"]}
    for box in coco["annotations"]:
        sx, sy = scale[box["image_id"]]
        x, y, w, h = box["bbox"]
        target = targets[box["image_id"] - 1]
        target["boxes"].append([x * sx, y * sy, (x + w) * sx, (y + h) * sy])
        target["labels"].append(label_of[box["category_id"]])
    targets = [
        {"boxes": torch.tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4),
         "labels": torch.tensor(t["labels"], dtype=torch.int64)}
        for t in targets
    ]  # fmt: skip
    return images, targets, coco


def to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(images, dtype=np.float32) / 255)


@dataclass(frozen=True)
class Fitted:
    detector: torch.nn.Module
    backbone: dict | None  # None: the detector's own stages; else `transferred`'s description
    # per epoch: epoch, train_loss, seconds (since training began), trainable_stages (the
    # transferred stages that learnt; None from scratch)
    history: list[dict]
    seconds: float
    frozen: bool  # the transferred stages did not learn
    strategy: str | None = None  # train.strategy of the transferred stages; None from scratch


def run(cfg: Config) -> TrainResult:
    validate.require_passed()
    cfg = settings(cfg)
    use_threads(cfg)
    meta = load_meta()
    images, targets, _ = split_data("train")
    torch.manual_seed(cfg.seed)  # the preview's draws, from a fork of this state
    _preview(box_augment.transform(cfg), images, targets, meta["classes"])
    fitted = fit(cfg, images, targets, len(meta["classes"]))
    save(fitted, CHECKPOINT)
    metrics = evaluate(fitted.detector, "val")
    seconds = round(fitted.seconds, 2)
    paths.write_json(REPORT, {"task": "detection", "epochs": fitted.history,
                              "train_seconds": seconds, "val": metrics,
                              "pretrained": source(fitted)})  # fmt: skip
    paths.write_metrics(
        paths.TRAINING_METRICS,
        {"epochs_run": len(fitted.history), "val_map": round(metrics["map"], 6),
         "val_map_50": round(metrics["map_50"], 6), "train_seconds": seconds},
    )  # fmt: skip
    paths.write_csv(paths.TRAINING_CURVE, fitted.history, list(fitted.history[0]))
    plots.detection_training_curve(fitted.history, CURVE_PLOT)
    return TrainResult(
        len(fitted.history), metrics["map"], metrics["map_50"], round(fitted.seconds, 2),
        str(CHECKPOINT),
    )  # fmt: skip


def settings(cfg: Config) -> Config:
    """`cfg` with, when `train.use_tuned`, the best detection params of reports/tuning.json
    (components/detection/tune.py); train, evaluate, export, quantize and register use it."""
    return tuned.apply_tuned(cfg) if cfg.train.use_tuned else cfg


def fit(cfg: Config, images: np.ndarray, targets: list[dict], n_classes: int) -> Fitted:
    """The detector of `cfg`, trained on `images` (uint8 [N, 3, S, S]) and their `targets`."""
    torch.manual_seed(cfg.seed)
    backbone, weights = transferred(cfg)
    detector = model.build(cfg, n_classes, backbone)
    if backbone is not None:
        model.load_classifier(detector, weights, backbone["source"])
        _log_source(backbone)
    stages = detector.backbone.stages() if backbone is not None else []
    learning_at_end = _trainable_stages(cfg, cfg.detection.epochs, stages)
    augment = box_augment.transform(cfg)
    optimizer = torch.optim.AdamW(
        _parameter_groups(detector, cfg, stages, learning_at_end),
        weight_decay=cfg.train.weight_decay,
    )
    batch = cfg.detection.batch_size
    steps_per_epoch = max(1, math.ceil(len(images) / batch))
    schedule = _schedule(optimizer, cfg, steps_per_epoch)
    clip = cfg.train.grad_clip_norm or 10.0
    generator = torch.Generator().manual_seed(cfg.seed)
    history, start = [], time.perf_counter()
    for epoch in range(1, cfg.detection.epochs + 1):
        learning = _trainable_stages(cfg, epoch, stages)
        frozen = models.freeze_stages(stages, learning)
        detector.train()
        models.hold_batch_norm(frozen)  # nor do their batch-norm statistics move
        order = torch.randperm(len(images), generator=generator).numpy()
        total = 0.0
        for first in range(0, len(order), batch):
            index = np.sort(order[first : first + batch])
            if len(index) < 2:  # batch norm cannot learn from one image at a 1x1 stage
                continue
            batch_images = torch.from_numpy(np.array(images[index]))
            x, y = box_augment.apply(augment, batch_images, [targets[i] for i in index])
            losses = detector(list(x), y)
            loss = sum(losses.values())
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(detector.parameters(), clip)
            optimizer.step()
            schedule.step()
            total += loss.item() * len(index)
        seconds = round(time.perf_counter() - start, 2)
        history.append(
            {"epoch": epoch, "train_loss": total / max(1, len(images)), "seconds": seconds,
             "trainable_stages": _count(stages, learning)}
        )  # fmt: skip
    frozen = bool(stages) and learning_at_end == 0
    strategy = cfg.train.strategy if stages else None
    return Fitted(detector, backbone, history, time.perf_counter() - start, frozen, strategy)


def save(fitted: Fitted, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with paths.atomic(path) as partial:
        state = fitted.detector.state_dict()
        torch.save({"backbone": fitted.backbone, "state_dict": state}, partial)


def source(fitted: Fitted) -> dict | None:
    """Where the backbone came from (None: from scratch), for reports."""
    if fitted.backbone is None:
        return None
    keys = ("source", "run_id", "arch", "widths")
    return {**{k: fitted.backbone[k] for k in keys}, "strategy": fitted.strategy,
            "frozen": fitted.frozen}  # fmt: skip


def transferred(cfg: Config) -> tuple[dict | None, dict | None]:
    """(the backbone's description, its weights) of `detection.pretrained`'s classifier;
    (None, None) from scratch."""
    uri = cfg.detection.pretrained
    if not uri:
        return None, None
    if uri in model.PACKAGED:  # ImageNet weights: in an installed package, or torch's cache
        backbone, weights = model.imagenet_weights(uri)
        return {**backbone, "source": uri, "run_id": None}, weights
    checkpoint = pretrained.lensflow_checkpoint(uri, "detection.pretrained")
    backbone, weights = model.from_classifier(checkpoint, uri)
    return {**backbone, "source": uri, "run_id": checkpoint["run_id"]}, weights


def _trainable_stages(cfg: Config, epoch: int, stages: list) -> int | None:
    """How many of the transferred `stages` (from the top) learn in `epoch` (1-based):
    classification's schedule of `train.strategy` (`recipe.trainable_stages`: `head_epochs`,
    `unfreeze_stages`, `unfreeze_every`) over `detection.epochs`; None: all of them (also
    from scratch, where there are none to freeze)."""
    if not stages:
        return None
    return recipe.trainable_stages(cfg.train, epoch, len(stages))


def _count(stages: list, learning: int | None) -> int | None:
    return (len(stages) if learning is None else learning) if stages else None


def _parameter_groups(detector, cfg: Config, stages: list, learning: int | None) -> list[dict]:
    """The FPN and the heads at `detection.lr`; the transferred `stages` that learn in some
    epoch (the last `learning`, None: all; the schedule only adds stages, so the last epoch's
    are all of them) at `train.backbone_lr_factor` x that, from the start, as classification's
    loop does: one LR schedule spans the run, and a stage frozen in an epoch gets no gradient,
    so the optimiser leaves it untouched. The others are in no group."""
    lr = cfg.detection.lr
    transferred = {id(p) for stage in stages for p in stage.parameters()}
    groups = [{"params": [p for p in detector.parameters() if id(p) not in transferred],
               "lr": lr}]  # fmt: skip
    learns = stages if learning is None else stages[len(stages) - learning :]
    params = [p for stage in learns for p in stage.parameters()]
    if params:
        groups.append({"params": params, "lr": lr * cfg.train.backbone_lr_factor})
    return groups


def _log_source(backbone: dict) -> None:
    """The classifier the backbone came from, on the active MLflow run (lineage)."""
    import mlflow

    if mlflow.active_run() is not None:
        tags = {"lensflow.pretrained": backbone["source"],
                "lensflow.pretrained_run_id": backbone["run_id"],
                "lensflow.pretrained_arch": backbone["arch"]}  # fmt: skip
        mlflow.set_tags({key: value for key, value in tags.items() if value})


def use_threads(cfg: Config) -> None:
    if cfg.detection.threads:
        torch.set_num_threads(cfg.detection.threads)


def _preview(augment, images: np.ndarray, targets: list[dict], classes: list[str]) -> None:
    """16 training images as augmented, with their boxes; drawn from a forked generator, so
    training's random draws stay those of its seed."""
    with torch.random.fork_rng():
        x, y = box_augment.apply(
            augment, torch.from_numpy(np.array(images[:16])), list(targets[:16])
        )
    boxes = [
        [(*box.tolist(), classes[int(label)]) for box, label in zip(*t.values(), strict=True)]
        for t in y
    ]
    titles = [f"{len(b)} boxes" for b in boxes]
    pixels = (x * 255).round().to(torch.uint8).numpy()
    plots.image_grid(pixels, titles, PREVIEW, boxes=boxes)
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_artifact(str(PREVIEW), "plots")


def _schedule(optimizer, cfg: Config, steps_per_epoch: int):
    warmup = cfg.train.warmup_epochs * steps_per_epoch
    total = max(1, cfg.detection.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def predict(detector, images: np.ndarray, batch: int = 64, session=None) -> list[dict]:
    """Detections of uint8 images [N, 3, H, W] in their pixels: `model.Heads` by PyTorch, or
    by the ONNX Runtime `session` of its export, then `model.Decoder` in both cases."""
    detector.eval()
    size = detector.transform.min_size[0]
    heads, decode = model.Heads(detector, size), model.Decoder(detector, size)
    found = []
    for first in range(0, len(images), batch):
        chunk = np.array(images[first : first + batch])  # a writable copy of the memmap
        if session is None:
            outputs = heads(torch.from_numpy(chunk))
        else:
            outputs = session.run(list(decode.outputs), {"images": chunk})
        found += decode(*outputs, [chunk.shape[-2:]] * len(chunk))
    return found


def detections_as_coco(found: list[dict], coco: dict, size: int) -> list[dict]:
    """Detections in shard pixels -> COCO results in each image's own pixels."""
    ids = [c["id"] for c in coco["categories"]]
    results = []
    for image, out in zip(coco["images"], found, strict=True):
        sx, sy = image["width"] / size, image["height"] / size
        for box, score, label in zip(out["boxes"], out["scores"], out["labels"], strict=True):
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append(
                {"image_id": image["id"], "category_id": ids[int(label)], "score": float(score),
                 "bbox": [x1 * sx, y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy]}
            )  # fmt: skip
    return results


def evaluate(detector, split: str) -> dict:
    images, _, coco = split_data(split)
    found = predict(detector, images)
    return coco_map.evaluate(coco, detections_as_coco(found, coco, images.shape[-1]))


def load(cfg: Config, path: Path = CHECKPOINT):
    """The trained detector, built with `cfg` as given (callers pass `settings(cfg)`)."""
    backbone, state = read_checkpoint(path)
    detector = model.build(cfg, len(load_meta()["classes"]), backbone)
    detector.load_state_dict(state)
    return detector.eval()


def read_checkpoint(path: Path = CHECKPOINT) -> tuple[dict | None, dict]:
    """(the backbone's description or None, the state_dict); a checkpoint of before transfer
    was the state_dict alone."""
    checkpoint = torch.load(path, weights_only=True)
    if "state_dict" not in checkpoint:
        return None, checkpoint
    return checkpoint["backbone"], checkpoint["state_dict"]


def summary(result: TrainResult) -> str:
    return (
        f"train: {result.epochs} epochs in {result.seconds:.1f} s, validation mAP@[.5:.95] "
        f"{result.val_map:.4f}, mAP@0.5 {result.val_map_50:.4f} ({result.checkpoint})"
    )
