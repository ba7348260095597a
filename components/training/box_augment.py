"""box_augment: random augmentation of images with boxes (`task: detection`), per image, by
torchvision's transforms.v2 on `tv_tensors.BoundingBoxes`, so that every geometric transform
moves the boxes with the pixels.

In order, each from `detection.augment`:

- random resized crop (probability `crop_probability`, area `crop_min_scale`-1, aspect
  3/4-4/3), back to the image's size; a box cut by the crop keeps its visible part;
- horizontal flip (p 0.5) where `augment.flip` allows it (`auto`: never for the built-in
  sets, as in classification);
- colour jitter of brightness, contrast and saturation by `jitter`;
- `SanitizeBoundingBoxes`: boxes left with a side under `min_box_size` px (outside the crop,
  or cut to a sliver) are dropped with their labels.

Random draws come from torch's global generator, which training seeds.
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from components.training.augment import flips_allowed


def transform(cfg) -> v2.Transform | None:
    """The training transform of a config, or None when `detection.augment` does nothing."""
    options = cfg.detection.augment
    steps = []
    if options.crop_probability > 0 and options.crop_min_scale < 1:
        crop = v2.RandomResizedCrop(
            cfg.detection.image_size, scale=(options.crop_min_scale, 1.0), antialias=True
        )
        steps.append(v2.RandomApply([crop], p=options.crop_probability))
    if flips_allowed(cfg.augment, cfg.data.source):
        steps.append(v2.RandomHorizontalFlip(0.5))
    if options.jitter > 0:
        strength = options.jitter
        steps.append(v2.ColorJitter(brightness=strength, contrast=strength, saturation=strength))
    if not steps:
        return None
    return v2.Compose([*steps, v2.SanitizeBoundingBoxes(min_size=options.min_box_size)])


def apply(
    augment: v2.Transform | None, images: torch.Tensor, targets: list[dict]
) -> tuple[torch.Tensor, list[dict]]:
    """uint8 images [B, 3, H, W] with their targets ({boxes [k, 4] x1 y1 x2 y2 in pixels,
    labels [k]}) -> float images in [0, 1] and the targets of what they now show."""
    if augment is None:
        return images.float() / 255, targets
    out_images, out_targets = [], []
    for image, target in zip(images, targets, strict=True):
        boxes = tv_tensors.BoundingBoxes(
            target["boxes"], format="XYXY", canvas_size=tuple(image.shape[-2:])
        )
        picture, moved = augment(
            tv_tensors.Image(image), {"boxes": boxes, "labels": target["labels"]}
        )
        out_images.append(picture.as_subclass(torch.Tensor))
        out_targets.append(
            {"boxes": moved["boxes"].as_subclass(torch.Tensor), "labels": moved["labels"]}
        )
    return torch.stack(out_images).float() / 255, out_targets
