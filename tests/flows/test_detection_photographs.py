"""`task: detection` on real photographs the project does not ship, made at test time: crops
of scikit-learn's two sample photographs and matplotlib's portrait of Grace Hopper as
backgrounds (non-square, grayscale and RGB, PNG and JPEG), with a face, a flower and a pagoda
cut from those photographs pasted at known boxes. Through the `lensflow` command's own entry
point, with real Prefect and the session's MLflow server: the first run gates, trains,
exports with parity, registers and promotes; a second, on the YOLO layout of the same
photographs at another image size, is decided against that champion by the gates; a broken
copy fails the gate by file and is left byte for byte as it was."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cli import main as cli
from components.core import config, paths
from components.detection import prepare
from components.detection_release import export
from tests.conftest import _track_into, tiny_project

CLASSES = ("face", "flower", "pagoda")
SIZES = ((96, 64), (64, 96), (80, 80), (96, 48), (48, 72))  # width, height
PARAMS = {
    "task": "detection",
    "tracking": {"experiment": "lensflow-detection-photographs"},
    "registry": {"model_name": "lensflow-detector-photographs"},  # the server is shared
    "data": {"source": "data/raw/photos"},
    "detection": {
        "image_size": 32, "epochs": 2, "batch_size": 8, "lr": 0.003,
        "score_threshold": 0.0,  # a barely trained detector still answers with boxes
    },
    "train": {"warmup_epochs": 0, "progress_bar": False},
    "promote": {"min_map": 0.0, "bootstrap_samples": 20},
}  # fmt: skip


def _photographs() -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """The objects (class -> RGB array) and the background regions, from the photographs."""
    import matplotlib
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    portrait = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    hopper = np.asarray(Image.open(portrait).convert("RGB"))
    objects = {"face": hopper[95:330, 150:375], "flower": flower[82:362, 165:450],
               "pagoda": china[25:412, 62:325]}  # fmt: skip
    # the lake and trees, the leaves, the flag: none shows one of the objects
    return objects, [china[:, 340:], flower[:, :160], hopper[:400, :140]]


def write_detection_photographs(root: Path, n: int = 20, sizes=SIZES, seed: int = 0) -> dict:
    """A COCO detection folder (images/, annotations.json) of `n` photographs of `sizes`
    (width, height) in turn, 1-2 objects each, never overlapping, each 1/4 to 1/2 of the
    image's shorter side wide; returns the COCO dict."""
    objects, backgrounds = _photographs()
    rng = np.random.default_rng(seed)
    images, boxes = [], []
    for i in range(n):
        width, height = sizes[i % len(sizes)]
        canvas = Image.fromarray(backgrounds[i % len(backgrounds)]).resize((width, height))
        placed = []
        for _ in range(1 + i % 2):
            category = int(rng.integers(len(CLASSES)))
            piece = objects[CLASSES[category]]
            w = int(rng.integers(min(width, height) // 4, min(width, height) // 2 + 1))
            h = min(round(w * piece.shape[0] / piece.shape[1]), height)
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            if any(x < a + c and a < x + w and y < b + d and b < y + h for a, b, c, d in placed):
                continue
            placed.append((x, y, w, h))
            canvas.paste(Image.fromarray(piece).resize((w, h)), (x, y))
            boxes.append({"id": len(boxes) + 1, "image_id": i + 1, "category_id": category + 1,
                          "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})  # fmt: skip
        mode = "L" if i % 3 == 0 else "RGB"
        name = f"{mode.lower()}/{i:03d}.{'png' if i % 2 else 'jpg'}"
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        canvas.convert(mode).save(root / "images" / name)
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height})
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(CLASSES)]
    coco = {"images": images, "annotations": boxes, "categories": categories}
    (root / "annotations.json").write_text(json.dumps(coco))
    return coco


def write_yolo(coco: dict, images: Path, root: Path) -> None:
    """The same photographs in the YOLO layout: labels/*.txt and classes.txt."""
    shutil.copytree(images, root / "images")
    (root / "classes.txt").write_text("".join(c["name"] + "\n" for c in coco["categories"]))
    lines = {image["id"]: [] for image in coco["images"]}
    sizes = {image["id"]: (image["width"], image["height"]) for image in coco["images"]}
    for box in coco["annotations"]:
        (x, y, w, h), (width, height) = box["bbox"], sizes[box["image_id"]]
        centre = ((x + w / 2) / width, (y + h / 2) / height, w / width, h / height)
        lines[box["image_id"]].append(f"{box['category_id'] - 1} " + " ".join(map(str, centre)))
    for image in coco["images"]:
        label = root / "labels" / Path(image["file_name"]).with_suffix(".txt")
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("".join(line + "\n" for line in lines[image["id"]]))


def _boxes(coco: dict, prefix: str = "") -> dict[str, list]:
    """image path -> its (category, x, y, w, h) boxes, sorted, to 0.01 px."""
    names = {image["id"]: prefix + image["file_name"] for image in coco["images"]}
    found = {name: [] for name in names.values()}
    for box in coco["annotations"]:
        rounded = tuple(round(v, 2) for v in box["bbox"])
        found[names[box["image_id"]]].append((box["category_id"], *rounded))
    return {name: sorted(boxes) for name, boxes in found.items()}


def _digest(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def photo_detection(mlflow_on_postgres, tmp_path_factory):
    """A project on data/raw/photos (COCO) whose first run made the champion, v1, tracked by
    the session's MLflow server (a sqlite store's first migration takes seconds)."""
    root = tmp_path_factory.mktemp("detection-photographs")
    with tiny_project(root) as mp:
        _track_into(mp, mlflow_on_postgres.url)
        coco = write_detection_photographs(root / "data/raw/photos")
        write_yolo(coco, root / "data/raw/photos/images", root / "data/raw/photos_yolo")
        (root / "params.yaml").write_text(yaml.safe_dump(config.from_dict(PARAMS).as_dict()))
        assert cli.main(["run"]) == 0
        yield root, coco


def test_photographs_gate_train_export_register_and_promote(photo_detection, capfd):
    root, coco = photo_detection
    validation = json.loads(paths.VALIDATION_REPORT.read_text())
    assert validation["success"] and validation["n_used"] == len(coco["images"])
    assert validation["n_boxes"] == len(coco["annotations"]) and validation["issues"] == []
    exported = json.loads(export.REPORT.read_text())
    assert exported["parity"] and exported["n_images"] > 0
    registered = json.loads(paths.REGISTRY_REPORT.read_text())
    assert registered["task"] == "detection" and registered["version"] == "1"
    first = json.loads(paths.PROMOTION_REPORT.read_text())
    assert first["promoted"] and first["gates"]["bootstrap"]["note"] == "there is no champion yet"

    # the YOLO layout of the same photographs, at 64 px: judged against the 32 px champion
    capfd.readouterr()
    sets = ["data.source=data/raw/photos_yolo", "detection.image_size=64", "detection.epochs=1"]
    assert cli.main(["run", *[arg for item in sets for arg in ("--set", item)]]) == 0
    assert "Traceback" not in capfd.readouterr().err
    assert json.loads(paths.META.read_text())["format"] == "yolo"
    assert _boxes(json.loads(prepare.SOURCE_ANNOTATIONS.read_text())) == _boxes(coco, "images/")
    assert json.loads(export.REPORT.read_text())["parity"]
    second = json.loads(paths.PROMOTION_REPORT.read_text())
    gates = second["gates"]
    assert second["candidate"] == "2" and gates["same_classes"]["passed"]
    assert gates["beats_champion"]["champion_version"] == "1"
    assert gates["bootstrap"]["samples"] == 20
    assert second["promoted"] == all(gate["passed"] for gate in gates.values())


def test_a_broken_copy_fails_the_gate_by_file_and_is_not_modified(photo_detection, capfd, caplog):
    root, coco = photo_detection
    broken = root / "data/raw/broken"
    shutil.copytree(root / "data/raw/photos/images", broken / "images")
    boxes = json.loads(json.dumps(coco["annotations"]))
    boxes[0]["bbox"] = boxes[0]["bbox"][:3]  # a malformed entry
    boxes[1]["bbox"][0] += 200  # past its image's right edge
    (broken / "annotations.json").write_text(json.dumps({**coco, "annotations": boxes}))
    before = _digest(broken)
    capfd.readouterr()
    assert cli.main(["run", "--set", "data.source=data/raw/broken"]) == 1
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("lensflow: gate")
    # the log names the file and the entry, the report every finding by file
    said = "\n".join(record.getMessage() for record in caplog.records)
    assert "first corrupt_annotations: " in said
    assert "annotations.json: annotations[0] (id 1): expected 'bbox'" in said
    issues = json.loads(paths.VALIDATION_REPORT.read_text())["issues"]
    found = {(issue["code"], issue["path"], issue["severity"]) for issue in issues}
    first, second = (coco["images"][box["image_id"] - 1]["file_name"] for box in boxes[:2])
    assert ("corrupt_annotations", f"images/{first}", "error") in found
    assert ("box_outside_image", f"images/{second}", "warn") in found
    assert _digest(broken) == before
