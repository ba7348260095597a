"""What each architecture needs from its input, without importing torch: the smallest image
it can take, and the size the network sees (`model.input_size`, or a default that works).

The CLI's preflight checks a config against these before any flow starts; `models` builds
with the same numbers, so what the preflight accepts is what trains.
"""

from __future__ import annotations

from typing import get_args

from components.core.params_pipeline import Model, TorchvisionArch

# Weights trained on ImageNet photographs: a network loaded with them sees at least this many
# pixels by default. Below ~64 px ImageNet features say little (docs/training.md).
IMAGENET_WEIGHTS = ("efficientnet-lite0", "torchvision")
IMAGENET_INPUT_SIZE = 64

# The smallest input each architecture runs on (measured: forward and backward at every size
# from 1 px up). simple_cnn halves the size once per width, so it is computed.
MIN_INPUT_SIZE = {
    "resnet_cnn": 1,
    "mini_alexnet": 4,
    "efficientnet_lite0": 32,  # TensorFlow-style 'same' padding: a 5x5 kernel on 4x4 fails
    "resnet18": 1,
    "resnet34": 1,
    "resnet50": 1,
    "mobilenet_v3_small": 1,
    "mobilenet_v3_large": 1,
    "efficientnet_b0": 1,
}
IMAGENET_ARCHS = ("efficientnet_lite0", *get_args(TorchvisionArch))


def min_input_size(model: Model) -> int:
    if model.arch == "simple_cnn":
        return 2 ** len(model.widths)  # one 2x2 max-pool per width
    return MIN_INPUT_SIZE[model.arch]


def network_input_size(model: Model, image_size: int) -> int:
    """The size the network sees: model.input_size when set; otherwise the prepared size,
    raised to IMAGENET_INPUT_SIZE for ImageNet weights."""
    if model.input_size:
        return model.input_size
    if model.pretrained in IMAGENET_WEIGHTS:
        return max(image_size, IMAGENET_INPUT_SIZE)
    return image_size


def input_size_problem(model: Model, image_size: int, prefix: str = "") -> str | None:
    """Why the network cannot take its input (None: it can), naming the key to change."""
    size, minimum = network_input_size(model, image_size), min_input_size(model)
    if size >= minimum:
        return None
    key = "model.input_size" if model.input_size else "prepare.image_size"
    example = max(minimum, IMAGENET_INPUT_SIZE) if model.arch in IMAGENET_ARCHS else minimum
    return (
        f"{prefix}{key} is {size} px but model.arch {model.arch} needs at least {minimum}: "
        f"set model.input_size (e.g. {example}; the model resizes its input to it)"
    )
