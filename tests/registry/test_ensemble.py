"""An ensemble as one model: combined from trained runs, tested, registered, loaded and
answering with the mean of its members' log-probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.registry.test_pyfunc import raw_images

from fewshot.data.episodes import EpisodeSampler
from fewshot.data.reader import load_split
from fewshot.errors import CheckpointError, ConfigError
from fewshot.evaluate import evaluate_method
from fewshot.model_file import from_run, with_settings
from fewshot.pipeline import ensemble
from fewshot.registry.gate import promote
from fewshot.registry.versions import load
from fewshot.streams import Stream


@pytest.mark.slow
def test_registered_ensemble_answers_with_the_mean_of_its_members_log_probabilities(
    omniglot_runs,
):
    runs = omniglot_runs
    sources = [str(runs.dirs["good"]), str(runs.dirs["untrained"])]
    result = ensemble(
        sources, ["name=ens", "registry.register=true", "registry.name=ens", "train.precision=fp32"]
    )
    members = [from_run(s) for s in sources]
    config = members[0][0]

    # Its test figure is the ensemble's own, on the first member's fixed test episodes.
    _, combined = from_run(result.run_dir)
    assert result.test == evaluate_method(combined, result.config)
    assert result.test.mean != evaluate_method(members[1][1], config).mean

    # Registered, gated and loaded like any model: one pyfunc holding both members.
    assert promote("ens", uri=runs.uri).outcome == "first"
    model = load("models:/ens@champion", runs.uri)
    assert model.method.name == "ensemble" and len(model.method.members) == 2
    for (_, member), loaded in zip(members, model.method.members, strict=True):
        for key, value in member.state_dict().items():
            assert torch.equal(value, loaded.state_dict()[key].cpu()), key

    split = load_split(runs.store, "small2", config.data.image_size)
    sampler = EpisodeSampler(split, n_way=5, k_shot=1, q_query=4)
    classes, indices = sampler.sample_indices(np.random.default_rng([Stream.TEST, 0, 7, 0]))
    raw = raw_images(runs.store, "small2")
    names = [split.class_names[c] for c in classes]
    support_images = [raw[i] for i in indices[:, 0]]
    query_images = [raw[i] for i in indices[:, 1:].reshape(-1)]
    answers = model.classify(support_images, names, query_images)
    support, queries = model.support_set(support_images, names), model.queries(query_images)

    # p(n | q) = softmax_n(mean_m log_softmax(logits_m(q))), each member computed as the
    # loaded model computes (its precision and memory format).
    predicts = [m.eval().predict for _, m in members]
    log_probs = [model.computed(p, support.x, support.y, queries).log_softmax(1) for p in predicts]
    expected = torch.stack(log_probs).mean(0).softmax(1)
    got = torch.tensor([[a["probabilities"][n] for n in names] for a in answers])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # Not just either member's answer.
    for single in log_probs:
        assert (got - single.exp()).abs().max() > 1e-3


def test_members_with_other_inputs_or_too_few_are_refused_and_leave_no_run(tiny_runs):
    runs = tiny_runs
    name = "ens-refused"
    with pytest.raises(CheckpointError, match=r"data.image_size is 28 but .* is 16"):
        ensemble([str(runs.dirs["tiny"]), str(runs.dirs["tiny28"])], [f"name={name}"])
    with pytest.raises(ConfigError, match="at least 2 members"):
        ensemble([str(runs.dirs["tiny"])], [f"name={name}"])
    assert not (runs.dirs["tiny"].parent / name).exists()


def test_an_ensemble_takes_no_test_time_settings_and_is_no_member(tiny_runs):
    runs = tiny_runs
    result = ensemble([str(runs.dirs["tiny"])] * 2, ["name=ens-twice"])
    config, combined = from_run(result.run_dir)
    with pytest.raises(CheckpointError, match="set them on its members"):
        with_settings(config, combined, ["method.test_views=2"])
    for sources in ([result.run_dir, runs.dirs["tiny"]], [runs.dirs["tiny"], result.run_dir]):
        with pytest.raises(CheckpointError, match="is an ensemble already"):
            ensemble([str(s) for s in sources], ["name=ens-nested"])
    assert not (runs.dirs["tiny"].parent / "ens-nested").exists()
