"""Trained runs for the registry tests, each set in its own MLflow database.

Every test registers under its own model name, so tests share runs but no registry state.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot.config import load_config
from fewshot.train.runner import train


@pytest.fixture(autouse=True)
def _one_thread():
    """Scoring runs in this process: one torch thread, as the runs train with. On the shared
    2-core machine two busy-waiting threads are several times slower (docs/runtime.md)."""
    torch.set_num_threads(1)  # tests/conftest.py gives the default back afterwards


@dataclass(frozen=True)
class Runs:
    uri: str  # the tracking URI of the runs' database
    store: Path  # the dataset they were trained on
    ids: dict[str, str]  # run name -> MLflow run id
    dirs: dict[str, Path]  # run name -> run directory


def train_runs(root: Path, store: Path, settings: dict[str, list[str]]) -> Runs:
    """Train one run per name with its settings, all tracked in root/mlflow.db."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    common = [
        f"data.path={store}",
        "train.threads=1",  # the CPU is shared; one thread is the fast choice then
        "train.precision=fp32",
        f"train.output_dir={root / 'runs'}",
        f"tracking.uri={uri}",
    ]
    results = {
        name: train(load_config(None, [f"name={name}", *common, *overrides]))
        for name, overrides in settings.items()
    }
    return Runs(
        uri,
        store,
        {name: r.run_id for name, r in results.items()},
        {name: r.run_dir for name, r in results.items()},
    )


def omniglot(steps: int) -> list[str]:
    return [
        "data.train_split=small1",
        "data.val_split=null",
        "data.test_split=small2",
        "backbone.width=16",
        "episode.meta_batch=1",
        f"train.steps={steps}",
        f"train.eval_every={steps}",
        "evaluate.episodes=100",
    ]


@pytest.fixture(scope="session")
def omniglot_runs(tmp_path_factory, omniglot_store) -> Runs:
    """`good`: ProtoNet conv4 (width 16, 28 px) after 200 steps of 5-way 1-shot on small1,
    about 67% on small2 (whose alphabets, once the copies of small1's are merged, it has
    not seen); `untrained`: the same after one step, about 36%. About 30 s."""
    return train_runs(
        tmp_path_factory.mktemp("registry"),
        omniglot_store,
        {"good": omniglot(200), "untrained": omniglot(1)},
    )


TINY = [
    "data.image_size=16",
    "backbone.width=8",
    "episode.q_query=3",
    "train.steps=2",
    "train.eval_every=2",
    "train.val_episodes=2",
    "evaluate.episodes=20",
]


@pytest.fixture
def tiny() -> list[str]:
    """Settings of a run that trains in a second or two."""
    return TINY


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, synthetic_store) -> Runs:
    """`tiny` (16 px) and `tiny28` (28 px): two steps on the synthetic store, for plumbing."""
    return train_runs(
        tmp_path_factory.mktemp("registry-tiny"),
        synthetic_store,
        {"tiny": TINY, "tiny28": [*TINY, "data.image_size=28"]},
    )


@pytest.fixture(scope="session")
def glyph():
    """glyph(seed, size, mode, format) -> encoded image: black strokes on white, the same
    pixels whatever the mode (L, LA, RGB, RGBA, P) and, for PNG, bit-exact."""

    def draw(seed: int, size=(40, 40), mode: str = "L", format: str = "PNG") -> bytes:
        rng = np.random.default_rng(seed)
        pixels = np.where(rng.random((size[1], size[0])) < 0.15, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").convert(mode).save(buffer, format=format)
        return buffer.getvalue()

    return draw
