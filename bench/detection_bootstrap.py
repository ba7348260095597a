"""The paired bootstrap of detection promotion: its reweighted mAP against faster-coco-eval run
on every resample. Prints one JSON line.

A seeded synthetic test split (`--images` images, 3 classes, 3 boxes an image, a crowd box in
every fifth, `--detections` detections an image: near-copies of the boxes and background
boxes), two detectors' worth of detections; measures `promote.matches` (once per model),
`promote.weighted_map` over `--samples` resamples for both models, and faster-coco-eval on
`--naive` resamples (extrapolated to `--samples`), and checks the two agree on those.

    python bench/detection_bootstrap.py [--images 60] [--detections 100] [--samples 1000]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from components.detection import coco_map
from components.detection_release import promote


def split(rng, n_images: int, per_image: int, noise: float):
    truth = {
        "images": [{"id": i, "width": 64, "height": 64} for i in range(1, n_images + 1)],
        "categories": [{"id": k, "name": str(k)} for k in (1, 2, 3)],
        "annotations": [],
    }
    found = []
    for i in range(1, n_images + 1):
        for j in range(3):
            x, y, s = *rng.uniform(0, 40, 2), rng.uniform(4, 20)
            category = int(rng.integers(1, 4))
            truth["annotations"].append(
                {
                    "image_id": i,
                    "category_id": category,
                    "bbox": [x, y, s, s],
                    "iscrowd": int(i % 5 == j),
                }
            )
            for _ in range(2):
                box = [x + rng.normal(0, noise), y + rng.normal(0, noise), s, s]
                found.append(
                    {
                        "image_id": i,
                        "category_id": category,
                        "bbox": box,
                        "score": float(rng.uniform(0.3, 1)),
                    }
                )
        for _ in range(per_image - 6):
            x, y, s = *rng.uniform(0, 50, 2), rng.uniform(4, 20)
            found.append(
                {
                    "image_id": i,
                    "category_id": int(rng.integers(1, 4)),
                    "bbox": [x, y, s, s],
                    "score": float(rng.uniform(0, 0.6)),
                }
            )
    return truth, found  # fmt: skip


def resampled(truth: dict, found: list, drawn: np.ndarray):
    copies = {"images": [], "categories": truth["categories"], "annotations": []}
    dets = []
    for new, old in enumerate(drawn + 1, start=1):
        copies["images"].append({"id": new, "width": 64, "height": 64})
        copies["annotations"] += [a | {"image_id": new} for a in truth["annotations"]
                                  if a["image_id"] == old]  # fmt: skip
        dets += [d | {"image_id": new} for d in found if d["image_id"] == old]
    return copies, dets


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--detections", type=int, default=100)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--naive", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    truth, candidate = split(rng, args.images, args.detections, noise=1.0)
    _, champion = split(np.random.default_rng(0), args.images, args.detections, noise=2.0)
    start = time.perf_counter()
    mine, theirs = promote.matches(truth, candidate), promote.matches(truth, champion)
    match_s = time.perf_counter() - start
    weights = rng.multinomial(args.images, np.full(args.images, 1 / args.images), args.samples)
    start = time.perf_counter()
    diff = promote.weighted_map(mine, weights) - promote.weighted_map(theirs, weights)
    bootstrap_s = time.perf_counter() - start
    start, worst = time.perf_counter(), 0.0
    for i, row in enumerate(weights[: args.naive]):
        drawn = np.repeat(np.arange(args.images), row)
        naive = [
            coco_map.evaluate(*resampled(truth, d, drawn))["map"] for d in (candidate, champion)
        ]
        worst = max(worst, abs(naive[0] - naive[1] - diff[i]))
    naive_s = (time.perf_counter() - start) / args.naive * args.samples
    print(json.dumps({
        "images": args.images, "detections_per_image": args.detections, "samples": args.samples,
        "matches_s_two_models": round(match_s, 3), "bootstrap_s": round(bootstrap_s, 3),
        "faster_coco_eval_per_resample_s_extrapolated": round(naive_s, 1),
        "speedup": round(naive_s / (match_s + bootstrap_s), 1),
        "max_abs_diff_vs_faster_coco_eval": worst,
        "p_value": float((1 + np.count_nonzero(diff <= 0)) / (len(diff) + 1)),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
