"""evaluate, for `task: detection`: COCO mAP of the trained detector on the test split.

reports/evaluation.json: `map` (mAP@[.5:.95]), `map_50`, `map_75`, by object size
(`map_small`, `map_medium`, `map_large`), recalls (`mar_1`, `mar_10`, `mar_100`, …) and
`per_class` AP (`null` for a class with no test box); metrics/evaluation.json keeps
`test_map` and `test_map_50` for `dvc metrics diff`. In the images' own pixels, by
faster-coco-eval (`coco_map`).
"""

from __future__ import annotations

from dataclasses import dataclass

from components.core import paths
from components.core.config import Config
from components.detection import train


@dataclass(frozen=True)
class EvaluationResult:
    map: float
    map_50: float
    report: str


def run(cfg: Config) -> EvaluationResult:
    train.use_threads(cfg)
    metrics = train.evaluate(train.load(cfg), "test")
    paths.write_json(paths.EVALUATION_REPORT, {"task": "detection", "split": "test", **metrics})
    paths.write_metrics(
        paths.EVALUATION_METRICS,
        {"test_map": round(metrics["map"], 6), "test_map_50": round(metrics["map_50"], 6)},
    )
    return EvaluationResult(metrics["map"], metrics["map_50"], str(paths.EVALUATION_REPORT))


def summary(result: EvaluationResult) -> str:
    return f"evaluate: test mAP@[.5:.95] {result.map:.4f}, mAP@0.5 {result.map_50:.4f}"
