"""A request's images decoded together (`Preprocessing.tensor`: Pillow's two resize
passes over stacks of pictures, data/decode.py `resize_all`) give, pixel for pixel, what
decoding each alone gives (`decode_image`, as training decoded its dataset), whatever
their modes and sizes; a bad image among them is named by its index."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot.data import decode
from fewshot.data.decode import decode_image, normalise
from fewshot.errors import RequestError
from fewshot.registry.preprocess import Preprocessing

SIZE = 28
# Picture sizes (width, height): Omniglot's, non-square, one side already SIZE, SIZE
# itself (not resized), smaller than SIZE (enlarged), and one over
# STACKED_PICTURE_PIXELS (resized alone).
SIZES = [(105, 105), (60, 40), (SIZE, 90), (90, SIZE), (SIZE, SIZE), (17, 23), (300, 260)]


def png(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def picture(kind: str, size: tuple[int, int], rng: np.random.Generator) -> bytes:
    """A PNG of noise (so that any difference in resampling shows) in mode `kind`."""
    width, height = size
    noise = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    if kind == "1":
        return png(Image.fromarray(noise[..., 0] > 127))
    if kind == "L":
        return png(Image.fromarray(noise[..., 0]))
    if kind == "I;16":
        wide = noise[..., 0].astype("<u2") * 251 + noise[..., 1] % 251
        return png(Image.fromarray(wide.astype("<u2")))
    if kind in ("P", "P transparent"):
        image = Image.fromarray(noise[..., 0] % 16, "P")
        image.putpalette(rng.integers(0, 256, 16 * 3, dtype=np.uint8).tolist())
        return png(image, **({"transparency": 3} if kind == "P transparent" else {}))
    if kind == "RGB":
        return png(Image.fromarray(noise[..., :3]))
    if kind == "RGBA":
        return png(Image.fromarray(noise, "RGBA"))
    raise AssertionError(kind)


KINDS = ["1", "L", "I;16", "P", "P transparent", "RGB", "RGBA"]


def one_by_one(preprocessing: Preprocessing, blobs: list[bytes]) -> torch.Tensor:
    """What training's decoder gives each image, standardised: the reference."""
    p = preprocessing
    arrays = [decode_image(blob, p.image_size, p.channels, p.invert) for blob in blobs]
    return normalise(torch.from_numpy(np.stack(arrays)), p.mean, p.std)


def test_the_pictures_have_the_modes_they_stand_for():
    rng = np.random.default_rng(0)
    modes = [Image.open(io.BytesIO(picture(k, (9, 9), rng))).mode for k in KINDS]
    assert modes == ["1", "L", "I;16", "P", "P", "RGB", "RGBA"]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_a_request_decodes_as_each_image_alone(kind, channels):
    rng = np.random.default_rng(len(kind) * channels)
    # Three of each size, shuffled, so that pictures of one size stack between others.
    blobs = [picture(kind, size, rng) for size in SIZES * 3]
    blobs = [blobs[i] for i in rng.permutation(len(blobs))]
    preprocessing = Preprocessing(SIZE, channels, True, (0.2,) * channels, (0.3,) * channels)
    batch = preprocessing.tensor(blobs, "query_images")
    assert batch.shape == (len(blobs), channels, SIZE, SIZE)
    assert torch.equal(batch, one_by_one(preprocessing, blobs))


def test_a_request_of_every_mode_decodes_as_each_image_alone_when_stacks_fill(monkeypatch):
    """With room for two 105 px pictures, stacks are resized as the request is read."""
    monkeypatch.setattr(decode, "STACK_PIXELS", 2 * 105 * 105)
    rng = np.random.default_rng(1)
    blobs = [picture(kind, size, rng) for kind in KINDS for size in SIZES[:3]]
    for channels in (1, 3):
        preprocessing = Preprocessing(SIZE, channels, False, (0.5,) * channels, (0.2,) * channels)
        assert torch.equal(preprocessing.tensor(blobs, "x"), one_by_one(preprocessing, blobs))


def test_an_unreadable_image_is_named_by_its_index():
    rng = np.random.default_rng(2)
    blobs = [picture("L", (105, 105), rng) for _ in range(6)]
    blobs[4] = blobs[4][: len(blobs[4]) // 2]  # truncated: the header reads, the pixels don't
    with pytest.raises(RequestError) as caught:
        Preprocessing(SIZE, 1, True, (0.2,), (0.3,)).tensor(blobs, "query_images")
    message = str(caught.value)
    assert message.startswith("query_images[4]: not a readable image (")
    assert message.endswith("send PNG or JPEG bytes")
    assert "\n" not in message


# Pillow warns of a picture over its limit before open_image refuses it.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_image_over_max_pixels_is_refused_by_its_index(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)  # as a server lowers it
    rng = np.random.default_rng(3)
    blobs = [picture("L", (90, 90), rng), picture("L", (101, 100), rng)]
    with pytest.raises(RequestError, match=r"^support_images\[1\]: .*over the limit of 10000"):
        Preprocessing(SIZE, 1, True, (0.2,), (0.3,)).tensor(blobs, "support_images")
