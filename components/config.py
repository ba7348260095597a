"""The schema of params.yaml: one pydantic model per section, unknown keys are errors.

`load(path, overrides)` is the only way the pipeline reads its configuration, so the Prefect
flow, the DVC stages and the tests all see the same validated values.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import ClassVar, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)

from components import credentials


class UserError(Exception):
    """Bad usage or bad input: the CLI prints the message on one line and exits with 2."""


class GateFailed(Exception):
    """A quality gate said no: the CLI prints the message and exits with 1."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Tracking(Section):
    experiment: str = "lensflow"


class Data(Section):
    source: str = Field("digits", description="'digits', 'shapes' or a path to an ImageFolder")
    classes: list[str] | None = Field(None, description="expected class names; None: the folders")
    shapes_per_class: int = Field(100, ge=1)


class Prepare(Section):
    image_size: int = Field(16, ge=8, le=1024)
    channels: Literal[1, 3] = 1
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    max_pixels: int = Field(
        50_000_000, ge=1, description="larger images are refused from their header, never decoded"
    )
    workers: int = Field(0, ge=0, description="processes reading images; 0 = one per CPU core")


# error: fails the gate; warn: reported; quarantine: reported and left out of the splits;
# off: not checked. Files are never modified, whatever the policy.
FilePolicy = Literal["error", "warn", "quarantine", "off"]
GatePolicy = Literal["error", "warn", "off"]  # for checks on classes and splits: nothing to exclude


class Policies(Section):
    unreadable: FilePolicy = "error"
    empty_file: FilePolicy = "error"
    not_an_image: FilePolicy = "error"
    truncated: FilePolicy = "error"
    undecodable: FilePolicy = "error"
    too_many_pixels: FilePolicy = "error"
    symlink_outside_root: FilePolicy = "quarantine"
    outside_class_folder: FilePolicy = "warn"
    nested_folder: FilePolicy = "warn"
    unknown_label: FilePolicy = "error"
    too_small: FilePolicy = "quarantine"
    extreme_aspect_ratio: FilePolicy = "warn"
    mode_grayscale: FilePolicy = "warn"
    mode_palette: FilePolicy = "warn"
    mode_alpha: FilePolicy = "warn"
    mode_cmyk: FilePolicy = "warn"
    mode_16bit: FilePolicy = "warn"
    exif_rotated: FilePolicy = "warn"
    constant_image: FilePolicy = "warn"
    duplicate: FilePolicy = "warn"
    conflicting_labels: FilePolicy = "error"
    split_leakage: GatePolicy = "error"
    near_duplicate: FilePolicy = "warn"
    missing_class: GatePolicy = "error"
    empty_class: GatePolicy = "error"
    too_few_images: GatePolicy = "error"
    class_imbalance: GatePolicy = "warn"


class Validate(Section):
    min_images_per_class: int = Field(2, ge=1)
    min_size: int = Field(8, ge=1, description="minimum shorter side, in pixels")
    max_aspect_ratio: float = Field(10.0, ge=1, description="longer side / shorter side")
    max_imbalance_ratio: float = Field(10.0, ge=1, description="largest class / this class")
    near_duplicate_distance: int = Field(
        3, ge=0, le=16, description="perceptual-hash bits (of 128) that near-duplicates differ by"
    )
    policy: Policies = Policies()


class Augment(Section):
    preset: Literal["none", "light", "standard", "strong"] = "none"
    flip: Literal["auto"] | bool = Field("auto", description="auto: never for built-in data")
    mixup_alpha: float = Field(0.0, ge=0, description="0 = off; e.g. 0.2")
    cutmix_alpha: float = Field(0.0, ge=0, description="0 = off; e.g. 1.0")


TorchvisionArch = Literal[
    "resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large",
    "efficientnet_b0",
]  # fmt: skip
Arch = Literal["simple_cnn", "resnet_cnn", "mini_alexnet", "efficientnet_lite0", TorchvisionArch]
WEIGHTS_ARCH = {"efficientnet-lite0": "efficientnet_lite0"}  # model.pretrained -> its arch


class Model(Section):
    arch: Arch = "simple_cnn"
    se: bool = Field(False, description="resnet_cnn: squeeze-and-excitation in each block")
    pretrained: str | None = Field(
        None, description="efficientnet-lite0 | torchvision | a state_dict file | models:/URI"
    )
    widths: list[int] = Field(default_factory=lambda: [32, 64, 128], min_length=1)
    dropout: float = Field(0.2, ge=0, lt=1)
    input_size: int | None = Field(
        None, ge=8, le=1024, description="size the network sees (resized inside); None: image_size"
    )

    @model_validator(mode="before")
    @classmethod
    def _arch_from_weights(cls, data):
        """Weights made for one architecture select it, unless model.arch names another."""
        if isinstance(data, dict) and data.get("arch", "simple_cnn") == "simple_cnn":
            arch = WEIGHTS_ARCH.get(data.get("pretrained"))
            if arch:
                return {**data, "arch": arch}
        return data


class Train(Section):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: int = Field(1, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only (Nesterov)")
    schedule: Literal["cosine", "onecycle", "step", "plateau"] = "cosine"
    step_epochs: int = Field(10, ge=1, description="schedule step: LR x 0.1 every step_epochs")
    grad_clip_norm: float = Field(0.0, ge=0, description="0 = off")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="0 = off; e.g. 0.999")
    class_weights: bool = Field(False, description="weight the loss by inverse class frequency")
    strategy: Literal["fine_tune", "feature_extraction", "two_stage", "gradual_unfreeze"] = (
        "fine_tune"
    )
    backbone_lr_factor: float = Field(1.0, gt=0, description="backbone lr = lr x this factor")
    layer_lr_decay: float = Field(
        1.0, gt=0, le=1, description="each backbone stage below the top: lr x this once more"
    )
    head_epochs: int = Field(3, ge=1, description="two_stage, gradual_unfreeze: head-only epochs")
    unfreeze_stages: int = Field(
        0, ge=0, description="two_stage: backbone stages unfrozen after the head epochs; 0 = all"
    )
    unfreeze_every: int = Field(
        1, ge=1, description="gradual_unfreeze: one more stage every this many epochs"
    )
    use_tuned: bool = Field(False, description="train with the best params of reports/tuning.json")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(False, description="mixed precision: bf16 on CPU, fp16 (+ scaler) on CUDA")
    channels_last: bool = False
    compile: bool = Field(False, description="torch.compile the training model")
    patience: int = Field(5, ge=1, description="early stopping: epochs without a better val loss")
    progress_bar: bool = True


class Evaluate(Section):
    robustness_images: int = Field(
        2000, ge=1, description="seeded sample of the test split scored under corruptions"
    )


class Export(Section):
    opset: int = Field(18, ge=17)
    parity_atol: float = Field(1e-4, gt=0)


class Quantize(Section):
    calibration_images: int = Field(300, ge=1, description="training images used to calibrate")
    exclude_head: bool = Field(True, description="keep the classifier head in float")
    min_speedup: float = Field(1.3, gt=0, description="int8 vs fp32 ONNX Runtime, batch 64")
    max_drop: float = Field(1.0, ge=0, description="accuracy points int8 may lose")


class Registry(Section):
    model_name: str = "lensflow-classifier"

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data):
        if isinstance(data, dict) and "min_accuracy" in data:
            raise ValueError("registry.min_accuracy moved to promote.min_accuracy")
        return data


class Promote(Section):
    """The gates a registered version passes before `@champion` moves to it (README)."""

    min_accuracy: float = Field(0.9, ge=0, le=1, description="test accuracy, ONNX Runtime")
    min_macro_f1: float = Field(0.85, ge=0, le=1, description="test macro-F1, ONNX Runtime")
    min_improvement: float = Field(
        0.0, ge=0, le=1, description="accuracy over the champion's: strictly more than this"
    )
    mcnemar_p: float | None = Field(
        0.05, gt=0, le=1, description="exact McNemar test on the paired predictions; None: off"
    )
    max_latency_ms_p95: float | None = Field(
        None, ge=0, description="batch-1 p95 latency budget (ONNX Runtime); None: off"
    )
    lock_timeout_s: float = Field(
        600.0, gt=0, description="a promotion lock older than this is stale and broken"
    )


class Serve(Section):
    """`lensflow serve` and `lensflow predict` (README "Serving")."""

    host: str = Field("127.0.0.1", description="bind address; 0.0.0.0 exposes it to the network")
    port: int = Field(8000, ge=1, le=65535)
    poll_seconds: float = Field(10.0, gt=0, description="how often @champion is looked up")
    int8: bool = Field(False, description="serve the int8 variant when the version shipped one")
    top_k: int = Field(3, ge=1, description="classes per image in a response (?top_k= overrides)")
    max_upload_bytes: int = Field(10 * 2**20, ge=1, description="request body limit (413)")
    max_pixels: int = Field(4096 * 4096, ge=1, description="per image, read from the header (413)")
    max_images: int = Field(32, ge=1, description="images per request (413)")
    max_in_flight: int = Field(64, ge=1, description="requests in progress; beyond: 503 at once")
    retry_after_seconds: int = Field(1, ge=0, description="Retry-After of a 503")
    threads: int = Field(1, ge=1, description="ONNX Runtime intra-op threads per inference")
    batch_max: int = Field(1, ge=1, description="micro-batching: images per run; 1 = off")
    batch_wait_ms: float = Field(2.0, ge=0, description="micro-batching: longest wait to fill")
    shutdown_timeout: float = Field(10.0, gt=0, description="SIGTERM: seconds to finish requests")
    golden_atol: float = Field(1e-4, gt=0, description="fp32: max |p - golden p| to be served")
    int8_min_agreement: float = Field(
        0.9, ge=0, le=1, description="int8: top-1 agreement with the golden fp32 classes"
    )


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


class DeploymentSchedule(Section):
    """schedule.<deployment>: when Prefect starts the deployment's flow (cron or interval, or
    neither: runs only on demand) and whether that schedule is active."""

    cron: str | None = Field(None, description="a cron expression, e.g. '0 3 * * 1'")
    interval: float | None = Field(None, gt=0, description="seconds between runs")
    timezone: str = Field("UTC", description="the cron expression's time zone")
    active: bool = Field(True, description="false: the schedule is created paused")
    overrides: list[str] = Field(default_factory=list, description="--set items for each run")

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, name: str) -> str:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {name!r}, e.g. Europe/Paris") from None
        return name

    @model_validator(mode="after")
    def _one_schedule(self) -> DeploymentSchedule:
        if self.cron is not None and self.interval is not None:
            raise ValueError("set cron or interval, not both (neither: no schedule)")
        return self


class MonitoringSchedule(DeploymentSchedule):
    data: str | None = Field("data/incoming", description="the folder of new images to check")
    model: str | None = Field(None, description="a model URI; None: the champion")


class Schedule(Section):
    """The Prefect deployments' schedules: `lensflow schedule` serves them, `lensflow deploy`
    sends them to a work pool (flows/deployments.py)."""

    training: DeploymentSchedule = DeploymentSchedule()
    continuous_validation: MonitoringSchedule = MonitoringSchedule(cron="0 6 * * *")


class Monitor(Section):
    """Continuous validation (`lensflow monitor`) and the reference profile export makes."""

    data: str | None = Field(None, description="the batch folder the flow checks by default")
    false_alarm_rate: float = Field(0.05, gt=0, lt=1, description="per pass, all checks")
    min_relative_accuracy: float = Field(0.95, gt=0, description="of the recorded test accuracy")
    on_alert: Literal["none", "retrain"] = "none"
    permutations: int = Field(1000, ge=100, description="of the MMD and class-prior tests")
    reference_images: int = Field(1000, ge=10, description="validation images in the profile")
    pca_components: int = Field(8, ge=1, description="embedding dimensions the MMD test sees")
    autoencoder_epochs: int = Field(10, ge=1)


class Config(Section):
    seed: int = 42
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
    schedule: Schedule = Schedule()
    monitor: Monitor = Monitor()

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

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
