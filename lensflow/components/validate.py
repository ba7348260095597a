"""validate: a Great Expectations suite over the per-image manifest that `prepare` wrote.

GX validates tables, not images, so every image fact it checks is a manifest column.
The suite is the gate: when it fails, reports/validation.json lists every offending file
with a code and the flow stops before training.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pandas as pd

from lensflow.components import paths
from lensflow.components.config import Config, UserError
from lensflow.components.prepare import SPLITS, load_meta

# code -> (column, message); each becomes one expectation of the suite
CHECKS = {
    "undecodable": ("decodable", "the file cannot be decoded as an image"),
    "unknown_label": ("label", "the folder is not one of the expected classes"),
    "split_leakage": ("splits_sharing_sha256", "the same file content is in more than one split"),
    "too_few_images": (
        "class_size",
        "the class has fewer images than validate.min_images_per_class",
    ),
}


@dataclass(frozen=True)
class ValidationResult:
    success: bool
    n_images: int
    n_issues: int
    report: str


def run(cfg: Config) -> ValidationResult:
    if not paths.MANIFEST.exists():
        raise UserError(f"{paths.MANIFEST} is missing: run the prepare stage first")
    manifest = pd.read_parquet(paths.MANIFEST)
    classes = load_meta()["classes"]
    table = _with_derived_columns(manifest)
    results = _run_suite(table, _expectations(classes, cfg.validate_.min_images_per_class))

    code_of_column = {column: code for code, (column, _) in CHECKS.items()}
    issues, checks = [], []
    for result in results.results:
        code = code_of_column[result.expectation_config.kwargs["column"]]
        bad_paths = [row["path"] for row in result.result.get("unexpected_index_list") or []]
        checks.append({"code": code, "success": bool(result.success), "n_failed": len(bad_paths)})
        for path in bad_paths:
            issues.append({"path": path, "code": code, "message": _message(code, path, manifest)})

    report = {
        "success": bool(results.success),
        "n_images": len(manifest),
        "n_used": int(manifest["split"].isin(SPLITS).sum()),
        "checks": checks,
        "issues": issues,
    }
    paths.REPORTS.mkdir(parents=True, exist_ok=True)
    paths.VALIDATION_REPORT.write_text(json.dumps(report, indent=2))
    return ValidationResult(
        report["success"], len(manifest), len(issues), str(paths.VALIDATION_REPORT)
    )


def require_passed() -> None:
    """Refuse to go on when the last validation failed (or never ran)."""
    if not paths.VALIDATION_REPORT.exists():
        raise UserError(f"{paths.VALIDATION_REPORT} is missing: run the validate stage first")
    if not json.loads(paths.VALIDATION_REPORT.read_text())["success"]:
        raise UserError(f"the data failed validation; see {paths.VALIDATION_REPORT}")


def summary(result: ValidationResult) -> str:
    verdict = "passed" if result.success else "FAILED"
    counts = f"{result.n_images} images, {result.n_issues} issues"
    return f"validation {verdict}: {counts} ({result.report})"


def _with_derived_columns(manifest: pd.DataFrame) -> pd.DataFrame:
    table = manifest.copy()
    in_split = table[table["split"].isin(SPLITS)]
    splits_per_sha = in_split.groupby("sha256")["split"].nunique()
    table["splits_sharing_sha256"] = table["sha256"].map(splits_per_sha).fillna(0).astype(int)
    table["class_size"] = table.groupby("label")["path"].transform("count")
    return table


def _expectations(classes: list[str], min_per_class: int) -> list:
    import great_expectations as gx

    column = {code: col for code, (col, _) in CHECKS.items()}
    between = gx.expectations.ExpectColumnValuesToBeBetween
    return [
        gx.expectations.ExpectColumnValuesToBeInSet(column=column["undecodable"], value_set=[True]),
        gx.expectations.ExpectColumnValuesToBeInSet(
            column=column["unknown_label"], value_set=classes
        ),
        between(column=column["split_leakage"], min_value=0, max_value=1),
        between(column=column["too_few_images"], min_value=min_per_class),
    ]


def _run_suite(table: pd.DataFrame, expectations: list):
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    batch = (
        context.data_sources.add_pandas("manifest")
        .add_dataframe_asset("images")
        .add_batch_definition_whole_dataframe("all")
    )
    suite = context.suites.add(gx.ExpectationSuite(name="lensflow-images"))
    for expectation in expectations:
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="lensflow-images", data=batch, suite=suite)
    )
    result_format = {"result_format": "COMPLETE", "unexpected_index_column_names": ["path"]}
    return definition.run(batch_parameters={"dataframe": table}, result_format=result_format)


def _message(code: str, path: str, manifest: pd.DataFrame) -> str:
    if code == "undecodable":
        error = manifest.loc[manifest["path"] == path, "error"].iloc[0]
        return f"{CHECKS[code][1]}: {error}"
    return CHECKS[code][1]
