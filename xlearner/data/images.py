"""Reading a source image at ingest: a complete decode that fails on damage, and the image
normalised so that every later reader (PIL or nvjpeg) sees it as it is meant to look.

- **Damage.** A PNG's chunk checksums are verified, then it is decoded. A JPEG is
  decoded by libjpeg-turbo (``simplejpeg``, strict) with its "Corrupt JPEG data"
  warnings (premature end of a data segment, a bad Huffman code, extraneous bytes before
  a marker, restart markers out of order) raised as errors: Pillow decodes with the same
  library but drops those warnings, so bytes overwritten inside a scan decoded as a
  picture, most often in smooth images, where the decoder runs past the damaged data and
  pads the rest. Every coded byte is decoded; the inverse DCT runs at 1/8 size, which
  makes the check cheap. Not caught, by any decoder: damage that leaves a valid coded
  stream (a few bytes whose Huffman codes happen to resynchronise before the end of their
  restart interval or scan): the file is then a valid JPEG of a slightly different picture.
- **Orientation.** An EXIF Orientation other than 1 is applied (``ImageOps.exif_transpose``)
  and the image re-encoded without it: sizes, boxes and masks refer to the image as shown.
- **Bit depth.** 16-bit greyscale (Pillow modes ``I;16*``, ``I``) is scaled to 8 bit
  (``v * 255 / 65535``) and re-encoded as an 8-bit PNG; 16-bit RGB(A) Pillow already
  reads as 8 bit.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

PIL_FORMATS = {"JPEG": "jpg", "PNG": "png"}
HIGH_BIT_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I")
ORIENTATION_TAG = 0x0112
ORIENTED = range(2, 9)  # EXIF orientations that need a transpose (1: as stored)
JPEG_QUALITY = 95  # of an image re-encoded to apply its orientation
IMAGE_CHECKS = 2  # the version of these checks; 2: JPEGs decoded with libjpeg's warnings as errors


@dataclass(frozen=True)
class SourceImage:
    """A validated image: its format, its size as shown, the bytes to store and, when these
    are not the file's own bytes, what was normalised."""

    format: str  # "jpg" or "png", from the content
    width: int
    height: int
    data: bytes
    normalised: str | None = None


@dataclass(frozen=True)
class _Header:
    format: str
    width: int
    height: int
    mode: str
    orientation: int


def _open(data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ValueError("not an image file PIL can identify") from None
    if image.format not in PIL_FORMATS:
        image.close()
        raise ValueError(f"is {image.format}, not JPEG or PNG")
    return image


def _header(image: Image.Image) -> _Header:
    orientation = image.getexif().get(ORIENTATION_TAG, 1)
    return _Header(PIL_FORMATS[image.format], image.width, image.height, image.mode, orientation)


def _check_jpeg(data: bytes) -> _Header:
    """Decode a JPEG completely; ValueError if its coded data is damaged (see the module)."""
    with _open(data) as image:
        header = _header(image)
    try:  # min_height/min_width 1: the smallest DCT scaling, 1/8
        simplejpeg.decode_jpeg(data, strict=True, min_height=1, min_width=1)
    except ValueError as err:
        raise ValueError(f"JPEG data damaged: {err}") from None
    return header


def _check_png(data: bytes) -> _Header:
    with _open(data) as probe:
        probe.verify()  # every chunk's CRC (a PNG decode does not check them)
    with _open(data) as image:
        image.load()
        return _header(image)


def _encode(image: Image.Image, image_format: str) -> bytes:
    out = io.BytesIO()
    if image_format == "jpg":
        image.save(out, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(out, format="PNG")
    return out.getvalue()


def _normalised(data: bytes, orientation: int) -> tuple[Image.Image, str]:
    """The image as it is stored (oriented, 8 bit) and what changed."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        changes = []
        if orientation in ORIENTED:  # first: the converted copy below has no EXIF
            image = ImageOps.exif_transpose(image)
            changes.append(f"EXIF orientation {orientation} applied")
        if image.mode in HIGH_BIT_DEPTH:
            values = np.asarray(image, dtype=np.int64).clip(0, 65535)
            image = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")
            changes.append("16-bit scaled to 8 bit")
        return image, ", ".join(changes)


def read_image(data: bytes, validated: bool = False) -> SourceImage:
    """Decode ``data`` completely and normalise it (see the module); ValueError if damaged.

    ``validated``: these bytes passed the same checks (:data:`IMAGE_CHECKS`) before, as
    their recorded sha256 shows, so only the header is read (and the image normalised).
    """
    if validated:
        with _open(data) as image:
            header = _header(image)
    else:
        header = _check_jpeg(data) if data[:2] == b"\xff\xd8" else _check_png(data)
    if header.mode not in HIGH_BIT_DEPTH and header.orientation not in ORIENTED:
        return SourceImage(header.format, header.width, header.height, data)
    image, what = _normalised(data, header.orientation)
    stored = _encode(image, header.format)
    return SourceImage(header.format, image.width, image.height, stored, what)
