"""Pruning pays: the same study with and without the pruner, on digits.

Two Optuna studies with the same seed, search space and trial budget (params.yaml's `tune`
section, its pruner against none), each in a storage of its own, in one temporary project.
Reports the epochs each trained in total and the best validation value each found. Target:
at least 40 % fewer epochs with pruning, best value within 0.5 points. Prints one JSON line.

    python bench/tune_pruning.py [--trials 20] [--pruner median]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from components.core import config
from components.data import datasets, prepare, validate
from components.experiments import tune

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--pruner", help="default: tune.pruner of params.yaml")
    args = parser.parse_args()
    base = config.load(REPO / "params.yaml")
    pruner = args.pruner or base.tune.pruner
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        try:
            cfg = config.from_dict({**base.as_dict(), "data": {"source": "digits"}})
            datasets.run(cfg)
            prepare.run(cfg)
            validate.run(cfg, track=False)
            studies = {name: study(cfg, tmp, args.trials, name) for name in (pruner, "none")}
        finally:
            os.chdir(cwd)
    pruned, full = studies[pruner], studies["none"]
    print(
        json.dumps(
            {
                "bench": "tune_pruning",
                "dataset": "digits",
                "trials": args.trials,
                "epochs_per_trial": cfg.train.epochs,
                "seed": cfg.seed,
                "metric": cfg.tune.metric,
                "pruner": pruner,
                "with_pruning": pruned,
                "without_pruning": full,
                "epochs_saved": round(1 - pruned["epochs"] / full["epochs"], 3),
                "best_value_delta_points": round(
                    100 * (pruned["best_value"] - full["best_value"]), 2
                ),
                "target_epochs_saved": 0.4,
                "target_best_value_delta_points": -0.5,
            }
        )
    )


def study(cfg: config.Config, tmp: str, trials: int, pruner: str) -> dict:
    cfg = config.with_values(
        cfg,
        {
            "tune.enabled": True,
            "tune.trials": trials,
            "tune.workers": 1,
            "tune.pruner": pruner,
            "tune.storage": f"sqlite:///{tmp}/optuna-{pruner}.db",
            "train.progress_bar": False,
        },
    )
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON line only
        result = tune.run(cfg)
    report = json.loads(Path(result.report).read_text())
    return {
        "epochs": report["epochs_trained"],
        "best_value": round(report["best_value"], 4),
        "best_trial": report["best_trial"],
        "counts": {k: v for k, v in report["counts"].items() if v},
        "seconds": round(time.perf_counter() - start, 1),
    }


if __name__ == "__main__":
    main()
