"""How method tests build their configs and methods: small images, a narrow backbone."""

from __future__ import annotations

import pytest
import torch

from fewshot.config import load_config
from fewshot.methods import build_method


@pytest.fixture(scope="session")
def method_config():
    """`method_config(*overrides)`: a validated config at 16 px with a width-4 backbone;
    later overrides win, so a test may ask for other sizes."""

    def make(*overrides: str):
        return load_config(None, ["data.image_size=16", "backbone.width=4", *overrides])

    return make


@pytest.fixture(scope="session")
def make_method(method_config):
    """`make_method(*overrides)`: the method of `method_config(*overrides)` for 1-channel
    images, with the initial weights torch seed 0 gives (so tests can compare numbers)."""

    def make(*overrides: str):
        config = method_config(*overrides)
        torch.manual_seed(0)
        return build_method(config, channels=1)

    return make
