"""promote, for `task: detection`: the gates on mAP and a paired bootstrap over test images.

The decision, its record in the promotion log, the lease and the alias moves are
classification's (components/release/promote.py, which calls `gate_results` here). The
candidate and the champion are scored by ONNX Runtime and `model.Decoder` (rebuilt from each
version's metadata) on the same prepared test split, in each image's own pixels:
- absolute: `min_map` (COCO mAP@[.5:.95], re-scored here), `export_parity` (the export's
  box-matching parity), `no_leakage`, `max_latency_ms_p95` (off by default);
- relative to the champion: `same_classes` (the same class names in the same order),
  `beats_champion` (mAP gained > `min_improvement`) and `bootstrap`.

Why a paired bootstrap: mAP is not a mean of per-image scores (precision is accumulated over
all images' detections, ranked by score), so neither McNemar nor a paired t-test applies. The
test images are resampled with replacement `bootstrap_samples` times; on each resample both
models' mAP is recomputed on the same images, and the one-sided p-value is the share of
resamples where the candidate does not beat the champion, (1 + #{diff <= 0}) / (B + 1). It
passes at p <= `bootstrap_p` with a positive observed difference.

To make B resamples affordable, COCO's matching (per image and class: the 100 best
detections, greedy by score, at IoU 0.50:0.05:0.95, crowd boxes as ignored regions) runs once
per model (`matches`), and a resample only reweights each image's detections and boxes by the
times it was drawn (`weighted_map`: COCO's accumulation with weights, 101 recall points).
With every weight 1 it equals faster-coco-eval's mAP (checked in the tests); a duplicated
image counts as its copies would, up to the order of detections of equal score.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np

from components.core import paths
from components.core.config import Config
from components.core.errors import UserError
from components.detection import coco_map, train
from components.detection import prepare as detection_prepare
from components.detection_release import registry as detection_registry
from components.release import promote, registry
from components.release.promote import PromotionResult

IOUS = np.linspace(0.5, 0.95, 10)
RECALLS = np.linspace(0.0, 1.0, 101)
MAX_DETECTIONS = 100  # COCO's maxDets for mAP
CHUNK = 32  # resamples accumulated at once (memory: CHUNK x 10 x detections of a class)
RELATIVE = ("same_classes", "beats_champion", "bootstrap")


def run(cfg: Config, version: str | None = None) -> PromotionResult:
    return promote.run(cfg, version, gates=gate_results)


def summary(result: PromotionResult) -> str:
    """promote's line; then, against a champion, what decided: both mAPs, each at its image
    size and on which images, the gain and the bootstrap's p (or why they were not compared)."""
    line = promote.summary(result)
    if not paths.PROMOTION_REPORT.exists():
        return line
    report = json.loads(paths.PROMOTION_REPORT.read_text())
    evidence, gates = report.get("evidence") or {}, report.get("gates") or {}
    if evidence.get("comparison_refused"):
        return f"{line}\n  not compared with the champion: {evidence['comparison_refused']}"
    if "champion" not in evidence:
        return line
    mine, theirs = evidence["candidate"], evidence["champion"]
    boot = gates["bootstrap"]
    p = f"p {boot['value']:.3f} (needs <= {boot['threshold']})" if "value" in boot else "off"
    return (
        f"{line}\n  test mAP@[.5:.95]: v{mine['version']} {mine['map']:.4f} at "
        f"{mine['image_size']} px, champion v{theirs['version']} {theirs['map']:.4f} at "
        f"{theirs['image_size']} px ({theirs['test_images_from']}); gain "
        f"{gates['beats_champion']['value']:+.4f} (needs > "
        f"{gates['beats_champion']['threshold']}), paired bootstrap {p}"
    )


def gate_results(cfg: Config, name: str, candidate: str, champion: str | None):
    """{gate: {value, threshold, passed[, note]}} and the evidence they were decided on."""
    limits = cfg.promote
    images, _, coco = train.split_data("test")
    test_shas = promote.holdout_shas()
    mine = scored(cfg, name, candidate, images, coco)
    if mine.get("refused"):
        raise UserError(f"v{candidate} of {name}: {mine['refused']}")
    parity = json.loads(promote.version_tag(name, candidate, "lensflow.export_parity") or "null")
    gates = {
        "min_map": promote.at_least(mine["map"], limits.min_map),
        "export_parity": {
            "value": parity["mismatched_images"] if parity else None, "threshold": 0,
            "passed": bool(parity and parity["parity"]),
            **({} if parity else {"note": "the version has no parity evidence"}),
        },
        "no_leakage": promote.leakage_gate(
            candidate, promote.images_seen(name, candidate, test_shas)
        ),
        "max_latency_ms_p95": _latency_gate(mine, images, limits.max_latency_ms_p95),
    }  # fmt: skip
    evidence = {"candidate": _public(mine), "test_images": len(images)}
    gates |= _relative_gates(cfg, name, mine, champion, (images, coco, test_shas), evidence)
    return gates, evidence


def _relative_gates(cfg: Config, name: str, mine: dict, champion, test, evidence) -> dict:
    images, coco, test_shas = test
    if champion is None:
        return {g: {"passed": True, "note": "there is no champion yet"} for g in RELATIVE}
    theirs = scored(cfg, name, champion, images, coco)
    same = theirs.get("classes") == mine["classes"]
    gates = {"same_classes": {"value": mine["classes"], "threshold": theirs.get("classes"),
                              "passed": same}}  # fmt: skip
    leaked = promote.images_seen(name, champion, test_shas)
    refused = theirs.get("refused")
    if not refused and not same:
        refused = f"the champion v{champion} detects other classes (a person decides)"
    if not refused and (leaked is None or leaked):
        refused = promote.leakage_gate(champion, leaked)["note"].replace(
            "this version", f"v{champion}"
        )
    if refused:
        evidence["comparison_refused"] = refused
        return gates | {g: {"passed": False, "note": f"not comparable: {refused}"}
                        for g in RELATIVE[1:]}  # fmt: skip
    evidence["champion"] = _public(theirs)
    gained = mine["map"] - theirs["map"]
    gates["beats_champion"] = {
        "value": gained, "threshold": cfg.promote.min_improvement,
        "passed": gained > cfg.promote.min_improvement, "champion_version": champion,
        "champion_map": theirs["map"], "champion_image_size": theirs["image_size"],
        "candidate_image_size": mine["image_size"],
    }  # fmt: skip
    gates["bootstrap"] = bootstrap_gate(cfg, mine["matches"], theirs["matches"], len(images))
    return gates


def bootstrap_gate(cfg: Config, mine: dict, theirs: dict, n_images: int) -> dict:
    limits = cfg.promote
    if limits.bootstrap_p is None:
        return {"passed": True, "note": "off"}
    rng = np.random.default_rng(cfg.seed)
    weights = rng.multinomial(n_images, np.full(n_images, 1 / n_images), limits.bootstrap_samples)
    diff = weighted_map(mine, weights) - weighted_map(theirs, weights)
    observed = float(weighted_map(mine, np.ones((1, n_images)))[0]) - float(
        weighted_map(theirs, np.ones((1, n_images)))[0]
    )
    p = float((1 + np.count_nonzero(diff <= 0)) / (len(diff) + 1))
    low, high = (float(v) for v in np.percentile(diff, [2.5, 97.5]))
    return {
        "value": p, "threshold": limits.bootstrap_p, "samples": len(diff),
        "map_difference": observed, "ci95": [low, high],
        "passed": observed > 0 and p <= limits.bootstrap_p,
    }  # fmt: skip


def scored(cfg: Config, name: str, version: str, images: np.ndarray, coco: dict) -> dict:
    """A version's detections on the test split, at its own `detection.image_size`, its COCO
    metrics and its matches; or `refused` saying why it cannot be scored here.

    `images` is the prepared test shard, at the candidate run's size. A version trained at
    another size gets the same test images read again from the raw folder at its size (as
    its own prepare would have made them; `prepare.read_split_at`), not the shard resized
    inside its graph: a champion of a larger size would otherwise see blurred upsampled
    images. The ground truth is the same (boxes in each image's own pixels) and so are the
    image ids, so the paired bootstrap still pairs each image with itself."""
    session, meta = registry.load_onnx_session(f"models:/{name}/{version}")
    result = {"version": version, "classes": meta["classes"]}
    names = [c["name"] for c in coco["categories"]]
    if meta.get("task") != "detection":
        return result | {"refused": f"v{version} is not a detector"}
    if meta["classes"] != names:
        return result | {"refused": f"v{version} detects {meta['classes']}, the data {names}"}
    size = int(meta.get("image_size", images.shape[-1]))
    result |= {"image_size": size, "test_images_from": "prepared shard"}
    if size != images.shape[-1]:
        try:
            images = detection_prepare.read_split_at(cfg, "test", size)
        except UserError as exc:
            return result | {"refused": f"v{version} cannot be scored at its {size} px: {exc}"}
        result["test_images_from"] = f"raw images read again at {size} px"
    decode = detection_registry.decoder(meta)
    found = []
    for first in range(0, len(images), 64):
        chunk = np.array(images[first : first + 64])
        found += detection_registry.detect(session, decode, chunk)
    detections = train.detections_as_coco(found, coco, images.shape[-1])
    metrics = coco_map.evaluate(coco, detections)
    result |= {"map": metrics["map"], "map_50": metrics["map_50"]}
    result["predict"] = lambda batch: detection_registry.detect(session, decode, batch)
    return result | {"matches": matches(coco, detections)}


def _latency_gate(mine: dict, images: np.ndarray, budget: float | None) -> dict:
    if budget is None:
        return {"passed": True, "note": "off"}
    from components.scoring import speed

    p95 = speed.measure(mine["predict"], np.array(images), seconds=0)["latency_ms_p95"]
    return {"value": p95, "threshold": budget, "passed": p95 <= budget}


def _public(scored: dict) -> dict:
    return {k: v for k, v in scored.items() if k not in ("matches", "predict")}


def matches(coco: dict, detections: list[dict]) -> dict:
    """COCO's matching, once: per category, each counted detection's `score`, `image` (index
    in image-id order), `matched` and `ignored` [IoU thresholds, detections], and `boxes`
    (non-crowd ground-truth boxes per image)."""
    ids = sorted(im["id"] for im in coco["images"])
    index = {image_id: i for i, image_id in enumerate(ids)}
    truth, found = defaultdict(list), defaultdict(list)
    for box in coco["annotations"]:
        truth[box["image_id"], box["category_id"]].append(box)
    for det in detections:
        found[det["image_id"], det["category_id"]].append(det)
    per_class = {}
    for category in (c["id"] for c in coco["categories"]):
        parts = {"score": [], "image": [], "matched": [], "ignored": []}
        boxes = np.zeros(len(ids))
        for image_id in ids:
            gts = sorted(truth.get((image_id, category), []), key=lambda g: bool(g.get("iscrowd")))
            crowd = np.array([bool(g.get("iscrowd")) for g in gts], bool)
            boxes[index[image_id]] = np.count_nonzero(~crowd)
            dts = sorted(found.get((image_id, category), []), key=lambda d: -d["score"])
            dts = dts[:MAX_DETECTIONS]
            if not dts:
                continue
            matched, ignored = _match(_iou(dts, gts, crowd), crowd)
            parts["score"].append([d["score"] for d in dts])
            parts["image"].append([index[image_id]] * len(dts))
            parts["matched"].append(matched)
            parts["ignored"].append(ignored)
        if not parts["score"]:
            per_class[category] = {"boxes": boxes, "score": np.zeros(0)}
            continue
        joined = {k: np.concatenate(v, axis=-1) for k, v in parts.items()}
        order = np.argsort(-joined["score"], kind="mergesort")
        # what follows the last true positive lowers precision at recall already reached: it
        # never changes an interpolated precision, on any resample, so it is left out
        positive = np.flatnonzero((joined["matched"] & ~joined["ignored"])[:, order].any(0))
        order = order[: positive[-1] + 1] if len(positive) else order[:0]
        per_class[category] = {k: v[..., order] for k, v in joined.items()} | {"boxes": boxes}
    return per_class


def _iou(dts: list[dict], gts: list[dict], crowd: np.ndarray) -> np.ndarray:
    """[detections, truths] IoU of xywh boxes; a crowd box's union is the detection's area."""
    if not gts:
        return np.zeros((len(dts), 0))
    d, g = np.array([x["bbox"] for x in dts], float), np.array([x["bbox"] for x in gts], float)
    width = np.minimum(d[:, None, 0] + d[:, None, 2], g[None, :, 0] + g[None, :, 2])
    width -= np.maximum(d[:, None, 0], g[None, :, 0])
    height = np.minimum(d[:, None, 1] + d[:, None, 3], g[None, :, 1] + g[None, :, 3])
    height -= np.maximum(d[:, None, 1], g[None, :, 1])
    inter = np.clip(width, 0, None) * np.clip(height, 0, None)
    area_d, area_g = d[:, 2] * d[:, 3], g[:, 2] * g[:, 3]
    union = np.where(crowd[None, :], area_d[:, None], area_d[:, None] + area_g[None, :] - inter)
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _match(iou: np.ndarray, crowd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COCO's greedy matching of detections (by score) to truths (non-crowd first), per IoU
    threshold: (matched, matched to a crowd box = ignored), each [thresholds, detections]."""
    n_det, n_gt = iou.shape
    matched = np.zeros((len(IOUS), n_det), bool)
    ignored = np.zeros((len(IOUS), n_det), bool)
    best_possible = iou.max(1) if n_gt else np.zeros(n_det)
    for t, threshold in enumerate(IOUS):
        taken = np.zeros(n_gt, bool)
        for d in np.flatnonzero(best_possible >= threshold):
            best, m = min(threshold, 1 - 1e-10), -1
            for g in range(n_gt):
                if taken[g] and not crowd[g]:
                    continue
                if m > -1 and not crowd[m] and crowd[g]:
                    break
                if iou[d, g] < best:
                    continue
                best, m = iou[d, g], g
            if m > -1:
                matched[t, d], ignored[t, d], taken[m] = True, crowd[m], True
    return matched, ignored


def weighted_map(per_class: dict, weights: np.ndarray) -> np.ndarray:
    """mAP@[.5:.95] for each row of `weights` [resamples, images] (how often each image was
    drawn): COCO's accumulation, each image's detections and boxes counted that often."""
    weights = np.asarray(weights, float)
    total = np.zeros(len(weights))
    counted = np.zeros(len(weights))
    for found in per_class.values():
        n_boxes = weights @ found["boxes"]
        ap = np.zeros(len(weights))
        if len(found["score"]):
            for first in range(0, len(weights), CHUNK):
                ap[first : first + CHUNK] = _ap(found, weights[first : first + CHUNK])
        total += np.where(n_boxes > 0, ap, 0.0)
        counted += n_boxes > 0
    return np.divide(total, counted, out=np.zeros_like(total), where=counted > 0)


def _ap(found: dict, weights: np.ndarray) -> np.ndarray:
    """AP averaged over IoU thresholds and 101 recall points, per row of `weights`."""
    w = weights[:, found["image"]][:, None, :]  # [B, 1, D]
    counts = ~found["ignored"]
    tp = np.cumsum(w * (found["matched"] & counts), axis=2)
    fp = np.cumsum(w * (~found["matched"] & counts), axis=2)
    n_boxes = np.maximum(weights @ found["boxes"], 1e-12)[:, None, None]
    recall = tp / n_boxes
    precision = tp / (tp + fp + np.spacing(1))
    precision = np.maximum.accumulate(precision[..., ::-1], axis=2)[..., ::-1]
    interpolated = np.zeros(precision.shape[:2] + (len(RECALLS),))
    for b in range(precision.shape[0]):
        for t in range(precision.shape[1]):
            at = np.searchsorted(recall[b, t], RECALLS, side="left")
            ok = at < precision.shape[2]
            interpolated[b, t, ok] = precision[b, t, at[ok]]
    return interpolated.mean(axis=(1, 2))
