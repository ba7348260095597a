"""evaluate, for `task: detection`: COCO mAP of the trained detector on the test split, its
precision-recall curves and a gallery of its misdetections.

reports/evaluation.json: `map` (mAP@[.5:.95]), `map_50`, `map_75`, by object size
(`map_small`, `map_medium`, `map_large`), recalls (`mar_1`, `mar_10`, `mar_100`, …),
`per_class` AP (`null` for a class with no test box) and `misdetections` (at IoU 0.5 among
the boxes scoring at least `score`: `missed` ground-truth boxes, `false_positives`,
`images_with_errors`); metrics/evaluation.json keeps `test_map` and `test_map_50` for `dvc
metrics diff`. In the images' own pixels, by faster-coco-eval (`coco_map`).

Figures (plots/, logged to the step's MLflow run under `plots/` with the report and the
metrics `test/map`, `test/map_50`, `test/ap/<class>`): `detection_pr_curves.png`, each
class's precision against recall at IoU 0.5 (COCO's 101-point interpolated precision), and
`misclassified.png`, the test images with the most misdetections (up to 16, most first):
ground truth green where found and red where missed, predictions blue where right and orange
where false, with their scores.

Also what dvc.yaml's evaluate stage declares, in detection's terms: detections are matched to
the test boxes greedily by score at IoU >= 0.5 (any class). reports/predictions.csv and
plots/confusion_matrix.png: one (actual, predicted) row per box and per detection scoring >=
`CONFUSION_SCORE`, `background` for a missed box or a detection with no box;
plots/reliability.png: per score bin, the share of detections that found a box of their class;
plots/saliency.png: the first test images with their detections.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

from components.core import paths, plots, tracking
from components.core.config import Config
from components.data.prepared import load_meta
from components.detection import coco_map, train

PR_CURVES = paths.PLOTS / "detection_pr_curves.png"
MISDETECTIONS = paths.PLOTS / "misclassified.png"  # the name dvc.yaml's evaluate declares
SHOWN_SCORE = 0.5  # boxes scoring under this (or the detector's threshold, if higher) are no
# errors: the gallery shows what a user of the boxes would act on, not the tail mAP counts
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
    results = train.detections_as_coco(found, coco, images.shape[-1])
    metrics = coco_map.evaluate(coco, results, curves=True)
    curves = metrics.pop("pr_curves")
    score = max(cfg.detection.score_threshold, SHOWN_SCORE)
    errors = [misdetections(t, f, score) for t, f in zip(targets, found, strict=True)]
    metrics["misdetections"] = {
        "score": score,
        "iou": MATCH_IOU,
        "missed": sum(len(e["missed"]) for e in errors),
        "false_positives": sum(len(e["false"]) for e in errors),
        "images_with_errors": sum(bool(len(e["missed"]) + len(e["false"])) for e in errors),
    }
    _figures(images, targets, found, load_meta()["classes"])
    paths.write_json(paths.EVALUATION_REPORT, {"task": "detection", "split": "test", **metrics})
    paths.write_metrics(
        paths.EVALUATION_METRICS,
        {"test_map": round(metrics["map"], 6), "test_map_50": round(metrics["map_50"], 6)},
    )
    classes = [c["name"] for c in coco["categories"]]
    names = [Path(image["file_name"]).name for image in coco["images"]]
    title = "precision-recall at IoU 0.5 (test)"
    figures = [
        plots.precision_recall(curves, coco_map.RECALLS, title, PR_CURVES),
        gallery(images, targets, found, errors, classes, names),
    ]
    with tracking.step_run(cfg, "evaluate"):
        import mlflow

        mlflow.log_metrics({"test/map": metrics["map"], "test/map_50": metrics["map_50"]})
        for name, ap in metrics["per_class"].items():
            if ap is not None:
                mlflow.log_metric(f"test/ap/{name}", ap)
        mlflow.log_artifact(str(paths.EVALUATION_REPORT))
        for figure in figures:
            mlflow.log_artifact(str(figure), "plots")
    return EvaluationResult(metrics["map"], metrics["map_50"], str(paths.EVALUATION_REPORT))


def misdetections(target: dict, found: dict, score: float) -> dict:
    """One image's errors at IoU `MATCH_IOU` among the predictions scoring >= `score`, matched
    greedily from the highest score to a ground-truth box of their class (as COCO matches):
    indices of the `missed` ground-truth boxes, and of the `right` and `false` predictions
    (into `found`)."""
    kept = torch.nonzero(found["scores"] >= score).flatten()
    kept = kept[found["scores"][kept].argsort(descending=True)]
    iou = box_iou(found["boxes"][kept], target["boxes"])  # [kept, ground truth]
    same = found["labels"][kept][:, None] == target["labels"][None, :]
    iou = torch.where(same, iou, torch.zeros_like(iou))
    taken = torch.zeros(len(target["boxes"]), dtype=torch.bool)
    right, false = [], []
    for row, index in enumerate(kept.tolist()):
        candidates = iou[row].masked_fill(taken, -1)
        if len(candidates) and candidates.max() >= MATCH_IOU:
            taken[candidates.argmax()] = True
            right.append(index)
        else:
            false.append(index)
    missed = torch.nonzero(~taken).flatten().tolist()
    return {"missed": missed, "right": right, "false": false}


def gallery(images, targets, found, errors, classes: list[str], names: list[str]) -> Path:
    """The images with the most misses and false positives, their boxes colour-coded."""
    counts = np.array([len(e["missed"]) + len(e["false"]) for e in errors], dtype=int)
    worst = [int(i) for i in np.argsort(-counts, kind="stable")[:16] if counts[i]]
    boxes, titles = [], []
    for i in worst:
        target, out, error = targets[i], found[i], errors[i]
        missed = set(error["missed"])
        drawn = [
            (*box.tolist(), classes[int(label)], "red" if k in missed else "limegreen")
            for k, (box, label) in enumerate(zip(target["boxes"], target["labels"], strict=True))
        ]
        for colour, kind in (("deepskyblue", "right"), ("orange", "false")):
            drawn += [
                (*out["boxes"][k].tolist(),
                 f"{classes[int(out['labels'][k])]} {float(out['scores'][k]):.2f}", colour)
                for k in error[kind]
            ]  # fmt: skip
        boxes.append(drawn)
        titles.append(f"{names[i]}: {len(missed)} missed, {len(error['false'])} false")
    return plots.image_grid(np.asarray(images)[worst], titles, MISDETECTIONS, boxes=boxes)


def summary(result: EvaluationResult) -> str:
    return f"evaluate: test mAP@[.5:.95] {result.map:.4f}, mAP@0.5 {result.map_50:.4f}"


def _figures(images: np.ndarray, targets: list[dict], found: list[dict], classes: list) -> None:
    names = [*classes, BACKGROUND]
    rows, scored = [], []
    for target, out in zip(targets, found, strict=True):
        pairs, hits = _match(target, out, len(classes))
        rows += [{"actual": names[a], "predicted": names[p]} for a, p, s in pairs]
        scored += hits
    paths.write_csv(paths.PREDICTIONS, rows, ["actual", "predicted"])
    matrix = np.zeros((len(names), len(names)), dtype=int)
    for row in rows:
        matrix[names.index(row["actual"]), names.index(row["predicted"])] += 1
    plots.confusion_matrix(matrix, names, paths.PLOTS / "confusion_matrix.png")
    plots.reliability_diagram(*_calibration(scored), paths.PLOTS / "reliability.png")
    first = list(range(min(16, len(images))))
    _detections(images, found, first, classes, paths.PLOTS / "saliency.png")


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


def _detections(images, found, index: list[int], classes: list, out) -> None:
    """The images at `index` with their detections scoring >= CONFUSION_SCORE."""
    drawn = []
    for i in index:
        kept = found[i]["scores"] >= CONFUSION_SCORE
        boxes = [(*b.tolist(), f"{classes[int(c)]} {float(s):.2f}") for b, c, s in
                 zip(found[i]["boxes"][kept], found[i]["labels"][kept], found[i]["scores"][kept],
                     strict=True)]  # fmt: skip
        drawn.append(boxes)
    pixels = np.array(images[index]) if index else np.zeros((0, 3, 8, 8), np.uint8)
    titles = [f"test image {i + 1}" for i in index]
    plots.image_grid(pixels, titles, out, boxes=drawn)
