"""params.yaml, the sections of the training pipeline: tracking, data, prepare, validate,
augment, model, train, evaluate, export, quantize, registry and promote. Each key's description
here is the one the manual's params reference (docs/params.md) shows."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
