"""Detection on the built-in set, end to end on this machine's CPU cores: `lensflow data`, then
`lensflow stage prepare|validate|train|evaluate|export` with `--set task=detection`, in a fresh
temporary project. Prints one JSON line: COCO mAP@0.5 and mAP@[.5:.95] on the test split, the
wall time of the whole run and of training, export parity, and ONNX Runtime vs eager PyTorch
ms per image (batch 1). Target (issue 32): mAP@0.5 >= 0.9 within 10 minutes on 2 cores.

    python bench/detection.py [--epochs N] [--images N] [--lr LR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.002)
    args = parser.parse_args()
    overrides = [
        "task=detection", f"detection.synthetic_images={args.images}",
        f"train.epochs={args.epochs}", "train.batch_size=16", f"train.lr={args.lr}",
        "train.progress_bar=false",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": ""}
    with tempfile.TemporaryDirectory() as project:
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project}/mlflow.db"
        start, steps = time.perf_counter(), {}
        for step in (["data"], *(["stage", s] for s in STAGES)):
            began = time.perf_counter()
            command = [sys.executable, "-m", "cli.main", *step]
            for item in overrides:
                command += ["--set", item]
            done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{' '.join(step)}: {done.stderr[-2000:]}")
            steps[step[-1]] = round(time.perf_counter() - began, 1)
        wall = time.perf_counter() - start
        reports = Path(project) / "reports"
        evaluation = json.loads((reports / "evaluation.json").read_text())
        exported = json.loads((reports / "detection_export.json").read_text())
        trained = json.loads((reports / "detection_training.json").read_text())
    print(
        json.dumps(
            {
                "bench": "detection",
                "images": args.images,
                "epochs": args.epochs,
                "lr": args.lr,
                "test_map_50": round(evaluation["map_50"], 4),
                "test_map": round(evaluation["map"], 4),
                "wall_s": round(wall, 1),
                "train_s": trained["train_seconds"],
                "step_s": steps,
                "parity": exported["parity"],
                "onnx_ms_per_image": exported["onnx_ms_per_image"],
                "torch_ms_per_image": exported["torch_ms_per_image"],
                "cpu_cores": len(os.sched_getaffinity(0)),
            }
        )
    )


STAGES = ("prepare", "validate", "train", "evaluate", "export")

if __name__ == "__main__":
    main()
