"""Image bytes to pixels: the one decoder that preparing, training and serving share.

`decode_image` turns encoded image bytes into uint8 [C, S, S] (wide modes scaled to 8
bits, transparent pixels composited onto white paper, bilinear resize, optional inversion
so that ink is high) and `normalise` standardises a uint8 batch per channel. A converter
checks each source file with `check_image`, the store computes its normalisation with
`decode_image`, training decodes and normalises with them, and so does a served model: a
model always sees the pixels it was trained on. A served model decodes all of a request's
images at once (`picture` each, then `resize_all`), the pixels `decode_image` gives each.

Pillow's own conversion to 8 bits clips (a 16-bit white, 65535, and a 16-bit mid-grey
both become 255), so `eight_bit` scales the modes wider than 8 bits first:
- I;16, I;16B, I;16L, I;16N (16-bit grey): round(v / 257), so 65535 -> 255, 257 * p -> p.
- I (32-bit integer grey: 32-bit TIFFs, int32 arrays, 16-bit PNGs in older Pillows):
  read as 16-bit, like I;16, so a file decodes alike in every Pillow; values outside
  0..65535 are refused.
- F (32-bit float grey): values in [0, 1] are scaled by 255, values in [0, 255] are taken
  as they are (so an image whose brightest pixel is at most 1 reads as [0, 1]); negative,
  larger or non-finite values are refused.
Alpha (LA, PA, RGBA, RGBa, a palette or grey with a transparent entry) is composited
onto white: the datasets draw dark ink on white paper, so a transparent pixel is paper.
CMYK, YCbCr, LAB and HSV become RGB. A grey dataset then takes Pillow's luma of RGB, an
RGB one repeats grey into the three channels.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from PIL.Image import DecompressionBombError

from fewshot.errors import DataError

# What PIL raises for bytes that are not a decodable image of a sane size (and `eight_bit`
# for pixel values that no bit depth explains: a ValueError).
IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, DecompressionBombError)
# The modes with more than 8 bits per pixel, all grey (Pillow has no wide colour mode).
WIDE = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
# The 8-bit modes a PNG holds as they are; any other mode is converted to RGB(A).
PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")
# Bytes of one encoded image per pixel of the pixel limit: uncompressed 16-bit RGBA, the
# widest pixel a PNG holds. More bytes than that is not an image within the limit.
BYTES_PER_PIXEL = 8
READ_CHUNK = 2**20
# `resize_all`: the largest picture that joins a stack (above it the Pillow calls that
# stacking saves, about 10 microseconds a picture, are a tenth or less of the resize
# itself), and the most pixels of pictures waiting for one (16 MB in RGB, which Pillow
# holds in 4 bytes a pixel).
STACKED_PICTURE_PIXELS = 256 * 256
STACK_PIXELS = 2**22


def max_image_bytes() -> int | None:
    """The most bytes one encoded image may take: BYTES_PER_PIXEL per pixel of
    Image.MAX_IMAGE_PIXELS (max_pixels, lowered by a server); None when that is off."""
    return BYTES_PER_PIXEL * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None


def check_size(size: int, where: str, at_least: bool = False) -> None:
    """Refuse an encoded image of `size` bytes (`at_least`: of which `size` are read so far)
    over `max_image_bytes`."""
    limit = max_image_bytes()
    if limit is not None and size > limit:
        raise DataError(
            f"{where}: {size}{' or more' if at_least else ''} bytes, over the limit of {limit} "
            f"bytes for one image (max_pixels {Image.MAX_IMAGE_PIXELS} x {BYTES_PER_PIXEL} "
            "bytes); remove or replace it"
        )


def read_limited(stream: BinaryIO, where: str) -> bytes:
    """An encoded image from `stream`, read a chunk at a time and refused once past
    `max_image_bytes`. One read of n bytes of a zip member inflates up to n bytes whatever
    size its header declares, so the member is never asked for more than a chunk."""
    chunks, size = [], 0
    while chunk := stream.read(READ_CHUNK):
        chunks.append(chunk)
        size += len(chunk)
        check_size(size, where, at_least=True)
    return b"".join(chunks)


def open_image(data: bytes) -> Image.Image:
    """PIL's lazy open (header only), refusing more pixels than Image.MAX_IMAGE_PIXELS: PIL
    itself only warns below twice that, and the pixels would be decoded. A server lowers
    the limit to its own setting (serve/limits.py)."""
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        image.close()
        raise DecompressionBombError(
            f"{width}x{height} pixels, over the limit of {Image.MAX_IMAGE_PIXELS} (max_pixels)"
        )
    return image


def check_image(data: bytes, where: str) -> None:
    """Refuse bytes that PIL cannot decode, naming the file: `verify` checks the chunks'
    checksums, `load` decodes the pixels, which a PNG with valid checksums can still fail,
    and `eight_bit` refuses wide pixel values that no bit depth explains."""
    try:
        with open_image(data) as image:
            image.verify()
        with open_image(data) as image:
            image.load()
            eight_bit(image)
    except IMAGE_ERRORS as exc:
        reason = str(exc)[:200] or type(exc).__name__
        raise DataError(f"{where}: not a readable image ({reason}); remove or replace it") from None


def eight_bit(image: Image.Image) -> Image.Image:
    """`image` in one of PNG_MODES, the same picture: wide grey scaled to 8 bits by the
    rules of the module's docstring, other modes converted to RGB, or RGBA if they have
    alpha. Decoding starts from it, and a converter stores it for a format it re-encodes."""
    if image.mode in WIDE:
        return _wide_to_eight_bit(image)
    if image.mode in PNG_MODES:
        return image
    return image.convert("RGBA" if image.mode.upper().endswith("A") else "RGB")


def _wide_to_eight_bit(image: Image.Image) -> Image.Image:
    values = np.asarray(image)
    if image.mode == "F":
        if not np.isfinite(values).all():
            raise ValueError("float pixels that are not finite (NaN or infinity)")
        low, high = float(values.min()), float(values.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"float pixels from {low:g} to {high:g}, outside [0, 1] and [0, 255]; "
                "save it as 8- or 16-bit"
            )
        scaled = np.rint(values * 255 if high <= 1 else values)
    else:
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise ValueError(
                f"integer pixels from {low} to {high}, outside 16 bits (0..65535); "
                "save it as 8- or 16-bit"
            )
        scaled = (values.astype(np.uint32) + 128) // 257  # round(v / 257), exactly
    grey = Image.fromarray(scaled.astype(np.uint8))
    transparent = image.info.get("transparency")  # a 16-bit grey PNG's tRNS value
    if not isinstance(transparent, int):
        return grey
    alpha = np.where(values == transparent, 0, 255).astype(np.uint8)
    return Image.merge("LA", (grey, Image.fromarray(alpha)))


def picture(data: bytes, channels: int) -> Image.Image:
    """Encoded bytes -> the picture, decoded, at its own size: L for a grey dataset
    (`channels` 1), else RGB, transparent pixels on white paper."""
    with open_image(data) as image:
        image = eight_bit(image)
        if image.mode in ("RGBA", "LA") or "transparency" in image.info:
            # Transparent pixels are paper: composite onto white before dropping alpha.
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
        return image.convert("L" if channels == 1 else "RGB")


def resized(image: Image.Image, size: int) -> Image.Image:
    """`image` at size x size (bilinear, antialiased when shrinking)."""
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.BILINEAR)


def channels_first(pixels: np.ndarray, invert: bool) -> np.ndarray:
    """uint8 [B, S, S] (L) or [B, S, S, 3] (RGB) -> uint8 [B, C, S, S], inverted (ink
    high) with `invert`."""
    if invert:
        pixels = 255 - pixels
    return pixels[:, None] if pixels.ndim == 3 else pixels.transpose(0, 3, 1, 2)


def decode_image(data: bytes, size: int, channels: int, invert: bool) -> np.ndarray:
    """Encoded bytes -> uint8 [C, size, size] (antialiased resize)."""
    pixels = np.asarray(resized(picture(data, channels), size), dtype=np.uint8)
    return channels_first(pixels[None], invert)[0]


def resize_all(pictures: Iterable[Image.Image], size: int) -> np.ndarray:
    """`picture`s, all L or all RGB -> uint8 [B, size, size] or [B, size, size, 3], each
    exactly as `resized` gives it, with less than a Pillow call per picture.

    Pillow resizes in two passes, rows first: a pixel of the first pass is a weighted sum
    along one row of the picture, rounded to 8 bits, a pixel of the second a weighted sum
    along one column of the first pass's result, with weights that depend only on the
    picture's width (first pass) or height (second pass). So the rows of pictures of one
    size stacked top to bottom take the first pass in one call, and those results laid
    side by side take the second in one call: the same sums, in two calls for all
    (`stacked_resize`). A picture larger than STACKED_PICTURE_PIXELS is resized alone, and
    the pictures that wait for a stack hold at most STACK_PIXELS, so a request's memory
    stays that of one large picture at a time."""
    out: list[np.ndarray | None] = []
    waiting: dict[tuple[int, int], list[tuple[int, Image.Image]]] = {}  # by picture size
    held = 0

    def resize_waiting() -> None:
        for group in waiting.values():
            arrays = stacked_resize([image for _, image in group], size)
            for (i, _), array in zip(group, arrays, strict=True):
                out[i] = array
        waiting.clear()

    for i, image in enumerate(pictures):
        pixels = image.width * image.height
        if image.size == (size, size) or pixels > STACKED_PICTURE_PIXELS:
            out.append(np.asarray(resized(image, size), dtype=np.uint8))
            continue
        if held + pixels > STACK_PIXELS:
            resize_waiting()
            held = 0
        out.append(None)
        waiting.setdefault(image.size, []).append((i, image))
        held += pixels
    resize_waiting()
    return np.stack(out)


def stacked_resize(images: list[Image.Image], size: int) -> np.ndarray:
    """Pictures of one mode and size -> uint8 [B, size, size(, 3)], each resized to
    size x size by Pillow's two passes (`resize_all`): one call for the rows of all,
    stacked top to bottom, one for the columns of all, side by side."""
    (width, height), count = images[0].size, len(images)
    tall = Image.new(images[0].mode, (width, count * height))
    for k, image in enumerate(images):
        tall.paste(image, (0, k * height))
    rows = np.asarray(tall.resize((size, count * height), Image.Resampling.BILINEAR))
    colour = rows.shape[2:]  # (3,) for RGB, () for L
    wide = rows.reshape(count, height, size, *colour).swapaxes(0, 1)
    wide = Image.fromarray(np.ascontiguousarray(wide.reshape(height, count * size, *colour)))
    both = np.asarray(wide.resize((count * size, size), Image.Resampling.BILINEAR))
    return both.reshape(size, count, size, *colour).swapaxes(0, 1)


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float, standardised per channel. Training (the sampler) and
    serving (the pyfunc) both call this, so a model always sees what it was trained on."""
    mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean) / std
