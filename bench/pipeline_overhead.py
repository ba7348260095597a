"""Wall time of `lensflow run` on digits, and how much of it is the training loop.

Twice, each in a fresh temporary project (git + DVC, the repository's params.yaml and
dvc.yaml), after `lensflow data` has written the digits there, so only the run itself is timed:
with Prefect's temporary (ephemeral) server and a sqlite MLflow store, then against the local
stack (`lensflow stack up`: an MLflow and a Prefect server, started before the clock starts).
Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_WALL_S, TARGET_OUTSIDE_S = 60.0, 20.0


def main() -> None:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):  # each arm sets its own
        env.pop(name, None)
    ephemeral = _timed_run(env, stack=False)
    local_stack = _timed_run(env, stack=True)
    wall, outside = ephemeral["wall_s"], ephemeral["outside_loop_s"]
    print(json.dumps({
        "bench": "pipeline_overhead",
        "dataset": "digits",
        "ephemeral": ephemeral,
        "local_stack": local_stack,
        "stack_saves_s": round(wall - local_stack["wall_s"], 1),
        # the same training work in both runs: on a shared machine this is the fairer measure
        "stack_saves_outside_loop_s": round(outside - local_stack["outside_loop_s"], 1),
        "target_wall_s": TARGET_WALL_S,
        "target_outside_loop_s": TARGET_OUTSIDE_S,
        "meets_targets": wall <= TARGET_WALL_S and outside <= TARGET_OUTSIDE_S,
    }))  # fmt: skip


def _timed_run(base_env: dict[str, str], stack: bool) -> dict:
    """`lensflow run` in a fresh project: with Prefect's temporary server and a sqlite MLflow
    store, or against `lensflow stack up` there (started before the clock, stopped after)."""
    with tempfile.TemporaryDirectory(prefix="lensflow-bench-") as tmp:
        project = Path(tmp)
        shutil.copy(REPO / "params.yaml", project)
        shutil.copy(REPO / "dvc.yaml", project)
        env = {
            **base_env,
            "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
            "DVC_SITE_CACHE_DIR": str(project / ".dvc" / "tmp" / "site-cache"),
            "PREFECT_HOME": str(project / ".prefect-client"),
        }

        def run(*args: str) -> str:
            done = subprocess.run(args, cwd=project, env=env, check=True, capture_output=True)
            return done.stdout.decode() + done.stderr.decode()

        run("git", "init", "-q")
        run(sys.executable, "-m", "dvc", "init", "-q")
        run("lensflow", "data")
        if stack:
            exports = run("lensflow", "stack", "up").splitlines()
            env.update(line.removeprefix("export ").split("=", 1) for line in exports
                       if line.startswith("export "))  # fmt: skip
        try:
            start = time.perf_counter()
            printed = run("lensflow", "run", "--set", "train.progress_bar=false")
            wall = time.perf_counter() - start
        finally:
            if stack:
                run("lensflow", "stack", "down")
        training = json.loads((project / "reports/training.json").read_text())
        evaluation = json.loads((project / "reports/evaluation.json").read_text())
    loop = training["train_loop_seconds"]
    return {
        "prefect": env.get("PREFECT_API_URL", "ephemeral"),
        "temporary_prefect_server": "Starting temporary server" in printed,
        "wall_s": round(wall, 1),
        "train_loop_s": round(loop, 1),
        "outside_loop_s": round(wall - loop, 1),
        "epochs": training["epochs_run"],
        "test_accuracy": evaluation["accuracy"],
    }


if __name__ == "__main__":
    main()
