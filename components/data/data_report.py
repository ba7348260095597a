"""The data's statistics and the browsable validation report: class counts per split, image
sizes, modes, formats and channel statistics (reports/data_stats.json), and a self-contained
HTML page of the verdict, the checks and the issues (reports/validation.html)."""

from __future__ import annotations

import html
from itertools import pairwise

import numpy as np
import pandas as pd

from components.core import paths
from components.data.checks import SPLITS

HTML_REPORT = paths.VALIDATION_REPORT.with_suffix(".html")
DATA_STATS = paths.REPORTS / "data_stats.json"
HTML_MAX_ISSUES = 2000
SIZE_EDGES = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def data_stats(images: pd.DataFrame, meta: dict) -> dict:
    """Class counts per split, image sizes, modes, formats and channel statistics."""
    decoded = images[images["decode"] == "ok"]
    used = images[images["split"].isin(SPLITS)]
    per_class = {}
    for name in [*meta["classes"], *sorted(set(meta["class_folders"]) - set(meta["classes"]))]:
        rows = images[images["label"] == name]
        per_class[name] = {
            "files": len(rows),
            "used": int(rows["split"].isin(SPLITS).sum()),
            **{split: int((rows["split"] == split).sum()) for split in SPLITS},
        }
    return {
        "classes": per_class,
        "size_histogram": _size_histogram(decoded),
        "common_sizes": _top_counts(
            decoded["width"].astype(str) + "x" + decoded["height"].astype(str)
        ),
        "modes": _top_counts(decoded["mode"]),
        "formats": _top_counts(images.loc[images["format"].fillna("") != "", "format"]),
        **_channel_stats(used),
    }


def _size_histogram(decoded: pd.DataFrame) -> dict[str, int]:
    """Counts by shorter side, in powers of two."""
    labels = [f"{lo}-{hi - 1}" for lo, hi in pairwise(SIZE_EDGES)] + [f"{SIZE_EDGES[-1]}+"]
    shorter = np.minimum(decoded["width"], decoded["height"])
    counts, _ = np.histogram(shorter, bins=[*SIZE_EDGES, np.inf])
    return dict(zip(labels, (int(c) for c in counts), strict=True))


def _top_counts(values: pd.Series, top: int = 20) -> dict[str, int]:
    return {str(k): int(v) for k, v in values.value_counts().head(top).items()}


def _channel_stats(used: pd.DataFrame) -> dict:
    """Pixel-weighted mean and std per channel over the used images, in [0, 1]."""
    if used.empty:
        return {"channel_mean": None, "channel_std": None}
    means, stds = (_rows_of(used[name]) / 255.0 for name in ("channel_mean", "channel_std"))
    weights = (used["width"] * used["height"]).to_numpy(dtype=float)[:, None]
    mean = (weights * means).sum(axis=0) / weights.sum()
    second_moment = (weights * (stds**2 + means**2)).sum(axis=0) / weights.sum()
    std = np.sqrt(np.maximum(second_moment - mean**2, 0))
    return {
        "channel_mean": [round(float(v), 6) for v in mean],
        "channel_std": [round(float(v), 6) for v in std],
    }


def _rows_of(lists: pd.Series) -> np.ndarray:
    """A column of equal-length Arrow lists (none missing) as a 2-D array."""
    return lists.list.flatten().to_numpy(dtype=float).reshape(len(lists), -1)


def html_report(report: dict, stats: dict, source: str) -> str:
    """A self-contained page: verdict, checks, issues, class counts, sizes and channels."""
    verdict = "passed" if report["success"] else "FAILED"
    issues = report["issues"][:HTML_MAX_ISSUES]
    more = len(report["issues"]) - len(issues)
    classes = [[name, *counts.values()] for name, counts in stats["classes"].items()]
    parts = [
        f"<h1>Data validation {verdict}</h1>",
        f"<p>{_e(source)}: {report['n_images']} files, {report['n_used']} used in the splits.</p>",
        "<h2>Checks</h2>",
        _table(
            ["code", "policy", "files"],
            [[c["code"], c["policy"], c["n_failed"]] for c in report["checks"]],
        ),
        f"<h2>Issues ({len(report['issues'])})</h2>",
        _table(["path", "code", "severity", "message"], [list(i.values()) for i in issues]),
        f"<p>{more} more in validation.json</p>" if more else "",
        "<h2>Classes</h2>",
        _table(["class", "files", "used", *SPLITS], classes),
        "<h2>Shorter side (pixels)</h2>",
        _table(["size", "images"], list(stats["size_histogram"].items())),
        "<h2>Modes and formats</h2>",
        _table(["mode", "images"], list(stats["modes"].items())),
        _table(["format", "files"], list(stats["formats"].items())),
        "<h2>Channels (used images, 0-1)</h2>",
        _table(["", "mean", "std"], _channel_rows(stats)),
    ]
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
    )
    body = "\n".join(parts)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>lensflow validation</title>"
        f"<style>{style}</style></head><body>{body}</body></html>"
    )


def _channel_rows(stats: dict) -> list[list]:
    if stats["channel_mean"] is None:
        return []
    return [
        [f"channel {i}", mean, std]
        for i, (mean, std) in enumerate(
            zip(stats["channel_mean"], stats["channel_std"], strict=True)
        )
    ]


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _e(value) -> str:
    return html.escape(str(value))
