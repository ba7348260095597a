"""Image preprocessing shared by `prepare` (once, to make shards) and the exported model.

The exported ONNX model contains `Preprocess`, so a served model sees exactly the transform
the training data went through: uint8 NCHW -> float in [0, 1] -> bilinear resize -> normalise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 NCHW batch to size x size with the same op the model uses."""
    if images.shape[-2:] == (size, size):
        return images
    resized = _resize(images.float(), size)
    return resized.round().clamp(0, 255).to(torch.uint8)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    # antialias stays off: it must match the ONNX Resize the exporter emits
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


class Preprocess(nn.Module):
    """uint8 images [N, C, H, W] (any H, W) -> normalised float [N, C, size, size]."""

    def __init__(self, size: int, mean: list[float], std: list[float]):
        super().__init__()
        self.size = size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = _resize(images.float(), self.size)
        return (x / 255.0 - self.mean) / self.std
