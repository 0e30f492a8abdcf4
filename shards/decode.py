"""Image decoding and its limits: every encoded image a worker, the service or a trainer reads goes
through `decode_image` (or `image_header`, when the pixels are decoded elsewhere, e.g. on a GPU).

Limits are checked from the header, before any pixel is decoded: more than MAX_PIXELS pixels (a
decompression bomb; Pillow's own limit, left as Pillow sets it, only warns below twice its value)
or more pixels than the file's bytes can hold for its format (a truncated or forged file). Every
failure is a ValueError with our message: Pillow's texts can name heap addresses.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator

from PIL import Image

# Larger than any real training image; checked before decoding.
MAX_PIXELS = 64_000_000

# The most pixels a real image of a format can hold per byte of file: a flat 8000x8000 JPEG has 64
# a byte (each 8x8 block takes some bits), zlib compresses at most 1032:1, so a PNG of 1 bit a
# pixel has at most 8,256 a byte (24-bit RGB: 344). A header that claims more is a truncated or
# forged file whose decode would allocate the whole canvas for nothing.
MAX_PIXELS_PER_BYTE = {"JPEG": 2000, "PNG": 10000}


class ImpossibleHeader(ValueError):
    """An image header that claims more pixels than the file's bytes can hold."""


def check_header(im: Image.Image, size: int) -> None:
    """Refuse, from the header alone, what `decode_image` must not decode: more than MAX_PIXELS
    pixels, or (JPEG, PNG) far fewer bytes than any image of that size takes."""
    pixels = im.width * im.height
    if pixels > MAX_PIXELS:
        raise Image.DecompressionBombError(f"{im.width}x{im.height}")
    density = MAX_PIXELS_PER_BYTE.get(im.format or "")
    if density and pixels > density * size:
        raise ImpossibleHeader(
            f"{im.format} of {size} bytes cannot hold the {im.width}x{im.height} pixels its header claims "
            "(truncated or forged)"
        )


@contextlib.contextmanager
def _checked_image(data: bytes, failing: str) -> Iterator[Image.Image]:
    """The opened image, its header read and checked (`check_header`); Pillow's many error types,
    raised here or in the caller's block, become ValueErrors with our message (`failing` names
    what failed otherwise). Pillow's own texts can name heap addresses: never passed on."""
    try:
        with warnings.catch_warnings():  # Pillow warns of a bomb it would still decode; we refuse it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # reads the header only
        with im:
            check_header(im, len(data))
            yield im
    except Image.DecompressionBombError as e:
        raise ValueError(f"image too large: more than {MAX_PIXELS:,} pixels") from e
    except Image.UnidentifiedImageError as e:
        raise ValueError("cannot identify the image format") from e
    except ImpossibleHeader:
        raise
    except Exception as e:  # PIL raises several types for bad data
        raise ValueError(f"{failing}: {type(e).__name__}: {e}") from e


def image_header(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone; ValueError for what `decode_image` would refuse
    before decoding (unidentifiable, too many pixels, more pixels than the bytes can hold)."""
    with _checked_image(data, "cannot read the image header") as im:
        return im.size


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes to RGB; raises ValueError for anything undecodable, larger than
    MAX_PIXELS, or whose header claims far more pixels than its bytes can hold (`check_header`)."""
    with _checked_image(data, "cannot decode image") as im:
        im.load()
        return im.convert("RGB")
