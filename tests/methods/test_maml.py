import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from fewshot.data.episodes import Episode
from fewshot.errors import ConfigError


@pytest.fixture
def make(make_method):
    return lambda *overrides: make_method(
        "method.name=maml", "episode.n_way=2", "method.inner_lr=0.3", *overrides
    )


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(4, 1, 16, 16, generator=g),
        torch.tensor([0, 1, 0, 1]),
        torch.randn(6, 1, 16, 16, generator=g),
        torch.tensor([0, 1, 0, 1, 1, 0]),
    )


def test_one_inner_step_is_one_sgd_step(make):
    method = make()
    support_x, support_y, _, _ = batch()
    adapted = method.adapt(support_x, support_y, steps=1, create_graph=False)
    reference = copy.deepcopy(method)
    optimiser = torch.optim.SGD(reference.parameters(), lr=0.3)
    F.cross_entropy(reference(support_x), support_y).backward()
    optimiser.step()
    for name, value in reference.named_parameters():
        torch.testing.assert_close(adapted[name], value, rtol=1e-5, atol=1e-6)
    # The module itself is never modified: the inner loop is functional.
    for name, value in make().named_parameters():
        torch.testing.assert_close(dict(method.named_parameters())[name], value)


def test_head_only_adaptation_leaves_the_backbone(make):
    method = make("method.adapt=head")
    support_x, support_y, _, _ = batch()
    adapted = method.adapt(support_x, support_y, steps=2, create_graph=False)
    params = dict(method.named_parameters())
    assert all(adapted[n] is params[n] for n in params if n.startswith("backbone."))
    assert not torch.equal(adapted["head.weight"], params["head.weight"])


def meta_gradient(method, first_order):
    method.params = method.params.model_copy(update={"first_order": first_order, "inner_steps": 1})
    episode = Episode(*batch(), classes=torch.tensor([0, 1]))
    params = [p for p in method.parameters()]
    return torch.autograd.grad(method.loss(episode).total, params), episode


def test_first_and_second_order_meta_gradients_match_their_formulas(make):
    """One inner step: theta' = theta - a g_s(theta).
    First order:  grad = g_q(theta').
    Second order: grad = (I - a H_s(theta)) g_q(theta')   (H_s: Hessian of the support loss)."""
    method = make()
    first, episode = meta_gradient(method, first_order=True)
    second, _ = meta_gradient(method, first_order=False)
    names = [n for n, _ in method.named_parameters()]
    theta = dict(method.named_parameters())
    adapted = method.adapt(episode.support_x, episode.support_y, 1, create_graph=False)
    adapted = {n: t.detach().requires_grad_() for n, t in adapted.items()}
    query_loss = F.cross_entropy(
        functional_call(method, adapted, (episode.query_x,)), episode.query_y
    )
    g_query = torch.autograd.grad(query_loss, [adapted[n] for n in names])
    for a, b in zip(first, g_query, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    support_loss = F.cross_entropy(method(episode.support_x), episode.support_y)
    g_support = torch.autograd.grad(support_loss, [theta[n] for n in names], create_graph=True)
    hvp = torch.autograd.grad(g_support, [theta[n] for n in names], grad_outputs=g_query)
    for s, gq, hv in zip(second, g_query, hvp, strict=True):
        torch.testing.assert_close(s, gq - 0.3 * hv, rtol=1e-3, atol=1e-5)
    difference = sum((a - b).abs().sum() for a, b in zip(first, second, strict=True))
    assert difference > 1e-3  # the curvature term is really there


def test_predict_adapts_even_under_no_grad(make):
    method = make("method.eval_inner_steps=3").eval()
    support_x, support_y, query_x, _ = batch()
    with torch.no_grad():
        logits = method.predict(support_x, support_y, query_x)
        unadapted = method(query_x)
    assert logits.shape == (6, 2) and not torch.allclose(logits, unadapted)


def test_evaluation_way_must_match_the_head(make):
    with pytest.raises(ConfigError, match="evaluate.n_way"):
        make("evaluate.n_way=5")
