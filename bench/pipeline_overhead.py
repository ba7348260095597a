"""Wall time of `lensflow run` on digits, and how much of it is the training loop.

Runs in a fresh temporary project (git + DVC, the repository's params.yaml and dvc.yaml),
after `lensflow data` has written the digits there, so only the run itself is timed.
Prefect runs in ephemeral mode unless PREFECT_API_URL points at a server.
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
    with tempfile.TemporaryDirectory(prefix="lensflow-bench-") as tmp:
        project = Path(tmp)
        shutil.copy(REPO / "params.yaml", project)
        shutil.copy(REPO / "dvc.yaml", project)
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
        env["DVC_SITE_CACHE_DIR"] = str(project / ".dvc" / "tmp" / "site-cache")

        def run(*args: str) -> None:
            subprocess.run(args, cwd=project, env=env, check=True, capture_output=True)

        run("git", "init", "-q")
        run(sys.executable, "-m", "dvc", "init", "-q")
        run("lensflow", "data")
        start = time.perf_counter()
        run("lensflow", "run", "--set", "train.progress_bar=false")
        wall = time.perf_counter() - start
        training = json.loads((project / "reports/training.json").read_text())
        evaluation = json.loads((project / "reports/evaluation.json").read_text())

    loop = training["train_loop_seconds"]
    print(json.dumps({
        "bench": "pipeline_overhead",
        "dataset": "digits",
        "prefect": os.environ.get("PREFECT_API_URL", "ephemeral"),
        "wall_s": round(wall, 1),
        "train_loop_s": round(loop, 1),
        "outside_loop_s": round(wall - loop, 1),
        "epochs": training["epochs_run"],
        "test_accuracy": evaluation["accuracy"],
        "target_wall_s": TARGET_WALL_S,
        "target_outside_loop_s": TARGET_OUTSIDE_S,
        "meets_targets": wall <= TARGET_WALL_S and wall - loop <= TARGET_OUTSIDE_S,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
