"""lensflow labels on real (tiny) data: out-of-sample probabilities by cross-fitting, cleanlab's
suspects, the reports, the MLflow artifacts and the gate."""

from __future__ import annotations

import csv
import json

import mlflow
import numpy as np

from cli.main import main
from components.core import paths
from components.labelling import crossfit


def test_folds_cover_every_row_once_and_stratify():
    labels = np.repeat([0, 1, 2], [10, 7, 1])
    folds = crossfit.folds(labels, 3, seed=0)
    rows = np.concatenate(folds)
    assert sorted(rows.tolist()) == list(range(len(labels)))  # each row held out exactly once
    for held_out in folds:
        assert 3 <= (labels[held_out] == 0).sum() <= 4


def test_labels_finds_the_flipped_images_and_gates_on_the_noise_rate(mini_raw, capsys):
    # prepare and validate, then the labels; the gate at 0: any estimated noise fails it
    # (exit 1), after every report is written
    code = main(["labels", "--max-noise-rate", "0"])
    assert code == 1, capsys.readouterr()
    assert "gate failed" in capsys.readouterr().err

    with paths.LABEL_ISSUES.open() as f:
        issues = list(csv.DictReader(f))
    assert list(issues[0]) == ["path", "split", "given", "suggested", "score",
                               "suggested_probability"]  # fmt: skip
    scores = [float(row["score"]) for row in issues]
    assert scores == sorted(scores)  # worst first
    # a wrong label is suspected, its true class suggested; most suspects are wrong labels
    flipped = mini_raw["flipped"]
    found = [row for row in issues if flipped.get(row["path"]) == row["suggested"]]
    assert found and len(found) >= len(issues) / 2, issues

    report = json.loads(paths.LABELS_REPORT.read_text())
    assert report["folds"] == 2 and report["n_issues"] == len(issues)
    assert set(report["noise_rate_per_class"]) == {"checker_2", "circle_large", "gradient_h"}
    assert report["noise_rate"] > 0 and report["gate"] == {"max_noise_rate": 0.0, "passed": False}
    assert paths.LABEL_SUSPECTS_PLOT.stat().st_size > 1000

    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    step = next(r for r in runs if r.data.tags.get("lensflow.step") == "labels")
    folds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == step.info.run_id]
    assert sorted(r.info.run_name for r in folds) == ["fold-1-of-2", "fold-2-of-2"]
    assert step.data.metrics["labels/noise_rate"] == report["noise_rate"]
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(step.info.run_id, "labels")}
    assert {"labels/label_issues.csv", "labels/labels.json", "labels/label_suspects.png"} <= logged
