"""COCO mAP from faster-coco-eval equals pycocotools' (the reference) to 1e-4, on a fixture
with crowd regions, small objects, empty images and false positives on them."""

import pytest

from components.detection import coco_map


def fixture() -> tuple[dict, list[dict]]:
    images = [{"id": i, "file_name": f"{i}.png", "width": 200, "height": 160} for i in range(1, 8)]
    boxes = [
        (1, 1, [10, 10, 60, 50], 0),  # medium
        (1, 2, [100, 20, 40, 40], 0),
        (1, 1, [0, 100, 200, 60], 1),  # a crowd region: detections in it are ignored
        (2, 1, [5, 5, 12, 10], 0),  # small
        (2, 1, [30, 30, 20, 20], 0),  # small
        (2, 2, [60, 60, 100, 90], 0),  # large
        (3, 2, [50, 50, 30, 30], 0),
        (4, 1, [120, 80, 16, 16], 0),  # small
        (4, 3, [10, 10, 120, 120], 0),  # large
        (7, 3, [40, 40, 50, 50], 0),
    ]  # images 5 and 6 are empty
    annotations = [
        {"id": i, "image_id": image, "category_id": cat, "bbox": box, "iscrowd": crowd,
         "area": box[2] * box[3]}
        for i, (image, cat, box, crowd) in enumerate(boxes, start=1)
    ]  # fmt: skip
    categories = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"},
                  {"id": 3, "name": "triangle"}, {"id": 4, "name": "never"}]  # fmt: skip
    detections = [
        (1, 1, [12, 11, 58, 50], 0.95),
        (1, 1, [20, 110, 40, 30], 0.9),  # inside the crowd region: ignored
        (1, 2, [98, 22, 42, 37], 0.6),
        (1, 2, [10, 10, 60, 50], 0.3),  # right place, wrong class
        (2, 1, [6, 5, 11, 10], 0.8),
        (2, 1, [31, 29, 20, 22], 0.4),
        (2, 1, [31, 29, 20, 22], 0.35),  # a duplicate: a false positive
        (2, 2, [70, 65, 90, 80], 0.7),
        (3, 2, [49, 52, 32, 29], 0.5),
        (4, 1, [121, 82, 15, 14], 0.45),
        (4, 3, [30, 20, 100, 110], 0.85),
        (5, 1, [10, 10, 30, 30], 0.9),  # on an empty image
        (6, 3, [50, 50, 60, 60], 0.2),  # on an empty image
        (7, 3, [44, 38, 50, 52], 0.65),
        (7, 4, [0, 0, 10, 10], 0.1),  # a class with no ground truth
    ]
    results = [
        {"image_id": image, "category_id": cat, "bbox": box, "score": score}
        for image, cat, box, score in detections
    ]
    gt = {"images": images, "annotations": annotations, "categories": categories}
    return gt, results


def test_faster_coco_eval_equals_pycocotools():
    gt, detections = fixture()
    faster = coco_map.evaluate(gt, detections)
    reference = coco_map.evaluate(gt, detections, backend="pycocotools")
    for key in coco_map.STATS:
        assert faster[key] == pytest.approx(reference[key], abs=1e-4), key
    assert faster["per_class"].keys() == reference["per_class"].keys()
    for name, value in reference["per_class"].items():
        if value is None:
            assert faster["per_class"][name] is None
        else:
            assert faster["per_class"][name] == pytest.approx(value, abs=1e-4), name
    assert faster["per_class"]["never"] is None
    assert 0.3 < faster["map"] < 0.95 and faster["map_50"] > faster["map"]
    assert faster["map_small"] > 0  # the small boxes count


def test_perfect_detections_score_one_and_none_score_zero():
    gt, _ = fixture()
    perfect = [
        {"image_id": b["image_id"], "category_id": b["category_id"], "bbox": b["bbox"],
         "score": 1.0}
        for b in gt["annotations"] if not b["iscrowd"]
    ]  # fmt: skip
    assert coco_map.evaluate(gt, perfect)["map"] == pytest.approx(1.0)
    assert coco_map.evaluate(gt, [])["map"] == 0.0
