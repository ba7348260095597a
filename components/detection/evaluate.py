"""evaluate, for `task: detection`: COCO mAP of the trained detector on the test split.

reports/evaluation.json: `map` (mAP@[.5:.95]), `map_50`, `map_75`, by object size
(`map_small`, `map_medium`, `map_large`), recalls (`mar_1`, `mar_10`, `mar_100`, …) and
`per_class` AP (`null` for a class with no test box); metrics/evaluation.json keeps
`test_map` and `test_map_50` for `dvc metrics diff`. In the images' own pixels, by
faster-coco-eval (`coco_map`).

Also what dvc.yaml's evaluate stage declares, in detection's terms: detections are matched to
the test boxes greedily by score at IoU >= 0.5 (any class). reports/predictions.csv and
plots/confusion_matrix.png: one (actual, predicted) row per box and per detection scoring >=
`CONFUSION_SCORE`, `background` for a missed box or a detection with no box;
plots/reliability.png: per score bin, the share of detections that found a box of their class;
plots/misclassified.png: the test images with the most such errors, their boxes (`gt:`) and
detections drawn; plots/saliency.png: the first test images with their detections.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_iou

from components.core import paths, plots
from components.core.config import Config
from components.data.prepared import load_meta
from components.detection import coco_map, train

MATCH_IOU = 0.5
CONFUSION_SCORE = 0.5  # detections below it stay out of the confusion matrix and galleries
BACKGROUND = "background"


@dataclass(frozen=True)
class EvaluationResult:
    map: float
    map_50: float
    report: str


def run(cfg: Config) -> EvaluationResult:
    cfg = train.settings(cfg)  # train.use_tuned: the study's score threshold, NMS IoU
    train.use_threads(cfg)
    images, targets, coco = train.split_data("test")
    found = train.predict(train.load(cfg), images)
    metrics = coco_map.evaluate(coco, train.detections_as_coco(found, coco, images.shape[-1]))
    _figures(images, targets, found, load_meta()["classes"])
    paths.write_json(paths.EVALUATION_REPORT, {"task": "detection", "split": "test", **metrics})
    paths.write_metrics(
        paths.EVALUATION_METRICS,
        {"test_map": round(metrics["map"], 6), "test_map_50": round(metrics["map_50"], 6)},
    )
    return EvaluationResult(metrics["map"], metrics["map_50"], str(paths.EVALUATION_REPORT))


def summary(result: EvaluationResult) -> str:
    return f"evaluate: test mAP@[.5:.95] {result.map:.4f}, mAP@0.5 {result.map_50:.4f}"


def _figures(images: np.ndarray, targets: list[dict], found: list[dict], classes: list) -> None:
    names = [*classes, BACKGROUND]
    rows, scored, errors = [], [], []
    for target, out in zip(targets, found, strict=True):
        pairs, hits = _match(target, out, len(classes))
        rows += [{"actual": names[a], "predicted": names[p]} for a, p, s in pairs]
        scored += hits
        errors.append(sum(a != p for a, p, _ in pairs))
    paths.write_csv(paths.PREDICTIONS, rows, ["actual", "predicted"])
    matrix = np.zeros((len(names), len(names)), dtype=int)
    for row in rows:
        matrix[names.index(row["actual"]), names.index(row["predicted"])] += 1
    plots.confusion_matrix(matrix, names, paths.PLOTS / "confusion_matrix.png")
    plots.reliability_diagram(*_calibration(scored), paths.PLOTS / "reliability.png")
    worst = [i for i in np.argsort(errors, kind="stable")[::-1][:16] if errors[i]]
    _gallery(images, targets, found, worst, classes, paths.PLOTS / "misclassified.png")
    first = list(range(min(16, len(images))))
    _gallery(images, None, found, first, classes, paths.PLOTS / "saliency.png")


def _match(target: dict, out: dict, background: int) -> tuple[list, list]:
    """Greedy by score at IoU >= MATCH_IOU: (actual, predicted, score) per box and per
    detection >= CONFUSION_SCORE, and (score, found a box of its class) per detection."""
    boxes, labels = target["boxes"], target["labels"]
    iou = box_iou(out["boxes"], boxes) if len(boxes) else torch.zeros(len(out["boxes"]), 0)
    free = torch.ones(len(boxes), dtype=torch.bool)
    pairs, hits = [], []
    for d in torch.argsort(out["scores"], descending=True).tolist():
        score, label = float(out["scores"][d]), int(out["labels"][d])
        overlap = iou[d].where(free, torch.tensor(-1.0)) if len(boxes) else iou[d]
        g = int(overlap.argmax()) if len(boxes) and overlap.max() >= MATCH_IOU else None
        if g is not None:
            free[g] = False
        hits.append((score, g is not None and int(labels[g]) == label))
        if score >= CONFUSION_SCORE:
            pairs.append((background if g is None else int(labels[g]), label, score))
        elif g is not None:
            free[g] = True  # a low-scoring match leaves the box to count as missed
    pairs += [(int(labels[g]), background, 0.0) for g in torch.nonzero(free).flatten().tolist()]
    return pairs, hits


def _calibration(scored: list[tuple[float, bool]], n_bins: int = 10) -> tuple[list, float]:
    bins, ece = [], 0.0
    for b in range(n_bins):
        lower, upper = b / n_bins, (b + 1) / n_bins
        inside = [(s, h) for s, h in scored if lower <= s < upper or (b == n_bins - 1 and s == 1)]
        accuracy = float(np.mean([h for _, h in inside])) if inside else 0.0
        if inside:
            ece += len(inside) / len(scored) * abs(accuracy - np.mean([s for s, _ in inside]))
        bins.append({"lower": lower, "upper": upper, "count": len(inside), "accuracy": accuracy})
    return bins, float(ece)


def _gallery(images, targets, found, index: list[int], classes: list, out) -> None:
    drawn = []
    for i in index:
        kept = found[i]["scores"] >= CONFUSION_SCORE
        boxes = [(*b.tolist(), f"{classes[int(c)]} {float(s):.2f}") for b, c, s in
                 zip(found[i]["boxes"][kept], found[i]["labels"][kept], found[i]["scores"][kept],
                     strict=True)]  # fmt: skip
        if targets is not None:
            t = targets[i]
            boxes += [(*b.tolist(), f"gt:{classes[int(c)]}")
                      for b, c in zip(t["boxes"], t["labels"], strict=True)]  # fmt: skip
        drawn.append(boxes)
    pixels = np.array(images[index]) if index else np.zeros((0, 3, 8, 8), np.uint8)
    titles = [f"test image {i + 1}" for i in index]
    plots.image_grid(pixels, titles, out, boxes=drawn)
