"""Detection on the built-in set, end to end on this machine's CPU cores, with the params.yaml
defaults: `lensflow data`, then `lensflow stage prepare|validate|train|evaluate|export` with
`--set task=detection`, in a fresh temporary project. Prints one JSON line: COCO mAP@0.5 and
mAP@[.5:.95] on the test split, the wall time of the whole run, of train + evaluate (what the
acceptance times) and of training alone, export parity, ONNX Runtime vs eager PyTorch images/s
(batch 1, both with the shared postprocessing), the CPU seconds of each step, and the load
average before and after (other jobs on the cores slow every wall time; CPU seconds much
less). Target (issue 32): mAP@0.5 >= 0.9 within 10 minutes on 2 cores.

    python bench/detection.py [--epochs N] [--images N] [--lr LR] [--batch-size N]
                              [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "validate", "train", "evaluate", "export")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, help="detection.epochs (default: params.yaml)")
    parser.add_argument("--images", type=int, help="detection.synthetic_images")
    parser.add_argument("--lr", type=float, help="detection.lr")
    parser.add_argument("--batch-size", type=int, help="detection.batch_size")
    parser.add_argument("--set", action="append", default=[], help="any other KEY=VALUE")
    args = parser.parse_args()
    overrides = ["task=detection", "train.progress_bar=false", *args.set]
    for key, value in (
        ("detection.epochs", args.epochs), ("detection.synthetic_images", args.images),
        ("detection.lr", args.lr), ("detection.batch_size", args.batch_size),
    ):  # fmt: skip
        if value is not None:
            overrides.append(f"{key}={value}")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as project:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project}/mlflow.db"
        start, steps, cpu = time.perf_counter(), {}, {}
        for step in (["data"], *(["stage", s] for s in STAGES)):
            began, used = time.perf_counter(), _children_cpu()
            command = [sys.executable, "-m", "cli.main", *step]
            for item in overrides:
                command += ["--set", item]
            done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{' '.join(step)}: {done.stderr[-2000:]}")
            steps[step[-1]] = round(time.perf_counter() - began, 1)
            cpu[step[-1]] = round(_children_cpu() - used, 1)
        wall = time.perf_counter() - start
        reports = Path(project) / "reports"
        evaluation = json.loads((reports / "evaluation.json").read_text())
        exported = json.loads((reports / "export.json").read_text())
        trained = json.loads((reports / "training.json").read_text())
    print(
        json.dumps(
            {
                "bench": "detection",
                "overrides": overrides[2:],
                "test_map_50": round(evaluation["map_50"], 4),
                "test_map": round(evaluation["map"], 4),
                "wall_s": round(wall, 1),
                "train_evaluate_s": round(steps["train"] + steps["evaluate"], 1),
                "train_s": trained["train_seconds"],
                "step_s": steps,
                "step_cpu_s": cpu,
                "parity": exported["parity"],
                "onnx_images_per_s": _per_second(exported["onnx_ms_per_image"]),
                "torch_images_per_s": _per_second(exported["torch_ms_per_image"]),
                "cpu_cores": len(os.sched_getaffinity(0)),
                "load_before": [round(v, 2) for v in load_before],
                "load_after": [round(v, 2) for v in os.getloadavg()],
            }
        )
    )


def _children_cpu() -> float:
    """CPU seconds (user + system) of the finished subprocesses: with `detection.threads` 1,
    about the wall time the step would take on an idle core."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _per_second(ms_per_image: float) -> float:
    return round(1000 / ms_per_image, 1) if ms_per_image else 0.0


if __name__ == "__main__":
    main()
