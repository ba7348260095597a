"""The detection feasibility spike (issue 32): on the locked torch / torchvision / ONNX Runtime,
which torchvision detector exports to ONNX, through which exporter, with NMS in the graph or
after it, and how long a tiny detector's training epoch takes on this machine's cores.

Prints one JSON line: per detector, per exporter (`dynamo`: torch.onnx.export's default path;
`legacy`: the TorchScript exporter, `dynamo=False`) and per NMS placement (`in_graph`: the
whole detector, postprocessing included; `after_graph`: the graph ends at the head's outputs
and NMS runs in Python afterwards), whether the export worked, the first line of its error,
and whether ONNX Runtime finds the same boxes as eager PyTorch (IoU >= 0.99, same class) on
an input other than the one traced; then seconds per training epoch.

    python bench/detection_spike.py [DETECTOR …]
"""

from __future__ import annotations

import io
import json
import tempfile
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import onnxruntime as ort
import torch
from torch import nn
from torchvision.models.detection import FCOS, RetinaNet, ssdlite320_mobilenet_v3_large
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import mobilenet_backbone
from torchvision.ops import FeaturePyramidNetwork, batched_nms, box_iou
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

SIZE, CLASSES, SEED = 64, 3, 0


class TinyBackbone(nn.Module):
    """Four Conv-BN-ReLU stages (strides 4, 8, 16, 32), an FPN over the last three + P6, P7."""

    def __init__(self, out_channels: int = 32):
        super().__init__()
        stages, width_in = [], 3
        for i, width in enumerate((16, 32, 64, 96)):
            stages.append(
                nn.Sequential(
                    nn.Conv2d(width_in, width, 3, 4 if i == 0 else 2, 1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                )
            )
            width_in = width
        self.stages = nn.ModuleList(stages)
        self.fpn = FeaturePyramidNetwork(
            [32, 64, 96], out_channels, extra_blocks=LastLevelP6P7(out_channels, out_channels)
        )
        self.out_channels = out_channels

    def forward(self, x):
        features = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i:
                features[str(i - 1)] = x
        return self.fpn(features)


def anchors(levels: int) -> AnchorGenerator:
    sizes = tuple((s, int(s * 1.26), int(s * 1.59)) for s in (8, 16, 32, 64, 128)[:levels])
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * levels)


def detectors() -> dict[str, nn.Module]:
    common = {"min_size": SIZE, "max_size": SIZE}
    mobile = mobilenet_backbone(
        backbone_name="mobilenet_v3_small", weights=None, fpn=True, trainable_layers=6
    )
    return {
        "retinanet_tiny_fpn": RetinaNet(
            TinyBackbone(), CLASSES, anchor_generator=anchors(5), **common
        ),
        "fcos_tiny_fpn": FCOS(TinyBackbone(), CLASSES, **common),
        "retinanet_mobilenet_v3_small_fpn": RetinaNet(
            mobile, CLASSES, anchor_generator=anchors(3), **common
        ),
        "ssdlite320_mobilenet_v3_large": ssdlite320_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=CLASSES + 1
        ),
    }


class Whole(nn.Module):
    """uint8 [1, 3, H, W] -> boxes, scores, labels: the detector with its own postprocessing
    (torchvision's batched NMS) inside."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        out = self.model(list(images.float() / 255))[0]
        return out["boxes"], out["scores"], out["labels"]


class Heads(nn.Module):
    """uint8 [N, 3, H, W] -> class logits [N, A, C], box regression [N, A, 4]: RetinaNet up to
    its head; anchors, decoding and NMS stay outside the graph."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        m = self.model
        x = (images.float() / 255 - torch.tensor(m.transform.image_mean).view(1, 3, 1, 1)) / (
            torch.tensor(m.transform.image_std).view(1, 3, 1, 1)
        )
        features = list(m.backbone(x).values())
        out = m.head(features)
        return out["cls_logits"], out["bbox_regression"]


def after_graph(model, cls_logits, regression, score_thresh=0.0, iou=0.5, top=100):
    """The postprocessing an evaluator and a server would share: decode against the anchors,
    threshold, per-class NMS."""
    image = torch.zeros(1, 3, SIZE, SIZE)
    from torchvision.models.detection.image_list import ImageList

    feats = [f for f in model.backbone(image).values()]
    anchor = model.anchor_generator(ImageList(image, [(SIZE, SIZE)]), feats)[0]
    boxes = model.box_coder.decode_single(torch.as_tensor(regression[0]), anchor)
    scores = torch.as_tensor(cls_logits[0]).sigmoid()
    keep_anchor, labels = torch.nonzero(scores > score_thresh, as_tuple=True)
    kept_scores = scores[keep_anchor, labels]
    kept_boxes = boxes[keep_anchor].clamp(0, SIZE)
    keep = batched_nms(kept_boxes, kept_scores, labels, iou)[:top]
    return kept_boxes[keep], kept_scores[keep], labels[keep]


def same_boxes(a, b) -> bool:
    """Every box of each side has a partner of the same class at IoU >= 0.99, same counts."""
    (ba, _, la), (bb, _, lb) = a, b
    ba, bb = torch.as_tensor(ba), torch.as_tensor(bb)
    la, lb = torch.as_tensor(la), torch.as_tensor(lb)
    if len(ba) != len(bb):
        return False
    if len(ba) == 0:
        return True
    iou = box_iou(ba, bb) * (la[:, None] == lb[None, :])
    return bool((iou.max(dim=1).values >= 0.99).all() and (iou.max(dim=0).values >= 0.99).all())


def export(module, example, dynamo: bool) -> tuple[bytes | None, str]:
    buffer = io.BytesIO()
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dynamo:
                program = torch.onnx.export(
                    module, (example,), dynamo=True, opset_version=18, verbose=False
                )
                path = Path(tempfile.mkdtemp()) / "model.onnx"
                program.save(path, external_data=False)
                data = path.read_bytes()
            else:
                torch.onnx.export(
                    module, (example,), buffer, dynamo=False, opset_version=17,
                    input_names=["images"],
                )  # fmt: skip
                data = buffer.getvalue()
    except Exception as exc:  # noqa: BLE001 - the spike records every failure
        return None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
    return data, f"ok in {time.perf_counter() - start:.1f} s"


def ort_run(data: bytes, images: torch.Tensor):
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: images.numpy()}), [o.name for o in session.get_outputs()]


def onnx_ops(data: bytes) -> list[str]:
    import onnx

    return sorted({node.op_type for node in onnx.load_from_string(data).graph.node})


def check(name: str, model: nn.Module) -> dict:
    """Untrained, every score is near the prior (0.01): a threshold of 0 gives every image
    detections, so tracing meets NMS and parity compares real boxes."""
    model.score_thresh = 0.0
    gen = torch.Generator().manual_seed(SEED)
    traced_on = torch.randint(0, 256, (1, 3, SIZE, SIZE), dtype=torch.uint8, generator=gen)
    other = torch.randint(0, 256, (1, 3, SIZE, SIZE), dtype=torch.uint8, generator=gen)
    other[:, :, 16:40, 10:50] = 255  # a different input: other scores, other boxes
    model.eval()
    results = {}
    for placement in ("in_graph", "after_graph"):
        if placement == "after_graph" and not isinstance(model, RetinaNet):
            continue
        module = Whole(model) if placement == "in_graph" else Heads(model)
        for exporter in ("dynamo", "legacy"):
            model.eval()  # a failed torch.export can leave the model in training mode
            data, status = export(module, traced_on, dynamo=exporter == "dynamo")
            model.eval()
            entry = {"export": status}
            if data is not None:
                try:
                    outputs, _ = ort_run(data, other)
                    with torch.no_grad():
                        eager = module(other)
                    if placement == "after_graph":
                        eager = after_graph(model, *eager)
                        outputs = after_graph(model, *outputs)
                    entry["onnx_ops_nms"] = "NonMaxSuppression" in onnx_ops(data)
                    entry["n_boxes"] = [len(eager[0]), len(outputs[0])]
                    entry["parity"] = same_boxes(eager, outputs)
                except Exception as exc:  # noqa: BLE001
                    entry["ort"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            results[f"{placement}/{exporter}"] = entry
    return results


def epoch_seconds(model: nn.Module, n_images: int = 128, batch: int = 16) -> float:
    torch.manual_seed(SEED)
    model.train()
    images = torch.rand(n_images, 3, SIZE, SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for first in range(0, n_images, batch):
        targets = []
        for _ in range(batch):
            xy = torch.rand(3, 2) * (SIZE - 24)
            wh = 8 + torch.rand(3, 2) * 16
            targets.append(
                {"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, CLASSES, (3,))}
            )
        losses = model(list(images[first : first + batch]), targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) * 1000 / n_images  # ms per image


def main() -> None:
    import sys

    only = sys.argv[1:]  # detector names; none: all
    torch.manual_seed(SEED)
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "size": SIZE}
    for name, model in detectors().items():
        if only and name not in only:
            continue
        params = sum(p.numel() for p in model.parameters())
        report[name] = {"params": params, **check(name, model)}
        report[name]["train_ms_per_image"] = round(epoch_seconds(model), 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
