"""validate: a Great Expectations suite over the per-image manifest that `prepare` wrote.

GX validates tables, not images, so every image fact it checks is a manifest column, and the
class checks run on a one-row-per-class table. Each check of `checks.active` is one
expectation; its policy sets the severity (`error` -> critical, the others -> warning) and the
gate passes when no critical expectation fails. reports/validation.json lists every offending
file with its code, severity and reason; reports/validation.html and reports/data_stats.json
(`data_report`) are the browsable report and the data statistics, also logged to MLflow with
the GX result.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import pandas as pd

from components.core import paths
from components.core.config import Config
from components.core.errors import GateFailed, UserError
from components.data import checks, data_report
from components.data.checks import SPLITS
from components.data.prepared import load_manifest, load_meta, manifest_sha256

SEVERITIES = ("error", "quarantine", "warn")
KEY_COLUMN = {"images": "path", "classes": "name"}

# The reason of each code; {names} come from the offending row and from validate's params.
MESSAGES = {
    "unreadable": "the file cannot be read: {error}",
    "empty_file": "the file is empty (0 bytes)",
    "not_an_image": "not an image: {error}",
    "truncated": "the image data ends early: {error}",
    "undecodable": "the file cannot be decoded as an image: {error}",
    "too_many_pixels": "refused before decoding (decompression-bomb guard): {error}",
    "symlink_outside_root": "a symbolic link that leads outside the dataset root: not followed",
    "outside_class_folder": "a file outside any class folder: not used",
    "nested_folder": "in a subfolder of class '{label}'",
    "unknown_label": "the folder '{label}' is not one of data.classes",
    "too_small": "{width}x{height} is under validate.min_size ({min_size} px, shorter side)",
    "extreme_aspect_ratio": "{width}x{height}: aspect ratio {aspect_ratio:.1f} is over "
    "validate.max_aspect_ratio ({max_aspect_ratio})",
    "mode_grayscale": "a grey image (mode {mode}) converted to RGB",
    "mode_palette": "a palette image (mode {mode}) converted to {target}",
    "mode_alpha": "alpha channel (mode {mode}) dropped when converting to {target}",
    "mode_cmyk": "a CMYK image converted to {target}",
    "mode_16bit": "a {bit_depth:.0f}-bit image (mode {mode}) scaled to 8 bits",
    "exif_rotated": "EXIF orientation {exif_orientation:.0f}: turned upright before use",
    "constant_image": "every pixel has the same value",
    "duplicate": "the same content as {duplicate_of}, in the same class",
    "conflicting_labels": "the same content is in {labels_per_sha256:.0f} classes: {same_content}",
    "split_leakage": "the same content is in {splits_per_sha256:.0f} splits: {same_content}",
    "near_duplicate": "looks like {near_duplicate_of} of an earlier split (perceptual hashes "
    "{near_duplicate_distance:.0f} bits apart; validate.near_duplicate_distance: {near_limit})",
    "missing_class": "class '{name}' is in data.classes but has no folder",
    "empty_class": "the class folder is empty",
    "too_few_images": "{n_used:.0f} usable images, under validate.min_images_per_class "
    "({min_images_per_class})",
    "class_imbalance": "{n_used:.0f} usable images; the largest class has {largest:.0f} "
    "(ratio {imbalance_ratio:.1f} > validate.max_imbalance_ratio {max_imbalance_ratio})",
}


@dataclass(frozen=True)
class ValidationResult:
    success: bool
    n_images: int
    n_issues: int
    report: str
    n_used: int = 0
    problems: list[tuple[str, str, int]] = field(default_factory=list)  # (code, severity, n)


def run(cfg: Config, track: bool = True) -> ValidationResult:
    """Check the prepared manifest, write the reports; `track`: log them to MLflow too."""
    manifest, meta = _load(cfg)
    classes = meta["classes"]
    active = checks.active(cfg, classes)
    images = checks.derive(manifest)
    tables = {
        "images": images,
        "classes": checks.class_table(images, meta["class_folders"], classes),
    }
    results = _run_suites(tables, active)
    issues = _issues(results, active, tables, cfg)
    counts = {check.code: 0 for check in active}
    for issue in issues:
        counts[issue["code"]] += 1
    report = {
        "success": all(_gate_passed(result) for result in results.values()),
        "n_images": len(manifest),
        "n_used": int(manifest["split"].isin(SPLITS).sum()),
        "manifest_sha256": manifest_sha256(),
        "counts": counts,
        "checks": [
            {
                "code": c.code,
                "policy": c.policy,
                "success": counts[c.code] == 0,
                "n_failed": counts[c.code],
            }
            for c in active
        ],
        "issues": issues,
    }
    stats = data_report.data_stats(tables["images"], meta)
    _write_reports(report, stats, meta["source"])
    if track:
        gx_results = {name: result.to_json_dict() for name, result in results.items()}
        _log_to_mlflow(cfg, report, stats, gx_results)
    problems = [
        (check.code, check.policy, counts[check.code]) for check in active if counts[check.code]
    ]
    problems.sort(key=lambda p: (SEVERITIES.index(p[1]), -p[2]))
    return ValidationResult(
        report["success"],
        len(manifest),
        len(issues),
        str(paths.VALIDATION_REPORT),
        report["n_used"],
        problems,
    )


def require_passed() -> None:
    """Refuse to go on unless the last validation passed, on the data prepared now."""
    rerun = "run `lensflow stage validate` (or `lensflow run`)"
    if not paths.VALIDATION_REPORT.exists():
        raise GateFailed(f"the prepared data has not been validated: {rerun}")
    report = json.loads(paths.VALIDATION_REPORT.read_text())
    if not paths.MANIFEST.exists() or report.get("manifest_sha256") != manifest_sha256():
        raise GateFailed(
            f"{paths.VALIDATION_REPORT} is about other data than {paths.MANIFEST}: {rerun}"
        )
    if not report["success"]:
        raise GateFailed(f"the data failed validation; see {paths.VALIDATION_REPORT}")


def summary(result: ValidationResult) -> str:
    """A few lines for the terminal: the verdict, then the problems by severity."""
    verdict = "passed" if result.success else "FAILED"
    counts = f"{result.n_images} files, {result.n_used} used, {result.n_issues} issues"
    lines = [f"validation {verdict}: {counts} ({result.report})"]
    for severity in SEVERITIES:
        found = [f"{code} {n}" for code, policy, n in result.problems if policy == severity]
        if found:
            lines.append(f"  {severity}: {', '.join(found)}")
    return "\n".join(lines)


def _load(cfg: Config) -> tuple[pd.DataFrame, dict]:
    if not paths.MANIFEST.exists():
        raise UserError(f"{paths.MANIFEST} is missing: run the prepare stage first")
    meta = load_meta()
    if meta.get("validate_params") != cfg.validate_.model_dump(mode="json"):
        # prepare applies the quarantine policies: its splits must come from the same params
        raise UserError(
            f"{paths.PREPARED} was prepared with other `validate` params: run prepare again"
        )
    return load_manifest(), meta


def _run_suites(tables: dict[str, pd.DataFrame], active: list[checks.Check]) -> dict:
    """One GX suite per table (images, classes); returns the validation result of each."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    source = context.data_sources.add_pandas("manifest")
    results = {}
    for name, table in tables.items():
        table_checks = [check for check in active if check.table == name]
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=f"lensflow-{name}"))
        for check in table_checks:
            suite.add_expectation(_expectation(gx, check))
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"lensflow-{name}", data=batch, suite=suite)
        )
        key = KEY_COLUMN[name]
        columns = [key, *dict.fromkeys(check.column for check in table_checks)]
        result_format = {"result_format": "COMPLETE", "unexpected_index_column_names": [key]}
        results[name] = definition.run(
            batch_parameters={"dataframe": table[columns]}, result_format=result_format
        )
    context.data_sources.delete("manifest")  # the context outlives us: drop its batch data
    return results


def _expectation(gx, check: checks.Check):
    expect = gx.expectations
    common = {
        "column": check.column,
        "severity": "critical" if check.policy == "error" else "warning",
        "meta": {"code": check.code, "policy": check.policy},
    }
    if check.rule == "min":
        return expect.ExpectColumnValuesToBeBetween(min_value=check.bound, **common)
    if check.rule == "max":
        return expect.ExpectColumnValuesToBeBetween(max_value=check.bound, **common)
    if check.rule == "in":
        return expect.ExpectColumnValuesToBeInSet(value_set=check.bound, **common)
    if check.rule == "not_in":
        return expect.ExpectColumnValuesToNotBeInSet(value_set=check.bound, **common)
    return expect.ExpectColumnValuesToBeNull(**common)


def _gate_passed(result) -> bool:
    from great_expectations.expectations.metadata_types import FailureSeverity

    return result.get_max_severity_failure() != FailureSeverity.CRITICAL


def _issues(results: dict, active: list[checks.Check], tables: dict, cfg: Config) -> list[dict]:
    """Every offending row of every expectation, errors first, then in check and path order."""
    policy = {check.code: check.policy for check in active}
    issues = []
    for name, result in results.items():
        table, key = tables[name], KEY_COLUMN[name]
        for expectation in result.results:
            code = expectation.expectation_config.meta["code"]
            bad = {row[key] for row in expectation.result.get("unexpected_index_list") or []}
            rows = table[table[key].isin(bad)].sort_values(key)
            if code in ("conflicting_labels", "split_leakage"):
                rows = rows.assign(same_content=_copies(code, rows, table))
            context = _message_context(code, table, cfg)
            for row in rows.to_dict("records"):
                path = row["path"] if name == "images" else f"{row['name']}/"
                message = MESSAGES[code].format(**{**context, **row})
                issues.append(
                    {"path": path, "code": code, "severity": policy[code], "message": message}
                )
    order = {check.code: i for i, check in enumerate(active)}
    issues.sort(key=lambda i: (SEVERITIES.index(i["severity"]), order[i["code"]]))
    return issues


def _message_context(code: str, table: pd.DataFrame, cfg: Config) -> dict:
    """The values a message needs besides its own row."""
    context = {
        **cfg.validate_.model_dump(exclude={"policy"}),
        # a row's own near_duplicate_distance (the measured one) hides the param's name
        "near_limit": cfg.validate_.near_duplicate_distance,
        "target": "L" if cfg.prepare.channels == 1 else "RGB",
    }
    if code == "class_imbalance":
        context["largest"] = table["n_used"].max()
    return context


def _copies(code: str, rows: pd.DataFrame, table: pd.DataFrame) -> pd.Series:
    """For each row, every file with its content: 'path (class)' or 'path (split)'."""
    column = "label" if code == "conflicting_labels" else "split"
    candidates = table["decode"] == "ok" if column == "label" else table["split"].isin(SPLITS)
    copies = table[candidates & table["sha256"].isin(rows["sha256"])]
    named = copies["path"] + " (" + copies[column].astype(str) + ")"
    return rows["sha256"].map(named.groupby(copies["sha256"]).agg(", ".join))


def _write_reports(report: dict, stats: dict, source: str) -> None:
    paths.write_json(paths.VALIDATION_REPORT, report)
    paths.write_json(data_report.DATA_STATS, stats)
    paths.write_text(data_report.HTML_REPORT, data_report.html_report(report, stats, source))


def _log_to_mlflow(cfg: Config, report: dict, stats: dict, gx_results: dict) -> None:
    """The reports as artifacts under validation/: into the pipeline run when there is one
    (the flow), else into a `validate` run of its own (the DVC stage)."""
    import mlflow

    from components.core import tracking

    artifacts = {
        "validation/validation.json": report,
        "validation/data_stats.json": stats,
        "validation/gx_result.json": gx_results,
    }
    page = data_report.HTML_REPORT.read_text(encoding="utf-8")
    with tracking.step_run(cfg, "validate"):
        for name, content in artifacts.items():
            mlflow.log_dict(content, name)
        mlflow.log_text(page, "validation/validation.html")
