"""The review queue: the images worth a person's time, as Label Studio tasks, and the
answers read back.

`queue` picks suspected label errors (reports/label_issues.csv), images monitoring flagged
(reports/monitoring_images.csv) and a small seeded random sample of training images; each task
carries the model's prediction as a pre-annotation. `export` writes them as a Label Studio
import file (review/tasks.json, for teams without a server) and, given a server, creates or
updates the project over its REST API (`label_studio`). `answers` reads the annotations back,
from the server or from a Label Studio JSON export, into review/answers.csv, which
`lensflow ingest` applies.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np

from components.core import paths
from components.core.config import Config
from components.core.errors import UserError
from components.data import prepared

TASKS = paths.REVIEW / "tasks.json"  # the Label Studio import file
ANSWERS = paths.REVIEW / "answers.csv"  # what reviewers decided, for lensflow ingest
ANSWER_COLUMNS = ("path", "kind", "given", "label", "who", "when", "task")
DOCUMENT_ROOT_ENV = "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"


@dataclass(frozen=True)
class ExportResult:
    n_tasks: int
    per_source: dict[str, int]
    tasks_file: str
    project_id: int | None
    added: int
    note: str = ""


def label_config(classes: list[str]) -> str:
    """The project's labelling interface: the image, the given label, one choice per class."""
    choices = "".join(f"<Choice value={quoteattr(name)}/>" for name in classes)
    return (
        '<View><Image name="image" value="$image"/>'
        '<Header value="given: $given, source: $source"/>'
        f'<Choices name="label" toName="image" choice="single" showInline="true">{choices}'
        "</Choices></View>"
    )


def queue(cfg: Config) -> list[dict]:
    """[{path, kind, given, predicted, score, source}]: `path` relative to the dataset root for
    its images (kind relabel), absolute for a monitored batch's (kind new)."""
    root = paths.source_dir(cfg)
    items = _suspects(cfg.review.suspects) + _flagged(cfg.review.flagged)
    seen = {item["path"] for item in items}
    items += _random(cfg, root, seen)
    return items


def tasks(items: list[dict], root: Path) -> list[dict]:
    """Label Studio tasks (data + a prediction as pre-annotation) for queue items."""
    return [
        {
            "data": {
                "image": image_url(
                    Path(item["path"]) if item["kind"] == "new" else root / item["path"]
                ),
                "path": item["path"],
                "kind": item["kind"],
                "given": item["given"],
                "source": item["source"],
            },
            "predictions": [
                {
                    "model_version": "lensflow",
                    "score": item["score"],
                    "result": [choice(item["predicted"])],
                }
            ],
        }
        for item in items
    ]


def choice(label: str) -> dict:
    return {"from_name": "label", "to_name": "image", "type": "choices",
            "value": {"choices": [label]}}  # fmt: skip


def image_url(file: Path) -> str:
    """Label Studio's URL of a local file: under its local-files document root (the environment
    variable it reads, default the project folder, where `make label-studio` starts it)."""
    root = Path(os.environ.get(DOCUMENT_ROOT_ENV) or Path.cwd()).resolve()
    resolved = file.resolve()
    relative = resolved.relative_to(root) if resolved.is_relative_to(root) else resolved
    return f"/data/local-files/?d={relative.as_posix()}"


def export(cfg: Config, server: bool) -> ExportResult:
    """review/tasks.json always; the Label Studio project too when `server`."""
    meta = prepared.load_meta()
    items = queue(cfg)
    if not items:
        raise UserError(
            f"nothing to review: no {paths.LABEL_ISSUES} (lensflow labels), no flagged images in "
            f"{paths.MONITORING_IMAGES} (lensflow monitor) and review.random is 0"
        )
    found = tasks(items, paths.source_dir(cfg))
    paths.REVIEW.mkdir(parents=True, exist_ok=True)
    paths.write_json(TASKS, found)
    project_id, added, notes = None, 0, set()
    if server:
        from components.labelling import label_studio

        client = label_studio.Client.from_env(cfg.review.url)
        project_id = client.project(cfg.review.project, label_config(meta["classes"]))
        for folder in _folders(items, paths.source_dir(cfg)):
            notes.add(client.serve_folder(project_id, folder))
        added = client.add_tasks(project_id, found)
    per_source: dict[str, int] = {}
    for item in items:
        per_source[item["source"]] = per_source.get(item["source"], 0) + 1
    note = "; ".join(sorted(n for n in notes if n))
    return ExportResult(len(found), per_source, str(TASKS), project_id, added, note)


def _folders(items: list[dict], root: Path) -> set[str]:
    """The folders whose images the tasks show: the dataset's, and each monitored batch's."""
    found = {str(root.resolve())}
    found |= {str(Path(i["path"]).resolve().parent) for i in items if i["kind"] == "new"}
    return found


def answers(exported: list[dict]) -> list[dict]:
    """One answer per task a person annotated (its latest annotation that was not skipped),
    from Label Studio's JSON export format."""
    found = []
    for task in exported:
        data = task.get("data") or {}
        done = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        if not done or "path" not in data:
            continue
        latest = max(done, key=lambda a: str(a.get("updated_at") or a.get("created_at") or ""))
        picked = [r["value"]["choices"][0] for r in latest.get("result") or []
                  if r.get("type") == "choices" and r.get("value", {}).get("choices")]  # fmt: skip
        if not picked:
            continue
        found.append(
            {
                "path": data["path"],
                "kind": data.get("kind", "relabel"),
                "given": data.get("given", ""),
                "label": picked[0],
                "who": _who(latest.get("completed_by")),
                "when": latest.get("updated_at") or latest.get("created_at") or _now(),
                "task": task.get("id", ""),
            }
        )
    return found


def import_answers(cfg: Config, file: str | None) -> list[dict]:
    """review/answers.csv from a Label Studio JSON export file, or from the server's project."""
    if file:
        try:
            exported = json.loads(Path(file).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{file}: not a Label Studio JSON export ({exc})") from None
        if not isinstance(exported, list):
            raise UserError(f"{file}: expected a JSON list of tasks (Label Studio's JSON export)")
    else:
        from components.labelling import label_studio

        client = label_studio.Client.from_env(cfg.review.url)
        exported = client.export(client.find_project(cfg.review.project))
    found = answers(exported)
    paths.write_csv(ANSWERS, found, ANSWER_COLUMNS)
    return found


def _who(completed_by) -> str:
    if isinstance(completed_by, dict):
        return str(
            completed_by.get("email") or completed_by.get("username") or completed_by.get("id")
        )
    return f"label-studio-user:{completed_by}" if completed_by is not None else "unknown"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _read_csv(file: Path) -> list[dict]:
    if not file.exists():
        return []
    with file.open(newline="") as f:
        return list(csv.DictReader(f))


def _suspects(limit: int) -> list[dict]:
    return [
        {
            "path": row["path"],
            "kind": "relabel",
            "given": row["given"],
            "predicted": row["suggested"],
            "score": float(row["suggested_probability"]),
            "source": "suspect",
        }  # fmt: skip
        for row in _read_csv(paths.LABEL_ISSUES)[:limit]
    ]


def _flagged(limit: int) -> list[dict]:
    """Flagged images of the last monitoring pass, least confident first."""
    if not paths.MONITORING_REPORT.exists():
        return []
    batch = Path(json.loads(paths.MONITORING_REPORT.read_text())["batch"]["path"])
    rows = [row for row in _read_csv(paths.MONITORING_IMAGES) if row["flagged"] == "True"]
    rows.sort(key=lambda row: float(row["confidence"]))
    return [
        {
            "path": str(batch / row["path"]),
            "kind": "new",
            "given": row["label"],
            "predicted": row["predicted"],
            "score": float(row["confidence"]),
            "source": "monitoring",
        }  # fmt: skip
        for row in rows[:limit]
    ]


def _random(cfg: Config, root: Path, seen: set[str]) -> list[dict]:
    """A seeded sample of training images not already queued, with the trained model's
    prediction (models/checkpoint.pt) or, before any training, the given label."""
    if cfg.review.random == 0:
        return []
    manifest = prepared.load_manifest(["path", "label", "split"])
    train = manifest[manifest["split"] == "train"].reset_index(drop=True)
    rows = [i for i in prepared.sample(len(train), cfg.review.random * 2, cfg.seed)
            if str(train["path"][i]) not in seen][: cfg.review.random]  # fmt: skip
    predicted, score = _predict(np.asarray(rows, np.int64), train["label"].astype(str).tolist())
    return [
        {
            "path": str(train["path"][i]),
            "kind": "relabel",
            "given": str(train["label"][i]),
            "predicted": predicted[n],
            "score": score[n],
            "source": "random",
        }  # fmt: skip
        for n, i in enumerate(rows)
    ]


def _predict(rows: np.ndarray, given: list[str]) -> tuple[list[str], list[float]]:
    if not paths.CHECKPOINT.exists() or len(rows) == 0:
        return [given[i] for i in rows], [1.0] * len(rows)
    from components.scoring import backends
    from components.training import models

    model, spec = models.load_checkpoint(paths.CHECKPOINT)
    images, _ = prepared.load_split("train")
    probs = backends.torch_predictor(model)(np.asarray(images[rows]))
    return [spec["classes"][k] for k in probs.argmax(1)], [round(float(p), 6) for p in probs.max(1)]
