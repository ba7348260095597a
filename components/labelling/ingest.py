"""ingest: reviewed labels become the next data version, without touching a raw file.

A relabel goes into <root>/labels.csv (prepare applies it; the image stays where it is); a
newly labelled image (from a monitored batch) is copied to <root>/<class>/. Every change gets
a row in <root>/ingest_audit.csv (who decided, who ingested, when), then `dvc add <root>`
versions the folder, so the next `lensflow run` trains on it and its lineage names the hash.

All answers are checked first: any problem (a missing file, a class the data does not have, a
path answered twice) is one line of one error, and nothing is applied. The plan is written to
a journal before the first change, and every step is idempotent: an interrupted ingest is
resumed by the next `lensflow ingest`, never left half-applied.
"""

from __future__ import annotations

import csv
import getpass
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from components.core import paths, versioning
from components.core.config import Config
from components.core.errors import UserError
from components.data import overrides

JOURNAL = paths.REVIEW / "ingest.journal.json"
AUDIT_COLUMNS = ("ingest", "when", "action", "path", "from", "to", "source", "decided_by",
                 "decided_at", "ingested_by")  # fmt: skip


@dataclass(frozen=True)
class IngestResult:
    relabelled: int
    added: int
    unchanged: int
    resumed: bool
    audit: str
    data_md5: str


def run(cfg: Config, answers_file: str | Path) -> IngestResult:
    root = paths.source_dir(cfg)
    resumed = JOURNAL.exists()
    if resumed:
        _apply(root, json.loads(JOURNAL.read_text()))
    answers = _read_answers(Path(answers_file))
    plan = _plan(root, _classes(cfg, root), answers, Path(answers_file))
    if plan["changes"]:
        paths.write_json(JOURNAL, plan)
        _apply(root, plan)
    return IngestResult(
        relabelled=sum(c["action"] != "add" for c in plan["changes"]),
        added=sum(c["action"] == "add" for c in plan["changes"]),
        unchanged=plan["unchanged"],
        resumed=resumed,
        audit=str(paths.audit_file(root)),
        data_md5=versioning.data_md5(root),
    )


def summary(result: IngestResult) -> str:
    again = "resumed the interrupted ingest; " if result.resumed else ""
    return (
        f"ingest: {again}{result.relabelled} relabelled, {result.added} images added, "
        f"{result.unchanged} answers already true; data {result.data_md5}; audit {result.audit}"
    )


def _classes(cfg: Config, root: Path) -> list[str]:
    if cfg.data.classes:
        return list(cfg.data.classes)
    if not root.is_dir():
        raise UserError(f"{root}: dataset folder not found")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_answers(file: Path) -> list[dict]:
    if not file.exists():
        raise UserError(f"{file}: not found (lensflow review import writes it)")
    with file.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"path", "kind", "label"} - set(reader.fieldnames or ())
        if missing:
            raise UserError(f"{file}: missing columns {', '.join(sorted(missing))}")
        return list(reader)


def _plan(root: Path, classes: list[str], answers: list[dict], file: Path) -> dict:
    """{id, changes: [...], overrides: the relabels after, unchanged}; a UserError listing
    every problem when any answer cannot be applied."""
    current = overrides.read(root, classes)
    after, changes, problems, answered = dict(current), [], [], {}
    unchanged = 0
    for line, answer in enumerate(answers, start=2):
        where, path, label = f"{file}:{line}", answer["path"], answer["label"]
        if answered.setdefault(path, label) != label:
            problems.append(f"{where}: {path} is answered twice, differently")
        elif label not in classes:
            problems.append(
                f"{where}: unknown class {label!r} for {path} (classes: {', '.join(classes)})"
            )
        elif answer["kind"] == "relabel":
            change = _relabel(root, path, label, after, where, problems)
            unchanged += change is None and not problems
            changes += [_decided(change, answer)] if change else []
        elif answer["kind"] == "new":
            change = _add(root, Path(path), label, where, problems)
            unchanged += change is None and not problems
            changes += [_decided(change, answer)] if change else []
        else:
            problems.append(f"{where}: unknown kind {answer['kind']!r} (relabel or new)")
    if problems:
        raise UserError("nothing was ingested:\n" + "\n".join(problems))
    return {"id": uuid.uuid4().hex[:12], "changes": changes, "overrides": after,
            "unchanged": unchanged, "when": _now()}  # fmt: skip


def _relabel(root: Path, path: str, label: str, after: dict, where: str, problems: list):
    parts = Path(path).parts
    if len(parts) < 2 or not (root / path).is_file():
        problems.append(f"{where}: {path} is not an image of {root}")
        return None
    folder, before = parts[0], after.get(path, parts[0])
    if label == before:
        return None
    if label == folder:
        del after[path]
    else:
        after[path] = label
    return {"action": "relabel", "path": path, "from": before, "to": label, "source": ""}


def _add(root: Path, source: Path, label: str, where: str, problems: list):
    if not source.is_file():
        problems.append(f"{where}: {source} is missing")
        return None
    digest = _sha256(source)
    target = root / label / source.name
    if target.exists() and _sha256(target) != digest:
        target = target.with_name(f"{source.stem}-{digest[:8]}{source.suffix}")
    if target.exists() and _sha256(target) == digest:
        return None  # already in the data
    rel = target.relative_to(root).as_posix()
    return {"action": "add", "path": rel, "from": "", "to": label, "source": str(source.resolve())}


def _decided(change: dict, answer: dict) -> dict:
    return {**change, "decided_by": answer.get("who") or "unknown",
            "decided_at": answer.get("when") or ""}  # fmt: skip


def _apply(root: Path, plan: dict) -> None:
    """Each step leaves the data as it was or as it should be, so running it again (after a
    kill) finishes the job: copies under a hidden name then renamed, relabels and audit
    written atomically, the audit rows of this ingest written once."""
    for change in plan["changes"]:
        if change["action"] == "add":
            _copy(Path(change["source"]), root / change["path"])
    if plan["overrides"] or paths.overrides_file(root).exists():
        overrides.write(root, plan["overrides"])
    _audit(root, plan)
    if versioning.in_dvc_repo():
        versioning.dvc_add(root)
    JOURNAL.unlink(missing_ok=True)


def _copy(source: Path, target: Path) -> None:
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")  # hidden: prepare never reads it
    shutil.copyfile(source, partial)
    os.replace(partial, target)


def _audit(root: Path, plan: dict) -> None:
    file = paths.audit_file(root)
    rows = []
    if file.exists():
        with file.open(newline="") as f:
            rows = list(csv.DictReader(f))
    if any(row["ingest"] == plan["id"] for row in rows):
        return
    who = _user()
    rows += [{"ingest": plan["id"], "when": plan["when"], "ingested_by": who,
              **{k: c[k] for k in AUDIT_COLUMNS if k in c}} for c in plan["changes"]]  # fmt: skip
    paths.write_csv(file, rows, AUDIT_COLUMNS)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _sha256(file: Path) -> str:
    with file.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
