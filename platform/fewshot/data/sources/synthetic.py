"""Procedurally drawn glyphs: a built-in few-shot dataset that needs no download.

Each group ("script") owns a handful of primitive strokes (cubic Bezier curves).
A class (a "character") is a stroke program: two to four of its script's
primitives, each placed at its own offset and scale. Every drawing of a
character re-runs the program with jitter on the control points, the stroke
width and a small affine transform, as a hand would. Characters of one script
share strokes, so within-script episodes are harder, as within-alphabet
Omniglot is. Scripts are disjoint across splits, so test characters come from
scripts never seen in training.

Everything follows from `seed`: the same arguments give byte-identical stores.
"""

from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fewshot.data.store import Example, SourceInfo, existing_store, read_manifest, write_store

GENERATOR_VERSION = 1
CANVAS = 64


def _bezier(points: np.ndarray, steps: int = 24) -> np.ndarray:
    """Cubic Bezier through 4 control points [4, 2] -> polyline [steps, 2]."""
    t = np.linspace(0.0, 1.0, steps)[:, None]
    p0, p1, p2, p3 = points
    return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3


def _character(rng: np.random.Generator, primitives: np.ndarray) -> list[np.ndarray]:
    """A stroke program: some primitives, each placed in the unit square."""
    chosen = rng.choice(len(primitives), size=rng.integers(2, 5), replace=False)
    strokes = []
    for index in chosen:
        scale = rng.uniform(0.6, 0.9)
        offset = rng.uniform(0.05, 0.95 - scale, size=2)
        flip = rng.choice([-1.0, 1.0], size=2)
        stroke = (primitives[index] - 0.5) * flip + 0.5
        strokes.append(stroke * scale + offset)
    return strokes


def _draw(
    rng: np.random.Generator, strokes: list[np.ndarray], canvas: int = CANVAS, rgb: bool = False
) -> bytes:
    angle = rng.normal(0.0, 0.12)
    scale = rng.uniform(0.85, 1.1)
    shift = rng.normal(0.0, 0.04, size=2)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    width = max(1, round(int(rng.integers(3, 6)) * canvas / CANVAS))
    if rgb:  # dark ink of some colour on light paper of another, drawn per image
        paper = tuple(int(c) for c in rng.integers(160, 256, size=3))
        ink = tuple(int(c) for c in rng.integers(0, 120, size=3))
        image = Image.new("RGB", (canvas, canvas), paper)
    else:
        ink = 0
        image = Image.new("L", (canvas, canvas), 255)  # dark ink on white, like Omniglot
    pen = ImageDraw.Draw(image)
    for stroke in strokes:
        control = stroke + rng.normal(0.0, 0.035, size=stroke.shape)
        line = (_bezier(control) - 0.5) @ rotation.T * scale + 0.5 + shift
        pixels = [tuple(p) for p in (line * canvas).tolist()]
        pen.line(pixels, fill=ink, width=width, joint="curve")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def generate(
    groups: tuple[int, int, int],
    classes_per_group: int,
    images_per_class: int,
    seed: int,
    canvas: int = CANVAS,
    rgb: bool = False,
) -> dict[str, list[Example]]:
    """Splits train/val/test with `groups` scripts each, `canvas` px, grey or RGB."""
    rng = np.random.default_rng(seed)
    splits: dict[str, list[Example]] = {}
    script = 0
    for split, n_groups in zip(("train", "val", "test"), groups, strict=True):
        examples = []
        for _ in range(n_groups):
            group = f"script{script:02d}"
            script += 1
            primitives = rng.uniform(0.0, 1.0, size=(6, 4, 2))
            for c in range(classes_per_group):
                strokes = _character(rng, primitives)
                name = f"{group}/char{c:02d}"
                examples.extend(
                    Example(name, group, _draw(rng, strokes, canvas, rgb))
                    for _ in range(images_per_class)
                )
        splits[split] = examples
    return splits


def prepare(
    out: str | Path,
    *,
    groups: tuple[int, int, int] = (12, 4, 4),
    classes_per_group: int = 10,
    images_per_class: int = 20,
    seed: int = 0,
    overwrite: bool = False,
    canvas: int = CANVAS,
    rgb: bool = False,
) -> dict:
    """`canvas` and `rgb` make stores shaped like natural-image sets (84 px RGB, as
    miniImageNet) for benchmarks; the defaults give the grey glyphs of the demo."""
    recipe = f"v{GENERATOR_VERSION}-{groups}-{classes_per_group}-{images_per_class}-{seed}"
    if canvas != CANVAS or rgb:  # the defaults keep their recipe, so old stores still match
        recipe += f"-{canvas}px" + ("-rgb" if rgb else "")
    info = SourceInfo(
        name="synthetic",
        source="synthetic",
        checksum=hashlib.sha256(recipe.encode()).hexdigest(),
        channels=3 if rgb else 1,
        image_shape=(canvas, canvas),
        invert=not rgb,  # grey glyphs are ink on paper: inverted so ink is high
        extra={"recipe": recipe},
    )
    if existing_store(Path(out), info.checksum, overwrite):  # generating is the slow part
        return read_manifest(out)
    splits = generate(groups, classes_per_group, images_per_class, seed, canvas, rgb)
    return write_store(out, info, splits, overwrite=overwrite)
