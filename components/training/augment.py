"""augment: random augmentation of batches of uint8 image tensors, inside the training loop.

Images are decoded once (prepare); augmentation runs per batch, vectorised over the batch,
so it costs little next to the training step. Presets follow the torchvision/timm recipes:

- none
- light:    random resized crop (scale 0.8-1) and horizontal flip
- standard: random resized crop (0.6-1), flip, colour jitter 0.3, random erasing p=0.25
- strong:   standard + TrivialAugmentWide (per image: slower)

MixUp / CutMix mix pairs of images and their labels (soft targets) at batch level.
Flips are off for the built-in datasets: a flipped digit or spiral is another class.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from components.core import paths

PRESETS = {
    "none": {},
    "light": {"crop_scale": (0.8, 1.0), "flip": True},
    "standard": {"crop_scale": (0.6, 1.0), "flip": True, "jitter": 0.3, "erasing": 0.25},
    "strong": {
        "crop_scale": (0.6, 1.0),
        "flip": True,
        "jitter": 0.3,
        "erasing": 0.25,
        "trivial_augment": True,
    },
}


def flips_allowed(augment_cfg, data_source: str) -> bool:
    """`augment.flip: auto` flips user images but never the built-in ones (label-changing)."""
    if augment_cfg.flip == "auto":
        return data_source not in paths.BUILTIN
    return bool(augment_cfg.flip)


class BatchAugment:
    """(uint8 images [B, C, H, W], int labels [B]) -> (augmented images, targets).

    Targets stay class indices, or become class probabilities [B, K] under MixUp/CutMix.
    Images come back as float in [0, 255] when anything was applied (the model's own
    preprocessing converts either).
    """

    def __init__(self, augment_cfg, num_classes: int, allow_flips: bool, seed: int):
        self.options = dict(PRESETS[augment_cfg.preset])
        self.options["flip"] = self.options.get("flip", False) and allow_flips
        self.generator = torch.Generator().manual_seed(seed)
        # TrivialAugmentWide draws from torch's global generator, seeded by loop.seed_everything
        self.trivial = v2.TrivialAugmentWide() if self.options.get("trivial_augment") else None
        mixers = []
        if augment_cfg.mixup_alpha > 0:
            mixers.append(v2.MixUp(alpha=augment_cfg.mixup_alpha, num_classes=num_classes))
        if augment_cfg.cutmix_alpha > 0:
            mixers.append(v2.CutMix(alpha=augment_cfg.cutmix_alpha, num_classes=num_classes))
        self.mix = v2.RandomChoice(mixers) if mixers else None

    @property
    def active(self) -> bool:
        return bool(self.options.get("crop_scale") or self.options["flip"] or self.mix)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        if self.trivial is not None:
            images = torch.stack([self.trivial(image) for image in images])
        x = images.float()
        if "crop_scale" in self.options or self.options["flip"]:
            x = self._crop_and_flip(x)
        if "jitter" in self.options:
            x = self._colour_jitter(x, self.options["jitter"])
        if "erasing" in self.options:
            x = self._erase(x, self.options["erasing"])
        if self.mix is not None:
            x, labels = self.mix(x, labels)
        return x, labels

    def _uniform(self, n: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=self.generator)

    def _crop_and_flip(self, x: torch.Tensor) -> torch.Tensor:
        """Random resized crop + horizontal flip as one affine resampling per image."""
        n = len(x)
        width = height = torch.ones(n)
        if "crop_scale" in self.options:
            area = self._uniform(n, *self.options["crop_scale"])
            ratio = torch.exp(self._uniform(n, math.log(3 / 4), math.log(4 / 3)))
            width = torch.sqrt(area * ratio).clamp(max=1.0)
            height = torch.sqrt(area / ratio).clamp(max=1.0)
        shift_x = (1 - width) * (2 * torch.rand(n, generator=self.generator) - 1)
        shift_y = (1 - height) * (2 * torch.rand(n, generator=self.generator) - 1)
        flip = torch.ones(n)
        if self.options["flip"]:
            flip = torch.where(torch.rand(n, generator=self.generator) < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = width * flip, shift_x
        theta[:, 1, 1], theta[:, 1, 2] = height, shift_y
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        warped = F.grid_sample(
            x, grid, mode="bilinear", padding_mode="reflection", align_corners=False
        )
        return warped.clamp(0, 255)  # bilinear rounding can step just past 255

    def _colour_jitter(self, x: torch.Tensor, strength: float) -> torch.Tensor:
        n = len(x)
        brightness = self._uniform(n, 1 - strength, 1 + strength).view(-1, 1, 1, 1)
        contrast = self._uniform(n, 1 - strength, 1 + strength).view(-1, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return ((x - mean) * contrast + mean * brightness).clamp(0, 255)

    def _erase(self, x: torch.Tensor, probability: float) -> torch.Tensor:
        """Random erasing: a rectangle of 2-25 % of the image set to noise, per chosen image."""
        n, _, h, w = x.shape
        chosen = torch.rand(n, generator=self.generator) < probability
        area = self._uniform(n, 0.02, 0.25)
        ratio = torch.exp(self._uniform(n, math.log(0.3), math.log(3.3)))
        eh = (torch.sqrt(area * ratio) * h).clamp(1, h)
        ew = (torch.sqrt(area / ratio) * w).clamp(1, w)
        top = torch.rand(n, generator=self.generator) * (h - eh)
        left = torch.rand(n, generator=self.generator) * (w - ew)
        rows = torch.arange(h).view(1, h, 1)
        cols = torch.arange(w).view(1, 1, w)
        box = (
            (rows >= top.view(-1, 1, 1))
            & (rows < (top + eh).view(-1, 1, 1))
            & (cols >= left.view(-1, 1, 1))
            & (cols < (left + ew).view(-1, 1, 1))
        )
        mask = (box & chosen.view(-1, 1, 1)).unsqueeze(1)
        noise = torch.rand(x.shape, generator=self.generator) * 255
        return torch.where(mask, noise, x)


def batch_augmenter(cfg, num_classes: int, seed: int) -> BatchAugment:
    """The training augmentation of a config (params.augment), seeded."""
    allow_flips = flips_allowed(cfg.augment, cfg.data.source)
    return BatchAugment(cfg.augment, num_classes, allow_flips, seed)
