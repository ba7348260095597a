"""tune: an Optuna study over `tune.space`, pruned per epoch, resumable, shared by workers.

TPE (seeded) samples each trial's params from tune.space; the trial trains with `loop.fit` and
reports the validation metric after every epoch, so the pruner stops bad trials early. A trial
that raises is recorded as failed and the study goes on. The study lives in a database
(`tune_storage`: sqlite by default; a server database such as Postgres lets workers on several
machines share it) and is named after everything a trial's result depends on
(`tuned.study_name`): the same params resume the same study, other params start another. In
MLflow each invocation is one run, tagged with its study, with a child run per trial. The
best params go to reports/tuning.json, never into params.yaml; train uses them when
`train.use_tuned` is true (`tuned.apply_tuned`).
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import optuna
import torch

from components.core import config, paths, tracking
from components.core.config import Config
from components.core.credentials import redact
from components.core.errors import GateFailed
from components.core.params_search import Distribution
from components.data import prepared
from components.data.validate import require_passed
from components.experiments import tune_storage
from components.scoring import metrics
from components.training import augment, loop, models, tuned

STATES = ("complete", "pruned", "fail", "running", "waiting")


@dataclass(frozen=True)
class TuneResult:
    report: str
    status: str  # ok | no_complete_trial | not_run
    study: str | None
    n_trials: int
    new_trials: int
    counts: dict
    best_trial: int | None
    best_value: float | None
    best_params: dict
    mlflow_run_id: str | None


def run(cfg: Config) -> TuneResult:
    """The tune stage: a study of `tune.trials` more trials when `tune.enabled` (what
    `lensflow tune` sets); otherwise keeps reports/tuning.json, or writes one saying so."""
    if not cfg.tune.enabled:
        return _not_run()
    require_passed()
    name, url = tuned.study_name(cfg), tune_storage.storage_url(cfg)
    study = optuna.create_study(
        study_name=name,
        storage=tune_storage.open_storage(url, cfg.tune.heartbeat_grace),
        direction="maximize",
        load_if_exists=True,
    )
    with _study_run(cfg, study) as parent:
        first = len(study.trials)
        crashed = _dispatch(cfg, name, url, parent.info.run_id, first)
        if crashed:  # a dead worker's trial is failed once its heartbeat is old enough
            time.sleep(cfg.tune.heartbeat_grace + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # silent for tune.heartbeat_grace
        report = _report(cfg, study, url, parent.info.run_id)
        paths.write_json(paths.TUNING_REPORT, report)
        _log_study(study, report)
    if crashed:
        raise GateFailed(
            f"{len(crashed)} tune workers stopped with an error (exit codes {crashed}, see "
            "above); the study keeps every finished trial: run again to resume"
        )
    if report["best_trial"] is None:
        raise GateFailed(
            f"no trial of study {name} completed ({_counts_text(report['counts'])}); "
            "the failed trials' runs in MLflow say why"
        )
    return _result(report, new_trials=len(study.trials) - first)


def summary(result: TuneResult) -> str:
    if result.status == "not_run":
        return f"tune: no study (tune.enabled is false; `lensflow tune` runs one): {result.report}"
    best = ", ".join(f"{k}={_short(v)}" for k, v in result.best_params.items())
    return (
        f"tune: study {result.study}: {result.new_trials} new trial"
        f"{'' if result.new_trials == 1 else 's'}, {result.n_trials} in all "
        f"({_counts_text(result.counts)}); best trial {result.best_trial}: "
        f"{result.best_value:.4f} with {best}\n"
        f"tune: {result.report}; MLflow run {result.mlflow_run_id}"
    )


# --- workers -------------------------------------------------------------------------------


def _dispatch(cfg: Config, name: str, url: str, parent_run_id: str, first: int) -> list[int]:
    """tune.trials trials over tune.workers processes (one: in this process); returns the exit
    codes of the workers that crashed."""
    workers = min(cfg.tune.workers, cfg.tune.trials)
    shares = [cfg.tune.trials // workers + (i < cfg.tune.trials % workers) for i in range(workers)]
    jobs = [
        {
            "cfg": cfg.as_dict(),
            "study": name,
            "storage": url,
            "trials": share,
            "parent_run_id": parent_run_id,
            # another seed per worker and per resumption: no worker repeats another's samples
            "seed": cfg.seed + first + i,
            "threads": max(1, (os.cpu_count() or 1) // workers),
        }
        for i, share in enumerate(shares)
    ]
    if workers == 1:
        _optimize({**jobs[0], "threads": None})  # this process: its threads as they are
        return []
    spawn = multiprocessing.get_context("spawn")  # a clean interpreter: no forked torch/sqlite
    processes = [spawn.Process(target=_optimize, args=(job,), name="tune-worker") for job in jobs]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    return [p.exitcode for p in processes if p.exitcode != 0]


def _optimize(job: dict) -> None:
    """One worker: its share of the trials, sampled with its own seed."""
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    cfg = config.from_dict(job["cfg"])
    study = optuna.load_study(
        study_name=job["study"],
        storage=tune_storage.open_storage(job["storage"], cfg.tune.heartbeat_grace),
        sampler=optuna.samplers.TPESampler(
            seed=job["seed"], n_startup_trials=cfg.tune.startup_trials, constant_liar=True
        ),
        pruner=_pruner(cfg),
    )
    trial_fn = partial(_trial, context=_Context(cfg, job["parent_run_id"]))
    study.optimize(trial_fn, n_trials=job["trials"], timeout=cfg.tune.timeout, catch=(Exception,))


def _pruner(cfg: Config) -> optuna.pruners.BasePruner:
    t = cfg.tune
    if t.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=t.startup_trials, n_warmup_steps=t.min_epochs
        )
    if t.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=t.min_epochs, reduction_factor=3)
    if t.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=t.min_epochs, max_resource=cfg.train.epochs, reduction_factor=3
        )
    return optuna.pruners.NopPruner()


# --- one trial -----------------------------------------------------------------------------


class _Context:
    """What every trial of one worker shares: the data, the space, the MLflow parent."""

    def __init__(self, cfg: Config, parent_run_id: str):
        self.cfg = cfg
        self.space = cfg.tune.space.flat()
        self.meta = prepared.load_meta()
        self.train = prepared.load_split("train")
        self.val = prepared.load_split("val")
        self.experiment_id = tracking.setup(cfg)
        self.tags = {
            **tracking.lineage(cfg),
            **tracking.process_tags(),
            "lensflow.step": "tune-trial",
            "mlflow.parentRunId": parent_run_id,
        }


def _trial(trial: optuna.Trial, context: _Context) -> float:
    """Sample, train, report each epoch; all inside the trial's own MLflow child run, which
    ends FINISHED (complete), KILLED (pruned) or FAILED, with the state as a tag."""
    import mlflow

    params = {key: _suggest(trial, key, dist) for key, dist in context.space.items()}
    child = mlflow.MlflowClient().create_run(
        context.experiment_id,
        run_name=f"trial-{trial.number}",
        tags={
            **context.tags,
            "optuna.study": trial.study.study_name,
            "optuna.trial": str(trial.number),
        },
    )
    trial.set_user_attr(tune_storage.RUN_ATTR, child.info.run_id)
    mlflow.start_run(run_id=child.info.run_id, nested=True)
    state = "FAIL"
    try:
        tracking.log_dataset(context.cfg, "tune-trial")
        mlflow.log_params(params)
        value = _train_trial(trial, context, params)
        mlflow.log_metric("tune/value", value)
        state = "COMPLETE"
        return value
    except optuna.TrialPruned:
        state = "PRUNED"
        raise
    except Exception as exc:
        mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:500])
        raise
    finally:
        mlflow.set_tag("optuna.state", state)
        mlflow.end_run({"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state, "FAILED"))


def _suggest(trial: optuna.Trial, key: str, d: Distribution):
    if d.type == "categorical":
        return trial.suggest_categorical(key, d.choices)
    if d.type == "int":
        return trial.suggest_int(key, int(d.low), int(d.high), step=int(d.step or 1), log=d.log)
    return trial.suggest_float(key, d.low, d.high, step=d.step, log=d.log)


def _train_trial(trial: optuna.Trial, context: _Context, params: dict) -> float:
    import mlflow

    cfg = config.with_values(
        context.cfg, {**params, "train.progress_bar": False}, source=f"trial {trial.number}"
    )
    loop.seed_everything(cfg.seed)
    spec = models.model_spec(cfg.model, context.meta)
    model = models.build(spec, cfg.model.pretrained)
    num_classes = len(spec["classes"])
    augmenter = augment.batch_augmenter(cfg, num_classes, seed=cfg.seed)
    metric = cfg.tune.metric

    def on_epoch(row: dict) -> None:
        if metric == "val_accuracy":
            value = row["val_accuracy"]
        else:  # the training weights (with train.ema_decay, not the EMA ones)
            value = macro_f1(model, *context.val, num_classes)
            mlflow.log_metric("val/macro_f1", value, step=row["epoch"])
        trial.set_user_attr("epochs", row["epoch"])
        trial.report(value, row["epoch"])
        if trial.should_prune():
            raise optuna.TrialPruned(f"{metric} {value:.4f} after epoch {row['epoch']}")

    best, _, _, diverged = loop.fit(
        model, cfg, context.train, context.val, augmenter, on_epoch=on_epoch, last_path=None
    )
    if best["state_dict"] is None:
        raise RuntimeError(diverged or "no epoch finished")
    if diverged:
        mlflow.set_tag("diverged", diverged)
    if metric == "val_accuracy":
        return best["val_accuracy"]
    model.load_state_dict(best["state_dict"])
    return macro_f1(model, *context.val, num_classes)


@torch.no_grad()
def macro_f1(model: torch.nn.Module, images, labels, num_classes: int) -> float:
    model.eval()
    device = next(model.parameters()).device
    predicted = torch.cat(
        [model(images[i : i + 256].to(device)).argmax(1).cpu() for i in range(0, len(images), 256)]
    )
    matrix = metrics.confusion_matrix(labels.numpy(), predicted.numpy(), num_classes)
    return float(metrics.per_class_scores(matrix)[2].mean())


# --- the study's MLflow run and report -----------------------------------------------------


@contextmanager
def _study_run(cfg: Config, study: optuna.Study):
    """This invocation's MLflow run (a child of the flow's run, if any), tagged with the study:
    the parent of the trials this invocation runs. Invocations that share a study, at once or
    one after another, each have their own."""
    import mlflow

    with tracking.step_run(cfg, "tune") as run:
        mlflow.set_tags({"optuna.study": study.study_name, "mlflow.runName": study.study_name})
        yield run


def _report(cfg: Config, study: optuna.Study, url: str, run_id: str) -> dict:
    trials = study.get_trials(deepcopy=False)
    counts = dict.fromkeys(STATES, 0)
    for t in trials:
        counts[t.state.name.lower()] += 1
    best = study.best_trial if counts["complete"] else None
    return {
        "status": "ok" if best else "no_complete_trial",
        "study": study.study_name,
        "storage": redact(url),
        "metric": cfg.tune.metric,
        "direction": "maximize",
        "n_trials": len(trials),
        "counts": counts,
        "best_trial": best.number if best else None,
        "best_value": best.value if best else None,
        "best_params": best.params if best else {},
        "epochs_trained": sum(t.user_attrs.get("epochs", 0) for t in trials),
        "mlflow_run_id": run_id,
    }


def _log_study(study: optuna.Study, report: dict) -> None:
    """On the study's run: counts, best value, the report and the study plots."""
    import mlflow

    counts = report["counts"]
    step = report["n_trials"]
    values = {f"tune/{state}": counts[state] for state in ("complete", "pruned", "fail")}
    if report["best_value"] is not None:
        values["tune/best_value"] = report["best_value"]
    mlflow.log_metrics(values, step=step)
    mlflow.set_tag("tune.best_trial", str(report["best_trial"]))
    mlflow.log_dict(report, "tuning.json")
    if counts["complete"]:
        _log_plots(study)
    else:
        mlflow.set_tag("plots", "none: no complete trial")


def _log_plots(study: optuna.Study) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow
    from optuna.visualization import matplotlib as vis

    plots = {
        "optimization_history": vis.plot_optimization_history,
        "param_importances": vis.plot_param_importances,
        "parallel_coordinate": vis.plot_parallel_coordinate,
    }
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = plot(study)
        except (ValueError, RuntimeError) as exc:  # e.g. importances need 2+ complete trials
            mlflow.set_tag(f"plots.{name}", f"skipped: {exc}"[:500])
            continue
        figure = axes.figure
        figure.set_size_inches(10, 6)
        figure.tight_layout()
        mlflow.log_figure(figure, f"plots/{name}.png")
        plt.close(figure)


# --- not run -------------------------------------------------------------------------------


def _not_run() -> TuneResult:
    """tune.enabled is false: an earlier study's report stays (dvc.yaml: persist); without one,
    a report saying no study ran, so the train stage's dependency exists."""
    if not paths.TUNING_REPORT.exists():
        paths.REPORTS.mkdir(parents=True, exist_ok=True)
        report = {
            "status": "not_run",
            "study": None,
            "storage": None,
            "metric": None,
            "direction": None,
            "n_trials": 0,
            "counts": dict.fromkeys(STATES, 0),
            "best_trial": None,
            "best_value": None,
            "best_params": {},
            "epochs_trained": 0,
            "mlflow_run_id": None,
        }
        paths.write_json(paths.TUNING_REPORT, report)
    return _result(json.loads(paths.TUNING_REPORT.read_text()), new_trials=0, status="not_run")


def _result(report: dict, new_trials: int, status: str | None = None) -> TuneResult:
    return TuneResult(
        report=str(paths.TUNING_REPORT),
        status=status or report["status"],
        study=report["study"],
        n_trials=report["n_trials"],
        new_trials=new_trials,
        counts=copy.deepcopy(report["counts"]),
        best_trial=report["best_trial"],
        best_value=report["best_value"],
        best_params=report["best_params"],
        mlflow_run_id=report["mlflow_run_id"],
    )


def _counts_text(counts: dict) -> str:
    return ", ".join(f"{n} {state}" for state, n in counts.items() if n) or "none"


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
