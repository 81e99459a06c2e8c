import torch

from fewshot.methods import build_method
from fewshot.methods.ensemble import Ensemble


def test_an_ensemble_averages_its_members_log_probabilities(method_config):
    config = method_config()
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        members.append(build_method(config, 1).eval())
    support_x, query_x = torch.randn(3, 1, 16, 16), torch.randn(5, 1, 16, 16)
    support_y = torch.arange(3)
    with torch.no_grad():
        got = Ensemble(members).predict(support_x, support_y, query_x)
        each = [m.predict(support_x, support_y, query_x).log_softmax(1) for m in members]
    assert torch.allclose(got, (each[0] + each[1]) / 2, atol=1e-6)
    with torch.no_grad():
        alone = Ensemble(members[:1]).predict(support_x, support_y, query_x)
    assert torch.allclose(alone, each[0], atol=1e-6)
