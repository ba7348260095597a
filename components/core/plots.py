"""Evaluation figures as PNG files (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from components.core import paths


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_matrix(matrix: np.ndarray, classes: list[str], out: Path) -> Path:
    plt = _pyplot()
    size = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set(
        xticks=range(len(classes)),
        yticks=range(len(classes)),
        xlabel="predicted",
        ylabel="true",
        title="confusion matrix (test)",
    )
    ax.set_xticklabels(classes, rotation=90)
    ax.set_yticklabels(classes)
    threshold = matrix.max() / 2 if matrix.size else 0
    for (row, col), value in np.ndenumerate(matrix):
        color = "white" if value > threshold else "black"
        ax.text(col, row, str(value), ha="center", va="center", fontsize=7, color=color)
    return _save(fig, out)


def reliability_diagram(bins: list[dict], ece: float, out: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    centers = [(b["lower"] + b["upper"]) / 2 for b in bins if b["count"]]
    accuracy = [b["accuracy"] for b in bins if b["count"]]
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.bar(centers, accuracy, width=1 / len(bins), edgecolor="black", alpha=0.7, label="accuracy")
    ax.set(
        xlabel="confidence",
        ylabel="accuracy",
        xlim=(0, 1),
        ylim=(0, 1),
        title=f"reliability (ECE {ece:.3f})",
    )
    ax.legend(loc="upper left")
    return _save(fig, out)


def image_grid(
    images: np.ndarray,
    titles: list[str],
    out: Path,
    cmap: str | None = None,
    boxes: list | None = None,
) -> Path:
    """Up to 16 images [N, C, H, W] (uint8 or float) in a 4-column grid with titles; with
    `boxes`, per image a list of (x1, y1, x2, y2, name) drawn over it in pixels, yellow, or
    (x1, y1, x2, y2, name, colour)."""
    plt = _pyplot()
    n = max(1, min(16, len(images)))
    rows = (n + 3) // 4
    fig, axes = plt.subplots(rows, 4, figsize=(8, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, image, title) in enumerate(zip(axes.flat, images[:n], titles[:n], strict=False)):
        picture = image.transpose(1, 2, 0)
        ax.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap=cmap or "gray")
        ax.set_title(title, fontsize=8)
        for x1, y1, x2, y2, name, *colour in boxes[i] if boxes else ():
            colour = colour[0] if colour else "yellow"
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=colour, lw=1))
            ax.text(x1, y1, name, color=colour, fontsize=6, va="bottom")
    return _save(fig, out)


def comparison_curves(
    panels: dict[str, dict[str, list[dict]]],
    out: Path,
    metric: tuple[str, str] = ("val_accuracy", "validation accuracy"),
) -> Path:
    """`metric` (its history key, its label; validation accuracy by default) of each arm
    against epochs and against training seconds (log scale), one row per regime. `panels`:
    {regime: {arm: history rows with epoch, seconds and the metric (loop.fit's)}}."""
    plt = _pyplot()
    key, label = metric
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.6 * len(panels)), squeeze=False)
    for (regime, arms), (by_epoch, by_time) in zip(panels.items(), axes, strict=True):
        for arm, history in arms.items():
            values = [row[key] for row in history]
            by_epoch.plot([row["epoch"] for row in history], values, marker=".", label=arm)
            by_time.plot([row["seconds"] for row in history], values, marker=".", label=arm)
        by_epoch.set(xlabel="epoch", ylabel=label, title=f"{regime}: per epoch")
        by_time.set(xlabel="training seconds", ylabel=label, xscale="log")
        by_time.set_title(f"{regime}: against training time")
        for ax in (by_epoch, by_time):
            ax.grid(alpha=0.3)
            ax.legend()
    return _save(fig, out)


def precision_recall(curves: dict[str, list[float] | None], recalls, title: str, out: Path) -> Path:
    """One precision-recall curve per class ({name: precisions at `recalls`}, None: a class
    without ground truth, left out), its area in the legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for name, precision in curves.items():
        if precision is not None:
            ax.plot(recalls, precision, label=f"{name} (AP {np.mean(precision):.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left", fontsize=7)
    return _save(fig, out)


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with paths.atomic(out) as partial:
        fig.savefig(partial, dpi=100)
    _pyplot().close(fig)
    return out


def training_curves(history, out: Path) -> Path:
    """Loss and accuracy per epoch (train and validation), and the learning rate."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for column, ax in zip(("loss", "accuracy"), axes, strict=False):
        ax.plot(history["epoch"], history[f"train_{column}"], label="train")
        ax.plot(history["epoch"], history[f"val_{column}"], label="validation")
        ax.set(xlabel="epoch", title=column)
        ax.legend()
    axes[2].plot(history["epoch"], history["lr"])
    axes[2].set(xlabel="epoch", title="learning rate (head, end of epoch)")
    return _save(fig, out)


def detection_training_curve(history: list[dict], out: Path) -> Path:
    """A detector's training loss per epoch (`task: detection`)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot([row["epoch"] for row in history], [row["train_loss"] for row in history])
    ax.set(xlabel="epoch", title="training loss (focal + GIoU + centre-ness)")
    return _save(fig, out)
