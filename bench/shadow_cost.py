"""What shadow mode costs `lensflow serve`: requests/s and p99 of the champion's answers at
concurrency 4 (wrk), with serve.rollout off, shadow at serve.shadow_fraction 1.0, and shadow
at 0.25, one worker each, taking turns for a few rounds: each mode's median round, and its
cost as the median over the rounds of its ratio to `off` in the same round. A second `off`
server (`off_again`) is measured the same way: its "cost" is the bench's own spread.

The project is bench/serve_load.py's (digits, versions 1 and 2 the same model, @champion on
2); here @challenger is version 1, so the challenger's compute is real and every paired
request is written to the pair log (a temporary folder). Prints one JSON line; without wrk
it prints why it skipped.

    python bench/shadow_cost.py [--seconds 4] [--rounds 3] [--project DIR] [--nice 19] [--pin]

`--nice` is serve.offpath_nice of the shadow servers: 19 pairs what the answers leave of the
cores, lower pairs more at the answers' cost (`paired_fraction` says how many were paired).
`--pin` (Linux, 2 or more cores): wrk on the first core, the servers (and their off-path
processes) on the others, so the load generator does not share a core with what it measures.

Where the cost lies: each round also measures `off` beside a *burner*, a process that does
nothing but burn the CPU share the shadow_1.0 server's off-path process used in that round
(its CPU seconds over the round's seconds), in bursts every serving/rollout.PAIR_EVERY_S, at
the off-path process's priority (serving/offpath.lower_priority). `off_beside_burner`'s cost
is what any process using that much of the cores costs the answers on this machine, whatever
it computes; `answers_cpu_ms` / `offpath_cpu_ms`: CPU milliseconds per answered request of the
server's processes and of its off-path processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import (  # noqa: E402
    _bodies,
    _cpu_seconds,
    _free_port,
    _parse,
    _project,
    _start,
    _stop,
    _wrk,
)

OFFPATH = "multiprocessing"  # in the command line of the off-path process (spawned) only
BURNER = """
import sys, time
from serving.offpath import lower_priority
from serving.rollout import PAIR_EVERY_S
lower_priority(19)
busy = float(sys.argv[1]) * PAIR_EVERY_S
print("ready", flush=True)
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < busy:
        pass
    time.sleep(PAIR_EVERY_S - busy)
"""

CONCURRENCY = 4
TARGETS = {"p99_increase": 0.10, "requests_per_s_drop": 0.50}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--project", help="serve_load.py's project folder, reused when there")
    parser.add_argument("--nice", type=int, default=19, help="serve.offpath_nice")
    parser.add_argument(
        "--pin", action="store_true", help="wrk on one core, the servers on the rest"
    )
    args = parser.parse_args()
    wrk_cpus = None
    if args.pin:
        first, *rest = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, rest)  # inherited by the servers this process starts
        wrk_cpus = {first}
    if shutil.which("wrk") is None:
        print(json.dumps({"bench": "shadow_cost", "skipped": "wrk not found: apt-get install wrk"}))
        return
    with tempfile.TemporaryDirectory(prefix="lensflow-shadow-bench-") as tmp:
        root = Path(args.project or tmp)
        root.mkdir(parents=True, exist_ok=True)
        env = _project(root)
        bodies = _bodies(root, env)
        import mlflow

        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        mlflow.MlflowClient().set_registered_model_alias("lensflow-classifier", "challenger", "1")
        with tempfile.TemporaryDirectory(prefix="lensflow-pair-log-") as log_dir:
            shadow = ("serve.rollout=shadow", f"serve.offpath_nice={args.nice}")
            modes = {
                "off": (),
                "off_again": (),  # the same server twice: its "cost" is the bench's own spread
                "shadow_1.0": (*shadow, f"serve.rollout_dir={log_dir}/a"),
                "shadow_0.25": (*shadow, "serve.shadow_fraction=0.25",
                                f"serve.rollout_dir={log_dir}/b"),
            }  # fmt: skip
            runs, warm = _measure(root, env, bodies["png"], modes, args.seconds, args.rounds,
                                  wrk_cpus)  # fmt: skip
            folders = {"shadow_1.0": "a", "shadow_0.25": "b"}
            pairs = {m: _pair_count(Path(log_dir) / d) for m, d in folders.items()}
    summary = {mode: {**_median(r), **_paired(r, runs["off"])} for mode, r in runs.items()}
    full = summary["shadow_1.0"]
    answered = {m: sum(r["requests"] for r in runs[m]) + warm[m] for m in folders}
    print(json.dumps({
        "bench": "shadow_cost", "concurrency": CONCURRENCY, "cpus": os.cpu_count(),
        "offpath_nice": args.nice, "wrk_cpus": sorted(wrk_cpus) if wrk_cpus else "any",
        "load_average_before": round(os.getloadavg()[0], 2), "results": summary,
        "pairs_logged": pairs,
        # the rest went unpaired (lensflow_rollout_skipped): the off-path process runs at nice 19
        "paired_fraction": {m: round(pairs[m] / answered[m], 3) for m in folders},
        "targets": TARGETS,
        "meets_targets": full["p99_increase"] <= TARGETS["p99_increase"]
        and full["requests_per_s_drop"] <= TARGETS["requests_per_s_drop"],
    }))  # fmt: skip


def _median(rounds: list[dict]) -> dict:
    return sorted(rounds, key=lambda x: x["requests_per_s"])[len(rounds) // 2]


def _paired(rounds: list[dict], off: list[dict]) -> dict:
    """The cost against `off` in the same round (seconds apart), the median over the rounds:
    load that comes and goes on a shared machine cancels out instead of landing on one mode."""

    def median(values):
        return round(sorted(values)[len(values) // 2], 3)

    pairs = list(zip(rounds, off, strict=True))
    return {
        "p99_increase": median([a["p99_ms"] / b["p99_ms"] - 1 for a, b in pairs]),
        "requests_per_s_drop": median(
            [1 - a["requests_per_s"] / b["requests_per_s"] for a, b in pairs]
        ),
    }


def _measure(root: Path, env: dict, bodies: Path, modes: dict, seconds: int, rounds: int,
             wrk_cpus: set[int] | None):  # fmt: skip
    ports = {mode: _free_port() for mode in modes}
    processes, warm = {}, {}
    runs = {mode: [] for mode in [*modes, "off_beside_burner"]}

    def load(mode: str) -> dict:
        """One wrk run against `mode`'s server, with its servers' CPU ms per answer."""
        before = _cpu_by_role(processes[mode])
        run = _parse(_wrk(root, ports[mode], bodies, "png", CONCURRENCY, seconds,
                          wrk_cpus).communicate()[0])  # fmt: skip
        after = _cpu_by_role(processes[mode])
        for role, cpu in after.items():
            run[f"{role}_cpu_ms"] = round(1000 * (cpu - before[role]) / max(run["requests"], 1), 3)
        return run

    try:
        for mode, settings in modes.items():
            processes[mode] = _start(root, env, "lensflow", ports[mode], workers=1,
                                     settings=settings, log_name=f"lensflow-{mode}")  # fmt: skip
            warm_up = _wrk(root, ports[mode], bodies, "png", CONCURRENCY, 2, wrk_cpus)
            warm[mode] = _parse(warm_up.communicate()[0])["requests"]
        for _ in range(rounds):
            for mode in modes:
                runs[mode].append(load(mode))
            shadow = runs["shadow_1.0"][-1]
            duty = shadow["offpath_cpu_ms"] * shadow["requests"] / (1000 * seconds)
            with _burner(env, min(duty, 0.95)):
                runs["off_beside_burner"].append({**load("off"), "burner_duty": round(duty, 3)})
    finally:
        for process in processes.values():
            _stop(process)
    return runs, warm


@contextlib.contextmanager
def _burner(env: dict, duty: float):
    """A process burning `duty` of a core in bursts, at the off-path process's priority."""
    burner = subprocess.Popen([sys.executable, "-c", BURNER, str(duty)], env=env,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        burner.stdout.readline()  # "ready": its priority lowered
        yield
    finally:
        burner.kill()
        burner.wait()


def _cpu_by_role(server) -> dict[str, float]:
    """CPU seconds of the server's processes: {"answers": the server and its workers,
    "offpath": the off-path processes (and multiprocessing's helper)}."""
    offpath = _cpu_seconds(server, only=OFFPATH)
    return {"answers": _cpu_seconds(server) - offpath, "offpath": offpath}


def _pair_count(folder: Path) -> int:
    import pandas as pd

    parts = [p for p in folder.glob("pairs/*/part-*.parquet") if ".partial" not in p.name]
    return sum(len(pd.read_parquet(p, columns=["request_id"])) for p in parts)


if __name__ == "__main__":
    main()
