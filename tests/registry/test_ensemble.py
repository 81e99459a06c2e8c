"""An ensemble as one model: combined from trained runs, tested, registered, loaded and
answering with the mean of its members' log-probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from tests.registry.test_commands import fewshot
from tests.registry.test_pyfunc import raw_images

from fewshot.config import load_config
from fewshot.data.episodes import EpisodeSampler
from fewshot.data.reader import load_split
from fewshot.errors import CheckpointError, ConfigError
from fewshot.evaluate import evaluate_method
from fewshot.model_file import from_run, with_settings
from fewshot.pipeline import ensemble, train
from fewshot.registry.gate import promote
from fewshot.registry.versions import load
from fewshot.streams import Stream
from fewshot.train import runner


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
    log_probs = [
        model.runtime.computed(p, support.x, support.y, queries).log_softmax(1) for p in predicts
    ]
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


def member_config(store, tiny: list[str], *settings: str):
    """A tiny member with the registry settings `make omniglot` gives its members."""
    return load_config(
        None,
        [
            f"data.path={store}",
            *tiny,
            "train.threads=1",
            "train.precision=fp32",
            "name=member",
            "registry.register=true",
            "registry.name=prod",
            *settings,
        ],
    )


def test_an_ensemble_registers_only_when_its_own_command_asks(workdir, synthetic_store, tiny):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    member = train(member_config(synthetic_store, tiny, f"tracking.uri={uri}"))
    client = MlflowClient(uri)
    sources = [str(member.run_dir)] * 2

    # The member's registry.register and registry.name are not the ensemble's: `prod`
    # keeps its one version and its challenger, and nothing else is registered.
    quiet = ensemble(sources, ["name=ens"])
    assert not quiet.config.registry.register and quiet.config.registry.name is None
    assert [m.name for m in client.search_registered_models()] == ["prod"]
    assert [v.run_id for v in client.search_model_versions("name='prod'")] == [member.run_id]
    assert client.get_model_version_by_alias("prod", "challenger").run_id == member.run_id

    # Asked on its own command line, it registers under its own name.
    asked = ensemble(sources, ["name=ens-asked", "registry.register=true"])
    assert client.get_model_version_by_alias("ens-asked", "challenger").run_id == asked.run_id
    assert [v.run_id for v in client.search_model_versions("name='prod'")] == [member.run_id]


def test_with_tracking_off_an_ensemble_is_saved_and_registering_is_refused_first(
    workdir, synthetic_store, tiny
):
    # Trained as jobs/omniglot.py trains its members (runner.train registers nothing).
    runner.train(member_config(synthetic_store, tiny, "tracking.enabled=false"))

    result = fewshot("ensemble", "runs/member", "runs/member", "--name", "ens", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "registered" not in result.stdout
    assert (workdir / "runs" / "ens" / "model.pt").is_file()

    asked = ["--name", "ens-asked", "--set", "registry.register=true"]
    result = fewshot("ensemble", "runs/member", "runs/member", *asked, cwd=workdir)
    assert result.returncode == 2
    assert result.stderr.startswith(
        "error: registry.register: needs tracking.enabled=true (the registry is MLflow); "
    ), result.stderr
    assert result.stderr.count("\n") == 1
    assert not (workdir / "runs" / "ens-asked").exists()
    assert not (workdir / "mlflow.db").exists()
