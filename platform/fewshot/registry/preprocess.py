"""What turns a caller's image file into the tensor a model was trained on.

A model is trained on images decoded from its dataset at `data.image_size`, with
the dataset's channels and inversion, standardised with the dataset's mean and std.
`Preprocessing` holds those values, read from the manifest once at registration
and packed into the registered model, so serving never needs the dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fewshot.data.decode import IMAGE_ERRORS, channels_first, normalise, picture, resize_all
from fewshot.data.store import read_manifest
from fewshot.errors import DataError, RegistryError, RequestError


@dataclass(frozen=True)
class Preprocessing:
    image_size: int
    channels: int
    invert: bool  # ink high: the dataset's images were inverted when decoded
    mean: tuple[float, ...]  # per channel, in [0, 1], after inversion
    std: tuple[float, ...]

    @classmethod
    def of_dataset(cls, root: Path, image_size: int) -> Preprocessing:
        """How images of the prepared dataset at `root` are decoded at `image_size`."""
        try:
            manifest = read_manifest(root)
        except DataError:
            raise RegistryError(
                f"dataset {root} is not here; pass --data DIR with the prepared dataset "
                "(the one the model was trained or is to be tested on)"
            ) from None
        norm = manifest["normalisation"]
        return cls(
            image_size=image_size,
            channels=manifest["channels"],
            invert=manifest.get("invert", False),
            mean=tuple(norm["mean"]),
            std=tuple(norm["std"]),
        )

    @classmethod
    def from_dict(cls, values: dict) -> Preprocessing:
        return cls(**{**values, "mean": tuple(values["mean"]), "std": tuple(values["std"])})

    def as_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    def picture(self, data: bytes, where: str) -> Image.Image:
        """Encoded bytes of any size and mode -> the decoded picture, L or RGB as the
        dataset's channels, before resizing (`decode.picture`). `where` names the image in
        the error (`query_images[3]`)."""
        try:
            return picture(data, self.channels)
        except IMAGE_ERRORS as exc:
            raise RequestError(
                f"{where}: not a readable image ({str(exc)[:120] or type(exc).__name__}); "
                "send PNG or JPEG bytes"
            ) from None

    def tensor(self, blobs: Sequence[bytes], name: str) -> torch.Tensor:
        """Encoded images -> the model's input, float [B, C, S, S]: each image's pixels as
        training decoded its dataset (`decode_image`), resized together (`resize_all`)."""
        pictures = (self.picture(blob, f"{name}[{i}]") for i, blob in enumerate(blobs))
        pixels = channels_first(resize_all(pictures, self.image_size), self.invert)
        return normalise(torch.from_numpy(np.ascontiguousarray(pixels)), self.mean, self.std)
