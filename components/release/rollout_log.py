"""The rollout's pair log: what `lensflow serve` writes during a live rollout and what the
controller (`lensflow rollout watch`) reads, its only state.

    <dir>/pairs/<worker>/part-<n>.parquet    one row per paired image: both models' answers
    <dir>/labels/<worker>/part-<n>.parquet   one row per true label received (POST /feedback)

Each serve worker writes in a sub-folder of its own, so any number of workers feed one log
without sharing a file or a lock. A part is written once (temporary name, then rename) and
never changed: the log only grows, one part per flush, and readers never see half a part.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from components.core import paths
from components.core.config import Config
from components.core.errors import UserError

PAIR_COLUMNS = (
    "request_id", "image", "time", "fingerprint", "answered_by",
    "champion_version", "champion_class", "champion_confidence", "champion_ms", "champion_error",
    "challenger_version", "challenger_class", "challenger_confidence", "challenger_ms",
    "challenger_error",
)  # fmt: skip
LABEL_COLUMNS = ("request_id", "image", "label", "time")


def folder(cfg: Config) -> Path:
    """serve.rollout_dir, or the per-user state folder; refused inside the project."""
    if cfg.serve.rollout_dir:
        where = Path(cfg.serve.rollout_dir).expanduser().resolve()
    else:
        state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
        where = Path(state).resolve() / "lensflow" / "rollouts" / cfg.registry.model_name
    if where == Path.cwd().resolve() or Path.cwd().resolve() in where.parents:
        raise UserError(
            f"serve.rollout_dir {where} is inside the project folder: give the pair log a "
            "folder (a volume) of its own"
        )
    return where


def worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{int(time.time())}"


class PartWriter:
    """Appends parts to `<dir>/<kind>/<worker>/`; part numbers follow on from any there."""

    def __init__(self, root: Path, kind: str, worker: str):
        self.folder = root / kind / worker
        self.folder.mkdir(parents=True, exist_ok=True)
        self.next = sum(".partial" not in p.name for p in self.folder.glob("part-*.parquet"))
        self.lock = threading.Lock()

    def write(self, rows: list[dict], columns: tuple[str, ...]) -> Path | None:
        if not rows:
            return None
        # pyarrow from the dicts: half pandas' time, which a serving worker holds the GIL for
        table = pa.Table.from_pylist(rows).select([*columns, *_extra(rows, columns)])
        with self.lock:
            target = self.folder / f"part-{self.next:06d}.parquet"
            self.next += 1
            with paths.atomic(target) as tmp:
                pq.write_table(table, tmp)
        return target


def _extra(rows: list[dict], columns: tuple[str, ...]) -> list[str]:
    return [key for key in rows[0] if key not in columns]


class Index:
    """The (request id, image) keys of a kind's parts, each part read once (parts never
    change): which of some keys the log holds, in time that grows with the new parts only."""

    def __init__(self, root: Path, kind: str):
        self.root, self.kind = root, kind
        self.read: set[Path] = set()
        self.keys: set[tuple[str, int]] = set()
        self.lock = threading.Lock()

    def find(self, keys: set) -> set:
        with self.lock:
            for part in parts(self.root, self.kind):
                if part not in self.read:
                    frame = pd.read_parquet(part, columns=["request_id", "image"])
                    self.keys.update(zip(frame["request_id"], frame["image"], strict=True))
                    self.read.add(part)
            return {key for key in keys if key in self.keys}


def read(root: Path, kind: str) -> pd.DataFrame:
    """Every part of one kind, in one frame (empty with the columns when there is none)."""
    found = parts(root, kind)
    columns = list(PAIR_COLUMNS if kind == "pairs" else LABEL_COLUMNS)
    if not found:
        return pd.DataFrame(columns=columns)
    return pd.concat([pd.read_parquet(p) for p in found], ignore_index=True)


def parts(root: Path, kind: str) -> list[Path]:
    """The complete parts of one kind (a part being written has `.partial` in its name)."""
    found = (root / kind).glob("*/part-*.parquet")
    return sorted(p for p in found if ".partial" not in p.name)


def labelled_pairs(root: Path, champion: str, challenger: str, since: float) -> pd.DataFrame:
    """The pairs of this champion and challenger since `since` (Unix s), each with its first
    label (NaN: none yet); a label sent twice counts once."""
    pairs = read(root, "pairs")
    pairs = pairs[
        (pairs["champion_version"].astype(str) == champion)
        & (pairs["challenger_version"].astype(str) == challenger)
        & (pairs["time"].astype(float) >= since)
    ]
    labels = read(root, "labels")
    if pairs.empty or labels.empty:
        return pairs.assign(label=None)
    labels = labels.sort_values("time", kind="stable").drop_duplicates(["request_id", "image"])
    return pairs.merge(labels[["request_id", "image", "label"]], on=["request_id", "image"],
                       how="left")  # fmt: skip
