"""The schema of params.yaml and the one way to read it: `load(path, overrides)`.

The Prefect flow, the DVC stages and the tests all see the same validated values. Each section
is a pydantic model in params_pipeline, params_detection, params_search or
params_operations; unknown keys are errors that name the key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from components.core import credentials
from components.core.errors import UserError
from components.core.params_detection import Detection
from components.core.params_operations import Labels, Monitor, Review, Rollout, Schedule, Serve
from components.core.params_pipeline import (
    Augment,
    Data,
    Evaluate,
    Export,
    Model,
    Prepare,
    Promote,
    Quantize,
    Registry,
    Section,
    Task,
    Tracking,
    Train,
    Validate,
)
from components.core.params_search import Compare, Tune

CLASSIFIER, DETECTOR = "lensflow-classifier", "lensflow-detector"  # registry.model_name


class Config(Section):
    seed: int = 42
    """Seeds Python, NumPy, torch and the split."""
    task: Task = "classification"
    """`classification` (an ImageFolder, one label per image) or `detection` (boxes: COCO JSON
    or the YOLO layout, see the `detection` section). Under `detection` a built-in
    classification set (`digits`, `shapes`: no boxes) selects the built-in detection set
    `detection_shapes`, and the default `registry.model_name` (`lensflow-classifier`) becomes
    `lensflow-detector`, so `--set task=detection` alone runs on it."""
    tracking: Tracking = Tracking()
    data: Data = Data()
    prepare: Prepare = Prepare()
    validate_: Validate = Field(Validate(), alias="validate")
    augment: Augment = Augment()
    model: Model = Model()
    train: Train = Train()
    evaluate: Evaluate = Evaluate()
    export: Export = Export()
    quantize: Quantize = Quantize()
    registry: Registry = Registry()
    promote: Promote = Promote()
    tune: Tune = Tune()
    compare: Compare = Compare()
    serve: Serve = Serve()
    rollout: Rollout = Rollout()
    schedule: Schedule = Schedule()
    monitor: Monitor = Monitor()
    detection: Detection = Detection()
    labels: Labels = Labels()
    review: Review = Review()

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _detection_source(cls, data):
        """A built-in classification set has no boxes: under `task: detection` it means the
        built-in detection set; that set has no classes to classify."""
        if not isinstance(data, dict) or not isinstance(data.get("data", {}), dict | None):
            return data  # an assignment to a validated config: checked when it was built
        section = data.get("data") or {}
        source, task = section.get("source", "digits"), data.get("task", "classification")
        if task == "classification" and source == "detection_shapes":
            raise ValueError("data.source detection_shapes is a detection set: set task: detection")
        if task != "detection":
            return data
        if source in ("digits", "shapes"):
            data = {**data, "data": {**section, "source": "detection_shapes"}}
        registry = data.get("registry") or {}
        if isinstance(registry, dict) and registry.get("model_name", CLASSIFIER) == CLASSIFIER:
            data = {**data, "registry": {**registry, "model_name": DETECTOR}}
        return data

    def as_dict(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)

    def params_hash(self) -> str:
        text = json.dumps(self.as_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Config:
    """Read params.yaml (missing file: all defaults), apply `section.key=value` overrides."""
    path = Path(path)
    raw: dict = {}
    if path.exists():
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{path}: not valid YAML ({exc.problem})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path}: expected a mapping of sections at the top level")
    for item in overrides or []:
        _apply_override(raw, item)
    return from_dict(raw, source=str(path))


def from_dict(raw: dict, source: str = "params") -> Config:
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise UserError(credentials.redact(f"{source}: {_describe(exc)}")) from None
    _refuse_credentials(cfg.as_dict(), source)
    return cfg


def _refuse_credentials(tree, source: str, key: str = "") -> None:
    """Every value is logged to MLflow and recorded by DVC: a password must never be one."""
    if isinstance(tree, dict):
        for name, value in tree.items():
            _refuse_credentials(value, source, f"{key}.{name}" if key else str(name))
    elif isinstance(tree, list):
        for value in tree:
            _refuse_credentials(value, source, key)
    elif isinstance(tree, str) and credentials.has_credentials(tree):
        if key == "tune.storage":
            where = (
                f"put the whole URL in the environment variable {credentials.TUNE_STORAGE_ENV} "
                "instead (or the password in PGPASSWORD / ~/.pgpass)"
            )
        else:
            where = "keep credentials in environment variables, never in params"
        raise UserError(
            f"{source}: '{key}' holds a password or token: {where}; params are written to MLflow "
            "and dvc.lock"
        )


def with_values(cfg: Config, values: dict, source: str = "params") -> Config:
    """A validated copy of `cfg` with dotted keys set: {"train.lr": 0.001, ...}."""
    raw = cfg.as_dict()
    for key, value in values.items():
        set_key(raw, key, value, source=f"{source}: {key!r}")
    return from_dict(raw, source=source)


def set_key(raw: dict, key: str, value, source: str) -> None:
    """raw["a"]["b"] = value for key "a.b". A missing section is created (validation then names
    an unknown one); a key that runs through a value is an error naming `source`."""
    *sections, leaf = key.split(".")
    node = raw
    for name in sections:
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise UserError(f"{source}: {name} is not a section")
    node[leaf] = value


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UserError(f"--set {item!r}: expected section.key=value")
    set_key(raw, key, yaml.safe_load(value) if value else value, source=f"--set {item!r}")


def _describe(exc: ValidationError) -> str:
    """One line for the first problem: which key, and what was expected."""
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        section = err["loc"][:-1]
        allowed = _allowed_keys(section)
        return f"unknown key '{key}' (allowed here: {', '.join(allowed)})"
    return f"'{key}': {err['msg']} (got {err.get('input')!r})"


def _allowed_keys(section: tuple) -> list[str]:
    model: type[BaseModel] = Config
    for name in section:
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == name), None)
        if field is None or not isinstance(field.annotation, type):
            return []
        model = field.annotation
    return [f.alias or n for n, f in model.model_fields.items()]
