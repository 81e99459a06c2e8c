import pytest
import torch

from fewshot.config import EvaluateConfig, load_config
from fewshot.errors import ConfigError
from fewshot.methods.protonet import prototypes, refined_prototypes
from fewshot.models.views import fixed_views
from fewshot.recipes.omniglot import RECIPE


@pytest.fixture
def make(make_method):
    return lambda overrides=(): make_method(*overrides).eval()


def test_logits_are_minus_squared_distances_to_prototypes(make):
    method = make()
    support_x, query_x = torch.randn(6, 1, 16, 16), torch.randn(4, 1, 16, 16)
    support_y = torch.tensor([0, 1, 2, 0, 1, 2])
    logits = method.predict(support_x, support_y, query_x)
    with torch.no_grad():
        zs, zq = method.backbone(torch.cat([support_x, query_x])).split([6, 4])
    expected = torch.empty(4, 3)
    for n in range(3):
        centre = zs[support_y == n].mean(0)
        for q in range(4):
            expected[q, n] = -((zq[q] - centre) ** 2).sum()
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-3)


def test_prototypes_are_class_means():
    z = torch.tensor([[1.0, 0.0], [3.0, 2.0], [10.0, 10.0]])
    centres = prototypes(z, torch.tensor([0, 0, 1]), 2)
    torch.testing.assert_close(centres, torch.tensor([[2.0, 1.0], [10.0, 10.0]]))


def test_cosine_metric_and_temperature(make):
    method = make(["method.distance=cosine", "method.temperature=0.5"])
    support_x, query_x = torch.randn(4, 1, 16, 16), torch.randn(3, 1, 16, 16)
    support_y = torch.tensor([0, 1, 0, 1])
    logits = method.predict(support_x, support_y, query_x)
    with torch.no_grad():
        zs, zq = method.backbone(torch.cat([support_x, query_x])).split([4, 3])
    centres = torch.stack([zs[support_y == n].mean(0) for n in range(2)])
    expected = torch.nn.functional.cosine_similarity(zq[:, None], centres[None], dim=2) / 0.5
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert logits.abs().max() <= 2.0 + 1e-5


def test_test_views_average_embeddings_at_test_time_only(make):
    method = make(["method.test_views=3"])
    support_x, query_x = torch.randn(3, 1, 16, 16), torch.randn(4, 1, 16, 16)
    support_y = torch.arange(3)
    x = torch.cat([support_x, query_x])
    with torch.no_grad():
        z = method.embed(fixed_views(x, 3)).view(3, 7, -1).mean(0)
        assert torch.allclose(
            method.predict(support_x, support_y, query_x),
            method.score(method.prepare(z[:3], support_y), z[3:]),
            atol=1e-5,
        )
        method.train()  # training sees each image once
        z = method.embed(x)
        assert torch.allclose(
            method.predict(support_x, support_y, query_x),
            method.score(method.prepare(z[:3], support_y), z[3:]),
            atol=1e-5,
        )


def test_refined_prototypes_are_the_soft_k_means_step_by_hand():
    # Class 0 has supports at 0 and 2, class 1 one at 8 (1-d embeddings). Query a is 3/4
    # class 0, query b an even split: weights softmax(log w) = w.
    support_z = torch.tensor([[0.0], [2.0], [8.0]])
    support_y = torch.tensor([0, 0, 1])
    query_z = torch.tensor([[4.0], [6.0]])
    logits = torch.tensor([[0.75, 0.25], [0.5, 0.5]]).log()
    centres = refined_prototypes(support_z, support_y, query_z, logits)
    class_0 = (0 + 2 + 0.75 * 4 + 0.5 * 6) / (2 + 0.75 + 0.5)  # 8 / 3.25
    class_1 = (8 + 0.25 * 4 + 0.5 * 6) / (1 + 0.25 + 0.5)  # 12 / 1.75
    torch.testing.assert_close(centres, torch.tensor([[class_0], [class_1]]))


def test_transductive_prediction_scores_queries_against_the_refined_prototypes(make):
    method = make(["method.temperature=8"])
    support_x, query_x = torch.randn(6, 1, 16, 16), torch.randn(5, 1, 16, 16)
    support_y = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        logits = method.predict_transductive(support_x, support_y, query_x)
        zs, zq = method.backbone(torch.cat([support_x, query_x])).split([6, 5])
    inductive = -torch.cdist(zq, prototypes(zs, support_y, 3)).pow(2) / 8
    centres = refined_prototypes(zs, support_y, zq, inductive)
    expected = -torch.cdist(zq, centres).pow(2) / 8
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-3)
    assert not torch.allclose(logits, method.predict(support_x, support_y, query_x))


def test_transductive_inference_is_off_unless_asked_and_refused_where_unsupported():
    assert EvaluateConfig().transductive is False
    assert load_config(RECIPE).evaluate.transductive is False
    with pytest.raises(ConfigError, match=r"^evaluate\.transductive: maml .*=false"):
        load_config(None, ["method.name=maml", "evaluate.transductive=true"])


def test_a_learned_temperature_starts_at_the_setting_and_moves_with_its_gradient(make):
    method = make(["method.temperature=8", "method.learn_temperature=true"]).train()
    fixed = make(["method.temperature=8"])
    fixed.load_state_dict({k: v for k, v in method.state_dict().items() if k != "log_temperature"})
    support_x, query_x = torch.randn(6, 1, 16, 16), torch.randn(6, 1, 16, 16)
    support_y = query_y = torch.tensor([0, 1, 2, 0, 1, 2])
    method.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            method.predict(support_x, support_y, query_x),
            fixed.predict(support_x, support_y, query_x),
        )
    assert "log_temperature" not in fixed.state_dict()  # older model files still load
    # logits = s / exp(u) with u = log t, so d logits / du = -logits and
    # d CE / du = mean over queries of sum_n (p_n - y_n) * (-logits_n).
    logits = method.predict(support_x, support_y, query_x)
    torch.nn.functional.cross_entropy(logits, query_y).backward()
    p = logits.detach().softmax(1)
    y = torch.nn.functional.one_hot(query_y, 3).float()
    expected = ((p - y) * -logits.detach()).sum(1).mean()
    assert expected.abs() > 0
    torch.testing.assert_close(method.log_temperature.grad, expected, rtol=1e-4, atol=1e-7)
