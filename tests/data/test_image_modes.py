"""Every image mode a user may feed decodes to the pixels of its 8-bit twin: the same
drawing saved as 16-bit, 32-bit or float grey, with alpha or a transparent palette entry,
or as CMYK. Pillow's own conversion clips 16-bit grey to white; preparing, training and
`fewshot predict` all decode through `decode_image`, so all three get the twin's pixels."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot.data.decode import check_image, decode_image
from fewshot.data.reader import load_split
from fewshot.data.sources import folder
from fewshot.data.store import read_manifest
from fewshot.errors import DataError
from fewshot.registry.preprocess import Preprocessing

SIZE = 24
PAPER = 255


def grey_drawing(shift: int = 0) -> np.ndarray:
    """Strokes of several greys, black included, on white paper."""
    pixels = np.full((SIZE, SIZE), PAPER, np.uint8)
    pixels[3:21, 5:8] = 0
    pixels[10:13, 2:22] = 60 + shift
    pixels[15:19, (11 + shift) : 20] = 171
    pixels[4:7, 14:22] = 254
    return pixels


# A palette drawing: index 0 is the paper, the others are inks.
PALETTE = [(255, 255, 255), (0, 0, 0), (200, 30, 40), (20, 90, 210), (250, 240, 10)]


def palette_indices() -> np.ndarray:
    indices = np.zeros((SIZE, SIZE), np.uint8)
    indices[3:21, 5:8] = 1
    indices[10:13, 2:22] = 2
    indices[15:19, 11:20] = 3
    indices[4:7, 14:22] = 4
    return indices


def colour_drawing() -> np.ndarray:
    return np.array(PALETTE, np.uint8)[palette_indices()]


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def ink(pixels: np.ndarray) -> np.ndarray:
    """Alpha that hides the paper and shows the ink."""
    paper = pixels == PAPER if pixels.ndim == 2 else (pixels == PAPER).all(axis=-1)
    return np.where(paper, 0, 255).astype(np.uint8)


def sixteen_bit(pixels: np.ndarray, dtype: str) -> np.ndarray:
    return pixels.astype(dtype) * 257


def paletted(transparent_paper: bool) -> Image.Image:
    """The colour drawing as a palette image; with `transparent_paper` the paper's entry is
    black and transparent, so only compositing onto white makes it paper."""
    colours = [(0, 0, 0), *PALETTE[1:]] if transparent_paper else PALETTE
    image = Image.fromarray(palette_indices(), "P")
    image.putpalette([c for colour in colours for c in colour])
    return image


def twin(mode: str) -> tuple[bytes, np.ndarray]:
    """(The drawing saved in `mode`, in a format that holds it, the 8-bit drawing)."""
    grey, colour = grey_drawing(), colour_drawing()
    if mode == "I;16":  # a 16-bit grey PNG, what the users fed
        return encoded(Image.fromarray(sixteen_bit(grey, "<u2"))), grey
    if mode == "I;16 transparent":  # 16-bit grey PNG whose paper is a transparent value
        values = np.where(grey == PAPER, 12345, sixteen_bit(grey, "<u2")).astype("<u2")
        return encoded(Image.fromarray(values), transparency=12345), grey
    if mode == "I;16B":
        raw = sixteen_bit(grey, ">u2").tobytes()
        return encoded(Image.frombytes("I;16B", grey.shape[::-1], raw), "TIFF"), grey
    if mode == "I":
        return encoded(Image.fromarray(sixteen_bit(grey, "<i4")), "TIFF"), grey
    if mode == "F [0, 1]":
        return encoded(Image.fromarray(grey.astype(np.float32) / 255), "TIFF"), grey
    if mode == "F [0, 255]":
        return encoded(Image.fromarray(grey.astype(np.float32)), "TIFF"), grey
    if mode == "LA":  # black under the transparent paper
        shown = np.where(grey == PAPER, 0, grey).astype(np.uint8)
        return encoded(Image.fromarray(np.stack([shown, ink(grey)], -1), "LA")), grey
    if mode == "RGBA":
        shown = np.where(ink(colour)[..., None] == 0, 0, colour).astype(np.uint8)
        return encoded(Image.fromarray(np.dstack([shown, ink(colour)]), "RGBA")), colour
    if mode == "P transparent":
        return encoded(paletted(True), transparency=0), colour
    if mode == "PA":
        image = paletted(True)
        image = Image.merge("PA", (image, Image.fromarray(ink(colour))))
        image.putpalette(paletted(True).getpalette())
        return encoded(image, "TIFF"), colour
    if mode == "CMYK":
        return encoded(Image.fromarray(colour).convert("CMYK"), "TIFF"), colour
    raise AssertionError(mode)


MODES = {
    "I;16": "I;16",
    "I;16 transparent": "I;16",
    "I;16B": "I;16B",
    "I": "I",
    "F [0, 1]": "F",
    "F [0, 255]": "F",
    "LA": "LA",
    "RGBA": "RGBA",
    "P transparent": "P",
    "PA": "PA",
    "CMYK": "CMYK",
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_mode_decodes_to_the_pixels_of_its_8_bit_twin(mode, channels):
    data, pixels = twin(mode)
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == MODES[mode]  # the file exercises the mode it is named after
    eight_bit = encoded(Image.fromarray(pixels))
    for size in (SIZE, 16):  # as stored, and resized
        expected = decode_image(eight_bit, size, channels, invert=True)
        np.testing.assert_array_equal(decode_image(data, size, channels, True), expected)
    if channels == 1 and pixels.ndim == 2:  # and the twin is the drawing itself, inverted
        np.testing.assert_array_equal(decode_image(data, SIZE, 1, False)[0], pixels)


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (Image.fromarray(np.full((4, 4), 70000, np.int32)), "integer pixels from 70000 to 70000"),
        (Image.fromarray(np.full((4, 4), -1, np.int32)), "integer pixels from -1 to -1"),
        (Image.fromarray(np.full((4, 4), 300, np.float32)), "float pixels from 300 to 300"),
        (Image.fromarray(np.full((4, 4), np.nan, np.float32)), "float pixels that are not finite"),
    ],
)
def test_pixels_that_no_bit_depth_explains_are_refused_in_one_line(image, reason):
    with pytest.raises(DataError) as err:
        check_image(encoded(image, "TIFF"), "odd.tif")
    message = str(err.value)
    assert message.startswith(f"odd.tif: not a readable image ({reason}")
    assert message.endswith("remove or replace it") and "\n" not in message
    with pytest.raises(ValueError, match="save it as 8- or 16-bit|not finite"):
        decode_image(encoded(image, "TIFF"), SIZE, 1, True)


def class_tree(root: Path, save) -> Path:
    """ROOT/class_c/i.* of 3 classes of 2 drawings, each written by `save(pixels, path)`."""
    for c in range(3):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(2):
            save(grey_drawing(shift=3 * c + i), root / f"class_{c}" / f"{i}")
    return root


SAVERS = {
    "8-bit PNG": lambda p, path: Image.fromarray(p).save(path.with_suffix(".png")),
    "16-bit PNG": lambda p, path: Image.fromarray(sixteen_bit(p, "<u2")).save(
        path.with_suffix(".png")
    ),
    # TIFFs are re-encoded to PNG by the converter, which cannot hold these modes.
    "float TIFF": lambda p, path: Image.fromarray(p.astype(np.float32) / 255).save(
        path.with_suffix(".tif")
    ),
    "CMYK TIFF": lambda p, path: Image.fromarray(p).convert("CMYK").save(path.with_suffix(".tif")),
}


@pytest.mark.parametrize("kind", ["16-bit PNG", "float TIFF", "CMYK TIFF"])
def test_a_folder_of_wide_images_prepares_the_store_of_its_8_bit_twin(tmp_path, kind):
    stores = {}
    for name in ("8-bit PNG", kind):
        tree = class_tree(tmp_path / name, SAVERS[name])
        stores[name] = tmp_path / f"{name} store"
        folder.prepare(tree, stores[name], ratios=(1.0,), channels=1)
    twin_store, store = stores["8-bit PNG"], stores[kind]
    assert read_manifest(store)["normalisation"] == read_manifest(twin_store)["normalisation"]
    images = load_split(store, "train", SIZE, "memory").images
    assert torch.equal(images, load_split(twin_store, "train", SIZE, "memory").images)
    white = (images == 255).float().mean()  # paper: 70% of each drawing, not 99% of it
    assert 0.6 < white < 0.8


@pytest.mark.parametrize("channels", [1, 3])
def test_predict_decodes_16_bit_queries_as_their_8_bit_twins(channels):
    preprocessing = Preprocessing(SIZE, channels, True, (0.1,) * channels, (0.3,) * channels)
    drawings = [grey_drawing(shift) for shift in range(3)]
    wide = [encoded(Image.fromarray(sixteen_bit(d, "<u2"))) for d in drawings]
    narrow = [encoded(Image.fromarray(d)) for d in drawings]
    queries = preprocessing.tensor(wide, "query_images")
    assert torch.equal(queries, preprocessing.tensor(narrow, "query_images"))
    assert not torch.equal(queries[0], queries[1])  # not the same blank page
