"""Image bytes to pixels: the one decoder that preparing, training and serving share.

`decode_image` turns encoded PNG or JPEG bytes into uint8 [C, S, S] (transparent pixels
composited onto white paper, bilinear resize, optional inversion so that ink is high) and
`normalise` standardises a uint8 batch per channel. A converter checks each source file
with `check_image`, the store computes its normalisation with `decode_image`, training
decodes and normalises with them, and so does a served model: a model always sees the
pixels it was trained on.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from PIL.Image import DecompressionBombError

from fewshot.errors import DataError

# What PIL raises for bytes that are not a decodable image of a sane size.
IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, DecompressionBombError)


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
    checksums, `load` decodes the pixels, which a PNG with valid checksums can still fail."""
    try:
        with open_image(data) as image:
            image.verify()
        with open_image(data) as image:
            image.load()
    except IMAGE_ERRORS as exc:
        reason = str(exc)[:200] or type(exc).__name__
        raise DataError(f"{where}: not a readable image ({reason}); remove or replace it") from None


def decode_image(data: bytes, size: int, channels: int, invert: bool) -> np.ndarray:
    """Encoded bytes -> uint8 [C, size, size] (antialiased resize)."""
    with open_image(data) as image:
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            # Transparent pixels are paper: composite onto white before dropping alpha.
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
        image = image.convert("L" if channels == 1 else "RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
    if invert:
        array = 255 - array
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float, standardised per channel. Training (the sampler) and
    serving (the pyfunc) both call this, so a model always sees what it was trained on."""
    mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean) / std
