"""COCO box mAP, computed by faster-coco-eval (a C++ reimplementation of pycocotools' COCOeval,
checked against pycocotools to 1e-4 in the tests).

`evaluate(ground_truth, detections)`: ground truth as a COCO dict (the prepared
`<split>-annotations.json`), detections as COCO results `[{image_id, category_id, bbox
[x, y, w, h], score}]` in the same pixels. Returns mAP@[.5:.95], mAP@0.5, mAP@0.75, by object
size, and the AP of each class (mAP@[.5:.95] over that class; `null` for a class with no
ground-truth box). Crowd boxes (`iscrowd: 1`) are ignored regions, as COCO defines them.
With `curves`, also `pr_curves`: each class's precision at COCO's 101 recall points at IoU
0.5 (`null` for a class with no ground-truth box; 0 where that recall is never reached).
"""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np

STATS = (
    "map", "map_50", "map_75", "map_small", "map_medium", "map_large",
    "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large",
)  # fmt: skip


RECALLS = np.linspace(0, 1, 101)  # COCO's recall points, those of `pr_curves`


def evaluate(
    ground_truth: dict, detections: list[dict], backend: str = "faster", curves: bool = False
) -> dict:
    """The COCO metrics of `detections` against `ground_truth`; `backend` "pycocotools" runs
    the reference implementation instead (installed for the tests)."""
    gt = copy.deepcopy(ground_truth)
    gt.setdefault("info", {})
    gt.setdefault("licenses", [])
    for i, box in enumerate(gt["annotations"], start=1):
        box.setdefault("id", i)
        box.setdefault("area", box["bbox"][2] * box["bbox"][3])
        box.setdefault("iscrowd", 0)
    if not detections or not gt["annotations"]:
        found = _empty(gt)
        if curves:
            zero = [0.0] * len(RECALLS)
            found["pr_curves"] = {
                k: None if v is None else zero for k, v in found["per_class"].items()
            }
        return found
    coco_eval = _run(gt, copy.deepcopy(detections), backend)
    stats = dict(zip(STATS, (float(v) for v in coco_eval.stats[: len(STATS)]), strict=True))
    found = {**stats, "per_class": _per_class(coco_eval, gt)}
    if curves:
        found["pr_curves"] = _curves_at_50(coco_eval, found["per_class"])
    return found


def _run(gt: dict, detections: list[dict], backend: str):
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval as Eval
    else:
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as Eval
    with contextlib.redirect_stdout(io.StringIO()):  # both print their progress and summary
        truth = COCO()
        truth.dataset = gt
        truth.createIndex()
        coco_eval = Eval(truth, truth.loadRes(detections), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def _per_class(coco_eval, gt: dict) -> dict[str, float | None]:
    """AP@[.5:.95] per category: precision [T, R, K, area, maxDets], area all, 100 boxes."""
    precision = np.asarray(coco_eval.eval["precision"])[:, :, :, 0, -1]
    names = {c["id"]: c["name"] for c in gt["categories"]}
    with_truth = {b["category_id"] for b in gt["annotations"] if not b.get("iscrowd")}
    found = {}
    for k, category in enumerate(coco_eval.params.catIds):
        values = precision[:, :, k]
        valid = values[values > -1]
        known = category in with_truth and valid.size
        found[names.get(category, str(category))] = float(valid.mean()) if known else None
    return found


def _curves_at_50(coco_eval, per_class: dict) -> dict[str, list[float] | None]:
    """precision [T, R, K, area, maxDets] at IoU 0.5 (T = 0), every area, 100 boxes."""
    precision = np.asarray(coco_eval.eval["precision"])[0, :, :, 0, -1]
    names = list(per_class)
    return {
        names[k]: None if per_class[names[k]] is None else np.maximum(precision[:, k], 0).tolist()
        for k in range(len(coco_eval.params.catIds))
    }


def _empty(gt: dict) -> dict:
    """No detections, or no ground truth: every metric 0 (COCOeval gives -1 or fails)."""
    with_truth = {b["category_id"] for b in gt["annotations"] if not b.get("iscrowd")}
    per_class = {c["name"]: (0.0 if c["id"] in with_truth else None) for c in gt["categories"]}
    return {**dict.fromkeys(STATS, 0.0), "per_class": per_class}
