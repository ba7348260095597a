"""Per-image facts for the manifest, and the pixels `prepare` puts in the shards.

`read_many(paths, options)` looks at each file: whether it decodes and why not, its format by
content, mode and bit depth, size, EXIF orientation, sha256, a perceptual hash, per-channel
mean/std and whether it is constant. It returns the facts and the image converted to the
configured channels and resized for the shard. It never writes anything, and it checks the
pixel count in the header before decoding, so a decompression bomb is refused unread.

Each file is decoded on its own; the arithmetic after that (statistics, hash bits, resize)
runs once per batch of same-sized small images, since for a small image the cost of one
numpy or torch call is larger than its arithmetic.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import stat
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

# Leading bytes of the formats we expect, to name what a file is when PIL cannot open it.
SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}
EXIF_ORIENTATION = 0x0112
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
BIT_DEPTH = {"1": 1, "I": 32, "F": 32, **dict.fromkeys(SIXTEEN_BIT_MODES, 16)}
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
HASH_SIZE = 8  # a dHash over a 9x9 grey thumbnail: 64 horizontal + 64 vertical bits
SMALL_IMAGE_BYTES = 1 << 20  # larger images are measured alone, at once, never batched


@dataclass(frozen=True)
class ReadOptions:
    channels: int
    image_size: int
    max_pixels: int


def read_many(paths: list[str], options: ReadOptions) -> list[tuple[dict, np.ndarray | None]]:
    """(facts, uint8 pixels [channels, image_size, image_size] or None when unusable) of each
    file, in order."""
    facts_list, shards, waiting = [], [], {}
    for path in paths:
        facts, array, thumbnail = _read_one(path, options)
        facts_list.append(facts)
        shards.append(None)
        if array is None:
            continue
        decoded = (len(shards) - 1, array, thumbnail)
        if array.nbytes > SMALL_IMAGE_BYTES:
            _measure([decoded], facts_list, shards, options)
        else:
            waiting.setdefault(array.shape, []).append(decoded)
    for group in waiting.values():
        _measure(group, facts_list, shards, options)
    return list(zip(facts_list, shards, strict=True))


def init_worker() -> None:
    import torch

    # Worker processes run side by side on the cores: one torch thread each.
    torch.set_num_threads(1)
    # A forked worker inherits the parent's SIGTERM handler (Prefect's flow engine installs
    # one); the pool stops its workers with SIGTERM, so they must die of it as by default.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def empty_facts() -> dict:
    return {
        "size_bytes": 0,
        "sha256": "",
        "format": "",
        "decode": "ok",
        "decodable": True,
        "error": "",
        "width": 0,
        "height": 0,
        "mode": "",
        "bit_depth": None,
        "has_alpha": None,
        "exif_orientation": None,
        "phash": None,
        "channel_mean": None,
        "channel_std": None,
        "constant": None,
    }


def _read_one(path: str, options: ReadOptions):
    """(facts, uint8 [H, W, channels] at the image's own size, 9x9 grey thumbnail), with
    None for both arrays when the file is unusable."""
    facts = empty_facts()
    try:
        data = _read_bytes(path)
    except OSError as exc:
        reason = f"{type(exc).__name__}: {exc.strerror or exc}"
        return _failed(facts, "unreadable", reason), None, None
    facts["size_bytes"] = len(data)
    facts["sha256"] = hashlib.sha256(data).hexdigest()
    facts["format"] = sniff_format(data)
    if not data:
        return _failed(facts, "empty_file", "the file is empty (0 bytes)"), None, None
    try:
        return _decode(data, facts, options)
    except Image.DecompressionBombError as exc:
        return _failed(facts, "too_many_pixels", str(exc)), None, None
    except Image.UnidentifiedImageError:
        if facts["format"]:
            reason = f"starts like a {facts['format']} file, but its header cannot be read"
            return _failed(facts, "undecodable", reason), None, None
        reason = f"the content is not a known image format (starts with {data[:8]!r})"
        return _failed(facts, "not_an_image", reason), None, None
    except Exception as exc:  # PIL raises many types for broken data; all mean "cannot decode"
        kind = "truncated" if _looks_truncated(exc) else "undecodable"
        return _failed(facts, kind, f"{type(exc).__name__}: {exc}"), None, None


def _failed(facts: dict, decode: str, error: str) -> dict:
    facts.update(decode=decode, decodable=False, error=error)
    return facts


def _read_bytes(path: str) -> bytes:
    # Only regular files: reading a FIFO or a device would block or never end.
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(0, "not a regular file")
    with open(path, "rb") as file:
        return file.read()


def sniff_format(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for sig, name in SIGNATURES.items() if data.startswith(sig)), "")


def _looks_truncated(exc: Exception) -> bool:
    text = str(exc).lower()
    return isinstance(exc, EOFError) or "truncated" in text or "end of file" in text


def _decode(data: bytes, facts: dict, options: ReadOptions):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check it ourselves
        image = Image.open(io.BytesIO(data))
    with image:
        facts["format"] = image.format or facts["format"]
        facts["width"], facts["height"] = image.size
        pixels = image.width * image.height
        if pixels > options.max_pixels:  # from the header: nothing decoded yet
            limit = f"{pixels:,} pixels is over prepare.max_pixels ({options.max_pixels:,})"
            reason = f"{image.width}x{image.height}: {limit}"
            return _failed(facts, "too_many_pixels", reason), None, None
        image.load()
        facts.update(
            mode=image.mode,
            bit_depth=bit_depth(image, data),
            has_alpha=image.mode in ALPHA_MODES or "transparency" in image.info,
            exif_orientation=orientation(image),
        )
        upright = ImageOps.exif_transpose(image) if facts["exif_orientation"] != 1 else image
        converted = to_channels(upright, options.channels, facts["bit_depth"])
        facts["width"], facts["height"] = converted.size
        array = np.asarray(converted).reshape(converted.height, converted.width, options.channels)
        return facts, array, thumbnail(converted)


def orientation(image: Image.Image) -> int:
    value = image.getexif().get(EXIF_ORIENTATION, 1)
    return value if value in range(1, 9) else 1  # exif_transpose ignores other values too


def bit_depth(image: Image.Image, data: bytes) -> int:
    if data[12:16] == b"IHDR":  # PNG: Pillow reads 16-bit RGB as 8-bit, the header knows
        return int(data[24])
    return BIT_DEPTH.get(image.mode, 8)


def to_channels(image: Image.Image, channels: int, bit_depth: int) -> Image.Image:
    """An L (channels 1) or RGB (3) image: palette expanded, alpha dropped, CMYK converted,
    16 bits scaled to 8."""
    if image.mode in SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        # Pillow's own I;16 -> L conversion clips at 255; scale the 16 bits down instead.
        values = np.asarray(image, dtype=np.float64)
        if bit_depth == 16 or image.mode in SIXTEEN_BIT_MODES:
            values = values / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    elif image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)  # drops alpha


def thumbnail(image: Image.Image) -> np.ndarray:
    """The 9x9 grey uint8 thumbnail the perceptual hash compares."""
    grey = image if image.mode == "L" else image.convert("L")
    side = HASH_SIZE + 1
    return np.asarray(grey.resize((side, side), Image.Resampling.BILINEAR))


def perceptual_hashes(thumbnails: np.ndarray) -> list[str]:
    """128-bit difference hashes (horizontal + vertical gradients) of uint8 [B, 9, 9]
    thumbnails, as 32 hex digits each. Re-encoded or resized copies differ by a few bits."""
    grey = thumbnails.astype(np.int16)
    horizontal = grey[:, :HASH_SIZE, 1:] > grey[:, :HASH_SIZE, :-1]
    vertical = grey[:, 1:, :HASH_SIZE] > grey[:, :-1, :HASH_SIZE]
    n = len(grey)
    bits = np.concatenate([horizontal.reshape(n, -1), vertical.reshape(n, -1)], axis=1)
    return [row.tobytes().hex() for row in np.packbits(bits, axis=1)]


def _measure(group: list, facts_list: list, shards: list, options: ReadOptions) -> None:
    """Statistics, hashes and shard pixels of a group of same-sized images, in one batch."""
    import torch  # here, not at the top: serving decodes with this module without torch

    from components.data.preprocess import resize_uint8

    batch = np.stack([array for _, array, _ in group])  # [B, H, W, C]
    planes = np.ascontiguousarray(batch.transpose(0, 3, 1, 2))  # [B, C, H, W]: fast to reduce
    stats = _pixel_stats(planes.reshape(len(group), options.channels, -1))
    hashes = perceptual_hashes(np.stack([thumb for _, _, thumb in group]))
    pixels = resize_uint8(torch.from_numpy(planes), options.image_size).numpy()
    for k, (index, _, _) in enumerate(group):
        facts_list[index].update(stats[k], phash=hashes[k])
        shards[index] = pixels[k]


def _pixel_stats(planes: np.ndarray) -> list[dict]:
    """Per image of uint8 [B, C, pixels]: channel mean and std (0-255), and whether constant.
    Sums go through int64 accumulators, not a widened copy of the pixels."""
    n = planes.shape[2]
    sums = planes.sum(axis=2, dtype=np.int64)
    squares = np.einsum("bcp,bcp->bc", planes, planes, dtype=np.int64)
    mean = sums / n
    std = np.sqrt(np.maximum(squares / n - mean**2, 0))
    constant = (planes.min(axis=2) == planes.max(axis=2)).all(axis=1)
    return [
        {"channel_mean": m, "channel_std": s, "constant": bool(c)}
        for m, s, c in zip(
            np.round(mean, 4).tolist(), np.round(std, 4).tolist(), constant, strict=True
        )
    ]
