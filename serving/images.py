"""Request bytes -> the uint8 array a lensflow model takes, within the service's limits.

The format is sniffed from the bytes (never the file name or the declared content type), the
pixel count is read from the header before anything is decoded, and the image is converted
to the model's channels at its own size: the exported model resizes and normalises inside.
Decoding mirrors components/imagefacts (EXIF rotation, palette and alpha, 16 bits scaled to
8) without importing torch, so the service starts in seconds.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps

SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}
SUPPORTED = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
EXIF_ORIENTATION = 0x0112
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class BadRequest(Exception):
    """A request the service refuses: an HTTP status (400, 413, 415) and one line saying why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def sniff(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for sig, name in SIGNATURES.items() if data.startswith(sig)), "")


def decode(data: bytes, channels: int, max_pixels: int, name: str = "image") -> np.ndarray:
    """uint8 [1, channels, height, width] of one encoded image, or BadRequest."""
    kind = sniff(data)
    if not kind:
        raise BadRequest(
            415,
            f"{name}: not a supported image format ({', '.join(SUPPORTED)}); "
            f"its bytes start with {data[:8]!r}",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below
            image = Image.open(io.BytesIO(data), formats=[kind])
    except Exception:  # PIL raises many types for a broken header
        reason = f"{name}: starts like a {kind} file, but its header cannot be read"
        raise BadRequest(400, reason) from None
    with image:
        if image.width * image.height > max_pixels:
            raise BadRequest(
                413,
                f"{name}: {image.width}x{image.height} is {image.width * image.height:,} "
                f"pixels, over serve.max_pixels ({max_pixels:,})",
            )
        try:
            image.load()
            if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
                image = ImageOps.exif_transpose(image)
            converted = to_channels(image, channels)
        except Exception as exc:  # truncated or corrupt data: PIL's types vary by format
            raise BadRequest(400, f"{name}: {kind} data cannot be decoded ({exc})") from None
    array = np.asarray(converted).reshape(converted.height, converted.width, channels)
    return np.ascontiguousarray(array.transpose(2, 0, 1))[None]


def to_channels(image: Image.Image, channels: int) -> Image.Image:
    """An L (channels 1) or RGB (3) image, as components/imagefacts.to_channels makes it."""
    if image.mode in SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode in SIXTEEN_BIT_MODES or values.max(initial=0) > 255:
            values = values / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    elif image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)


def multipart_files(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """(file name, bytes) of each file part of a multipart/form-data body (RFC 7578)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise BadRequest(400, "multipart/form-data without a boundary")
    delimiter = b"--" + match.group(1).encode("latin-1")
    parts = body.split(delimiter)
    if len(parts) < 3 or not parts[-1].startswith(b"--"):
        raise BadRequest(400, "the multipart body is cut short (no closing boundary)")
    files = []
    for part in parts[1:-1]:
        head, separator, content = part.partition(b"\r\n\r\n")
        if not separator:
            raise BadRequest(400, "a multipart part has no blank line after its headers")
        filename = re.search(rb'filename="([^"]*)"', head)
        if filename:
            files.append((filename.group(1).decode("utf-8", "replace"), content[:-2]))
    if not files:
        raise BadRequest(400, "the multipart body holds no file (send images as file fields)")
    return files
