"""prepare: ImageFolder -> manifest (one row per file, with its facts) + uint8 shards per split.

Every file under the dataset root gets a manifest row, usable or not, so `validate` can report
it: its facts come from `imagefacts` (read by one process per core, streamed, in path order).
Files whose checks have a `quarantine` or `error` policy are left out of the splits (split
"excluded", the codes in `excluded_by`). An image's split follows from its content (sha256) and
the seed, so identical files always land in the same split (a duplicated image can never leak
from train into test) and adding images never moves one a model was tested on. The raw
folder is only read: hidden files are ignored, and symbolic links that lead outside the root
are not followed.
Files are scanned, read and written as they are found: pixels and facts stream to scratch files
beside the outputs, and what is held in memory while the splits are decided is a compact table
of the columns that decide them (`prepared` says how the shards are stored and read).
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from components.core import memory, paths
from components.core.config import Config
from components.core.errors import UserError
from components.data import checks, imagefacts, overrides, prepared

SPLITS = checks.SPLITS
# Below this many files per worker, starting worker processes costs more than it saves.
MIN_FILES_PER_WORKER = 1000
CHUNK = 64  # files per task sent to a worker
ROWS_PER_TABLE = 4096  # files read, then written as one row group, at a time
# What the splits are decided from (the other facts stay on disk until the manifest is written).
SPLIT_COLUMNS = (
    "path", "label", "label_index", "location", "sha256", "decode", "decodable", "width",
    "height", "mode", "bit_depth", "has_alpha", "exif_orientation", "phash", "constant",
)  # fmt: skip


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
    root = paths.source_dir(cfg)
    _check_root(root, cfg)
    class_folders = _class_folders(root)
    classes = list(cfg.data.classes) if cfg.data.classes else sorted(class_folders)
    relabels = overrides.read(root, classes)
    paths.PREPARED.mkdir(parents=True, exist_ok=True)
    rows_path = paths.PREPARED / "rows.partial"  # every file's pixels, in manifest order
    facts_path = paths.PREPARED / "facts.partial.parquet"  # every file's facts, in that order
    try:
        n_files = _read_images(scan(root), classes, cfg, rows_path, facts_path, relabels)
        decided, per_folder = _decide_splits(facts_path, classes, cfg)
        memory.release_freed()  # what deciding took, before the manifest is written
        _write_manifest(facts_path, decided[list(prepared.SPLIT_FIELDS)])
        rows = _open_rows(rows_path, n_files, cfg)
        n_per_split = {}
        for split in SPLITS:
            index = decided.index[decided["split"] == split].to_numpy()
            prepared.write_split(split, rows, index, decided["label_index"].to_numpy()[index])
            n_per_split[split] = len(index)
        del rows
    finally:
        rows_path.unlink(missing_ok=True)
        facts_path.unlink(missing_ok=True)
    mean, std = prepared.channel_stats(prepared.load_split("train")[0])
    meta = {
        "source": str(root),
        "classes": classes,
        "class_folders": {name: per_folder.get(name, 0) for name in class_folders},
        "image_size": cfg.prepare.image_size,
        "channels": cfg.prepare.channels,
        "mean": mean,
        "std": std,
        "n_per_split": n_per_split,
        "fingerprint": fingerprint(),
        "relabelled": len(relabels),  # images whose label comes from <root>/labels.csv
        "validate_params": cfg.validate_.model_dump(mode="json"),
    }
    paths.write_json(paths.META, meta)
    return PrepareResult(n_files, n_per_split, classes, str(paths.MANIFEST))


def fingerprint() -> str:
    """sha256 of every manifest row's (relative path, sha256, label, split), in order: the
    data's identity where DVC does not track the folder, the same on every machine."""
    import pyarrow.parquet as pq

    digest = hashlib.sha256()
    manifest = pq.ParquetFile(paths.MANIFEST, memory_map=True)
    identity = ["path", "sha256", "label", "split"]
    for batch in manifest.iter_batches(batch_size=ROWS_PER_TABLE, columns=identity):
        rows = batch.to_pandas().astype(object).fillna("").astype(str)
        for row in rows.itertuples(index=False):
            digest.update(("\t".join(row) + "\n").encode())
    return digest.hexdigest()


def _decide_splits(facts_path: Path, classes: list[str], cfg: Config):
    """(each file's split columns and label_index, the file count of each class folder),
    from a compact table of the facts that decide them."""
    table = prepared.load_manifest(SPLIT_COLUMNS, facts_path)
    active = checks.active(cfg, classes)
    file_checks = [c for c in active if not c.needs_splits]
    table["excluded_by"] = checks.excluded_by(checks.derive(table), file_checks)
    table["split"] = _assign_splits(table, cfg)
    _mark_near_duplicates(table, active, cfg)
    in_folders = table.loc[table["location"].isin(["class_folder", "nested_folder"]), "label"]
    per_folder = {str(name): int(n) for name, n in in_folders.value_counts().items()}
    return table[[*prepared.SPLIT_FIELDS, "label_index"]].copy(), per_folder


def scan(root: Path) -> Iterator[Entry]:
    """Every non-hidden file under `root`, in path order, as the folders are listed, except
    the relabel and audit files at the root (`overrides`), which are data about the images.

    Folder links are followed while they stay inside the root, except into a folder already
    walked (so a loop ends); a link that leads outside is listed, never followed or read.
    """
    own = {paths.OVERRIDES, paths.INGEST_AUDIT}
    for entry in _walk(root, root, root.resolve(), walked=set()):
        if entry.location != "dataset_root" or entry.rel not in own:
            yield entry


def _walk(here: Path, root: Path, real_root: Path, walked: set[Path]) -> Iterator[Entry]:
    """The files under `here`, files and subfolders merged by name (the order of sorted paths);
    which subfolders to enter is settled when `here` is listed, as `os.walk` does."""
    walked.add(here.resolve())
    folders, files = _listing(here)
    inside, outside = _inside_and_outside(here, folders, real_root)
    inside = [name for name in inside if (here / name).resolve() not in walked]
    items = [*((name, True) for name in inside), *((name, False) for name in outside + files)]
    for name, is_folder in sorted(items, key=lambda item: _printable(item[0])):
        path = here / name
        if is_folder:
            yield from _walk(path, root, real_root, walked)
        else:
            leads_out = path.is_symlink() and not path.resolve().is_relative_to(real_root)
            yield _entry(path, root, outside=leads_out)


def _listing(folder: Path) -> tuple[list[str], list[str]]:
    """(subfolder names, including links to folders; non-hidden file names) of `folder`; an
    unreadable folder lists nothing, as in `os.walk`."""
    folders, files = [], []
    try:
        with os.scandir(folder) as found:
            for item in found:
                try:
                    is_folder = item.is_dir()
                except OSError:
                    is_folder = False
                if is_folder:
                    folders.append(item.name)
                elif not item.name.startswith("."):
                    files.append(item.name)
    except OSError:
        pass
    return folders, files


def _class_folders(root: Path) -> list[str]:
    """The class folders: the non-hidden folders at the root that stay inside it."""
    folders, _ = _listing(root)
    inside, _ = _inside_and_outside(root, folders, root.resolve())
    if not inside:
        raise UserError(f"{root}: no class folders (expected <root>/<class>/<image>)")
    return [_printable(name) for name in inside]


def _check_root(root: Path, cfg: Config) -> None:
    if not root.exists():
        hint = " (run `lensflow data` to write it)" if cfg.data.source in paths.BUILTIN else ""
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


def _read_images(
    entries: Iterator[Entry],
    classes: list[str],
    cfg: Config,
    rows_path: Path,
    facts_path: Path,
    relabels: dict[str, str],
) -> int:
    """Read every file of `entries`; its pixels go to `rows_path` (uint8 [C, S, S] a row, zero
    when not decoded) and its facts to `facts_path`, ROWS_PER_TABLE files at a time, so what
    is held does not grow with the number of files; its label is its folder's, or the one
    `relabels` names. Returns the number of files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    size, channels = cfg.prepare.image_size, cfg.prepare.channels
    options = imagefacts.ReadOptions(channels, size, cfg.prepare.max_pixels)
    label_index = {name: i for i, name in enumerate(classes)}
    blank = bytes(channels * size * size)
    n_files = 0
    with ExitStack() as stack:
        rows = stack.enter_context(rows_path.open("wb"))
        facts = stack.enter_context(pq.ParquetWriter(facts_path, prepared.FACTS_SCHEMA))
        read = stack.enter_context(_file_reader(options, cfg.prepare.workers))
        while block := list(itertools.islice(entries, ROWS_PER_TABLE)):
            readable = [e.location in ("class_folder", "nested_folder") for e in block]
            results = read([e.path for e, ok in zip(block, readable, strict=True) if ok])
            columns: dict[str, list] = {name: [] for name in prepared.FACTS_SCHEMA.names}
            for entry, ok in zip(block, readable, strict=True):
                found, array = next(results) if ok else (_not_read(entry), None)
                rows.write(blank if array is None else array.tobytes())
                label = relabels.get(entry.rel, entry.label)
                row = {
                    "path": entry.rel,
                    "label": label,
                    "label_index": label_index.get(label, -1),
                    "location": entry.location,
                    **found,
                }
                for name, values in columns.items():
                    values.append(row[name])
            facts.write_table(pa.Table.from_pydict(columns, schema=prepared.FACTS_SCHEMA))
            n_files += len(block)
    return n_files


def _open_rows(rows_path: Path, n_files: int, cfg: Config) -> np.ndarray:
    shape = (n_files, cfg.prepare.channels, cfg.prepare.image_size, cfg.prepare.image_size)
    if n_files == 0:  # an empty file cannot be memory-mapped
        return np.zeros(shape, dtype=np.uint8)
    return np.memmap(rows_path, dtype=np.uint8, mode="r", shape=shape)


def _write_manifest(facts_path: Path, split_fields: pd.DataFrame) -> None:
    """manifest.parquet: the facts, a row group at a time, with the split columns added."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    facts = pq.ParquetFile(facts_path, memory_map=True)
    added = pa.schema([prepared.MANIFEST_SCHEMA.field(name) for name in split_fields])
    added = pa.Table.from_pandas(split_fields, schema=added, preserve_index=False)
    with (
        paths.atomic(paths.MANIFEST) as partial,
        pq.ParquetWriter(partial, prepared.MANIFEST_SCHEMA) as writer,
    ):
        start = 0
        for batch in facts.iter_batches(batch_size=ROWS_PER_TABLE):
            columns = [*batch.columns, *added.slice(start, batch.num_rows).columns]
            writer.write_table(pa.Table.from_arrays(columns, schema=prepared.MANIFEST_SCHEMA))
            start += batch.num_rows


def _not_read(entry: Entry) -> dict:
    reasons = {
        "outside_root": "a symbolic link that leads outside the dataset root: not followed",
        "dataset_root": "outside any class folder: not read",
    }
    facts = imagefacts.empty_facts()
    facts.update(decode=None, decodable=False, error=reasons[entry.location])
    return facts


@contextmanager
def _file_reader(options, workers: int) -> Iterator[Callable[[list[str]], Iterator]]:
    """A function from files to their (facts, pixels), in order. A large folder (one whose
    first block has at least two workers' worth of files) is read by `workers` processes
    (0: one per core), started once for the whole folder."""
    read_chunk = partial(imagefacts.read_many, options=options)
    workers = workers or len(os.sched_getaffinity(0))
    with ExitStack() as stack:
        pool = None

        def read(files: list[str]) -> Iterator:
            nonlocal pool
            chunks = [files[i : i + CHUNK] for i in range(0, len(files), CHUNK)]
            if pool is None and workers > 1 and len(files) >= 2 * MIN_FILES_PER_WORKER:
                pool = stack.enter_context(_pool(workers))
            if pool is None:
                return itertools.chain.from_iterable(map(read_chunk, chunks))
            return _in_order(pool, read_chunk, chunks, limit=2 * workers)

        yield read


def _pool(workers: int):
    # fork: workers start at once and share the loaded libraries; the initializer gives each
    # one torch thread (as torch's DataLoader workers do), so forking after torch is safe.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    return context.Pool(workers, initializer=imagefacts.init_worker)


def _in_order(pool, read_chunk, chunks: list[list[str]], limit: int) -> Iterator:
    # At most `limit` chunks in flight: Pool.imap would queue every chunk at once, and the
    # decoded images of those the workers finish early would pile up in memory.
    in_flight: deque = deque()
    for chunk in chunks:
        in_flight.append(pool.apply_async(read_chunk, (chunk,)))
        if len(in_flight) > limit:
            yield from in_flight.popleft().get()
    while in_flight:
        yield from in_flight.popleft().get()


def _assign_splits(manifest: pd.DataFrame, cfg: Config) -> pd.Series:
    usable = (
        manifest["decodable"] & (manifest["label_index"] >= 0) & (manifest["excluded_by"] == "")
    )
    return split_by_content(manifest["sha256"], usable, cfg)


def split_by_content(sha256: pd.Series, usable: pd.Series, cfg: Config) -> pd.Series:
    """Each usable image's split from its content alone: a seeded hash of its sha256, read as a
    number in [0, 1), against the fractions. Adding or removing files never moves another
    image, identical files share a split, and only the seed or the fractions change them.
    Each class gets its fractions on average (exactly, only as the class grows); unusable
    rows are 'excluded'. Detection (components/detection/prepare.py) splits the same way."""
    split = pd.Series("excluded", index=sha256.index, dtype=object)
    position = sha256[usable].map(partial(_split_position, cfg.seed))
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
