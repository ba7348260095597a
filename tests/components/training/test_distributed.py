"""The train stage under `torchrun`: two CPU processes (gloo), DistributedDataParallel."""

import json
import os
import subprocess
import sys

import mlflow
import torch

from components.core import paths, tracking
from components.data import datasets, prepare, validate
from components.training import models
from tests.conftest import REPO

# `lensflow ARGS...` that, after training, writes a hash of each rank's final weights and of
# the best epoch's weights it kept to $WEIGHT_HASHES/rank<RANK>.json
HASHING_RANKS = """
import hashlib, json, os, sys
from pathlib import Path
from components.training import loop

def digest(state):
    hashed = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        hashed.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return hashed.hexdigest()

real_fit = loop.fit
def fit(model, *args, **kwargs):
    best, *rest = real_fit(model, *args, **kwargs)
    hashes = {"final": digest(model.state_dict()), "best": digest(best["state_dict"])}
    out = Path(os.environ["WEIGHT_HASHES"]) / f"rank{os.environ.get('RANK', '0')}.json"
    out.write_text(json.dumps(hashes))
    return (best, *rest)
loop.fit = fit
from cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_two_process_ddp_training_keeps_the_ranks_in_step_and_logs_and_checkpoints_once(
    tiny_cfg, project, tmp_path
):
    datasets.run(tiny_cfg)
    prepare.run(tiny_cfg)
    assert validate.run(tiny_cfg).success
    script, hashes = tmp_path / "hashing_ranks.py", tmp_path / "hashes"
    script.write_text(HASHING_RANKS)
    hashes.mkdir()
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*launch, str(script), "stage", "train", "--set", "train.epochs=4"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WEIGHT_HASHES": str(hashes)}
    done = subprocess.run(
        command, cwd=project, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]

    report = json.loads((project / paths.TRAINING_REPORT).read_text())
    assert report["world_size"] == 2 and report["epochs_run"] == 4
    # in step: both ranks end with the same weights and keep the same best epoch, bit for bit
    ranks = [json.loads((hashes / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    assert report["best_val_accuracy"] > 0.3  # 10 classes: it learned
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
