"""Learning, measured: trained on Omniglot small1, tested on the other alphabets of
small2 (5-way 1-shot, 200 fixed episodes). Chance is 20%; the thresholds are the
foundation's acceptance bars (ProtoNet 90%, MAML 80%), which the configs in
jobs/configs clear by several confidence intervals (benchmarks/results/foundation.md).
The runs are deterministic for a seed, so a pass is not luck of the draw."""

from pathlib import Path

import pytest

from fewshot.config import load_config
from fewshot.train.runner import train

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


@pytest.mark.parametrize(
    ("config", "threshold"),
    [("omniglot_protonet_5w1s.yaml", 0.90), ("omniglot_maml_5w1s.yaml", 0.80)],
)
def test_trained_on_small1_beats_the_bar_on_small2(workdir, omniglot_store, config, threshold):
    cfg = load_config(
        CONFIGS / config,
        [f"data.path={omniglot_store}", "evaluate.episodes=200", "tracking.enabled=false"],
    )
    result = train(cfg)
    assert result.test.mean >= threshold, str(result.test)
