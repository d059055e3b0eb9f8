"""Reading a source image at ingest: a complete decode that fails on damage, and the image
normalised so that every later reader (PIL or nvjpeg) sees it as it is meant to look.

- **Damage.** A PNG's chunk checksums are verified, then it is decoded. A JPEG's markers
  are walked (a marker that cannot be inside a scan, restarts out of order), then it is
  decoded without the last :data:`SCAN_TAIL` bytes of its scan, which must fail for want
  of them: bytes overwritten inside a scan often make libjpeg finish it early, with only a
  warning that Pillow does not report (the rest of the image is garbage, not an error).
  Not caught: damage that makes the decoder run past the scan's end (it pads with zeros,
  and Pillow cannot tell), and damage inside one restart interval, or in any but the last
  scan of a progressive JPEG, that leaves the markers intact.
- **Orientation.** An EXIF Orientation other than 1 is applied (``ImageOps.exif_transpose``)
  and the image re-encoded without it: sizes, boxes and masks refer to the image as shown.
- **Bit depth.** 16-bit greyscale (Pillow modes ``I;16*``, ``I``) is scaled to 8 bit
  (``v * 255 / 65535``) and re-encoded as an 8-bit PNG; 16-bit RGB(A) Pillow already
  reads as 8 bit.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

PIL_FORMATS = {"JPEG": "jpg", "PNG": "png"}
HIGH_BIT_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I")
ORIENTATION_TAG = 0x0112
ORIENTED = range(2, 9)  # EXIF orientations that need a transpose (1: as stored)
JPEG_QUALITY = 95  # of an image re-encoded to apply its orientation
SCAN_TAIL = 16  # bytes cut off the end of a JPEG's scan: a sound scan cannot decode without them
TRUNCATED = "image file is truncated"  # how Pillow says that the decoder wanted more bytes

# a marker inside entropy-coded data: 0xFF not followed by a stuffed 0x00 or a restart marker
_SCAN_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")
_RESTART = re.compile(rb"\xff[\xd0-\xd7]")
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # markers without a length field


@dataclass(frozen=True)
class SourceImage:
    """A validated image: its format, its size as shown, the bytes to store and, when these
    are not the file's own bytes, what was normalised."""

    format: str  # "jpg" or "png", from the content
    width: int
    height: int
    data: bytes
    normalised: str | None = None


def _last_scan(data: bytes) -> tuple[int, int]:
    """Where a JPEG's last scan's entropy-coded data starts and ends (at the EOI marker);
    ValueError naming the first structural damage (an impossible marker inside a scan,
    restarts out of order)."""
    i, start = 2, 0
    while True:
        if i + 1 >= len(data) or data[i] != 0xFF:
            raise ValueError(
                f"JPEG data damaged: no marker at byte {i}, where the previous segment ends"
            )
        while i + 1 < len(data) and data[i + 1] == 0xFF:  # fill bytes
            i += 1
        marker = data[i + 1]
        if marker == 0xD9:
            return start, i
        if marker in _STANDALONE:
            i += 2
            continue
        end = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if marker != 0xDA:
            i = end
            continue
        start = end
        found = _SCAN_MARKER.search(data, end)
        if found is None:
            raise ValueError("JPEG data damaged: the scan has no end marker (truncated)")
        i = found.start()
        for k, restart in enumerate(_RESTART.finditer(data, end, i)):
            if data[restart.start() + 1] - 0xD0 != k % 8:
                raise ValueError(
                    f"JPEG data damaged: restart markers out of order at byte {restart.start()}"
                )
        following = data[i + 1]
        if following < 0xC0 or following == 0xD8 or 0xF0 <= following <= 0xFD:
            raise ValueError(
                f"JPEG data damaged: marker 0xFF{following:02X} inside the scan at byte {i}"
            )


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
    """Decode a JPEG completely; ValueError if its scan data is damaged (see the module)."""
    start, end = _last_scan(data)
    cut = min(SCAN_TAIL, (end - start) // 2)  # 0: a scan of a byte or two, nothing to cut
    with _open(data[: end - cut] if cut else data) as image:
        header = _header(image)
        # DCT scaling: every coded byte is still decoded (damage is still caught), but the
        # inverse transform runs at 1/8 size, which makes validation cheap.
        image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
        try:
            image.load()
        except OSError as err:
            if cut and str(err).startswith(TRUNCATED):
                return header  # the decoder needs the bytes cut off, and decoded the others
            raise
    if not cut:
        return header
    raise ValueError(
        f"JPEG data damaged: the decoder finished the image {cut}+ bytes before the end of "
        "its scan, so bytes inside the scan were overwritten"
    )


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


def read_image(data: bytes) -> SourceImage:
    """Decode ``data`` completely and normalise it (see the module); ValueError if damaged."""
    header = _check_jpeg(data) if data[:2] == b"\xff\xd8" else _check_png(data)
    if header.mode not in HIGH_BIT_DEPTH and header.orientation not in ORIENTED:
        return SourceImage(header.format, header.width, header.height, data)
    image, what = _normalised(data, header.orientation)
    stored = _encode(image, header.format)
    return SourceImage(header.format, image.width, image.height, stored, what)
