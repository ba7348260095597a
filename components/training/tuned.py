"""The tuned params: the identity of a study (what a trial's result depends on) and the best
params of the last one (reports/tuning.json) applied to a config (`train.use_tuned`)."""

from __future__ import annotations

import hashlib
import json
import warnings

from components.core import config, paths, versioning
from components.core.config import Config
from components.core.errors import UserError

# train keys that change how fast a trial runs, not its result: not part of the study's identity
NOT_IDENTITY = ("progress_bar", "use_tuned", "device", "compile", "channels_last")


def apply_tuned(cfg: Config) -> Config:
    """`cfg` with the best params of reports/tuning.json (train.use_tuned)."""
    report_path = paths.TUNING_REPORT
    if not report_path.exists():
        raise UserError(
            f"train.use_tuned is true but {report_path} is missing: run `lensflow tune` first "
            "(or set tune.enabled: true)"
        )
    report = json.loads(report_path.read_text())
    if not report.get("best_params"):
        raise UserError(
            f"train.use_tuned is true but {report_path} has no best params "
            f"(status {report.get('status')}): run `lensflow tune` first"
        )
    if report.get("study") != study_name(cfg):
        warnings.warn(
            f"{report_path} comes from study {report.get('study')}, made with other params than "
            f"these (study {study_name(cfg)}); using its best params anyway",
            stacklevel=2,
        )
    return config.with_values(cfg, report["best_params"], source=str(report_path))


def study_name(cfg: Config) -> str:
    """`tune.study` + a hash of what a trial's result depends on: the data (its DVC hash), the
    seed, the params from `data` to `train` except the tuned keys, the space and the metric
    (for `task: detection` also the `detection` keys, except the tuned ones and `threads`)."""
    raw = cfg.as_dict()
    for key in cfg.tune.space.flat():
        section, leaf = key.split(".")
        raw[section].pop(leaf, None)
    for key in NOT_IDENTITY:
        raw["train"].pop(key, None)
    identity = {
        key: raw[key] for key in ("seed", "data", "prepare", "validate", "augment", "model")
    }
    space = raw["tune"]["space"]
    identity |= {
        "train": raw["train"],
        "space": {section: space[section] for section in ("augment", "model", "train")},
        "metric": cfg.tune.metric,
        "data.md5": versioning.data_md5(paths.source_dir(cfg)),
    }
    if cfg.task == "detection":  # components/detection/tune.py: the detector's knobs
        detection = {k: v for k, v in raw["detection"].items() if k != "threads"}
        for key in cfg.tune.space.flat(("detection",)):
            detection.pop(key.split(".")[1], None)
        identity |= {"task": "detection", "detection": detection, "space": space["detection"]}
        identity.pop("metric")  # validation mAP@[.5:.95]
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return f"{cfg.tune.study}-{digest[:8]}"
