"""Peak memory and time of prepare and of `lensflow run` on the built-in shapes at two sizes.

For each size (10,000 and 50,000 images by default) a fresh temporary project gets the shapes
written by `lensflow data`, then runs `lensflow stage prepare` alone and `lensflow run` (one
epoch), each in its own process. A sampler reads /proc every 20 ms and keeps the peak RssAnon
(anonymous memory: file pages of the memory-mapped shards, which the OS may drop, do not count)
of the lensflow process and of its whole process tree. Per-step wall times come from the
timestamps of Prefect's "Task run ... Finished" log lines (the tasks run one after another).
Prints one JSON line.

    python bench/memory_scaling.py [--sizes 10000 50000] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_GROWTH_MB = 50  # acceptance: 10,000 -> 50,000 images
MIN_PREPARE_IMAGES_PER_S = 1500
CLASSES = 10
CLOCK = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) \|")  # Prefect's log lines
FINISHED = re.compile(r"Task run '([\w-]+)-\w+' - Finished in state")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs=2, default=[10_000, 50_000])
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    results = [measure_size(n, args.epochs) for n in args.sizes]
    small, large = results
    growth = {
        key: round(large[key]["peak_rss_anon_mb"] - small[key]["peak_rss_anon_mb"], 1)
        for key in ("prepare", "run")
    }
    share = {r["n_images"]: r["run"]["evaluate_share"] for r in results}
    print(
        json.dumps(
            {
                "bench": "memory_scaling",
                "dataset": "shapes 32x32 RGB",
                "cpus": len(os.sched_getaffinity(0)),
                "epochs": args.epochs,
                "sizes": results,
                "rss_anon_growth_mb": growth,
                "max_growth_mb": MAX_GROWTH_MB,
                "passed": {
                    "memory": all(g <= MAX_GROWTH_MB for g in growth.values()),
                    "prepare_speed": large["prepare"]["images_per_s"] >= MIN_PREPARE_IMAGES_PER_S,
                    "evaluate_share": share[args.sizes[1]] <= share[args.sizes[0]] + 0.01,
                },
            }
        )
    )


def measure_size(n_images: int, epochs: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="lensflow-bench-") as tmp:
        project = Path(tmp)
        env = _project(project)
        lensflow = [sys.executable, "-m", "cli.main"]
        per_class = f"data.shapes_per_class={n_images // CLASSES}"
        sets = ["--set", per_class, "--set", "data.source=shapes", "--set", "prepare.channels=3"]
        subprocess.run(
            [*lensflow, "data", *sets], cwd=project, env=env, check=True, stdout=subprocess.DEVNULL
        )
        prepare = measured([*lensflow, "stage", "prepare", *sets], project, env)
        del prepare["log"]
        prepare["images_per_s"] = round(n_images / prepare["wall_s"])
        shutil.rmtree(project / "data" / "prepared")
        run_sets = [*sets, "--set", f"train.epochs={epochs}", "--set", "train.progress_bar=false"]
        run = measured([*lensflow, "run", *run_sets], project, env)
        run["steps_s"] = _step_seconds(run.pop("log"))
        run["evaluate_share"] = round(run["steps_s"]["evaluate"] / run["wall_s"], 3)
    return {"n_images": n_images, "prepare": prepare, "run": run}


def _project(project: Path) -> dict:
    shutil.copy(REPO / "params.yaml", project)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    env["PYTHONPATH"] = str(REPO)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("GX_ANALYTICS_ENABLED", "false")
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # a busy machine
    return env


def measured(command: list[str], cwd: Path, env: dict) -> dict:
    """Run `command`; its wall time, the peak RssAnon of it and of its process tree, its log."""
    log = cwd / "command.log"
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=out)
    peaks = {"main": 0, "tree": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            tree = _tree(process.pid)
            sizes = {pid: _rss_anon_kb(pid) for pid in tree}
            peaks["main"] = max(peaks["main"], sizes.get(process.pid, 0))
            peaks["tree"] = max(peaks["tree"], sum(sizes.values()))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = process.wait()
    done.set()
    sampler.join()
    if code != 0:
        raise SystemExit(f"{' '.join(command)} exited {code}:\n{log.read_text()[-3000:]}")
    return {
        "log": log.read_text(),
        "wall_s": round(time.perf_counter() - start, 1),
        "peak_rss_anon_mb": round(peaks["main"] / 1024, 1),
        "peak_rss_anon_tree_mb": round(peaks["tree"] / 1024, 1),
    }


def _tree(pid: int) -> list[int]:
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        pids.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                children = Path(f"/proc/{current}/task/{task}/children").read_text().split()
                queue += [int(c) for c in children]
        except OSError:
            continue
    return pids


def _rss_anon_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _step_seconds(log: str) -> dict[str, float]:
    """Seconds of each task: from the previous task's end (or the flow's first log line) to
    its own "Finished" line."""
    steps, previous = {}, None
    for line in log.splitlines():
        clock = CLOCK.match(line)
        if not clock:
            continue
        now = datetime.strptime(clock[1], "%H:%M:%S.%f")
        previous = previous or now
        finished = FINISHED.search(line)
        if finished:
            steps[finished[1]] = round((now - previous).total_seconds(), 1)
            previous = now
    return steps


if __name__ == "__main__":
    main()
