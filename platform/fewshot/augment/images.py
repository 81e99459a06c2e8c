"""Augmentation of the training images: more classes, jittered episodes.

- `rotated_classes`: every base class rotated by 90, 180 and 270 degrees becomes a new
  class (Santoro et al. 2016, Snell et al. 2017 on Omniglot): a rotated character is
  a different character, so the base classes quadruple.
- `AffineJitter`: a random small rotation, scale, shear and shift per image, drawn
  from the episode's own generator, so an episode stays a pure function of its key.
- `StrokeWidth`: thicker or thinner strokes per image, as people's pens differ.
- `training_jitter`: the active ones of the two, stroke width first, as one callable.

Test-time views travel with the model instead (models/views.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fewshot.config import AugmentConfig
from fewshot.data.reader import ImageSet
from fewshot.errors import ConfigError
from fewshot.models.views import affine_grids


def rotated_classes(images: ImageSet) -> ImageSet:
    """The classes of `images` plus their three rotations (labels C..4C-1 in rotation order).

    A rotated class keeps its group with a suffix (`Greek/rot90`), so a within-group
    episode never mixes upright and rotated characters of an alphabet."""
    if not isinstance(images.images, torch.Tensor):
        raise ConfigError(
            "augment.rotations: needs images decoded up front, but this split is decoded per "
            "episode; set data.decode=memory (and data.memory_budget_gb if it is large)"
        )
    n = images.n_classes
    rotations = range(4)
    return ImageSet(
        images=torch.cat([torch.rot90(images.images, r, dims=(2, 3)) for r in rotations]),
        labels=torch.cat([images.labels + r * n for r in rotations]),
        class_names=[f"{c}/rot{90 * r}" if r else c for r in rotations for c in images.class_names],
        class_groups=[
            f"{g}/rot{90 * r}" if r else g for r in rotations for g in images.class_groups
        ],
        mean=images.mean,
        std=images.std,
    )


class AffineJitter:
    """Random affine maps around the identity, one per image: rotation +- degrees,
    isotropic scale 1 +- scale, shear +- shear, shift +- translate (fractions of the
    image side). It runs on raw pixels, before standardisation, so the zero padding is
    the paper of ink-high images (Omniglot after inversion) and black otherwise."""

    def __init__(self, settings: AugmentConfig) -> None:
        self.settings = settings

    @property
    def active(self) -> bool:
        s = self.settings
        return any((s.degrees, s.scale, s.shear, s.translate))

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x [B, C, H, W] float pixels -> jittered x, the same shape."""
        s, b = self.settings, len(x)

        def uniform(bound: float) -> torch.Tensor:
            return (torch.rand(b, generator=generator) * 2 - 1) * bound

        angle = uniform(math.radians(s.degrees))
        scale = 1 + uniform(s.scale)
        shear = uniform(s.shear)
        shift = torch.stack([uniform(2 * s.translate), uniform(2 * s.translate)], 1)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # theta maps output coordinates to input ones: rotate, shear, then scale.
        linear = torch.stack(
            [torch.stack([cos, -sin + shear * cos], 1), torch.stack([sin, cos + shear * sin], 1)],
            1,
        ) / scale.view(b, 1, 1)
        theta = torch.cat([linear, shift.unsqueeze(2)], 2)
        return affine_grids(theta, x)


class StrokeWidth:
    """Each image blended towards its 3x3 dilation (a max filter: thicker strokes) or its
    3x3 erosion (a min filter: thinner ones) by a weight t drawn in +- `amount`:

        x' = x + |t| (dilate(x) - x)   if t > 0,    x + |t| (erode(x) - x)   otherwise.

    At 28x28 a stroke is 1 to 2 pixels wide, so a whole 3x3 step would double or erase
    it; the blend moves the width by a fraction of a pixel. Ink must be the high value
    (Omniglot after inversion)."""

    def __init__(self, amount: float) -> None:
        self.amount = amount

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x [B, C, H, W] float pixels -> x with thicker or thinner strokes, the same shape."""
        t = ((torch.rand(len(x), generator=generator) * 2 - 1) * self.amount).view(-1, 1, 1, 1)
        thick = F.max_pool2d(x, 3, stride=1, padding=1)
        thin = -F.max_pool2d(-x, 3, stride=1, padding=1)
        return x + t.abs() * (torch.where(t > 0, thick, thin) - x)


Jitter = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def training_jitter(settings: AugmentConfig) -> Jitter | None:
    """The per-image augmentations `settings` turns on, applied in turn (stroke width,
    then the affine map); None when there are none."""
    steps: list[Jitter] = []
    if settings.stroke:
        steps.append(StrokeWidth(settings.stroke))
    affine = AffineJitter(settings)
    if affine.active:
        steps.append(affine)
    if len(steps) <= 1:
        return steps[0] if steps else None

    def jitter(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for step in steps:
            x = step(x, generator)
        return x

    return jitter
