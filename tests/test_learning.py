"""Learning, measured: trained on Omniglot small1, tested on the other alphabets of
small2 (5-way 1-shot, 15 queries, 200 fixed episodes). Chance is 20%.

Each method runs a short version of its shipped config, sized for fp32 (what `auto`
picks on an AVX2-only CPU): 5 queries per class in the training episodes (the test
episodes keep 15) and fewer steps; about 7 minutes for the file on an Intel Xeon with
oneDNN and ATen held to AVX2, less where bf16 is native. ProtoNet (euclidean at the
Omniglot recipe's temperature 8) held the foundation's acceptance bar of 90% only
while small2 still held copies of small1's Greek and Latin (`data prepare omniglot`
now stores them once, so small2's alphabets are all unseen): on the 3 unseen alphabets
the short run makes 88%, and twice its steps gain 0.3 points, so its bar is now 80%, 8
points below, as the others'. MAML (Adam at 3e-3) keeps the foundation's 80%; the
full-length runs are in benchmarks/results/foundation.md. The others must beat chance
by a wide margin: each threshold sits 8 or more points below what the short run
measured in fp32 (the table, Intel Xeon with AMX; measured before the merge, and each
passed in bf16 after it), and every row passes in bf16 there too, because a run this far
from converged moves with the kernels and the rounding of each CPU, while a broken
method falls to chance or to an untrained model (TRML 43%, Subspace 52% untrained).
The runs are deterministic for a seed and an execution, so a pass is not luck of the
draw.
"""

from pathlib import Path

import pytest

from fewshot.config import load_config
from fewshot.train.runner import train

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "train"
SHORT = ["episode.q_query=5", "evaluate.q_query=15"]


@pytest.mark.parametrize(
    ("config", "overrides", "threshold"),
    [
        # bf16 87.96 +- 1.10% (500 steps: 88.27 +- 1.12%); before the merge, with small1's
        # Greek and Latin among the test alphabets, fp32 92.09 +- 1.04% (102 s)
        ("omniglot_protonet_5w1s.yaml", ["train.steps=250", "method.temperature=8"], 0.80),
        # fp32 85.73 +- 1.65% (147 s)
        ("omniglot_maml_5w1s.yaml", [*SHORT, "train.steps=300", "train.lr=0.003"], 0.80),
        # fp32 90.01 +- 1.19% (55 s)
        ("omniglot_trml_5w1s.yaml", [*SHORT, "train.steps=120"], 0.80),
        # fp32 88.19 +- 1.35% (46 s)
        ("omniglot_subspace_5w1s.yaml", [*SHORT, "train.steps=200"], 0.78),
        # fp32 89.75 +- 1.21% (41 s)
        ("omniglot_cfn_5w1s.yaml", [*SHORT, "pretrain.steps=300", "train.steps=200"], 0.78),
        # fp32 84.11 +- 1.32% (41 s, 2 threads)
        ("omniglot_mtl_5w1s.yaml", [*SHORT, "pretrain.steps=200", "train.steps=100"], 0.75),
        # fp32 88.45 +- 1.12% (59 s, 2 threads)
        ("omniglot_datg_protonet_5w1s.yaml", [*SHORT, "train.steps=200"], 0.78),
    ],
    ids=["protonet", "maml", "trml", "subspace", "cfn", "mtl", "datg"],
)
def test_trained_on_small1_beats_the_bar_on_small2(
    workdir, omniglot_store, config, overrides, threshold
):
    cfg = load_config(
        CONFIGS / config,
        [
            f"data.path={omniglot_store}",
            "evaluate.episodes=200",
            "tracking.enabled=false",
            *overrides,
        ],
    )
    result = train(cfg)
    assert result.test.mean >= threshold, str(result.test)
