"""Request bytes -> the uint8 array a lensflow model takes, within the service's limits.

The format is sniffed from the bytes (never the file name or the declared content type), the
pixel count is read from the header before anything is decoded, and the image is converted
to the model's channels at its own size: the exported model resizes and normalises inside.
Decoding is components/imagefacts' (EXIF rotation, palette and alpha, 16 bits scaled to 8), as
the training images were decoded; that module imports torch only where prepare resizes, so the
service starts in seconds.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps

from components.data import imagefacts

SUPPORTED = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
# open_image checks serve.max_pixels itself, from the header; Pillow's warning (at 89 M pixels)
# would only add noise. Set once here: a catch_warnings() per image costs more than the check.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class BadRequest(Exception):
    """A request the service refuses: an HTTP status (400, 413, 415, ...), one line saying
    why, and any headers the answer needs (Retry-After)."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def decode(data: bytes, channels: int, max_pixels: int, name: str = "image") -> np.ndarray:
    """uint8 [1, channels, height, width] of one encoded image, or BadRequest."""
    return to_array(open_image(data, max_pixels, name), data, channels, name)


def open_image(data: bytes, max_pixels: int, name: str = "image") -> Image.Image:
    """The image with only its header read: its size is known, nothing is decoded yet."""
    kind = imagefacts.sniff_format(data)
    if not kind:
        raise BadRequest(
            415,
            f"{name}: not a supported image format ({', '.join(SUPPORTED)}); "
            f"its bytes start with {data[:8]!r}",
        )
    try:
        image = Image.open(io.BytesIO(data), formats=[kind])
    except Image.DecompressionBombError as exc:  # Pillow's own limit, far above ours
        raise BadRequest(413, f"{name}: {exc} (serve.max_pixels {max_pixels:,})") from None
    except Exception:  # PIL raises many types for a broken header
        reason = f"{name}: starts like a {kind} file, but its header cannot be read"
        raise BadRequest(400, reason) from None
    if image.width * image.height > max_pixels:
        image.close()
        raise BadRequest(
            413,
            f"{name}: {image.width}x{image.height} is {image.width * image.height:,} "
            f"pixels, over serve.max_pixels ({max_pixels:,})",
        )
    return image


def to_array(image: Image.Image, data: bytes, channels: int, name: str) -> np.ndarray:
    """Decode an opened image (and close it) to uint8 [1, channels, height, width]."""
    with image:
        try:
            image.load()
            if imagefacts.orientation(image) != 1:
                image = ImageOps.exif_transpose(image)
            converted = imagefacts.to_channels(image, channels, imagefacts.bit_depth(image, data))
        except Exception as exc:  # truncated or corrupt data: PIL's types vary by format
            kind = image.format or "image"
            raise BadRequest(400, f"{name}: {kind} data cannot be decoded ({exc})") from None
    array = np.asarray(converted).reshape(converted.height, converted.width, channels)
    return np.ascontiguousarray(array.transpose(2, 0, 1))[None]


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
