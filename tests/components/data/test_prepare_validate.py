import json
import shutil

import numpy as np
import pandas as pd
import pytest

from components.core import config, paths, versioning
from components.core.errors import GateFailed, UserError
from components.data import datasets, prepare, prepared, validate


def _folder_cfg(root, **prepare_kw):
    return config.from_dict(
        {"data": {"source": str(root)}, "prepare": {"channels": 3, **prepare_kw}}
    )


@pytest.fixture
def shapes_folder(project):
    root = project / "images"
    datasets.write("shapes", root, per_class=10, seed=1)
    return root


def test_prepare_writes_manifest_shards_and_splits(shapes_folder):
    cfg = _folder_cfg(shapes_folder, image_size=16)
    result = prepare.run(cfg)
    manifest = pd.read_parquet(paths.MANIFEST)
    assert len(manifest) == result.n_images == 100
    assert {"path", "label", "split", "sha256", "width", "height", "mode"} <= set(manifest.columns)
    share = manifest["split"].value_counts(normalize=True)
    assert abs(share["test"] - 0.2) < 0.1 and abs(share["val"] - 0.15) < 0.1
    images, labels = prepared.load_split("train")
    assert images.dtype == np.uint8 and images.shape[1:] == (3, 16, 16)
    assert isinstance(images, np.memmap)  # read from disk a batch at a time, never whole
    assert not list(paths.PREPARED.glob("*partial*"))  # the scratch rows file is gone
    assert len(images) == len(labels) == result.n_per_split["train"] == share["train"] * 100
    meta = prepared.load_meta()
    assert meta["classes"] == sorted(datasets.SHAPE_CLASSES) and len(meta["mean"]) == 3


def test_adding_images_never_moves_an_existing_one(shapes_folder, tmp_path):
    prepare.run(_folder_cfg(shapes_folder))
    before = pd.read_parquet(paths.MANIFEST).set_index("path")["split"]
    datasets.write("shapes", tmp_path / "more", per_class=10, seed=2)  # 100 new images
    for image in (tmp_path / "more").glob("*/*.png"):
        shutil.copy(image, shapes_folder / image.parent.name / f"new-{image.name}")
    prepare.run(_folder_cfg(shapes_folder))
    after = pd.read_parquet(paths.MANIFEST).set_index("path")["split"]
    assert len(after) == 200 and after[before.index].equals(before)
    assert after.drop(before.index).nunique() == 3  # the new images spread over the splits
    reseeded = _folder_cfg(shapes_folder).model_copy(update={"seed": 7})
    prepare.run(reseeded)
    assert not pd.read_parquet(paths.MANIFEST).set_index("path")["split"].equals(after)


def test_removing_images_or_changing_fractions_moves_no_other_image(shapes_folder):
    prepare.run(_folder_cfg(shapes_folder))
    before = pd.read_parquet(paths.MANIFEST).set_index("path")["split"]
    removed = sorted(before.index)[::3]  # a third of every class
    for path in removed:
        (shapes_folder / path).unlink()
    prepare.run(_folder_cfg(shapes_folder))
    after = pd.read_parquet(paths.MANIFEST).set_index("path")["split"]
    assert sorted(after.index) == sorted(set(before.index) - set(removed))
    assert after.equals(before[after.index])  # every image left keeps its split

    # a larger test fraction: images move only towards test (train -> val -> test), the test
    # split only grows, and nothing else changes
    prepare.run(_folder_cfg(shapes_folder, test_fraction=0.35))
    moved = pd.read_parquet(paths.MANIFEST).set_index("path")["split"][after.index]
    order = {"test": 0, "val": 1, "train": 2}
    assert (moved.map(order) <= after.map(order)).all()
    assert set(after.index[after == "test"]) < set(moved.index[moved == "test"])
    assert (moved != after).sum() > 0


def test_untracked_data_is_identified_by_its_files(shapes_folder, project):
    assert versioning.data_md5(shapes_folder) == "untracked"  # nothing prepared yet
    prepare.run(_folder_cfg(shapes_folder))
    identity = versioning.data_md5(shapes_folder)
    assert identity.startswith("manifest:")
    copy = project / "elsewhere" / "copy"
    shutil.copytree(shapes_folder, copy)
    prepare.run(_folder_cfg(copy))
    assert versioning.data_md5(copy) == identity  # the same files, another place
    (copy / "checker_2" / "0000.png").write_bytes((copy / "checker_4" / "0001.png").read_bytes())
    prepare.run(_folder_cfg(copy))
    assert versioning.data_md5(copy) not in (identity, "untracked")


def test_validation_vouches_only_for_the_data_it_saw(shapes_folder, project):
    prepare.run(_folder_cfg(shapes_folder))
    assert validate.run(_folder_cfg(shapes_folder), track=False).success
    validate.require_passed()
    other = project / "other"
    datasets.write("shapes", other, per_class=10, seed=5)
    prepare.run(_folder_cfg(other))
    with pytest.raises(GateFailed, match="other data.*lensflow stage validate"):
        validate.require_passed()


def test_prepare_is_seeded(shapes_folder):
    prepare.run(_folder_cfg(shapes_folder))
    first = pd.read_parquet(paths.MANIFEST)
    prepare.run(_folder_cfg(shapes_folder))
    assert first.equals(pd.read_parquet(paths.MANIFEST))


def test_identical_files_share_a_split(shapes_folder):
    source = shapes_folder / "circle_small" / "0000.png"
    for i in range(5):
        shutil.copy(source, shapes_folder / "circle_small" / f"copy{i}.png")
    prepare.run(_folder_cfg(shapes_folder))
    manifest = pd.read_parquet(paths.MANIFEST)
    copies = manifest[
        manifest["sha256"]
        == manifest.loc[manifest["path"] == "circle_small/0000.png", "sha256"].iloc[0]
    ]
    assert len(copies) == 6 and copies["split"].nunique() == 1
    assert validate.run(_folder_cfg(shapes_folder), track=False).success


def test_clean_folder_passes_validation(shapes_folder):
    cfg = _folder_cfg(shapes_folder)
    prepare.run(cfg)
    result = validate.run(cfg, track=False)
    report = json.loads(paths.VALIDATION_REPORT.read_text())
    assert result.success and report["success"] and report["issues"] == []
    assert report["n_images"] == report["n_used"] == 100


def test_broken_file_fails_the_gate_and_is_named(shapes_folder):
    (shapes_folder / "checker_2" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    before = sorted(p.name for p in (shapes_folder / "checker_2").iterdir())
    cfg = _folder_cfg(shapes_folder)
    prepare.run(cfg)
    result = validate.run(cfg, track=False)
    report = json.loads(paths.VALIDATION_REPORT.read_text())
    assert not result.success
    assert [(i["path"], i["code"], i["severity"]) for i in report["issues"]] == [
        ("checker_2/broken.png", "undecodable", "error")
    ]
    assert report["n_used"] == 100 and report["counts"]["undecodable"] == 1
    assert (
        sorted(p.name for p in (shapes_folder / "checker_2").iterdir()) == before
    )  # nothing deleted
    with pytest.raises(GateFailed, match="failed validation"):
        validate.require_passed()


def test_leakage_between_splits_is_caught(shapes_folder):
    cfg = _folder_cfg(shapes_folder)
    prepare.run(cfg)
    manifest = pd.read_parquet(paths.MANIFEST)
    test_row = manifest[manifest["split"] == "test"].index[0]
    train_row = manifest[manifest["split"] == "train"].index[0]
    manifest.loc[train_row, "sha256"] = manifest.loc[test_row, "sha256"]
    manifest.to_parquet(paths.MANIFEST)
    validate.run(cfg, track=False)
    report = json.loads(paths.VALIDATION_REPORT.read_text())
    leaked = {i["path"] for i in report["issues"] if i["code"] == "split_leakage"}
    assert leaked == {manifest.loc[test_row, "path"], manifest.loc[train_row, "path"]}
    assert not report["success"]


def test_unexpected_class_and_tiny_class_fail(shapes_folder):
    cfg = config.from_dict(
        {
            "data": {"source": str(shapes_folder), "classes": sorted(datasets.SHAPE_CLASSES)[:-1]},
            "validate": {"min_images_per_class": 11},
        }
    )
    prepare.run(cfg)
    validate.run(cfg, track=False)
    issues = json.loads(paths.VALIDATION_REPORT.read_text())["issues"]
    assert {i["code"] for i in issues} == {"unknown_label", "too_few_images"}
    too_few = {i["path"] for i in issues if i["code"] == "too_few_images"}
    assert len(too_few) == 9 and all(path.endswith("/") for path in too_few)  # one per class


@pytest.mark.parametrize("make", ["missing", "file", "empty"])
def test_unusable_source_is_a_user_error(project, make):
    root = project / "src"
    if make == "file":
        root.write_text("x")
    elif make == "empty":
        root.mkdir()
    with pytest.raises(UserError, match="src"):
        prepare.run(_folder_cfg(root))
