"""tune, for `task: detection`: an Optuna study over the detector's knobs,
`tune.space.detection` (by default `detection.score_threshold` on a log scale and
`detection.nms_iou`; `detection.anchor_sizes` when the space lists choices of it).

Cheap by design. The score threshold and the NMS IoU only change the postprocessing
(`model.Decoder`): the detector is trained once, its raw outputs on the validation split are
kept, and a trial decodes them again with its values and scores COCO mAP@[.5:.95] on that
split: milliseconds, not a training. Anchor sizes change what each pyramid level learns, so each
choice of `detection.anchor_sizes` costs one training (`detection.epochs`, as train runs it);
the trials that share a choice share that training. A categorical space bounds the cost by its
number of choices, where a continuous one would retrain every trial: on 2 CPU cores one training
of the default recipe takes minutes, so anchors are tuned only when the space lists them.

The study's storage, name (`tuned.study_name`: the same params resume the same study), trial
count and timeout are classification's `tune.*`; one process (`tune.workers` and the pruner do
not apply: a trial has no epochs). In MLflow, a run per invocation with a child run per trial.
The best params go to reports/tuning.json; train, evaluate, export, quantize and register use
them when `train.use_tuned` is true (`train.settings`).
"""

from __future__ import annotations

import json
import warnings

import optuna
import torch

from components.core import config, paths, tracking
from components.core.config import Config
from components.core.credentials import redact
from components.core.errors import GateFailed, UserError
from components.data.prepared import load_meta
from components.data.validate import require_passed
from components.detection import coco_map, model, train
from components.experiments import tune as classification_tune
from components.experiments import tune_storage
from components.training import tuned

METRIC = "val_map"  # COCO mAP@[.5:.95] on the validation split, maximised
summary = classification_tune.summary


def run(cfg: Config) -> classification_tune.TuneResult:
    """A study of `tune.trials` more trials when `tune.enabled`; otherwise keeps
    reports/tuning.json, or writes one saying no study ran (as classification's)."""
    if not cfg.tune.enabled:
        return classification_tune._not_run()
    require_passed()
    space = cfg.tune.space.flat(("detection",))
    if not space:
        raise UserError("tune.space.detection is empty: nothing to tune for task: detection")
    name, url = tuned.study_name(cfg), tune_storage.storage_url(cfg)
    storage = tune_storage.open_storage(url, cfg.tune.heartbeat_grace)
    study = optuna.create_study(
        study_name=name, storage=storage, direction="maximize", load_if_exists=True
    )
    first = len(study.trials)
    study.sampler = optuna.samplers.TPESampler(
        seed=cfg.seed + first, n_startup_trials=cfg.tune.startup_trials
    )
    with tracking.step_run(cfg, "tune") as parent:
        import mlflow

        mlflow.set_tags({"optuna.study": name, "mlflow.runName": name, "task": "detection"})
        scorer = _Scorer(cfg, parent.info.run_id)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.optimize(
                lambda trial: scorer.trial(trial, space),
                n_trials=cfg.tune.trials,
                timeout=cfg.tune.timeout,
                catch=(Exception,),
            )
        report = _report(cfg, study, url, parent.info.run_id, space, scorer.trainings)
        paths.write_json(paths.TUNING_REPORT, report)
        classification_tune._log_study(study, report)
    if report["best_trial"] is None:
        raise GateFailed(
            f"no trial of study {name} completed; the failed trials' runs in MLflow say why"
        )
    return classification_tune._result(report, new_trials=len(study.trials) - first)


class _Scorer:
    """The validation split, one trained detector and its raw outputs per anchor choice."""

    def __init__(self, cfg: Config, parent_run_id: str):
        self.cfg = cfg
        self.images, _, self.coco = train.split_data("val")
        self.n_classes = len(load_meta()["classes"])
        self.trained: dict[str, tuple] = {}  # anchor sizes -> (detector, raw outputs)
        self.trainings = 0
        self.experiment_id = tracking.setup(cfg)
        self.tags = {
            **tracking.lineage(cfg),
            "lensflow.step": "tune-trial",
            "mlflow.parentRunId": parent_run_id,
        }

    def trial(self, trial: optuna.Trial, space: dict) -> float:
        import mlflow

        params = {key: _suggest(trial, key, dist) for key, dist in space.items()}
        client = mlflow.MlflowClient()
        child = client.create_run(
            self.experiment_id,
            run_name=f"trial-{trial.number}",
            tags={**self.tags, "optuna.study": trial.study.study_name,
                  "optuna.trial": str(trial.number)},
        )  # fmt: skip
        trial.set_user_attr(tune_storage.RUN_ATTR, child.info.run_id)
        client.log_batch(
            child.info.run_id,
            params=[mlflow.entities.Param(k, json.dumps(v)) for k, v in params.items()],
        )
        try:
            value = self._score(params)
        except Exception as exc:
            client.set_tag(child.info.run_id, "error", f"{type(exc).__name__}: {exc}"[:500])
            client.set_terminated(child.info.run_id, "FAILED")
            raise
        client.log_metric(child.info.run_id, "tune/value", value)
        client.set_terminated(child.info.run_id, "FINISHED")
        return value

    def _score(self, params: dict) -> float:
        cfg = config.with_values(self.cfg, params, source="tune trial")
        detector, outputs = self._raw(cfg)
        detector.score_thresh = cfg.detection.score_threshold
        detector.nms_thresh = cfg.detection.nms_iou
        size = cfg.detection.image_size
        decode = model.Decoder(detector, size)
        found = [d for batch in outputs for d in decode(*batch, [(size, size)] * len(batch[0]))]
        return coco_map.evaluate(self.coco, train.detections_as_coco(found, self.coco, size))["map"]

    def _raw(self, cfg: Config) -> tuple:
        """The detector of these anchor sizes, trained as train trains it, and its raw
        outputs on the validation split: trained once per choice."""
        key = json.dumps(list(cfg.detection.anchor_sizes))
        if key not in self.trained:
            train.use_threads(cfg)
            images, targets, _ = train.split_data("train")
            detector = train.fit(cfg, images, targets, self.n_classes).detector.eval()
            heads = model.Heads(detector, cfg.detection.image_size)
            with torch.no_grad():
                outputs = [
                    heads(torch.from_numpy(self.images[i : i + 64].copy()))
                    for i in range(0, len(self.images), 64)
                ]
            self.trained[key] = (detector, outputs)
            self.trainings += 1
        return self.trained[key]


def _suggest(trial: optuna.Trial, key: str, dist):
    if dist.type == "categorical":  # a list choice (anchor sizes) goes to Optuna as JSON text
        choice = trial.suggest_categorical(key, [json.dumps(c) for c in dist.choices])
        return json.loads(choice)
    return classification_tune._suggest(trial, key, dist)


def _report(cfg, study, url: str, run_id: str, space: dict, trainings: int) -> dict:
    trials = study.get_trials(deepcopy=False)
    counts = dict.fromkeys(classification_tune.STATES, 0)
    for t in trials:
        counts[t.state.name.lower()] += 1
    best = study.best_trial if counts["complete"] else None
    params = {}
    for key, value in (best.params if best else {}).items():
        categorical = key in space and space[key].type == "categorical"
        params[key] = json.loads(value) if categorical else value
    return {
        "status": "ok" if best else "no_complete_trial",
        "task": "detection",
        "study": study.study_name,
        "storage": redact(url),
        "metric": METRIC,
        "direction": "maximize",
        "n_trials": len(trials),
        "counts": counts,
        "best_trial": best.number if best else None,
        "best_value": best.value if best else None,
        "best_params": params,
        "trainings": trainings,  # detectors trained by this invocation (one per anchor choice)
        "epochs_trained": trainings * cfg.detection.epochs,
        "mlflow_run_id": run_id,
    }
