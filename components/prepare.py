"""prepare: ImageFolder -> manifest (one row per file, with its facts) + uint8 shards per split.

Every file under the dataset root gets a manifest row, usable or not, so `validate` can report
it: its facts come from `imagefacts` (read by one process per core, streamed, in path order).
Files whose checks have a `quarantine` or `error` policy are left out of the splits (split
"excluded", the codes in `excluded_by`). An image's split follows from its content (sha256) and
the seed, so identical files always land in the same split (a duplicated image can never leak
from train into test) and adding images never moves one a model was tested on. The raw
folder is only read: hidden files are ignored, and symbolic links that lead outside the root
are not followed.
Pixels go to disk as they are decoded (`prepared` says how the shards are stored and read).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from components import checks, datasets, imagefacts, paths, prepared
from components.config import Config, UserError

SPLITS = checks.SPLITS
# Below this many files per worker, starting worker processes costs more than it saves.
MIN_FILES_PER_WORKER = 1000
CHUNK = 64  # files per task sent to a worker
LIST_COLUMNS = ("channel_mean", "channel_std")  # three floats per row, kept as Arrow lists
ROWS_PER_TABLE = 4096  # manifest rows converted to a table (and written) at a time
MANIFEST_COLUMNS = ("path", "label", "label_index", "location", *imagefacts.empty_facts())


@dataclass(frozen=True)
class PrepareResult:
    n_images: int
    n_per_split: dict[str, int]
    classes: list[str]
    manifest: str


@dataclass(frozen=True, slots=True)
class Entry:
    """One non-hidden file under the root."""

    path: str  # where to read it
    rel: str  # relative to the root, with '/', as the manifest and reports name it
    label: str | None  # its top-level folder; None at the root
    location: str  # class_folder | nested_folder | dataset_root | outside_root (a link)


def run(cfg: Config) -> PrepareResult:
    root = datasets.source_dir(cfg)
    entries, class_folders = scan(root, cfg)
    classes = list(cfg.data.classes) if cfg.data.classes else sorted(class_folders)
    paths.PREPARED.mkdir(parents=True, exist_ok=True)
    rows_path = paths.PREPARED / "rows.partial.npy"  # every file's pixels, in manifest order
    try:
        manifest, rows = _read_images(entries, classes, cfg, rows_path)
        del entries  # the manifest holds what they said; their memory goes to the next steps
        active = checks.active(cfg, classes)
        file_checks = [c for c in active if not c.needs_splits]
        manifest["excluded_by"] = checks.excluded_by(checks.derive(manifest), file_checks)
        manifest["split"] = _assign_splits(manifest, cfg)
        _mark_near_duplicates(manifest, active, cfg)
        _write_manifest(manifest)
        n_per_split = {}
        for split in SPLITS:
            index = manifest.index[manifest["split"] == split].to_numpy()
            prepared.write_split(split, rows, index, manifest["label_index"].to_numpy()[index])
            n_per_split[split] = len(index)
    finally:
        rows_path.unlink(missing_ok=True)
    mean, std = prepared.channel_stats(prepared.load_split("train")[0])
    meta = {
        "source": str(root),
        "classes": classes,
        "class_folders": class_folders,
        "image_size": cfg.prepare.image_size,
        "channels": cfg.prepare.channels,
        "mean": mean,
        "std": std,
        "n_per_split": n_per_split,
        "fingerprint": fingerprint(manifest),
        "validate_params": cfg.validate_.model_dump(mode="json"),
    }
    paths.write_json(paths.META, meta)
    return PrepareResult(len(manifest), n_per_split, classes, str(paths.MANIFEST))


def fingerprint(manifest: pd.DataFrame) -> str:
    """sha256 of every row's (relative path, sha256, label, split), in manifest order: the
    data's identity where DVC does not track the folder, the same on every machine."""
    columns = manifest[["path", "sha256", "label", "split"]].fillna("").astype(str)
    digest = hashlib.sha256()
    for row in columns.itertuples(index=False):
        digest.update(("\t".join(row) + "\n").encode())
    return digest.hexdigest()


def scan(root: Path, cfg: Config) -> tuple[list[Entry], dict[str, int]]:
    """Every non-hidden file under `root` in path order, and the file count per class folder.

    Folder links are followed while they stay inside the root, except into a folder already
    walked (so a loop ends); a link that leads outside is listed, never followed or read.
    """
    _check_root(root, cfg)
    real_root = root.resolve()
    entries, class_folders, walked = [], {}, set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        here = Path(folder)
        walked.add(here.resolve())
        inside, outside = _inside_and_outside(here, subfolders, real_root)
        entries += [_entry(here / name, root, outside=True) for name in outside]
        subfolders[:] = [name for name in inside if (here / name).resolve() not in walked]
        if here == root:
            class_folders = dict.fromkeys(map(_printable, subfolders), 0)
        for name in sorted(files):
            file = here / name
            if not name.startswith("."):
                leads_out = file.is_symlink() and not file.resolve().is_relative_to(real_root)
                entries.append(_entry(file, root, outside=leads_out))
    if not class_folders:
        raise UserError(f"{root}: no class folders (expected <root>/<class>/<image>)")
    entries.sort(key=lambda e: Path(e.rel).parts)
    for entry in entries:
        if entry.location in ("class_folder", "nested_folder"):
            class_folders[entry.label] += 1
    return entries, class_folders


def _check_root(root: Path, cfg: Config) -> None:
    if not root.exists():
        hint = " (run `lensflow data` to write it)" if cfg.data.source in datasets.BUILTIN else ""
        raise UserError(f"{root}: dataset folder not found{hint}")
    if not root.is_dir():
        raise UserError(f"{root}: not a directory (expected <root>/<class>/<image>)")


def _inside_and_outside(here: Path, names: list[str], real_root: Path):
    """Non-hidden subfolders, sorted, split into those inside the root and links leading out."""
    visible = sorted(name for name in names if not name.startswith("."))
    inside = [name for name in visible if (here / name).resolve().is_relative_to(real_root)]
    return inside, [name for name in visible if name not in inside]


def _entry(path: Path, root: Path, outside: bool) -> Entry:
    parts = path.relative_to(root).parts
    if outside:
        location = "outside_root"
    elif len(parts) == 1:
        location = "dataset_root"
    elif len(parts) == 2:
        location = "class_folder"
    else:
        location = "nested_folder"
    label = _printable(parts[0]) if len(parts) > 1 else None
    return Entry(str(path), _printable("/".join(parts)), label, location)


def _printable(name: str) -> str:
    # A name that is not valid UTF-8 (a raw byte escaped by Python) cannot go into parquet/JSON.
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _read_images(entries: list[Entry], classes: list[str], cfg: Config, rows_path: Path):
    """(manifest, uint8 pixels [rows, C, S, S] memory-mapped at `rows_path`); rows that were
    not decoded stay zero.

    The pixels go straight to the file; the facts go into column lists that become a table
    every ROWS_PER_TABLE files, so the Python objects in flight stay bounded and what is held
    grows by one compact (Arrow-backed) manifest row per file.
    """
    size, channels = cfg.prepare.image_size, cfg.prepare.channels
    pixels = np.lib.format.open_memmap(
        rows_path, mode="w+", dtype=np.uint8, shape=(len(entries), channels, size, size)
    )
    readable = [e.location in ("class_folder", "nested_folder") for e in entries]
    options = imagefacts.ReadOptions(channels, size, cfg.prepare.max_pixels)
    to_read = [entry.path for entry, read in zip(entries, readable, strict=True) if read]
    stream = _read_all(to_read, options, cfg.prepare.workers)
    label_index = {name: i for i, name in enumerate(classes)}
    columns: dict[str, list] = {name: [] for name in MANIFEST_COLUMNS}
    tables = []
    for i, entry in enumerate(entries):
        if readable[i]:
            facts, array = next(stream)
            if array is not None:
                pixels[i] = array
        else:
            facts = _not_read(entry)
        row = {
            "path": entry.rel,
            "label": entry.label,
            "label_index": label_index.get(entry.label, -1),
            "location": entry.location,
        }
        for name, value in {**row, **facts}.items():
            columns[name].append(value)
        if len(columns["path"]) == ROWS_PER_TABLE or i == len(entries) - 1:
            tables.append(_table(columns))
            columns = {name: [] for name in MANIFEST_COLUMNS}
    manifest = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns)
    return manifest.infer_objects(), pixels


def _table(columns: dict[str, list]) -> pd.DataFrame:
    """Column lists as a table; the per-channel statistics as Arrow lists, not one Python list
    (and three floats) per row, which would pin the allocator's memory long after."""
    import pyarrow as pa

    table = pd.DataFrame(columns)
    for name in LIST_COLUMNS:
        values = pa.array(columns[name], type=pa.list_(pa.float64()))
        table[name] = pd.Series(values, dtype=pd.ArrowDtype(values.type))
    return table


def _write_manifest(manifest: pd.DataFrame) -> None:
    """manifest.parquet, converted to Arrow a row group at a time (a whole-table conversion
    would hold a second copy of the manifest)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.Schema.from_pandas(manifest, preserve_index=False)
    pandas_meta = schema.pandas_metadata
    for column in pandas_meta["columns"]:
        if column["name"] in LIST_COLUMNS:  # read back as numpy arrays, as written before
            column["numpy_type"] = "object"
    schema = schema.with_metadata({b"pandas": json.dumps(pandas_meta).encode()})
    with paths.atomic(paths.MANIFEST) as partial, pq.ParquetWriter(partial, schema) as writer:
        for rows in prepared.chunks(len(manifest), ROWS_PER_TABLE):
            writer.write_table(pa.Table.from_pandas(manifest.iloc[rows], schema=schema))
    pa.default_memory_pool().release_unused()


def _not_read(entry: Entry) -> dict:
    reasons = {
        "outside_root": "a symbolic link that leads outside the dataset root: not followed",
        "dataset_root": "outside any class folder: not read",
    }
    facts = imagefacts.empty_facts()
    facts.update(decode=None, decodable=False, error=reasons[entry.location])
    return facts


def _read_all(files: list[str], options, workers: int) -> Iterator[tuple[dict, object]]:
    """imagefacts.read_many over `files`, in order; `workers` processes (0: one per core) for
    large folders."""
    read_chunk = partial(imagefacts.read_many, options=options)
    chunks = [files[i : i + CHUNK] for i in range(0, len(files), CHUNK)]
    workers = min(workers or len(os.sched_getaffinity(0)), len(files) // MIN_FILES_PER_WORKER)
    if workers <= 1:
        for chunk in chunks:
            yield from read_chunk(chunk)
        return
    # fork: workers start at once and share the loaded libraries; the initializer gives each
    # one torch thread (as torch's DataLoader workers do), so forking after torch is safe.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with context.Pool(workers, initializer=imagefacts.init_worker) as pool:
        # At most a few chunks in flight: Pool.imap would queue every chunk at once, and the
        # decoded images of those the workers finish early would pile up in memory.
        in_flight: deque = deque()
        for chunk in chunks:
            in_flight.append(pool.apply_async(read_chunk, (chunk,)))
            if len(in_flight) > 2 * workers:
                yield from in_flight.popleft().get()
        while in_flight:
            yield from in_flight.popleft().get()


def _assign_splits(manifest: pd.DataFrame, cfg: Config) -> pd.Series:
    """Each usable image's split from its content alone: a seeded hash of its sha256, read as a
    number in [0, 1), against the fractions. Adding or removing files never moves another
    image, identical files share a split, and only the seed or the fractions change them.
    Each class gets its fractions on average (exactly, only as the class grows); unusable
    rows are 'excluded'."""
    split = pd.Series("excluded", index=manifest.index, dtype=object)
    usable = (
        manifest["decodable"] & (manifest["label_index"] >= 0) & (manifest["excluded_by"] == "")
    )
    position = manifest.loc[usable, "sha256"].map(partial(_split_position, cfg.seed))
    test, val = cfg.prepare.test_fraction, cfg.prepare.val_fraction
    split[usable] = np.where(
        position < test, "test", np.where(position < test + val, "val", "train")
    )
    return split


def _split_position(seed: int, sha256: str) -> float:
    digest = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _mark_near_duplicates(manifest: pd.DataFrame, active: list, cfg: Config) -> None:
    """Record, for each val/test image, a near-duplicate in an earlier split; with a
    quarantine (or error) policy the later copy leaves its split. (Exact copies share one.)"""
    manifest["near_duplicate_of"], manifest["near_duplicate_distance"] = None, np.nan
    check = next((c for c in active if c.code == "near_duplicate"), None)
    if check is None:
        return
    near_of, distance = checks.near_duplicates(manifest, cfg.validate_.near_duplicate_distance)
    manifest["near_duplicate_of"], manifest["near_duplicate_distance"] = near_of, distance
    if check.policy in ("quarantine", "error"):
        found = near_of.notna()
        manifest.loc[found, "excluded_by"] = check.code
        manifest.loc[found, "split"] = "excluded"
