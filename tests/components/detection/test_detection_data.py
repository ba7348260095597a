"""Detection data (`task: detection`): the built-in set, COCO and YOLO annotations, and the
detection gate on a corpus of everything that goes wrong with boxes and annotation files.

Every problem is reported with its code, path and severity; the policies decide the splits;
nothing crashes; the raw folder is byte-for-byte the same afterwards.
"""

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components import preflight
from components.core import config, paths
from components.core.errors import UserError
from components.detection import prepare, synthetic, validate
from components.detection.annotations import read_coco

RNG = np.random.default_rng(3)


def png(width=32, height=32) -> bytes:
    buffer = io.BytesIO()
    pixels = RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def folder_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def detection_cfg(root: Path, **policy) -> config.Config:
    return config.from_dict(
        {
            "task": "detection",
            "data": {"source": str(root)},
            "detection": {"image_size": 32, "policy": policy},
        }
    )


def run_gate(cfg):
    prepare.run(cfg)
    return validate.run(cfg, track=False), json.loads(paths.VALIDATION_REPORT.read_text())


def by_path(report: dict) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for issue in report["issues"]:
        found.setdefault(issue["path"], set()).add(issue["code"])
    return found


# image name -> boxes [category, x, y, w, h] (and the codes expected for the image)
CLEAN = {f"clean_{i}.png": [[1 + i % 2, 4.0, 4.0, 10.0, 12.0]] for i in range(10)}
DEFECTS = {
    "outside.png": ([[1, 20.0, 20.0, 20.0, 8.0]], {"box_outside_image"}),
    "flat.png": ([[1, 5.0, 5.0, 0.0, 6.0]], {"degenerate_box"}),
    "unknown.png": ([[7, 5.0, 5.0, 6.0, 6.0]], {"unknown_class"}),
    "twice.png": ([[2, 3.0, 3.0, 10.0, 10.0], [2, 3.0, 3.0, 10.0, 10.0]], {"duplicate_box"}),
    "empty.png": ([], {"no_annotations"}),
}


@pytest.fixture
def coco_corpus(project) -> Path:
    root = project / "corpus"
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    entries = {**{k: (v, set()) for k, v in CLEAN.items()}, **DEFECTS}
    for image_id, (name, (boxes, _)) in enumerate(entries.items(), start=1):
        (root / "images" / name).write_bytes(png())
        images.append({"id": image_id, "file_name": name, "width": 32, "height": 32})
        for category, *box in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category, "bbox": box, "iscrowd": 0})  # fmt: skip
    (root / "images" / "broken.png").write_bytes(png()[:40])  # truncated
    (root / "images" / "unlisted.png").write_bytes(png())  # no entry in the COCO file
    (root / "images" / "resized.png").write_bytes(png(24, 32))  # listed as 32x32
    images += [
        {"id": 90, "file_name": "resized.png", "width": 32, "height": 32},
        {"id": 91, "file_name": "gone.png", "width": 32, "height": 32},  # no such file
        {"id": 92, "file_name": "broken.png", "width": 32, "height": 32},
        {"id": "x", "file_name": "bad-id.png"},  # malformed entry
    ]
    annotations += [
        {"id": 500, "image_id": 90, "category_id": 1, "bbox": [1, 1, 5, 5]},
        {"id": 501, "image_id": 1, "category_id": 1, "bbox": "4 4 10 10"},  # malformed bbox
        {"id": 502, "image_id": 999, "category_id": 1, "bbox": [1, 1, 5, 5]},  # unknown image
    ]
    categories = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations.json").write_text(json.dumps(coco))
    return root


def test_the_gate_reports_every_file_and_box_problem_and_leaves_the_raw_folder_alone(
    coco_corpus,
):
    before = folder_digest(coco_corpus)
    result, report = run_gate(detection_cfg(coco_corpus))
    assert folder_digest(coco_corpus) == before
    found = by_path(report)
    for name, (_, codes) in DEFECTS.items():
        assert found.get(f"images/{name}", set()) == codes, name
    for name in CLEAN:
        assert f"images/{name}" not in found or name == "clean_0.png"
    assert found["images/clean_0.png"] == {"corrupt_annotations"}  # its malformed bbox entry
    assert found["images/broken.png"] in ({"truncated"}, {"undecodable"})
    assert found["images/unlisted.png"] == {"no_annotations"}
    assert found["images/resized.png"] == {"size_mismatch"}
    assert found["annotations.json"] == {"corrupt_annotations", "missing_image"}
    messages = " ".join(i["message"] for i in report["issues"])
    assert "image_id 999" in messages and "images[18]" in messages and "gone.png" in messages
    # defaults: corrupt entries, unknown classes, size mismatches and truncated files fail it
    assert not result.success and not report["success"]
    severity = {(i["path"], i["code"]): i["severity"] for i in report["issues"]}
    assert severity[("images/flat.png", "degenerate_box")] == "quarantine"
    assert severity[("images/outside.png", "box_outside_image")] == "warn"
    assert severity[("images/unknown.png", "unknown_class")] == "error"
    # the splits: error and quarantine images out, warned ones in, boxes clipped and deduplicated
    manifest = pd.read_parquet(paths.MANIFEST).set_index("path")
    out = {"flat.png", "unknown.png", "broken.png", "resized.png", "clean_0.png"}
    for name in out:
        assert manifest.loc[f"images/{name}", "split"] == "excluded", name
    kept = manifest[manifest["split"] != "excluded"]
    assert len(kept) == 13 and set(kept["n_kept"]) == {0, 1}  # empty and unlisted: 0
    boxes = {}
    for split in prepare.SPLITS:
        coco = json.loads(prepare.split_annotations(split).read_text())
        names = {image["id"]: image["file_name"] for image in coco["images"]}
        for box in coco["annotations"]:
            boxes.setdefault(names[box["image_id"]], []).append(box["bbox"])
        shard = np.load(paths.shard_images(split))
        assert shard.shape == (len(coco["images"]), 3, 32, 32)
    assert boxes.get("images/outside.png") == [[20.0, 20.0, 12.0, 8.0]]  # clipped to 32 px
    assert boxes.get("images/twice.png") == [[3.0, 3.0, 10.0, 10.0]]  # the copy left out


def test_policies_decide_the_verdict_and_off_turns_a_check_off(coco_corpus):
    lenient = dict.fromkeys(("corrupt_annotations", "unknown_class", "size_mismatch"), "warn")
    cfg = config.with_values(
        detection_cfg(coco_corpus, **lenient, duplicate_box="off"),
        {"validate.policy.truncated": "quarantine", "validate.policy.undecodable": "quarantine"},
    )
    result, report = run_gate(cfg)
    assert result.success and report["success"], report["issues"][:3]
    assert "duplicate_box" not in report["counts"]
    assert report["counts"]["unknown_class"] == 1 and report["n_boxes"] > 0
    # a changed policy without a new prepare is refused: prepare applied the old one
    with pytest.raises(Exception, match="run prepare again"):
        validate.run(detection_cfg(coco_corpus), track=False)


def test_an_unparsable_coco_file_is_one_issue_and_no_traceback(project):
    root = project / "corpus"
    (root / "images").mkdir(parents=True)
    for i in range(3):
        (root / "images" / f"{i}.png").write_bytes(png())
    (root / "annotations.json").write_text('{"images": [')
    result, report = run_gate(detection_cfg(root))
    assert not result.success
    assert by_path(report)["annotations.json"] == {"corrupt_annotations"}
    assert report["counts"]["no_annotations"] == 3


def test_the_yolo_layout_is_converted_to_coco_at_prepare(project):
    root = project / "yolo"
    for folder in ("images/a", "labels/a"):
        (root / folder).mkdir(parents=True)
    (root / "classes.txt").write_text("cat\ndog\n")
    for i in range(6):
        (root / "images/a" / f"{i}.png").write_bytes(png(40, 20))
        (root / "labels/a" / f"{i}.txt").write_text(f"{i % 2} 0.5 0.5 0.25 0.5\n")
    (root / "labels/a/5.txt").write_text("1 0.5 0.5\n")  # corrupt: 3 numbers
    (root / "labels/a/4.txt").write_text("3 0.5 0.5 0.25 0.5\n")  # class 3 of 2
    (root / "labels/a/orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    result, report = run_gate(detection_cfg(root))
    found = by_path(report)
    assert found["images/a/5.png"] == {"corrupt_annotations"}
    assert found["images/a/4.png"] == {"unknown_class"}
    assert found["labels/a/orphan.txt"] == {"missing_image"}
    coco = json.loads(prepare.SOURCE_ANNOTATIONS.read_text())
    assert [c["name"] for c in coco["categories"]] == ["cat", "dog"]
    first = next(a for a in coco["annotations"] if a["image_id"] == 1)
    assert first["bbox"] == [15.0, 5.0, 10.0, 10.0] and first["category_id"] == 1


def test_the_built_in_set_is_seeded_and_has_several_overlapping_shapes_of_several_sizes(tmp_path):
    synthetic.write(tmp_path / "a", 24, 64, seed=5)
    synthetic.write(tmp_path / "b", 24, 64, seed=5)
    assert folder_digest(tmp_path / "a") == folder_digest(tmp_path / "b")
    coco = json.loads((tmp_path / "a/annotations.json").read_text())
    per_image = pd.Series([a["image_id"] for a in coco["annotations"]]).value_counts()
    assert per_image.max() >= 3 and len(per_image) == 24
    sides = {a["bbox"][2] for a in coco["annotations"]}
    assert min(sides) <= 12 and max(sides) >= 24
    assert {a["category_id"] for a in coco["annotations"]} == {1, 2, 3}
    boxes = pd.DataFrame([[a["image_id"], *a["bbox"]] for a in coco["annotations"]])
    overlapping = 0
    for _, group in boxes.groupby(0):
        xyxy = group[[1, 2, 3, 4]].to_numpy()
        for i in range(len(xyxy)):
            for j in range(i):
                a, b = xyxy[i], xyxy[j]
                overlapping += bool(
                    min(a[0] + a[2], b[0] + b[2]) > max(a[0], b[0])
                    and min(a[1] + a[3], b[1] + b[3]) > max(a[1], b[1])
                )
    assert overlapping >= 1
    # every annotated shape stays visible: shapes drawn later (in annotation order) leave at
    # least half of each earlier box uncovered (IoU alone let one vanish under a bigger one)
    for image_id, group in boxes.groupby(0):
        on_top = np.full((64, 64), -1)
        xyxy = group[[1, 2, 3, 4]].to_numpy(int)
        for k, (x, y, w, h) in enumerate(xyxy):
            on_top[y : y + h, x : x + w] = k
        for k, (x, y, w, h) in enumerate(xyxy):
            assert (on_top[y : y + h, x : x + w] == k).mean() >= 0.5, (image_id, k)
    image = np.asarray(Image.open(tmp_path / "a/images/00000.png"))
    x, y, w, h = (int(v) for v in coco["annotations"][0]["bbox"])
    inside = image[y + h // 2, x + w // 2].astype(int).sum()
    assert inside > image[..., :].reshape(-1, 3).astype(int).sum(axis=1).mean()  # bright shape


def test_the_stages_run_the_detection_components_and_refuse_the_others(project):
    """`lensflow stage prepare` under task: detection runs the detection prepare (a
    subprocess, as dvc.yaml calls it); a stage detection has not yet is refused."""

    def lensflow(*args):
        return subprocess.run(
            [sys.executable, "-m", "cli.main", *args, "--set", "task=detection",
             "--set", "detection.synthetic_images=16", "--set", "detection.image_size=32"],
            cwd=project, capture_output=True, text=True, timeout=600,
        )  # fmt: skip

    cfg = config.from_dict({"task": "detection", "detection": {"synthetic_images": 16}})
    assert cfg.data.source == "detection_shapes"  # digits, the default, has no boxes
    synthetic.run(cfg)
    done = lensflow("stage", "prepare")
    assert done.returncode == 0, done.stderr
    assert "prepare: 16 images" in done.stdout
    cfg = config.with_values(cfg, {"detection.image_size": 32})
    result = validate.run(cfg, track=False)
    report = json.loads((project / paths.VALIDATION_REPORT).read_text())
    assert result.success and report["task"] == "detection" and report["n_boxes"] > 16
    with pytest.raises(UserError, match="task: detection has only"):
        preflight.check_task(cfg, "doctor")  # what `lensflow doctor` runs first


def test_a_coco_file_name_that_repeats_images_is_reported_with_the_fix(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(png())
    entry = {"id": 1, "file_name": "images/a.png", "width": 32, "height": 32}
    coco = {"images": [entry], "annotations": [], "categories": []}
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    (problem,) = read_coco(tmp_path / "annotations.json", tmp_path).problems
    assert problem.code == "missing_image"
    assert problem.message == (
        "images[0]: images/images/a.png not found (file_name is relative to images/)"
    )
