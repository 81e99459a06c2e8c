"""A distilled student is one ordinary model: registered, promoted and served like any."""

from __future__ import annotations

import numpy as np
import torch
from tests.registry.conftest import omniglot
from tests.registry.test_pyfunc import raw_images

from fewshot.config import load_config
from fewshot.data.episodes import EpisodeSampler
from fewshot.data.reader import load_split
from fewshot.model_file import from_run, read
from fewshot.pipeline import train
from fewshot.registry.gate import promote
from fewshot.registry.versions import load
from fewshot.streams import Stream


def test_a_distilled_student_is_one_model_that_registers_promotes_and_serves(
    tmp_path, omniglot_store, omniglot_runs
):
    teachers = f"[{omniglot_runs.dirs['good']},{omniglot_runs.dirs['untrained']}]"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = [
        "name=student",
        f"data.path={omniglot_store}",
        "train.threads=1",
        "train.precision=fp32",
        f"train.output_dir={tmp_path / 'runs'}",
        f"tracking.uri={uri}",
        *omniglot(20),
        f"distill.teachers={teachers}",
        "registry.register=true",
        "registry.name=student",
    ]
    student_dir = train(load_config(None, settings)).run_dir
    # One model file of one method, the same keys as a model trained without a teacher.
    model = read(student_dir / "model.pt")
    plain = read(omniglot_runs.dirs["good"] / "model.pt")
    assert "members" not in model and model["state_dict"].keys() == plain["state_dict"].keys()

    assert promote("student", uri=uri).outcome == "first"
    served = load("models:/student@champion", uri)
    assert served.method.name == "protonet"
    split = load_split(omniglot_store, "small2", 28)
    sampler = EpisodeSampler(split, n_way=5, k_shot=1, q_query=2)
    classes, indices = sampler.sample_indices(np.random.default_rng([Stream.TEST, 0, 3, 0]))
    raw = raw_images(omniglot_store, "small2")
    names = [split.class_names[c] for c in classes]
    support_images = [raw[i] for i in indices[:, 0]]
    query_images = [raw[i] for i in indices[:, 1:].reshape(-1)]
    answers = served.classify(support_images, names, query_images)

    # The student's own answer, computed as the loaded model computes: no teacher in it.
    _, student = from_run(student_dir)
    support, queries = served.support_set(support_images, names), served.queries(query_images)
    computed = served.runtime.computed(student.eval().predict, support.x, support.y, queries)
    got = torch.tensor([[a["probabilities"][n] for n in names] for a in answers])
    torch.testing.assert_close(got, computed.softmax(1), atol=1e-5, rtol=0)
