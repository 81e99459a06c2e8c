import numpy as np
import pytest
import torch

from fewshot.augment.images import AffineJitter, StrokeWidth, rotated_classes, training_jitter
from fewshot.config import AugmentConfig
from fewshot.data.episodes import EpisodeSampler
from fewshot.data.reader import ImageSet
from fewshot.models.views import fixed_views
from fewshot.streams import Stream


def image_set(classes=3, per_class=4, size=12) -> ImageSet:
    images = torch.randint(0, 256, (classes * per_class, 1, size, size), dtype=torch.uint8)
    return ImageSet(
        images=images,
        labels=torch.arange(classes).repeat_interleave(per_class),
        class_names=[f"A/c{i}" for i in range(classes)],
        class_groups=["A"] * classes,
        mean=[0.5],
        std=[0.25],
    )


def test_rotations_are_three_new_classes_per_class_in_rotated_groups():
    images = image_set()
    rotated = rotated_classes(images)
    assert rotated.n_classes == 12 and len(rotated.images) == 4 * len(images.images)
    # Class c rotated by r*90 degrees is class c + r*C, its images the rotated originals.
    for r in range(4):
        for c in range(3):
            got = rotated.images[rotated.by_class[c + 3 * r]]
            want = torch.rot90(images.images[images.by_class[c]], r, dims=(2, 3))
            assert torch.equal(got, want)
    assert rotated.class_names[4] == "A/c1/rot90"
    assert rotated.groups() == {
        "A": [0, 1, 2],
        "A/rot90": [3, 4, 5],
        "A/rot180": [6, 7, 8],
        "A/rot270": [9, 10, 11],
    }


def spot(size=20, row=10, col=10) -> torch.Tensor:
    x = torch.zeros(1, 1, size, size)
    x[0, 0, row, col] = 255.0
    return x


def test_jitter_with_zero_bounds_is_the_identity_and_shifts_move_by_the_fraction():
    x = torch.rand(5, 1, 16, 16) * 255
    assert not AffineJitter(AugmentConfig()).active
    same = AffineJitter(AugmentConfig())(x, torch.Generator().manual_seed(0))
    assert torch.allclose(same, x, atol=1e-3)
    # The first test views: identity, then +-0.05 of the side: 1 px of 20 in x, then y.
    views = fixed_views(spot(), 5)
    peaks = [divmod(int(v.flatten().argmax()), 20) for v in views]
    assert peaks == [(10, 10), (10, 9), (10, 11), (9, 10), (11, 10)]
    assert views[1].sum() == pytest.approx(255.0, rel=1e-4)  # a whole-pixel shift keeps ink


def test_jitter_is_a_function_of_the_generator_and_stays_within_its_bounds():
    jitter = AffineJitter(AugmentConfig(translate=0.1))
    x = spot().repeat(64, 1, 1, 1)
    a = jitter(x, torch.Generator().manual_seed(1))
    b = jitter(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, jitter(x, torch.Generator().manual_seed(2)))
    # Shifts only: the ink's centre moves by at most 0.1 of the side (2 px of 20), and moves.
    rows = torch.arange(20.0).view(1, 20, 1)
    centre_rows = (a[:, 0] * rows).sum((1, 2)) / a[:, 0].sum((1, 2))
    assert (centre_rows - 10).abs().max() <= 2.0 + 1e-4
    assert (centre_rows - 10).abs().max() > 0.5


def test_a_jittered_sampler_draws_the_same_classes_and_images_with_other_pixels():
    images = image_set(classes=5)
    plain = EpisodeSampler(images, 3, 1, 2)
    jitter = AffineJitter(AugmentConfig(degrees=20, scale=0.1))
    jittered = EpisodeSampler(images, 3, 1, 2, jitter=jitter)
    a, b = plain.episode(Stream.TRAIN, 0, 3), jittered.episode(Stream.TRAIN, 0, 3)
    assert torch.equal(a.classes, b.classes) and torch.equal(a.query_y, b.query_y)
    assert not torch.allclose(a.query_x, b.query_x)
    again = jittered.episode(Stream.TRAIN, 0, 3)
    assert torch.equal(b.query_x, again.query_x)  # an episode is a function of its key
    assert np.isfinite(b.support_x.numpy()).all()


def stroke() -> torch.Tensor:
    """A vertical ink line, 1 px wide and 255 high, on a 9x9 image [1, 1, 9, 9]."""
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 2:7, 4] = 255.0
    return x


def test_stroke_width_blends_towards_the_dilation_or_the_erosion_by_the_drawn_weight():
    x = stroke().repeat(200, 1, 1, 1)
    out = StrokeWidth(0.6)(x, torch.Generator().manual_seed(3))
    t = (torch.rand(200, generator=torch.Generator().manual_seed(3)) * 2 - 1) * 0.6
    assert t.abs().max() <= 0.6 and (t > 0).any() and (t < 0).any()
    ink = out.sum((1, 2, 3)) / 255
    # Thicker: the 3x3 dilation of a 5-px line is 3 x 7 = 21 px, so ink = 5 + t * 16.
    # Thinner: its erosion is empty (a 1-px line), so ink = 5 * (1 - |t|).
    expected = torch.where(t > 0, 5 + t * 16, 5 * (1 - t.abs()))
    torch.testing.assert_close(ink, expected, rtol=0, atol=1e-4)
    assert torch.equal(StrokeWidth(0.0)(x, torch.Generator().manual_seed(3)), x)


def test_training_jitter_is_none_one_augmentation_or_stroke_width_then_the_affine_map():
    assert training_jitter(AugmentConfig()) is None
    assert isinstance(training_jitter(AugmentConfig(stroke=0.5)), StrokeWidth)
    assert isinstance(training_jitter(AugmentConfig(translate=0.1)), AffineJitter)
    both = training_jitter(AugmentConfig(stroke=0.5, translate=0.1))
    x = spot().repeat(8, 1, 1, 1)
    g = torch.Generator().manual_seed(4)
    by_hand = AffineJitter(AugmentConfig(translate=0.1))(StrokeWidth(0.5)(x, g), g)
    assert torch.equal(both(x, torch.Generator().manual_seed(4)), by_hand)
