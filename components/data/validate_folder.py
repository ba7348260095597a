"""lensflow validate: prepare + validate any ImageFolder as a dry run, outside the pipeline."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

from components.core import config, paths
from components.data import data_report, prepare, validate


def run(source: str | Path, report: str | Path) -> validate.ValidationResult:
    """prepare + validate any ImageFolder as a dry run: the shards are scratch in a temporary
    directory (the project's data/ stays untouched), nothing is logged to MLflow, and the
    JSON report (plus its HTML page) lands at `report`."""
    source, report = Path(source).resolve(), Path(report).resolve()
    cfg = config.from_dict({"data": {"source": str(source)}})
    cwd = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="lensflow-validate-") as work:
        os.chdir(work)
        try:
            prepare.run(cfg)
            result = validate.run(cfg, track=False)
            report.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(paths.VALIDATION_REPORT, report)
            if report.suffix != ".html":
                shutil.copyfile(data_report.HTML_REPORT, report.with_suffix(".html"))
        finally:
            os.chdir(cwd)
    return dataclasses.replace(result, report=str(report))
