"""robustness: accuracy under standard corruptions (noise, blur, brightness, contrast) at
three severities each, applied to uint8 images as a camera or a scanner would degrade them.

Twelve more passes over the test split would cost more than the evaluation itself on a large
dataset, so they run on a seeded sample (evaluate.robustness_images), a batch at a time."""

from __future__ import annotations

import math

import numpy as np
import torch

from components.data import prepared
from components.scoring.backends import Predictor

# name -> three severities; applied to uint8 images by `corrupt`
CORRUPTIONS = {
    "gaussian_noise": (8.0, 16.0, 32.0),  # std in pixel values
    "gaussian_blur": (0.5, 1.0, 1.5),  # sigma in pixels
    "brightness": (25.0, 50.0, 75.0),  # added to every pixel
    "contrast": (0.7, 0.5, 0.3),  # factor around each image's mean
}


def corrupt(images: np.ndarray, name: str, severity: float, rng: np.random.Generator):
    """One standard corruption of uint8 images [N, C, H, W], returned as uint8."""
    x = images.astype(np.float32)
    if name == "gaussian_noise":
        x = x + rng.normal(0, severity, size=x.shape)
    elif name == "gaussian_blur":
        x = _blur(x, severity)
    elif name == "brightness":
        x = x + severity
    elif name == "contrast":
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        x = (x - mean) * severity + mean
    else:
        raise ValueError(f"unknown corruption {name!r}")
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def corruption_accuracy(
    predict: Predictor, images, labels, sample: np.ndarray, seed: int, batch_size: int = 256
) -> dict[str, list[float]]:
    """Accuracy on rows `sample` of (images, labels) under each corruption and severity."""
    rng = np.random.default_rng(seed)
    accuracy = {}
    for name, severities in CORRUPTIONS.items():
        accuracy[name] = []
        for severity in severities:
            correct = 0
            for part in prepared.chunks(len(sample), batch_size):
                rows = sample[part]
                predicted = predict(corrupt(images[rows], name, severity, rng)).argmax(1)
                correct += int((predicted == labels[rows]).sum())
            accuracy[name].append(correct / len(sample) if len(sample) else float("nan"))
    return accuracy


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    radius = max(1, math.ceil(2 * sigma))
    taps = torch.exp(-(torch.arange(-radius, radius + 1.0) ** 2) / (2 * sigma**2))
    taps = taps / taps.sum()
    t = torch.from_numpy(x)
    channels = t.shape[1]
    for kernel in (taps.view(1, 1, 1, -1), taps.view(1, 1, -1, 1)):
        pad = (radius, radius, 0, 0) if kernel.shape[-1] > 1 else (0, 0, radius, radius)
        t = torch.nn.functional.pad(t, pad, mode="replicate")
        t = torch.nn.functional.conv2d(
            t, kernel.expand(channels, 1, *kernel.shape[2:]), groups=channels
        )
    return t.numpy()
