"""The paired bootstrap of promotion for `task: detection`: COCO's matching once, each
resample a reweighting, equal to faster-coco-eval's mAP recomputed on the resampled images."""

import numpy as np
import pytest

from components.detection import coco_map
from components.detection_release import promote


def test_the_bootstrap_recomputes_faster_coco_evals_map_on_each_resample():
    """Weights of 1 give faster-coco-eval's mAP; a resample's weights give the mAP of the
    images it drew, copies included (crowd boxes and an image without boxes among them)."""
    rng = np.random.default_rng(0)
    truth = {
        "images": [{"id": i, "width": 64, "height": 64} for i in range(1, 13)],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [],
    }
    found = []
    for i in range(1, 12):  # image 12: no box
        for j in range(3):
            x, y, s = *rng.uniform(0, 40, 2), rng.uniform(4, 20)
            category = int(rng.integers(1, 3))
            truth["annotations"].append(
                {
                    "image_id": i,
                    "category_id": category,
                    "bbox": [x, y, s, s],
                    "iscrowd": int(i % 5 == j),
                }
            )
            for _ in range(2):
                box = [x + rng.normal(0, 2), y + rng.normal(0, 2), s, s]
                found.append(
                    {
                        "image_id": i,
                        "category_id": category,
                        "bbox": box,
                        "score": float(rng.uniform()),
                    }
                )
        found.append({"image_id": i, "category_id": 1, "bbox": [1, 1, 9, 9], "score": 0.5})
    matches = promote.matches(truth, found)
    assert promote.weighted_map(matches, np.ones((1, 12)))[0] == pytest.approx(
        coco_map.evaluate(truth, found)["map"], abs=1e-9
    )
    drawn = rng.integers(0, 12, 12)
    copies = {"images": [], "categories": truth["categories"], "annotations": []}
    resampled = []
    for new, old in enumerate(drawn + 1, start=1):
        copies["images"].append({"id": new, "width": 64, "height": 64})
        copies["annotations"] += [a | {"image_id": new} for a in truth["annotations"]
                                  if a["image_id"] == old]  # fmt: skip
        resampled += [d | {"image_id": new} for d in found if d["image_id"] == old]
    weights = np.bincount(drawn, minlength=12)[None]
    assert promote.weighted_map(matches, weights)[0] == pytest.approx(
        coco_map.evaluate(copies, resampled)["map"], abs=1e-9
    )
