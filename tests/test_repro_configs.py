"""jobs/configs/repro/: one config per result reported in the specs' methods.md.

The table below restates methods.md (method, variant, backbone, dataset, shots and the
reported figure); a config that drifts from it, or a result without a config, fails.
"""

from pathlib import Path

import pytest

from fewshot.config import load_config

REPRO = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "repro"

MINI, MINI_S, FC100, CUB = "mini_imagenet", "mini_imagenet-S", "fc100", "cub"
# name: (method, variant, backbone, dataset, k_shot, reported figure as in the header)
REPORTED = {
    "mini_cfn_cim_conv4_5w1s": ("cfn", "cim", "conv4", MINI, 1, "56.13 +- 0.86%"),
    "mini_cfn_srm_conv4_5w1s": ("cfn", "srm", "conv4", MINI, 1, "56.36 +- 0.85%"),
    "mini_cfn_frm_conv4_5w1s": ("cfn", "frm", "conv4", MINI, 1, "56.54 +- 0.83%"),
    "mini_cfn_cim_conv4_5w5s": ("cfn", "cim", "conv4", MINI, 5, "69.11 +- 0.69%"),
    "mini_cfn_srm_conv4_5w5s": ("cfn", "srm", "conv4", MINI, 5, "69.34 +- 0.72%"),
    "mini_cfn_frm_conv4_5w5s": ("cfn", "frm", "conv4", MINI, 5, "69.74 +- 0.69%"),
    "mini_cfn_cim_wrn28_10_5w1s": ("cfn", "cim", "wrn28_10", MINI, 1, "60.03 +- 0.83%"),
    "mini_cfn_srm_wrn28_10_5w1s": ("cfn", "srm", "wrn28_10", MINI, 1, "59.88 +- 0.82%"),
    "mini_cfn_frm_wrn28_10_5w1s": ("cfn", "frm", "wrn28_10", MINI, 1, "59.16 +- 0.83%"),
    "mini_cfn_cim_wrn28_10_5w5s": ("cfn", "cim", "wrn28_10", MINI, 5, "74.15 +- 0.66%"),
    "mini_cfn_srm_wrn28_10_5w5s": ("cfn", "srm", "wrn28_10", MINI, 5, "73.35 +- 0.70%"),
    "mini_cfn_frm_wrn28_10_5w5s": ("cfn", "frm", "wrn28_10", MINI, 5, "73.75 +- 0.71%"),
    "minis_mlti_maml_conv4_5w1s": ("maml", "mlti", "conv4", MINI_S, 1, "41.58%"),
    "minis_datg_maml_conv4_5w1s": ("maml", "datg", "conv4", MINI_S, 1, "42.32%"),
    "minis_mlti_protonet_conv4_5w1s": ("protonet", "mlti", "conv4", MINI_S, 1, "41.36%"),
    "minis_datg_protonet_conv4_5w1s": ("protonet", "datg", "conv4", MINI_S, 1, "42.21%"),
    "minis_mlti_maml_conv4_5w5s": ("maml", "mlti", "conv4", MINI_S, 5, "55.22%"),
    "minis_datg_maml_conv4_5w5s": ("maml", "datg", "conv4", MINI_S, 5, "56.59%"),
    "minis_mlti_protonet_conv4_5w5s": ("protonet", "mlti", "conv4", MINI_S, 5, "55.34%"),
    "minis_datg_protonet_conv4_5w5s": ("protonet", "datg", "conv4", MINI_S, 5, "56.47%"),
    "mini_mtl_resnet12_5w1s": ("mtl", None, "resnet12", MINI, 1, "61.2%"),
    "mini_mtl_resnet12_5w5s": ("mtl", None, "resnet12", MINI, 5, "75.5%"),
    "fc100_mtl_resnet12_5w1s": ("mtl", None, "resnet12", FC100, 1, "about 7 points above MAML"),
    "fc100_mtl_resnet12_5w5s": ("mtl", None, "resnet12", FC100, 5, "about 7 points above MAML"),
    "cub_trml_conv4nopool_5w1s": ("trml", None, "conv4_nopool", CUB, 1, "none"),
    "cub_subspace_conv4_5w1s": ("subspace", None, "conv4", CUB, 1, "none"),
}


def test_one_config_per_reported_result():
    assert sorted(p.stem for p in REPRO.glob("*.yaml")) == sorted(REPORTED)


@pytest.mark.parametrize("name", sorted(REPORTED))
def test_config_matches_the_source(name):
    method, variant, backbone, dataset, k_shot, figure = REPORTED[name]
    path = REPRO / f"{name}.yaml"
    config = load_config(path)
    assert config.method.name == method
    assert config.backbone.name == backbone
    assert (config.episode.n_way, config.episode.k_shot, config.episode.q_query) == (5, k_shot, 15)
    assert config.eval_episode().q_query == 15
    if method == "cfn":
        assert config.method.params()["fusion"] == variant
    if variant in ("mlti", "datg"):
        assert config.task_mixup.strategy == variant
    # miniImageNet-S: 12 of the 64 base classes (methods.md, DATG).
    store, few = (MINI, 12) if dataset == MINI_S else (dataset, None)
    assert config.data.path == Path("data") / store
    assert config.data.train_classes == few
    assert config.distributed.use_gpu and config.train.device == "auto"
    # The header comment as one line (it wraps at any space).
    header = " ".join(line[2:] for line in path.read_text().split("\nname:")[0].splitlines())
    assert f"Reported: {figure}" in header
    assert "Our figure: not run yet" in header
    assert f"--config jobs/configs/repro/{name}.yaml" in header


def test_datg_keeps_the_sources_optimiser():
    config = load_config(REPRO / "minis_datg_maml_conv4_5w1s.yaml")
    t = config.train
    assert (t.optimizer, t.lr, t.momentum, t.gamma, t.steps) == ("sgd", 0.05, 0.9, 0.1, 15000)
    assert config.evaluate.episodes == 20000
    assert config.method.params()["adapt"] == "last_block"
