"""The live rollout's sequential test (components/release/sequential.py) in simulation.

Error rate: rollouts of two equally accurate models (independent errors), the test checked
after every label as `lensflow rollout watch` does (from rollout.min_pairs on, up to
rollout.max_labels labels): the share of rollouts that wrongly promote the challenger, and
that wrongly decide for either model, with Wilson 95 % upper bounds. Vectorised over rollouts.

Decision speed: rollouts of a champion and a better challenger (accuracies below): the
median number of labelled requests to a decision, next to the number the test's power
calculation (an exact computation over the discordant pairs, sequential.labels_for_power)
predicts for 80 % power. Prints one JSON line.

    python bench/rollout_decisions.py [--rollouts 4000] [--speed-rollouts 20]
        [--champion 0.90] [--challenger 0.95] [--equal 0.90]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.core.params_operations import Rollout  # noqa: E402
from components.release import sequential  # noqa: E402
from components.release.sequential import simulate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rollouts", type=int, default=4000)
    parser.add_argument("--speed-rollouts", type=int, default=20)
    parser.add_argument("--champion", type=float, default=0.90)
    parser.add_argument("--challenger", type=float, default=0.95)
    parser.add_argument("--equal", type=float, default=0.90)
    parser.add_argument("--max-labels", type=int, default=2000)
    args = parser.parse_args()
    settings = Rollout(max_labels=args.max_labels)
    started = time.perf_counter()
    equal = simulate(args.equal, args.equal, args.rollouts, settings, seed=1)
    promoted = int((equal["outcome"] == 1).sum())
    decided = int((equal["outcome"] != 0).sum())
    error_seconds = time.perf_counter() - started
    speed = simulate(args.champion, args.challenger, args.speed_rollouts, settings, seed=2)
    predicted = sequential.labels_for_power(
        args.champion, args.challenger, settings.alpha, settings.prior, 0.8, args.max_labels * 5
    )
    print(json.dumps({
        "bench": "rollout_decisions",
        "alpha": settings.alpha, "prior": settings.prior, "min_pairs": settings.min_pairs,
        "max_labels": settings.max_labels,
        "error_rate": {
            "rollouts": args.rollouts, "accuracy": args.equal, "peeks": "after every label",
            "wrong_promotions": promoted, "rate": promoted / args.rollouts,
            "wilson_upper_95": round(sequential.wilson_upper(promoted, args.rollouts), 4),
            "target_upper": settings.alpha + 0.01,
            "either_way": decided, "either_way_upper_95":
                round(sequential.wilson_upper(decided, args.rollouts), 4),
            "seconds": round(error_seconds, 2),
        },
        "decision_speed": {
            "rollouts": args.speed_rollouts, "champion": args.champion,
            "challenger": args.challenger,
            "median_labels": float(np.median(speed["labels"])),
            "power_80_labels": predicted,
            "promoted": int((speed["outcome"] == 1).sum()),
            "undecided": int((speed["outcome"] == 0).sum()),
        },
    }))  # fmt: skip


if __name__ == "__main__":
    main()
