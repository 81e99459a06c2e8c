"""The serving profile is fair only if its stages compute what a server answers."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot.bench import serve as bench
from fewshot.config import load_config
from fewshot.methods import build_method
from fewshot.methods.ensemble import Ensemble
from fewshot.registry.preprocess import Preprocessing
from fewshot.registry.pyfunc import FewShotModel
from fewshot.serve.client import request_body


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_profiled_stages_answer_as_the_served_model():
    config = load_config(None, ["data.image_size=16", "backbone.width=8", "method.test_views=2"])
    torch.manual_seed(0)  # two members with different weights
    members = [build_method(config, channels=1) for _ in range(2)]
    model = FewShotModel().use(
        config, Ensemble(members), Preprocessing(16, 1, True, (0.08,), (0.25,))
    )
    rng = np.random.default_rng(0)
    drawings = [png(rng.integers(0, 256, (30, 30), dtype=np.uint8)) for _ in range(8)]
    body = json.dumps(request_body({c: [drawings[i]] for i, c in enumerate("abcde")}, drawings[5:]))

    stages = bench.Stages()
    staged = json.loads(bench.staged_request(model, body.encode(), stages))["predictions"]
    whole = json.loads(bench.whole_request(model, body.encode()))["predictions"]

    assert [a["label"] for a in staged] == [a["label"] for a in whole]
    for ours, served in zip(staged, whole, strict=True):
        assert ours["probabilities"] == pytest.approx(served["probabilities"], abs=1e-5)
    assert list(stages.seconds) == [
        bench.PARSE,
        bench.BASE64,
        bench.DECODE,
        "features, member 1 of 2 (protonet)",
        "features, member 2 of 2 (protonet)",
        bench.SCORE,
        bench.SERIALISE,
    ]
    assert stages.totals() == [sum(seconds for (seconds,) in stages.seconds.values())]
