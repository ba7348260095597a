"""The evaluation figures, for a network that sees another input size than the images."""

import numpy as np
import pytest

from components.core import paths
from components.evaluation import figures
from components.scoring import backends
from components.scoring.metrics import score
from components.training import models


@pytest.fixture
def upsampling_model():
    """A 3-channel model fed 16 px images that it resizes to 32 px inside."""
    spec = {
        "arch": "simple_cnn",
        "widths": [8, 16],
        "dropout": 0.0,
        "se": False,
        "pretrained": None,
        "classes": ["a", "b", "c"],
        "channels": 3,
        "image_size": 16,
        "input_size": 32,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
    }
    return models.build(spec).eval()


def test_saliency_maps_lie_on_the_images_pixels(upsampling_model):
    images = np.random.default_rng(0).integers(0, 256, (4, 3, 16, 16), dtype=np.uint8)
    maps = figures.saliency(upsampling_model, images)
    assert maps.shape == (4, 1, 16, 16)
    assert maps.min() >= 0 and np.allclose(maps.reshape(4, -1).max(axis=1), 1.0)


def test_evaluation_figures_are_written_when_input_and_image_sizes_differ(
    upsampling_model, project
):
    images = np.random.default_rng(1).integers(0, 256, (9, 3, 16, 16), dtype=np.uint8)
    labels = np.arange(9) % 3
    predict = backends.torch_predictor(upsampling_model)
    metrics, probabilities = score(predict, images, labels, ["a", "b", "c"])
    written = figures.evaluation_figures(
        upsampling_model, metrics, probabilities, images, labels, ["a", "b", "c"]
    )
    assert paths.PLOTS / "saliency.png" in written
    assert all(path.stat().st_size > 1000 for path in written)
