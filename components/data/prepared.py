"""The prepared data on disk, and the one API every stage reads it with.

`prepare` writes manifest.parquet (one row per file, MANIFEST_SCHEMA; read it compactly with
`load_manifest`), meta.json and, per split, `<split>-images.npy` (uint8 [N, C, S, S]) and
`<split>-labels.npy` (int64 [N]). Readers get the images memory-mapped: pages are read from
disk as a batch touches them and belong to the OS page cache, so a dataset larger than memory
trains, and processes on one machine (DDP, tune workers) share one copy. Take a batch with
`batch(images, index)`; never copy a whole split into memory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from components.core import paths
from components.core.errors import UserError

CHUNK = 4096  # images copied or summed at a time

# A file's facts (as `imagefacts` reads them), then what `prepare` decides from them.
_LIST = pa.list_(pa.float64())
FACTS_SCHEMA = pa.schema(
    [
        ("path", pa.string()), ("label", pa.string()), ("label_index", pa.int64()),
        ("location", pa.string()), ("size_bytes", pa.int64()), ("sha256", pa.string()),
        ("format", pa.string()), ("decode", pa.string()), ("decodable", pa.bool_()),
        ("error", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
        ("mode", pa.string()), ("bit_depth", pa.int64()), ("has_alpha", pa.bool_()),
        ("exif_orientation", pa.int64()), ("phash", pa.string()), ("channel_mean", _LIST),
        ("channel_std", _LIST), ("constant", pa.bool_()),
    ]
)  # fmt: skip
SPLIT_FIELDS = ("excluded_by", "split", "near_duplicate_of", "near_duplicate_distance")
MANIFEST_SCHEMA = pa.schema(
    [
        *FACTS_SCHEMA,
        ("excluded_by", pa.string()), ("split", pa.string()),
        ("near_duplicate_of", pa.string()), ("near_duplicate_distance", pa.float64()),
    ]
)  # fmt: skip
# Text with few distinct values: read as categoricals (a code a row, not a string a row).
CATEGORICAL = ("label", "location", "format", "decode", "error", "mode", "excluded_by", "split")


def load_meta() -> dict:
    if not paths.META.exists():
        raise UserError(f"{paths.META} is missing: run the prepare stage first")
    return json.loads(paths.META.read_text())


def load_manifest(columns=None, path=None) -> pd.DataFrame:
    """The manifest (or `columns` of it; `path`: another file of its schema) in compact form:
    the CATEGORICAL columns as categoricals, the per-channel statistics as Arrow lists."""
    import pyarrow.parquet as pq

    path = path or paths.MANIFEST
    columns = list(columns or pq.read_schema(path).names)
    categorical = [name for name in CATEGORICAL if name in columns]
    table = pq.read_table(path, columns=columns, read_dictionary=categorical, memory_map=True)
    return table.to_pandas(types_mapper=_arrow_lists)


def _arrow_lists(arrow_type: pa.DataType):
    return pd.ArrowDtype(arrow_type) if pa.types.is_list(arrow_type) else None


def manifest_sha256() -> str:
    """The hash of manifest.parquet as prepare wrote it: what a validation report vouches for."""
    with paths.MANIFEST.open("rb") as manifest:
        return hashlib.file_digest(manifest, "sha256").hexdigest()


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, C, S, S], memory-mapped read-only; int64 labels [N]) of one split."""
    images_path, labels_path = paths.shard_images(split), paths.shard_labels(split)
    if not images_path.exists() or not labels_path.exists():
        raise UserError(f"{images_path} is missing: run the prepare stage first")
    return np.load(images_path, mmap_mode="r"), np.load(labels_path)


def batch(array: np.ndarray | torch.Tensor, index=slice(None)) -> torch.Tensor:
    """Rows `index` (a slice, or an index array or tensor) of a split's images or labels, as
    a tensor in memory: only these rows are read from disk."""
    if isinstance(array, torch.Tensor):
        return array[index]
    if isinstance(index, torch.Tensor):
        index = index.numpy()
    return torch.from_numpy(np.array(array[index]))


def chunks(n: int, size: int = CHUNK) -> Iterator[slice]:
    return (slice(start, min(start + size, n)) for start in range(0, n, size))


def sample(n: int, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded sample of at most `limit` of n rows (all of them when n <=
    limit): sorted, so reading them from a memory-mapped split goes forward through the file."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def write_split(split: str, rows: np.ndarray, index: np.ndarray, labels: np.ndarray) -> None:
    """Rows `index` of `rows` as the split's images, streamed a chunk at a time; each file is
    written under a temporary name and renamed, so a reader never sees half a shard."""
    with paths.atomic(paths.shard_images(split)) as partial:
        images = np.lib.format.open_memmap(
            partial, mode="w+", dtype=np.uint8, shape=(len(index), *rows.shape[1:])
        )
        for part in chunks(len(index)):
            images[part] = rows[index[part]]
        images.flush()
        del images
    with paths.atomic(paths.shard_labels(split)) as partial:
        np.save(partial, labels.astype(np.int64))


def channel_stats(images: np.ndarray) -> tuple[list[float] | None, list[float] | None]:
    """Per-channel mean/std (sample std, as torch's) in [0, 1] of uint8 [N, C, S, S], summed
    exactly in integers a chunk at a time; None when there are no images (the gate fails)."""
    if len(images) == 0:
        return None, None
    channels = images.shape[1]
    sums, squares = np.zeros(channels, np.int64), np.zeros(channels, np.int64)
    for part in chunks(len(images)):
        block = np.asarray(images[part])
        sums += np.einsum("ncij->c", block, dtype=np.int64)
        squares += np.einsum("ncij,ncij->c", block, block, dtype=np.int64)
    n = images.size // channels
    mean = sums / n / 255
    variance = (squares - sums.astype(np.float64) ** 2 / n) / (n - 1) / 255**2
    std = np.maximum(np.sqrt(np.maximum(variance, 0)), 1e-3)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]
