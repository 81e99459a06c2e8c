"""The pyfunc: raw images in, labels out; the same answers as the in-memory model."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fewshot.config import load_config
from fewshot.data.episodes import EpisodeSampler
from fewshot.data.reader import load_split
from fewshot.data.store import read_manifest
from fewshot.errors import RequestError
from fewshot.methods import build_method
from fewshot.model_file import from_run
from fewshot.registry.gate import promote
from fewshot.registry.preprocess import Preprocessing
from fewshot.registry.pyfunc import INPUTS, FewShotModel
from fewshot.registry.versions import current, register
from fewshot.runtime import Runtime, usable_cpus
from fewshot.streams import Stream


def raw_images(store: Path, split: str) -> list[bytes]:
    """The split's encoded images in the row order `load_split` decodes them in."""
    parts = sorted((store / f"split={split}").glob("part-*.parquet"))
    return pa.concat_tables(pq.read_table(p) for p in parts).column("image").to_pylist()


def b64(blobs: list[bytes]) -> np.ndarray:
    return np.array([base64.b64encode(b).decode() for b in blobs])


@pytest.mark.slow
def test_champion_through_models_uri_answers_like_the_in_memory_model(omniglot_runs, monkeypatch):
    runs = omniglot_runs
    version = register(runs.ids["good"], "roundtrip", uri=runs.uri)
    assert version.aliases == ["challenger"]
    assert promote("roundtrip", uri=runs.uri).outcome == "first"

    config, method = from_run(runs.dirs["good"])
    split = load_split(runs.store, "small2", config.data.image_size)
    sampler = EpisodeSampler(split, n_way=5, k_shot=1, q_query=15)
    classes, indices = sampler.sample_indices(np.random.default_rng([Stream.TEST, 0, 0, 0]))
    episode = sampler.build(classes, indices)  # [5 support, 75 queries]
    # Computed as a loaded model computes on this machine (precision, memory format).
    runtime = Runtime.for_inference()
    method.eval().to(memory_format=runtime.memory_format)
    x = [
        t.contiguous(memory_format=runtime.memory_format)
        for t in (episode.support_x, episode.query_x)
    ]
    with torch.no_grad(), runtime.autocast():
        expected = torch.softmax(method.predict(x[0], episode.support_y, x[1]).float(), dim=1)
    raw = raw_images(runs.store, "small2")
    names = [split.class_names[c] for c in classes]

    # Loading and predicting never read the dataset: the preprocessing travels with the model.
    for module in ("fewshot.data.store", "fewshot.data.reader", "fewshot.registry.preprocess"):
        monkeypatch.setattr(f"{module}.read_manifest", lambda *a: pytest.fail("read the dataset"))
    with current(runs.uri):
        pyfunc = mlflow.pyfunc.load_model("models:/roundtrip@champion")
        info = mlflow.models.get_model_info("models:/roundtrip@champion")
    answers = pyfunc.predict(
        {
            "support_images": b64([raw[i] for i in indices[:, 0]]),
            "support_labels": np.array(names),
            "query_images": b64([raw[i] for i in indices[:, 1:].reshape(-1)]),
        }
    )
    monkeypatch.undo()
    assert [a["label"] for a in answers] == [names[int(i)] for i in expected.argmax(1)]
    got = torch.tensor([[a["probabilities"][n] for n in names] for a in answers])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # Above the model after one step on the same episode: the trained model came back.
    _, untrained = from_run(runs.dirs["untrained"])
    untrained.eval().to(memory_format=runtime.memory_format)
    with torch.no_grad(), runtime.autocast():
        baseline = untrained.predict(x[0], episode.support_y, x[1]).argmax(1)
    correct = (expected.argmax(1) == episode.query_y).float().mean()
    assert correct > (baseline == episode.query_y).float().mean() + 0.1

    assert [spec.name for spec in info.signature.inputs.inputs] == list(INPUTS)
    assert info.saved_input_example_info is not None
    manifest = read_manifest(runs.store)
    packed = info.flavors["python_function"]["config"]
    assert packed["mean"] == manifest["normalisation"]["mean"] and packed["invert"] is True
    run_tags = mlflow.MlflowClient(runs.uri).get_run(runs.ids["good"]).data
    tags = mlflow.MlflowClient(runs.uri).get_model_version("roundtrip", "1").tags
    for key in ("fewshot.method", "fewshot.dataset", "fewshot.config_hash", "git.commit"):
        assert tags[key] == run_tags.tags[key]
    assert float(tags["fewshot.test_acc"]) == pytest.approx(run_tags.metrics["test_acc"], abs=1e-4)
    assert float(tags["fewshot.test_ci95"]) > 0


def in_memory(method: str = "protonet", n_way: int = 5) -> FewShotModel:
    """An untrained model with Omniglot-like preprocessing, without MLflow."""
    config = load_config(
        None,
        [
            f"method.name={method}",
            f"episode.n_way={n_way}",
            "data.image_size=16",
            "backbone.width=8",
        ],
    )
    torch.manual_seed(0)  # the same weights every run
    method = build_method(config, channels=1)
    return FewShotModel().use(config, method, Preprocessing(16, 1, True, (0.08,), (0.25,)))


def test_images_of_any_mode_and_size_are_classified(glyph):
    model = in_memory()
    sizes = [(40, 40), (57, 91), (16, 16), (105, 30)]
    modes = ["RGBA", "P", "RGB", "LA"]
    labels = ["a", "b", "c", "d"]
    support = [glyph(i, size) for i, size in enumerate(sizes)]
    # The same pixels in other modes decode to the same tensor: each copy finds its class.
    copies = [glyph(i, sizes[i], mode) for i, mode in enumerate(modes)]
    answers = model.classify(support, labels, copies)
    assert [a["label"] for a in answers] == labels
    lossy = model.classify(support, labels, [glyph(1, sizes[1], "RGB", "JPEG")])
    assert list(lossy[0]["probabilities"]) == labels
    assert sum(lossy[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_classes_follow_the_order_of_first_appearance_and_may_have_unequal_shots(glyph):
    model = in_memory()
    images = [glyph(i) for i in range(5)]
    answers = model.classify(images, ["z", "a", "z", "m", "a"], images[3:4])
    assert list(answers[0]["probabilities"]) == ["z", "a", "m"]
    assert answers[0]["label"] == "m"  # a copy of the one-shot class's only image


@pytest.mark.parametrize(
    ("support", "labels", "query", "message"),
    [
        (2, ["a"], 1, "support_labels: 1 labels for 2 support_images"),
        (2, ["a", "a"], 1, "support_labels: 1 distinct class(es) ['a']; a task needs at least 2"),
        (2, ["a", "b"], 0, "query_images: empty"),
    ],
)
def test_malformed_requests_are_refused_in_one_line(glyph, support, labels, query, message):
    images = [glyph(i) for i in range(max(support, query))]
    with pytest.raises(RequestError, match=re.escape(message)):
        in_memory().classify(images[:support], labels, images[:query])


def test_unreadable_image_names_its_position(glyph):
    with pytest.raises(RequestError, match=r"^query_images\[1\]: not a readable image"):
        in_memory().classify([glyph(0), glyph(1)], ["a", "b"], [glyph(2), b"not an image"])


def test_maml_refuses_another_way_than_it_was_trained_for(glyph):
    images = [glyph(i) for i in range(3)]
    with pytest.raises(RequestError, match="cannot answer a 3-way task"):
        in_memory("maml", n_way=5).classify(images, ["a", "b", "c"], images[:1])


def test_predict_turns_request_errors_into_mlflow_400s():
    request = {
        "support_images": np.array(["%%%"]),
        "support_labels": np.array(["a"]),
        "query_images": np.array(["%%%"]),
    }
    with pytest.raises(mlflow.MlflowException) as caught:
        in_memory().predict(None, request)
    assert caught.value.get_http_status_code() == 400
    assert caught.value.message.startswith("support_images[0]: not base64")


def test_loading_and_answering_leave_the_process_s_threads_as_they_were(tiny_runs, glyph):
    """A loaded model computes in someone else's process: its thread count is theirs."""
    register(tiny_runs.ids["tiny"], "threads", uri=tiny_runs.uri)
    torch.set_num_threads(usable_cpus() + 1)  # not what a runtime would choose here
    before = torch.get_num_threads()
    with current(tiny_runs.uri):
        pyfunc = mlflow.pyfunc.load_model("models:/threads/1")
    assert torch.get_num_threads() == before
    images = [glyph(i) for i in range(3)]
    answers = pyfunc.unwrap_python_model().classify(images[:2], ["a", "b"], images[2:])
    assert len(answers) == 1 and torch.get_num_threads() == before
