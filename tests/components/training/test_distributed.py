"""The train stage under `torchrun`: two CPU processes (gloo), DistributedDataParallel."""

import json
import subprocess
import sys

import mlflow
import torch

from components.core import paths, tracking
from components.data import datasets, prepare, validate
from components.training import models


def test_two_process_ddp_training_logs_and_checkpoints_once(tiny_cfg, project):
    datasets.run(tiny_cfg)
    prepare.run(tiny_cfg)
    assert validate.run(tiny_cfg).success
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*launch, "-m", "cli.main", "stage", "train", "--set", "train.epochs=4"]
    done = subprocess.run(command, cwd=project, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    report = json.loads((project / paths.TRAINING_REPORT).read_text())
    assert report["world_size"] == 2 and report["epochs_run"] == 4
    assert report["best_val_accuracy"] > 0.3  # 10 classes: it learned, in step, on both
    model, _ = models.load_checkpoint(project / paths.CHECKPOINT)
    assert model(torch.zeros(1, 3, 16, 16, dtype=torch.uint8)).shape == (1, 10)

    mlflow.set_tracking_uri(tracking.tracking_uri())
    runs = mlflow.search_runs(
        experiment_names=[tiny_cfg.tracking.experiment],
        filter_string="tags.`lensflow.step` = 'train'",
    )
    assert len(runs) == 1  # rank 1 logged nothing
    assert runs.iloc[0]["tags.train.world_size"] == "2"
    assert len(mlflow.MlflowClient().get_metric_history(runs.iloc[0].run_id, "val/loss")) == 4
