"""drift: the statistics of continuous validation. Each check compares one signal of a batch
with the same signal of the reference sample (validation images, never the test split) and
yields a p-value: two-sample KS for each image property and for confidence, entropy and
autoencoder reconstruction error; an MMD permutation test on the reduced embeddings; a
permutation chi-square test on the predicted classes. The pass alerts when any p-value is
under false_alarm_rate / number of checks (Bonferroni), so on clean data the chance that a
pass alerts is at most false_alarm_rate, whatever the batch size.

A permutation p-value is never below 1 / (1 + permutations), so the permutation count follows
the threshold (`permutations_for`): otherwise the MMD and class-prior tests could never fire.
Their memory does not grow with the permutations (MMD: in chunks) nor with the batch (class
prior: permuted class counts drawn directly).
"""

from __future__ import annotations

import math

import numpy as np

GREY = np.float32(1 / 3)
MMD_MAX_BATCH = 2000  # batch rows the MMD test sees (a seeded sample): its cost grows as N^2
PERMUTATION_CHUNK = 64  # MMD permutations built at once: [N, 64] arrays, whatever the count
FLOOR_MARGIN = 5  # the smallest permutation p-value sits at least 5x under the threshold


def permutations_for(n_checks: int, false_alarm_rate: float, asked: int) -> tuple[int, str]:
    """The permutation count the tests run, and a line saying why when it is not `asked`:
    raised until the smallest p-value, 1 / (1 + permutations), is at most 1 / FLOOR_MARGIN
    of the threshold false_alarm_rate / n_checks."""
    threshold = false_alarm_rate / max(1, n_checks)
    needed = math.ceil(FLOOR_MARGIN / threshold) - 1
    if asked >= needed:
        return asked, ""
    return needed, (
        f"monitor.permutations={asked} raised to {needed}: the smallest permutation p-value, "
        f"1/{asked + 1}, must stay {FLOOR_MARGIN}x under the threshold "
        f"monitor.false_alarm_rate / {n_checks} checks = {threshold:.3g}"
    )


def image_properties(images: np.ndarray, widths, heights) -> dict[str, np.ndarray]:
    """Per image, from uint8 [N, C, S, S] as the model takes them and the files' raw sizes:
    brightness, contrast (std) and sharpness (variance of the Laplacian) of the grey image,
    in [0, 1] units; size (sqrt of width x height) and aspect (width / height); and each
    channel's mean and std."""
    x = np.asarray(images, dtype=np.float32) / 255.0
    grey = x.mean(axis=1)
    laplacian = (
        grey[:, :-2, 1:-1] + grey[:, 2:, 1:-1] + grey[:, 1:-1, :-2] + grey[:, 1:-1, 2:]
    ) - 4 * grey[:, 1:-1, 1:-1]
    widths, heights = np.asarray(widths, np.float64), np.asarray(heights, np.float64)
    properties = {
        "brightness": grey.mean(axis=(1, 2)),
        "contrast": grey.std(axis=(1, 2)),
        "sharpness": laplacian.var(axis=(1, 2)) if laplacian.size else np.zeros(len(x)),
        "size": np.sqrt(widths * heights),
        "aspect": widths / np.maximum(heights, 1),
    }
    for c in range(x.shape[1]):
        properties[f"channel_mean_{c}"] = x[:, c].mean(axis=(1, 2))
        properties[f"channel_std_{c}"] = x[:, c].std(axis=(1, 2))
    return {name: np.asarray(values, np.float64) for name, values in properties.items()}


def confidence_and_entropy(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.clip(np.asarray(probabilities, np.float64), 1e-12, 1.0)
    return p.max(axis=1), -(p * np.log(p)).sum(axis=1)


def ks(batch: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov: (statistic, p-value)."""
    from scipy.stats import ks_2samp

    result = ks_2samp(batch, reference)
    return float(result.statistic), float(result.pvalue)


def mmd_permutation(
    batch: np.ndarray, reference: np.ndarray, bandwidth: float, permutations: int, seed: int
) -> tuple[float, float]:
    """MMD^2 (biased estimate, Gaussian kernel of fixed `bandwidth`) between two samples and its
    permutation p-value: (1 + permutations at least as large) / (1 + permutations)."""
    rng = np.random.default_rng(seed)
    if len(batch) > MMD_MAX_BATCH:
        batch = batch[np.sort(rng.choice(len(batch), MMD_MAX_BATCH, replace=False))]
    n, m = len(batch), len(reference)
    pooled = np.vstack([batch, reference]).astype(np.float64)
    squared = (pooled**2).sum(axis=1)
    distances = np.maximum(squared[:, None] + squared[None, :] - 2 * pooled @ pooled.T, 0)
    kernel = np.exp(-distances / (2 * bandwidth**2))
    del distances
    weights = np.concatenate([np.full(n, 1 / n), np.full(m, -1 / m)])
    observed = float(weights @ kernel @ weights)
    as_large = 0
    for start in range(0, permutations, PERMUTATION_CHUNK):
        size = min(PERMUTATION_CHUNK, permutations - start)
        permuted = rng.permuted(np.tile(weights, (size, 1)), axis=1).T  # [N, size]
        statistics = np.einsum("ib,ib->b", permuted, kernel @ permuted)
        as_large += int((statistics >= observed - 1e-12).sum())
    return observed, (1 + as_large) / (1 + permutations)


def chi2_permutation(
    batch: np.ndarray, reference: np.ndarray, classes: int, permutations: int, seed: int
) -> tuple[float, float]:
    """The chi-square statistic of the 2 x classes table of predicted-class counts (batch,
    reference) and its permutation p-value: exact in small samples, where the chi-square
    distribution is not. A permutation's batch counts are a multivariate hypergeometric draw
    from the pooled counts, drawn directly: memory permutations x classes, whatever the
    batch size."""
    rng = np.random.default_rng(seed)
    batch_counts = np.bincount(batch, minlength=classes)
    total = batch_counts + np.bincount(reference, minlength=classes)
    observed = _chi2(batch_counts[None], total)[0]
    permuted = rng.multivariate_hypergeometric(total, len(batch), size=permutations)
    statistics = _chi2(permuted, total)
    p_value = (1 + int((statistics >= observed - 1e-9).sum())) / (1 + permutations)
    return float(observed), p_value


def _chi2(batch_counts: np.ndarray, total: np.ndarray) -> np.ndarray:
    """Pearson's statistic of each row of batch counts against the rest of the pooled counts
    `total`."""
    total = total.astype(np.float64)
    n = batch_counts[0].sum()
    m = total.sum() - n
    seen = total > 0
    observed_batch = batch_counts[:, seen].astype(np.float64)
    observed_reference = total[seen] - observed_batch
    expected_batch, expected_reference = total[seen] * n / (n + m), total[seen] * m / (n + m)
    return ((observed_batch - expected_batch) ** 2 / expected_batch).sum(axis=1) + (
        (observed_reference - expected_reference) ** 2 / expected_reference
    ).sum(axis=1)


def n_checks(reference: dict, batch: dict) -> int:
    """How many p-valued checks `checks` makes for these signals."""
    scalar = [k for k in batch if k not in ("embeddings", "predicted") and k in reference]
    return len(scalar) + int(_has_embeddings(reference, batch)) + 1


def _has_embeddings(reference: dict, batch: dict) -> bool:
    return batch.get("embeddings") is not None and reference.get("embeddings") is not None


def checks(reference: dict, batch: dict, classes: int, permutations: int, seed: int) -> list:
    """One p-valued check per signal both sides have: [{name, test, statistic, p_value}].
    `reference` and `batch` map a signal's name to its per-image values: the image properties,
    `confidence`, `entropy`, `reconstruction_error`, `embeddings` (rows) and `predicted`
    (class indices); `reference` also holds `bandwidth` (the MMD kernel's)."""
    found = []
    scalar = [k for k in batch if k not in ("embeddings", "predicted") and k in reference]
    for name in scalar:
        statistic, p_value = ks(batch[name], reference[name])
        found.append(_check(name, "ks", statistic, p_value))
    if _has_embeddings(reference, batch):
        statistic, p_value = mmd_permutation(
            batch["embeddings"], reference["embeddings"], reference["bandwidth"], permutations, seed
        )
        found.append(_check("embedding_mmd", "mmd_permutation", statistic, p_value))
    statistic, p_value = chi2_permutation(
        batch["predicted"], reference["predicted"], classes, permutations, seed
    )
    found.append(_check("class_prior", "chi2_permutation", statistic, p_value))
    return found


def _check(name: str, test: str, statistic: float, p_value: float) -> dict:
    return {"name": name, "test": test, "statistic": statistic, "p_value": p_value}


def bonferroni(tested: list[dict], false_alarm_rate: float) -> list[dict]:
    """Each p-valued check against false_alarm_rate / number of checks:
    [{name, value (the p-value), threshold, passed, test, statistic}]."""
    threshold = false_alarm_rate / max(1, len(tested))
    return [
        {
            "name": c["name"],
            "value": c["p_value"],
            "threshold": threshold,
            "passed": bool(c["p_value"] >= threshold),
            "test": c["test"],
            "statistic": c["statistic"],
        }
        for c in tested
    ]


def median_bandwidth(points: np.ndarray, limit: int = 1000, seed: int = 0) -> float:
    """The median heuristic: the median distance between pairs of (at most `limit`) points."""
    rng = np.random.default_rng(seed)
    if len(points) > limit:
        points = points[rng.choice(len(points), limit, replace=False)]
    squared = (points**2).sum(axis=1)
    distances = np.maximum(squared[:, None] + squared[None, :] - 2 * points @ points.T, 0)
    upper = distances[np.triu_indices(len(points), k=1)]
    return float(np.sqrt(np.median(upper))) if upper.size and np.median(upper) > 0 else 1.0
