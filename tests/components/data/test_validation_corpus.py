"""The data gate on a folder of everything that goes wrong in real image folders.

The corpus is built at test time in a temporary directory. Every file is reported with its
own code and severity (or handled as its policy says), nothing crashes, and the raw folder is
byte-for-byte the same afterwards.
"""

import hashlib
import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components.core import config, paths
from components.core.errors import GateFailed, UserError
from components.data import checks, data_report, datasets, imagefacts, prepare, prepared, validate

RNG = np.random.default_rng(7)


def noise(width=24, height=24, mode="RGB") -> Image.Image:
    """A random image: no two are alike, so none is a near-duplicate of another."""
    return Image.fromarray(RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


def encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG whose header claims width x height pixels: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def sixteen_bit_png() -> bytes:
    values = np.full((16, 16), 65535, dtype=np.uint16)
    values[:8] = 32896  # 128 * 257
    return encoded(Image.fromarray(values), "PNG")


def exif_rotated_jpeg() -> bytes:
    """Stored 40 wide x 20 high, with EXIF orientation 6 (shown rotated: 20 x 40)."""
    image = noise(40, 20)
    exif = image.getexif()
    exif[imagefacts.EXIF_ORIENTATION] = 6
    return encoded(image, "JPEG", exif=exif.tobytes())


def palette_png() -> bytes:
    return encoded(noise().convert("P", palette=Image.Palette.ADAPTIVE), "PNG")


# path -> (bytes, expected issue codes); {} = a clean file
def corpus_files() -> dict[str, tuple[bytes, set[str]]]:
    png = encoded(noise(), "PNG")
    jpeg = encoded(noise(), "JPEG")
    dog = encoded(noise(), "PNG")
    cat = encoded(noise(), "PNG")
    files = {f"cats/clean_{i:02d}.png": (encoded(noise(), "PNG"), set()) for i in range(12)}
    files |= {f"dogs/clean_{i:02d}.png": (encoded(noise(), "PNG"), set()) for i in range(12)}
    files |= {
        "cats/zero.png": (b"", {"empty_file"}),
        "cats/truncated.png": (png[: len(png) // 2], {"truncated"}),
        "cats/truncated.jpg": (jpeg[: len(jpeg) // 2], {"truncated"}),
        "cats/text.jpg": (b"just some notes, not a picture\n", {"not_an_image"}),
        "cats/cmyk.jpg": (encoded(noise(mode="CMYK"), "JPEG"), {"mode_cmyk"}),
        "cats/deep.png": (sixteen_bit_png(), {"mode_16bit", "mode_grayscale"}),
        "cats/rgba.png": (encoded(noise(mode="RGBA"), "PNG"), {"mode_alpha"}),
        "cats/palette.png": (palette_png(), {"mode_palette"}),
        "cats/grey.png": (encoded(noise(mode="L"), "PNG"), {"mode_grayscale"}),
        "cats/rotated.jpg": (exif_rotated_jpeg(), {"exif_rotated"}),
        "cats/one_pixel.png": (encoded(noise(1, 1), "PNG"), {"too_small", "constant_image"}),
        "cats/strip.png": (encoded(noise(200, 10), "PNG"), {"extreme_aspect_ratio"}),
        "cats/blank.png": (
            encoded(Image.new("RGB", (24, 24), (9, 9, 9)), "PNG"),
            {"constant_image"},
        ),
        "cats/bomb.png": (png_header_only(10_000, 10_000), {"too_many_pixels"}),
        "cats/bigger_bomb.png": (png_header_only(100_000, 100_000), {"too_many_pixels"}),
        "cats/cat.png": (cat, set()),
        "cats/cat_copy.png": (cat, {"duplicate"}),
        "cats/dog in the wrong folder.png": (dog, {"conflicting_labels"}),
        "cats/café ñandú 猫.png": (encoded(noise(), "PNG"), set()),
        "cats/nested/deeper.png": (encoded(noise(), "PNG"), {"nested_folder"}),
        "dogs/dog.png": (dog, {"conflicting_labels"}),
        "lonely/only.png": (encoded(noise(), "PNG"), set()),
        "README.txt": (b"stray notes at the root\n", {"outside_class_folder"}),
        # hidden: never listed, never reported
        "cats/.DS_Store": (b"\x00\x00\x00\x01Bud1", None),
        "dogs/.cache/thumb.png": (encoded(noise(), "PNG"), None),
    }
    return files


CLASS_ISSUES = {"empty/": {"empty_class"}, "lonely/": {"too_few_images", "class_imbalance"}}


def build_corpus(parent: Path) -> Path:
    root = parent / "corpus"
    for rel, (content, _) in corpus_files().items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    (root / "empty").mkdir()
    outside = parent / "outside.png"
    outside.write_bytes(encoded(noise(), "PNG"))
    (root / "cats" / "link_out.png").symlink_to(outside)
    (root / "dogs" / "link_in.png").symlink_to(root / "dogs" / "clean_00.png")
    return root


def expected_issues() -> dict[str, set[str]]:
    by_path = {rel: codes for rel, (_, codes) in corpus_files().items() if codes}
    by_path["cats/link_out.png"] = {"symlink_outside_root"}
    by_path["dogs/link_in.png"] = {"duplicate"}  # a link inside the root is just another file
    return by_path | CLASS_ISSUES


def folder_fingerprint(root: Path) -> str:
    """sha256 over every entry under root: names, kinds, contents and link targets."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_symlink():
            digest.update(b"link:" + os.readlink(path).encode())
        elif path.is_file():
            digest.update(b"file:" + path.read_bytes())
        else:
            digest.update(b"dir")
    return digest.hexdigest()


def corpus_cfg(root: Path, **validate_kw) -> config.Config:
    return config.from_dict(
        {"data": {"source": str(root)}, "prepare": {"channels": 3}, "validate": validate_kw}
    )


def prepare_and_validate(cfg) -> tuple[dict, pd.DataFrame]:
    prepare.run(cfg)
    validate.run(cfg, track=False)
    return json.loads(paths.VALIDATION_REPORT.read_text()), pd.read_parquet(paths.MANIFEST)


@pytest.fixture
def corpus(project) -> Path:
    return build_corpus(project)


def test_every_problem_is_reported_with_its_code_and_the_raw_folder_is_untouched(corpus):
    before = folder_fingerprint(corpus)
    report, manifest = prepare_and_validate(corpus_cfg(corpus))

    assert folder_fingerprint(corpus) == before
    found: dict[str, set[str]] = {}
    for issue in report["issues"]:
        found.setdefault(issue["path"], set()).add(issue["code"])
        assert issue["message"] and issue["severity"] in ("error", "warn", "quarantine")
    assert found == expected_issues()
    assert not report["success"]
    assert report["n_images"] == len(manifest) and ".DS_Store" not in "".join(manifest["path"])
    assert report["counts"]["too_many_pixels"] == 2 and report["counts"]["truncated"] == 2
    with pytest.raises(GateFailed, match="failed validation"):
        validate.require_passed()


def test_severities_follow_the_default_policies(corpus):
    report, _ = prepare_and_validate(corpus_cfg(corpus))
    severity = {(i["path"], i["code"]): i["severity"] for i in report["issues"]}
    assert severity[("cats/zero.png", "empty_file")] == "error"
    assert severity[("cats/one_pixel.png", "too_small")] == "quarantine"
    assert severity[("cats/link_out.png", "symlink_outside_root")] == "quarantine"
    assert severity[("cats/cmyk.jpg", "mode_cmyk")] == "warn"
    assert severity[("dogs/dog.png", "conflicting_labels")] == "error"
    assert severity[("empty/", "empty_class")] == "error"
    codes_in_order = [i["severity"] for i in report["issues"]]
    assert codes_in_order == sorted(codes_in_order, key=validate.SEVERITIES.index)


def test_quarantined_and_error_files_are_left_out_of_the_shards(corpus):
    report, manifest = prepare_and_validate(corpus_cfg(corpus))
    leaving = {
        i["path"] for i in report["issues"] if i["severity"] in ("error", "quarantine")
    } - set(CLASS_ISSUES)
    excluded = set(manifest.loc[manifest["split"] == "excluded", "path"])
    assert leaving <= excluded
    assert set(manifest.loc[manifest["excluded_by"] != "", "path"]) <= leaving
    assert excluded - leaving == {"README.txt"}  # at the root: nothing to label it with
    n_in_shards = sum(len(prepared.load_split(split)[1]) for split in prepare.SPLITS)
    assert n_in_shards == report["n_used"] == int(manifest["split"].isin(prepare.SPLITS).sum())
    warned = {i["path"] for i in report["issues"] if i["severity"] == "warn"} - set(CLASS_ISSUES)
    used = set(manifest.loc[manifest["split"] != "excluded", "path"])
    assert warned - leaving - {"README.txt"} <= used


def test_images_are_converted_as_their_notes_say(corpus):
    _, manifest = prepare_and_validate(corpus_cfg(corpus))
    row = manifest.set_index("path")
    assert (row.at["cats/rotated.jpg", "width"], row.at["cats/rotated.jpg", "height"]) == (20, 40)
    assert row.at["cats/rotated.jpg", "exif_orientation"] == 6
    deep = row.loc["cats/deep.png"]
    assert deep["mode"] == "I;16" and deep["bit_depth"] == 16
    assert list(deep["channel_mean"]) == [191.5] * 3  # 16 bits scaled to 8, not clipped at 255
    assert row.at["cats/cmyk.jpg", "mode"] == "CMYK" and row.at["cats/palette.png", "mode"] == "P"
    assert row.at["cats/rgba.png", "has_alpha"] and row.at["cats/blank.png", "constant"]
    assert (
        row.at["cats/text.jpg", "format"] == "" and row.at["cats/truncated.jpg", "format"] == "JPEG"
    )
    assert row.at["cats/café ñandú 猫.png", "split"] in prepare.SPLITS
    assert row.at["cats/nested/deeper.png", "label"] == "cats"
    assert row.at["cats/link_out.png", "sha256"] == ""  # refused: never read
    assert row.at["cats/bomb.png", "error"].startswith("10000x10000")


def test_policies_are_configurable(corpus):
    policy = {"mode_cmyk": "error", "too_small": "warn", "nested_folder": "quarantine"}
    report, manifest = prepare_and_validate(corpus_cfg(corpus, policy=policy))
    severity = {(i["path"], i["code"]): i["severity"] for i in report["issues"]}
    split = manifest.set_index("path")["split"]
    assert (
        severity[("cats/cmyk.jpg", "mode_cmyk")] == "error" and split["cats/cmyk.jpg"] == "excluded"
    )
    assert severity[("cats/one_pixel.png", "too_small")] == "warn"
    assert split["cats/one_pixel.png"] in prepare.SPLITS
    assert split["cats/nested/deeper.png"] == "excluded"


def test_off_turns_a_check_off(corpus):
    report, _ = prepare_and_validate(corpus_cfg(corpus, policy={"exif_rotated": "off"}))
    assert "exif_rotated" not in report["counts"]
    assert all(i["code"] != "exif_rotated" for i in report["issues"])


def test_prepare_and_the_gx_suite_agree_on_what_to_exclude(corpus):
    cfg = corpus_cfg(corpus)
    report, manifest = prepare_and_validate(cfg)
    classes = prepared.load_meta()["classes"]
    by_pandas = set()
    for check in checks.active(cfg, classes):
        if check.table == "images" and check.policy in ("error", "quarantine"):
            bad = checks.violations(checks.derive(manifest), check)
            by_pandas |= {(path, check.code) for path in manifest.loc[bad, "path"]}
    by_gx = {
        (i["path"], i["code"])
        for i in report["issues"]
        if i["severity"] in ("error", "quarantine") and i["path"] not in CLASS_ISSUES
    }
    assert by_pandas == by_gx


def test_validate_refuses_a_manifest_prepared_with_other_params(corpus):
    prepare.run(corpus_cfg(corpus))
    with pytest.raises(UserError, match="run prepare again"):
        validate.run(corpus_cfg(corpus, min_size=2), track=False)


def test_a_clean_folder_passes_with_no_issues(project):
    root = project / "clean"
    for label in ("a", "b", "c"):
        (root / label).mkdir(parents=True)
        for i in range(10):
            noise(32, 32).save(root / label / f"{i}.png")
    cfg = config.from_dict({"data": {"source": str(root)}})
    prepare.run(cfg)
    result = validate.run(cfg, track=False)
    report = json.loads(paths.VALIDATION_REPORT.read_text())
    assert result.success and report["issues"] == [] and report["n_used"] == 30
    assert set(report["counts"].values()) == {0}


def test_digits_pass_with_the_default_params(project):
    root = project / "digits"
    datasets.write("digits", root)
    cfg = config.from_dict({"data": {"source": str(root)}})
    prepare.run(cfg)
    result = validate.run(cfg, track=False)
    report = json.loads(paths.VALIDATION_REPORT.read_text())
    assert result.success and report["n_used"] == 1797
    assert {i["severity"] for i in report["issues"]} <= {"warn"}


def waves(size=32) -> Image.Image:
    """A smooth random image (a sum of random waves), like a photo's low frequencies."""
    ys, xs = np.mgrid[0:size, 0:size] / size
    field = np.zeros((size, size))
    for _ in range(3):
        fx, fy, phase = RNG.uniform(-3, 3), RNG.uniform(-3, 3), RNG.uniform(0, 2 * np.pi)
        field += np.sin(2 * np.pi * (fx * xs + fy * ys) + phase)
    colour = RNG.uniform(20, 40, size=3)
    return Image.fromarray(np.clip(128 + field[..., None] * colour, 0, 255).astype(np.uint8))


def test_near_duplicates_across_splits_are_found(project):
    """JPEG re-encodings of images, beside as many distinct ones."""
    root = project / "near"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(30):
            image = waves()
            image.save(root / label / f"{i}.png")
            image.save(root / label / f"{i}_copy.jpg", quality=90)
    near = {"near_duplicate_distance": 6, "policy": {"near_duplicate": "quarantine"}}
    cfg = config.from_dict({"data": {"source": str(root)}, "validate": near})
    report, manifest = prepare_and_validate(cfg)
    near = [i for i in report["issues"] if i["code"] == "near_duplicate"]
    assert near and all(i["severity"] == "quarantine" for i in near)
    split = manifest.set_index("path")["split"]
    for issue in near:
        path = issue["path"]
        copy = path.endswith("_copy.jpg")
        partner = path.replace("_copy.jpg", ".png") if copy else path.replace(".png", "_copy.jpg")
        assert split[path] == "excluded" and partner in issue["message"]
    in_splits = manifest[manifest["split"].isin(prepare.SPLITS)]
    pairs = in_splits.assign(image=in_splits["path"].str.replace("_copy.jpg", ".png"))
    assert (pairs.groupby("image")["split"].nunique() == 1).all()  # no copy left across splits


def test_nearest_matches_a_brute_force_search():
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 2**63, size=(500, 2), dtype=np.uint64)
    queries = pool[rng.choice(500, 200)].copy()
    for row in queries[:150]:  # flip a few random bits
        for bit in rng.choice(128, rng.integers(0, 5), replace=False):
            row[bit // 64] ^= np.uint64(1) << np.uint64(int(bit) % 64)
    for max_distance in (0, 2, 3, 5):
        best, match = checks.nearest(queries, pool, max_distance)
        brute = np.bitwise_count(queries[:, None, :] ^ pool[None, :, :]).sum(axis=2)
        expected = brute.min(axis=1)
        found = match >= 0
        assert np.array_equal(found, expected <= max_distance)
        assert np.array_equal(best[found], expected[found])
        assert np.array_equal(brute[np.flatnonzero(found), match[found]], expected[found])


def test_leakage_and_conflicting_labels_name_every_copy(corpus):
    cfg = corpus_cfg(corpus)
    prepare.run(cfg)
    manifest = pd.read_parquet(paths.MANIFEST)
    train = manifest.index[manifest["split"] == "train"][0]
    test = manifest.index[manifest["split"] == "test"][0]
    manifest.loc[train, "sha256"] = manifest.loc[test, "sha256"]
    manifest.to_parquet(paths.MANIFEST)
    validate.run(cfg, track=False)
    report = json.loads(paths.VALIDATION_REPORT.read_text())
    leaked = [i for i in report["issues"] if i["code"] == "split_leakage"]
    assert {i["path"] for i in leaked} == {manifest.at[train, "path"], manifest.at[test, "path"]}
    assert all("(train)" in i["message"] and "(test)" in i["message"] for i in leaked)
    conflict = next(i for i in report["issues"] if i["code"] == "conflicting_labels")
    assert "dogs/dog.png (dogs)" in conflict["message"] and "(cats)" in conflict["message"]


def test_reports_html_and_data_statistics(corpus):
    report, _ = prepare_and_validate(corpus_cfg(corpus))
    page = data_report.HTML_REPORT.read_text()
    assert "Data validation FAILED" in page and "cats/dog in the wrong folder.png" in page
    stats = json.loads(data_report.DATA_STATS.read_text())
    lonely = stats["classes"]["lonely"]
    assert (
        lonely["files"] == lonely["used"] == lonely["train"] + lonely["val"] + lonely["test"] == 1
    )
    assert stats["classes"]["empty"]["files"] == 0
    assert sum(stats["size_histogram"].values()) == sum(stats["modes"].values())
    assert len(stats["channel_mean"]) == 3 and all(0 < v < 1 for v in stats["channel_mean"])


def test_validate_logs_its_reports_to_mlflow_with_the_data_version(project):
    import mlflow

    root = project / "small"
    datasets.write("shapes", root, per_class=3, seed=0)
    cfg = config.from_dict({"data": {"source": str(root)}, "prepare": {"channels": 3}})
    prepare.run(cfg)
    validate.run(cfg)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    (run,) = client.search_runs(experiment, "tags.`lensflow.step` = 'validate'")
    assert run.data.tags["data.md5"]
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "validation")}
    assert logged == {
        f"validation/{name}"
        for name in ("validation.json", "validation.html", "data_stats.json", "gx_result.json")
    }


def test_large_folders_read_in_worker_processes_give_the_same_manifest(project):
    root = project / "many"
    datasets.write("shapes", root, per_class=220, seed=3)
    single = config.from_dict({"data": {"source": str(root)}, "prepare": {"workers": 1}})
    prepare.run(single)
    one_process = pd.read_parquet(paths.MANIFEST)
    images, _ = prepared.load_split("train")
    prepare.run(config.from_dict({"data": {"source": str(root)}, "prepare": {"workers": 2}}))
    assert one_process.equals(pd.read_parquet(paths.MANIFEST))
    assert np.array_equal(images, prepared.load_split("train")[0])


def test_the_manifest_does_not_depend_on_how_many_files_are_read_at_a_time(corpus, monkeypatch):
    """Prepare streams the files in blocks; in blocks of three, one holds only files that were
    not decoded, so whole columns of it are empty."""
    cfg = corpus_cfg(corpus)
    prepare.run(cfg)
    whole, meta = pd.read_parquet(paths.MANIFEST), prepared.load_meta()
    images, _ = prepared.load_split("train")
    monkeypatch.setattr(prepare, "ROWS_PER_TABLE", 3)
    prepare.run(cfg)
    assert pq.ParquetFile(paths.MANIFEST).metadata.row_group(0).num_rows == 3
    assert whole.equals(pd.read_parquet(paths.MANIFEST)) and meta == prepared.load_meta()
    assert np.array_equal(images, prepared.load_split("train")[0])
