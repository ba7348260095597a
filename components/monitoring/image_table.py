"""The per-image table of a monitoring pass (reports/monitoring_images.csv): for every usable
image of the batch, what the model said (prediction, confidence, margin), its autoencoder
reconstruction error, where each of its signals sits in the reference profile, and which of
the pass's drift checks it fed. A review queue picks from it (`lensflow review export`)."""

from __future__ import annotations

import numpy as np

from components.core import paths

TAIL = 0.025  # an image outside the reference's central 95 % of a signal sits in its tail
COLUMNS = (
    "path", "label", "predicted", "confidence", "margin", "reconstruction_error",
    "reconstruction_percentile", "fed", "tails", "flagged",
)  # fmt: skip


def rows(files, labels, classes, probabilities, signals: dict, reference: dict, checks) -> list:
    """One dict per image. `fed`: the drift checks the image is part of (every check of the
    pass reads every image); `tails`: those of its scalar signals in the reference's tails;
    `flagged`: the image sits in the tail of a check that fired, or the pass fired on the
    model's own outputs (class prior, embeddings) and its confidence is in the low tail."""
    fired = {c["name"] for c in checks if c.get("test") and not c["passed"]}
    fed = [c["name"] for c in checks if c.get("test")]
    ordered = np.sort(probabilities, axis=1) if len(probabilities) else probabilities
    margin = ordered[:, -1] - ordered[:, -2] if ordered.shape[1] > 1 else ordered[:, -1]
    tails = _tails(signals, reference)
    low_confidence = _below(signals["confidence"], reference.get("confidence"), TAIL)
    out = []
    for i, name in enumerate(files):
        own_tails = [signal for signal, hit in tails.items() if hit[i]]
        flagged = bool(set(own_tails) & fired) or (
            bool(fired & {"class_prior", "embedding_mmd"}) and bool(low_confidence[i])
        )
        out.append(
            {
                "path": name,
                "label": classes[labels[i]] if labels is not None else "",
                "predicted": classes[int(signals["predicted"][i])],
                "confidence": round(float(signals["confidence"][i]), 6),
                "margin": round(float(margin[i]), 6),
                "reconstruction_error": round(float(signals["reconstruction_error"][i]), 6),
                "reconstruction_percentile": _percentile(
                    signals["reconstruction_error"][i], reference.get("reconstruction_error")
                ),
                "fed": ";".join(fed),
                "tails": ";".join(own_tails),
                "flagged": flagged,
            }
        )
    return out


def write(table: list[dict]) -> None:
    paths.write_csv(paths.MONITORING_IMAGES, table, COLUMNS)


def _tails(signals: dict, reference: dict) -> dict[str, np.ndarray]:
    """{scalar signal: whether each image lies outside the reference's central 1 - 2 TAIL}."""
    found = {}
    for name, values in signals.items():
        if name in ("embeddings", "predicted") or name not in reference:
            continue
        low, high = np.quantile(np.asarray(reference[name], np.float64), [TAIL, 1 - TAIL])
        values = np.asarray(values, np.float64)
        found[name] = (values < low) | (values > high)
    return found


def _below(values, reference, share: float) -> np.ndarray:
    if reference is None or len(reference) == 0:
        return np.zeros(len(values), bool)
    return np.asarray(values) < np.quantile(np.asarray(reference, np.float64), share)


def _percentile(value: float, reference) -> float | str:
    """The share of reference images with a smaller value (how unusual the image is)."""
    if reference is None or len(reference) == 0:
        return ""
    return round(float((np.asarray(reference) < value).mean()), 4)
