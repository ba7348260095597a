"""validate, for `task: detection`: the detection gate's verdict on what prepare found.

`prepare` ran every check of `box_checks` (it needs their policies to decide the splits) and
kept the findings in data/prepared/issues.json; this step judges them: the gate fails when a
finding's policy is `error`, or when no image with a box is left to train on. It writes
reports/validation.json with the classification report's keys (`success`, `n_images`,
`n_used`, `manifest_sha256`, `counts`, `checks`, `issues`) plus `task`, `n_boxes` and
`boxes_per_split`, and logs it to MLflow under validation/.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from components.core import paths
from components.core.config import Config
from components.core.errors import UserError
from components.data import data_report
from components.data.prepared import load_meta, manifest_sha256
from components.data.validate import ValidationResult
from components.detection import box_checks
from components.detection import prepare as detection_prepare


def run(cfg: Config, track: bool = True) -> ValidationResult:
    meta = load_meta()
    if meta.get("task") != "detection":
        raise UserError(f"{paths.PREPARED} holds classification data: run prepare again")
    if meta.get("gate_params") != detection_prepare.gate_params(cfg):
        raise UserError(
            f"{paths.PREPARED} was prepared with other `validate`/`detection` params: run "
            "prepare again"
        )
    issues = json.loads(detection_prepare.ISSUES.read_text())
    manifest = pd.read_parquet(paths.MANIFEST, columns=["split", "n_kept"])
    policies = box_checks.policies(cfg)
    active = [code for code in box_checks.CODES if policies[code] != "off"]
    counts = {code: 0 for code in active}
    for issue in issues:
        counts[issue["code"]] += 1
    used = manifest["split"].isin(detection_prepare.SPLITS)
    n_boxes = int(manifest.loc[used, "n_kept"].sum())
    enough = int(manifest.loc[manifest["split"] == "train", "n_kept"].sum()) > 0
    report = {
        "task": "detection",
        "success": enough and not any(i["severity"] == "error" for i in issues),
        "n_images": len(manifest),
        "n_used": int(used.sum()),
        "n_boxes": n_boxes,
        "boxes_per_split": meta["n_boxes_per_split"],
        "manifest_sha256": manifest_sha256(),
        "counts": counts,
        "checks": [
            {
                "code": code,
                "policy": policies[code],
                "success": counts[code] == 0,
                "n_failed": counts[code],
            }
            for code in active
        ],  # fmt: skip
        "issues": issues,
    }
    if not enough:
        report["reason"] = "no box left in the training split"
    paths.write_json(paths.VALIDATION_REPORT, report)
    _write_pages(report)
    if track:
        _log_to_mlflow(cfg, report)
    problems = [(code, policies[code], counts[code]) for code in active if counts[code]]
    problems.sort(key=lambda p: (box_checks.SEVERITIES.index(p[1]), -p[2]))
    return ValidationResult(
        report["success"], len(manifest), len(issues), str(paths.VALIDATION_REPORT),
        report["n_used"], problems,
    )  # fmt: skip


def _write_pages(report: dict) -> None:
    """What dvc.yaml's validate stage declares besides the report: reports/data_stats.json
    (images, boxes per split, check counts) and reports/validation.html (verdict, checks,
    issues)."""
    keys = ("task", "n_images", "n_used", "n_boxes", "boxes_per_split", "counts")
    paths.write_json(data_report.DATA_STATS, {key: report[key] for key in keys})
    verdict = "passed" if report["success"] else "FAILED"
    issues = report["issues"][: data_report.HTML_MAX_ISSUES]
    body = "\n".join(
        [
            f"<h1>Detection data validation {verdict}</h1>",
            f"<p>{report['n_images']} images, {report['n_used']} used, {report['n_boxes']} "
            "boxes.</p><h2>Checks</h2>",
            data_report._table(
                ["code", "policy", "findings"],
                [[c["code"], c["policy"], c["n_failed"]] for c in report["checks"]],
            ),
            f"<h2>Issues ({len(report['issues'])})</h2>",
            data_report._table(["finding"], [[json.dumps(issue)] for issue in issues]),
        ]
    )
    page = f"<!doctype html><html><head><meta charset='utf-8'></head><body>{body}</body></html>"
    paths.write_text(data_report.HTML_REPORT, page)


def summary(result: ValidationResult) -> str:
    """validate's lines, then the first finding of each failing check, naming its file."""
    from components.data import validate

    text = validate.summary(result)
    if not result.success and not any(p[1] == "error" for p in result.problems):
        text += "\n  error: no box left in the training split"
    issues = json.loads(Path(result.report).read_text())["issues"]
    for code in dict.fromkeys(i["code"] for i in issues if i["severity"] == "error"):
        first = next(i for i in issues if i["code"] == code)
        message = first["message"]
        where = "" if message.startswith(first["path"]) else f"{first['path']}: "
        text += f"\n  first {code}: {where}{message}"
    return text


def _log_to_mlflow(cfg: Config, report: dict) -> None:
    import mlflow

    from components.core import tracking

    with tracking.step_run(cfg, "validate"):
        mlflow.log_dict(report, "validation/validation.json")
        mlflow.log_metric("data/n_boxes", report["n_boxes"])
