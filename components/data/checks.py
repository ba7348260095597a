"""The checks of the data gate: one list of (code, column, rule, bound, policy), read two ways.

`validate` turns each check into a Great Expectations expectation (the gate and the report);
`prepare` evaluates the same rules with pandas to leave `quarantine` and `error` files out of
the splits. Both see the manifest through `derive`, which adds the columns the rules read;
near-duplicates, which depend on the split, are found by `prepare` and kept in the manifest.

Policies (params.yaml `validate.policy`): `error` fails the gate, `warn` reports, `quarantine`
reports and excludes the file from the splits, `off` skips the check. Raw files are never
touched whatever the policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from components.core.config import Config

SPLITS = ("train", "val", "test")
GREY_MODES = ("1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N")
HASH_BITS = 128


@dataclass(frozen=True)
class Check:
    code: str
    table: str  # "images" (one row per file) or "classes" (one row per class)
    column: str
    rule: str  # a value must be: "min" >= bound, "max" <= bound, "in" / "not_in" bound, "null"
    bound: object
    policy: str
    needs_splits: bool = False  # reads columns that exist once prepare has made the split


def active(cfg: Config, classes: list[str]) -> list[Check]:
    """The checks to run, in report order; `off` ones left out."""
    v = cfg.validate_
    decode = [
        (code, "images", "decode", "not_in", [code])
        for code in ("unreadable", "empty_file", "not_an_image", "truncated", "undecodable")
    ]
    # grey -> RGB is a conversion worth a note; RGB -> grey is what channels: 1 asks for
    grey_to_rgb = [("mode_grayscale", "images", "mode", "not_in", list(GREY_MODES))]
    grey_to_rgb = grey_to_rgb if cfg.prepare.channels == 3 else []
    specs = [
        *decode,
        ("too_many_pixels", "images", "decode", "not_in", ["too_many_pixels"]),
        ("symlink_outside_root", "images", "location", "not_in", ["outside_root"]),
        ("outside_class_folder", "images", "location", "not_in", ["dataset_root"]),
        ("nested_folder", "images", "location", "not_in", ["nested_folder"]),
        ("unknown_label", "images", "label", "in", list(classes)),
        ("too_small", "images", "min_side", "min", v.min_size),
        ("extreme_aspect_ratio", "images", "aspect_ratio", "max", v.max_aspect_ratio),
        *grey_to_rgb,
        ("mode_palette", "images", "mode", "not_in", ["P", "PA"]),
        ("mode_alpha", "images", "has_alpha", "in", [False]),
        ("mode_cmyk", "images", "mode", "not_in", ["CMYK"]),
        ("mode_16bit", "images", "bit_depth", "max", 8),
        ("exif_rotated", "images", "exif_orientation", "in", [1]),
        ("constant_image", "images", "constant", "in", [False]),
        ("duplicate", "images", "duplicate_of", "null", None),
        ("conflicting_labels", "images", "labels_per_sha256", "max", 1),
        ("split_leakage", "images", "splits_per_sha256", "max", 1),
        ("near_duplicate", "images", "near_duplicate_of", "null", None),
        ("missing_class", "classes", "folder_exists", "in", [True]),
        ("empty_class", "classes", "n_files", "min", 1),
        ("too_few_images", "classes", "n_used", "min", v.min_images_per_class),
        ("class_imbalance", "classes", "imbalance_ratio", "max", v.max_imbalance_ratio),
    ]
    checks = []
    for code, table, column, rule, bound in specs:
        policy = getattr(v.policy, code)
        if policy != "off":
            needs_splits = code in ("split_leakage", "near_duplicate")
            checks.append(Check(code, table, column, rule, bound, policy, needs_splits))
    return checks


def derive(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest plus the columns the image checks read (split ones when it has splits).

    Near-duplicates are not derived here: `prepare` finds them when it splits (before it
    quarantines any) and writes them into the manifest.
    """
    table = manifest.copy(deep=False)  # copy-on-write: the new columns are the only new data
    decoded = table["decode"] == "ok"
    width = table["width"].where(decoded).astype(float)
    height = table["height"].where(decoded).astype(float)
    table["min_side"] = np.minimum(width, height)
    table["aspect_ratio"] = np.maximum(width, height) / table["min_side"].where(lambda s: s > 0)
    # Integer codes, not strings, to group by: no Python string per row.
    content, label = pd.factorize(table["sha256"])[0], pd.factorize(table["label"])[0]
    labelled = (decoded & table["label"].notna()).to_numpy()
    table["duplicate_of"] = _first_copy(table["path"], content, label, labelled)
    per_content = _distinct_per_content(content, labelled, label)
    table["labels_per_sha256"] = np.where(decoded, per_content, np.nan)
    if "split" in table:
        in_split = table["split"].isin(SPLITS).to_numpy()
        splits = pd.factorize(table["split"])[0]
        table["splits_per_sha256"] = np.where(
            in_split, _distinct_per_content(content, in_split, splits), np.nan
        )
    return table


def _first_copy(path: pd.Series, content, label, among) -> pd.Series:
    """For each row of `among` that has an earlier row of the same content and label there,
    the path of the first such row; else missing."""
    rows = np.flatnonzero(among)
    groups = pd.DataFrame({"label": label[rows], "content": content[rows], "row": rows})
    first = groups.groupby(["label", "content"])["row"].transform("min").to_numpy()
    copies = first != rows
    first_copy = pd.Series(None, index=path.index, dtype=object)
    first_copy.iloc[rows[copies]] = path.iloc[first[copies]].to_numpy()
    return first_copy


def _distinct_per_content(content: np.ndarray, among: np.ndarray, values: np.ndarray):
    """For each row, how many distinct `values` the rows of `among` with its content hold
    (missing where none of them has it)."""
    counts = pd.Series(values[among]).groupby(content[among]).nunique()
    per_content = np.full(content.max(initial=-1) + 2, np.nan)  # last slot: rows without one
    per_content[counts.index.to_numpy()] = counts.to_numpy()
    return per_content[content]


def violations(table: pd.DataFrame, check: Check) -> pd.Series:
    """True for the rows that break `check`; missing values are never judged (as in GX)."""
    values = table[check.column]
    known = values.notna()
    if check.rule == "null":
        return known
    if check.rule == "min":
        bad = values.where(known, check.bound) < check.bound
    elif check.rule == "max":
        bad = values.where(known, check.bound) > check.bound
    elif check.rule == "in":
        bad = ~values.isin(check.bound)
    else:
        bad = values.isin(check.bound)
    return bad & known


def excluded_by(table: pd.DataFrame, checks: list[Check]) -> pd.Series:
    """For each row, the codes (comma-separated) whose `quarantine`/`error` policy excludes it."""
    codes = pd.Series("", index=table.index, dtype=object)
    for check in checks:
        if check.table == "images" and check.policy in ("quarantine", "error"):
            bad = violations(table, check)
            codes[bad] = codes[bad].map(lambda old, code=check.code: f"{old},{code}".strip(","))
    return codes


def near_duplicates(table: pd.DataFrame, max_distance: int) -> tuple[pd.Series, pd.Series]:
    """For each val/test image, the closest image of an earlier split (train < val < test)
    whose perceptual hash is within `max_distance` bits, and that distance; else missing."""
    near_of = pd.Series(None, index=table.index, dtype=object)
    distance = pd.Series(np.nan, index=table.index)
    hashed = table["phash"].notna() & ~table["constant"].eq(True)
    for later in ("val", "test"):
        earlier_splits = SPLITS[: SPLITS.index(later)]
        held = table.index[hashed & (table["split"] == later)]
        earlier = table.index[hashed & table["split"].isin(earlier_splits)]
        if len(held) == 0 or len(earlier) == 0:
            continue
        queries = _hash_words(table.loc[held, "phash"])
        best, match = nearest(queries, _hash_words(table.loc[earlier, "phash"]), max_distance)
        found = match >= 0
        near_of[held[found]] = table.loc[earlier[match[found]], "path"].to_numpy()
        distance[held[found]] = best[found]
    return near_of, distance


def _hash_words(hex_hashes: pd.Series) -> np.ndarray:
    """32-hex-digit hashes -> uint64 [n, 2]."""
    raw = bytes.fromhex("".join(hex_hashes))
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64).reshape(-1, 2)


def nearest(queries: np.ndarray, pool: np.ndarray, max_distance: int):
    """For each query hash, the pool hash with the fewest differing bits if that is at most
    `max_distance`: (distance [n], pool index [n], -1 where none).

    Pigeonhole: two hashes within d bits agree exactly on at least one of d + 1 disjoint bit
    bands, so only pairs sharing a band value are compared, not every pair.
    """
    best = np.full(len(queries), HASH_BITS + 1, dtype=np.int64)
    match = np.full(len(queries), -1, dtype=np.int64)
    for word, shift, width in _bands(max_distance):
        mask = np.uint64((1 << width) - 1)
        pool_keys = (pool[:, word] >> np.uint64(shift)) & mask
        query_keys = (queries[:, word] >> np.uint64(shift)) & mask
        order = np.argsort(pool_keys, kind="stable")
        sorted_keys = pool_keys[order]
        starts = np.searchsorted(sorted_keys, query_keys, side="left")
        ends = np.searchsorted(sorted_keys, query_keys, side="right")
        for rows, cols in _candidate_pairs(starts, ends, order):
            bits = np.bitwise_count(queries[rows] ^ pool[cols]).sum(axis=1).astype(np.int64)
            close = bits <= max_distance
            _keep_closest(best, match, rows[close], cols[close], bits[close])
    return best, match


def _bands(max_distance: int) -> list[tuple[int, int, int]]:
    """(word, shift, width) of max_distance + 1 (rounded up to even) bands over 2 x 64 bits."""
    per_word = (max_distance + 2) // 2
    width = 64 // per_word
    bands = []
    for word in (0, 1):
        for i in range(per_word):
            last = i == per_word - 1
            bands.append((word, i * width, 64 - i * width if last else width))
    return bands


def _candidate_pairs(starts: np.ndarray, ends: np.ndarray, order: np.ndarray, limit=100_000):
    """(query rows, pool rows) sharing a band value, in chunks of at most ~limit pairs (each
    pair costs ~100 bytes of scratch while it is compared: ~10 MB a chunk)."""
    counts = ends - starts
    first = 0
    while first < len(counts):
        total = np.cumsum(counts[first:])
        last = first + max(1, int(np.searchsorted(total, limit, side="right")))
        chunk = counts[first:last]
        if chunk.sum():
            rows = np.repeat(np.arange(first, last), chunk)
            offsets = np.arange(chunk.sum()) - np.repeat(np.cumsum(chunk) - chunk, chunk)
            yield rows, order[np.repeat(starts[first:last], chunk) + offsets]
        first = last


def _keep_closest(best, match, rows, cols, bits) -> None:
    """Lower best/match where a pair is closer (ties: the lower pool index, for determinism)."""
    if len(rows) == 0:
        return
    by_row = np.lexsort((cols, bits, rows))
    rows, cols, bits = rows[by_row], cols[by_row], bits[by_row]
    first = np.r_[True, rows[1:] != rows[:-1]]
    rows, cols, bits = rows[first], cols[first], bits[first]
    closer = (bits < best[rows]) | ((bits == best[rows]) & (cols < match[rows]))
    best[rows[closer]] = bits[closer]
    match[rows[closer]] = cols[closer]


def class_table(images: pd.DataFrame, class_folders: dict[str, int], classes: list[str]):
    """One row per class (expected ones, then unexpected folders) for the class checks."""
    used = images[images["split"].isin(SPLITS)].groupby("label").size()
    rows = []
    for name in [*classes, *sorted(set(class_folders) - set(classes))]:
        exists = name in class_folders
        n_files = class_folders.get(name)
        expected_with_files = name in classes and exists and n_files > 0
        rows.append(
            {
                "name": name,
                "folder_exists": exists,
                "n_files": n_files,
                "n_used": int(used.get(name, 0)) if expected_with_files else None,
            }
        )
    table = pd.DataFrame(rows, columns=["name", "folder_exists", "n_files", "n_used"])
    table[["n_files", "n_used"]] = table[["n_files", "n_used"]].astype(float)  # None -> NaN
    largest = table["n_used"].max() if table["n_used"].notna().any() else np.nan
    table["imbalance_ratio"] = largest / table["n_used"].where(table["n_used"] > 0)
    return table
