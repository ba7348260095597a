"""params.yaml, the sections that search: tune (its space of distributions over augment, model
and train keys) and compare (the scratch and transfer arms)."""

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

from components.core.params_pipeline import Augment, Model, Section, Train


class Distribution(Section):
    """How tune samples one key: a float or int range (log scale optional), or choices."""

    type: Literal["float", "int", "categorical"]
    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = Field(None, gt=0)
    choices: list[str | int | float | bool | None] | None = Field(None, min_length=1)

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


class Space(Section):
    """tune.space: what to search. Only augment, model and train keys can be tuned: the trials
    train on the data as prepared."""

    augment: AugmentSpace = AugmentSpace()
    model: ModelSpace = ModelSpace()
    train: TrainSpace = TrainSpace()

    def flat(self) -> dict[str, Distribution]:
        """{"train.lr": Distribution, ...}: the tuned keys, as dotted params keys."""
        return {
            f"{section}.{key}": dist
            for section in ("augment", "model", "train")
            for key, dist in getattr(self, section)
            if dist is not None
        }


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
    enabled: bool = Field(False, description="lensflow run / dvc repro: a study before train")
    study: str = Field("lensflow", min_length=1, description="study name prefix (+ params hash)")
    storage: str = Field(
        "sqlite:///optuna.db", description="Optuna storage URL; no passwords (refused at load)"
    )
    trials: int = Field(20, ge=1, description="trials per invocation")
    timeout: float | None = Field(None, gt=0, description="seconds per invocation; None: no limit")
    workers: int = Field(1, ge=1, description="processes sharing the study")
    metric: Literal["val_accuracy", "val_macro_f1"] = "val_accuracy"
    pruner: Literal["none", "median", "successive_halving", "hyperband"] = "successive_halving"
    startup_trials: int = Field(5, ge=0, description="random trials before TPE; median waits")
    min_epochs: int = Field(2, ge=1, description="no trial is pruned before this many epochs")
    heartbeat_grace: int = Field(
        30, ge=2, description="seconds without a heartbeat after which a trial counts as failed"
    )
    space: Space = Field(default_factory=_default_space)


def _default_transfer() -> dict:
    return {
        "model.arch": "efficientnet_lite0",
        "model.pretrained": "efficientnet-lite0",
        "model.input_size": 64,
        "train.strategy": "feature_extraction",
        "train.lr": 0.01,
    }


class Compare(Section):
    """lensflow compare: two arms, each params.yaml plus dotted overrides of its augment,
    model and train keys, trained on every fraction of the same prepared training split."""

    fractions: list[float] = Field(default_factory=lambda: [1.0, 0.1], min_length=1)
    scratch: dict = Field(default_factory=dict, description="overrides of the scratch arm")
    transfer: dict = Field(default_factory=_default_transfer, description="of the transfer arm")

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, fractions: list[float]) -> list[float]:
        if not all(0 < f <= 1 for f in fractions):
            raise ValueError("every fraction must be in (0, 1]")
        if len(set(fractions)) != len(fractions):
            raise ValueError("fractions must differ")
        return fractions
