"""`dvc repro` reproduces a detection run: in a fresh git + DVC project on a tiny built-in
detection set, the Prefect flow (`lensflow run`, tune and quantize included, train.use_tuned)
records every stage in dvc.lock, so `dvc repro` has nothing to do; forcing train again through
DVC gives the same checkpoint, byte for byte (hence the same test mAP: evaluate stays up to
date)."""

from __future__ import annotations

import json

import yaml

from components.core import config, paths
from flows.training import training_flow
from tests.conftest import tiny_project
from tests.flows.test_dvc_front_end import DVC, copy_pipeline, sh

TINY = {
    "task": "detection",
    "detection": {
        "synthetic_images": 24, "synthetic_size": 32, "image_size": 32,
        "score_threshold": 0.0, "epochs": 1, "batch_size": 8, "lr": 0.003, "threads": 1,
    },
    "train": {"warmup_epochs": 0, "use_tuned": True},
    "tune": {"enabled": True, "trials": 3, "startup_trials": 2},
    "quantize": {"calibration_images": 8},
    "registry": {"model_name": "lensflow-detector-dvc"},
    "promote": {"min_map": 0.0, "bootstrap_samples": 20},
}  # fmt: skip


def test_dvc_repro_reproduces_a_detection_run(tmp_path):
    project = tmp_path
    copy_pipeline(project)
    with tiny_project(project) as mp:
        mp.setenv("DVC_SITE_CACHE_DIR", str(project / ".dvc-site-cache"))
        sh("git", "init", "-q", "-b", "main", cwd=project)
        (project / ".git/info/exclude").write_text(".dvc-site-cache/\n")
        sh(*DVC, "init", "-q", cwd=project)
        (project / "params.yaml").write_text(yaml.safe_dump(config.from_dict(TINY).as_dict()))
        summary = training_flow(params_path="params.yaml")

        # every stage ran, wrote what dvc.yaml declares, and is in dvc.lock
        tuning = json.loads(paths.TUNING_REPORT.read_text())
        assert tuning["task"] == "detection" and tuning["counts"]["complete"] == 3
        assert set(tuning["best_params"]) == {"detection.score_threshold", "detection.nms_iou"}
        assert tuning["trainings"] == 1  # post-processing trials share one training
        quantized = json.loads(paths.QUANTIZE_REPORT.read_text())
        assert quantized["status"] == ("shipped" if summary["int8_shipped"] else "not_shipped")
        assert quantized["status"] == "shipped" or quantized["reasons"], quantized
        assert "test_map" in json.loads(paths.EVALUATION_METRICS.read_text())
        status = sh(*DVC, "status", cwd=project)
        assert "up to date" in status, status  # a `dvc repro` now has nothing to do

        # DVC trains again: the same bytes (so the same test mAP: evaluate stays up to date)
        locked = checkpoint_md5(project)
        out = sh(*DVC, "repro", "--force", "--single-item", "train", cwd=project)
        assert "Running stage 'train'" in out and checkpoint_md5(project) == locked
        status = sh(*DVC, "status", cwd=project)
        # at most what holds training seconds differs: register's lineage report (the seconds,
        # rounded to 0.01, can come out the same, and then nothing differs)
        assert status.split() in (
            ["Data", "and", "pipelines", "are", "up", "to", "date."],
            ["register:", "changed", "deps:", "modified:", "reports/training.json"],
        ), status


def checkpoint_md5(project) -> str:
    outs = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["train"]["outs"]
    return next(out["md5"] for out in outs if out["path"] == "models/checkpoint.pt")
