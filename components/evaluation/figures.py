"""The evaluation's figures, written under plots/: what the numbers of evaluation.json look
like, and where the model looks (vanilla-gradient saliency)."""

from __future__ import annotations

import numpy as np
import torch

from components.core import paths, plots
from components.training import models


def saliency(model: models.Classifier, images: np.ndarray) -> np.ndarray:
    """Vanilla-gradient saliency of the predicted class, [N, 1, H, W] in [0, 1], at the
    images' own size (the gradient flows back through the model's resize, so a network that
    sees another input size still maps onto the pixels shown)."""
    model.eval()
    inputs = torch.from_numpy(images).float().requires_grad_(True)
    logits = model(inputs)
    logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
    maps = inputs.grad.abs().amax(dim=1, keepdim=True)
    maps = maps / maps.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return maps.numpy()


def evaluation_figures(model, metrics, probabilities, images, labels, classes) -> list:
    """The confusion matrix, the reliability diagram, misclassified images and saliency maps."""
    predicted = probabilities.argmax(1)
    wrong = np.flatnonzero(predicted != labels)[:16]
    shown = np.unique(labels, return_index=True)[1][:8]  # one image per class
    maps = saliency(model, images[shown])
    gray = images[shown].astype(np.float32).mean(axis=1, keepdims=True) / 255.0
    overlay = np.concatenate([np.maximum(gray, maps), gray * (1 - maps), gray * (1 - maps)], 1)
    return [
        plots.confusion_matrix(
            np.array(metrics["confusion_matrix"]), classes, paths.PLOTS / "confusion_matrix.png"
        ),
        plots.reliability_diagram(
            metrics["calibration_bins"], metrics["ece"], paths.PLOTS / "reliability.png"
        ),
        plots.image_grid(
            images[wrong],
            [f"{classes[labels[i]]} -> {classes[predicted[i]]}" for i in wrong],
            paths.PLOTS / "misclassified.png",
        ),
        plots.image_grid(
            overlay, [f"pred {classes[predicted[i]]}" for i in shown], paths.PLOTS / "saliency.png"
        ),
    ]
