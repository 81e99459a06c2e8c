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


def test_an_ensemble_prepares_and_scores_member_by_member(make_method):
    # Features [B, D] and [B, P, C]; temperatures that make the untrained members' scores
    # far from uniform.
    protonet = ["method.name=protonet", "method.temperature=0.001"]
    trml = ["method.name=trml", "backbone.name=conv4_nopool", "method.temperature_init=1000"]
    members = [make_method(*protonet), make_method(*trml)]
    ensemble = Ensemble(members).eval()
    assert ensemble.splits_prediction
    support_x, query_x = torch.randn(6, 1, 16, 16), torch.randn(4, 1, 16, 16)
    support_y = torch.arange(3).repeat(2)
    with torch.no_grad():
        prepared = ensemble.prepare(ensemble.features(support_x), support_y)
        got = ensemble.score(prepared, ensemble.features(query_x))
        alone = [m.prepare(m.features(support_x), support_y) for m in members]
        scores = [m.score(p, m.features(query_x)) for m, p in zip(members, alone, strict=True)]
    # Its prepared support set is the tuple of its members'; its score their mean
    # log-softmax, as its predict.
    assert len(prepared) == 2
    for mine, theirs in zip(prepared, alone, strict=True):
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), key
    expected = (scores[0].log_softmax(1) + scores[1].log_softmax(1)) / 2
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    for single in scores:  # not either member's answer
        assert (got.softmax(1) - single.softmax(1)).abs().max() > 1e-3


def test_an_ensemble_splits_only_if_every_member_splits(make_method):
    protonet, maml = make_method("method.name=protonet"), make_method("method.name=maml")
    assert Ensemble([protonet, protonet]).splits_prediction
    assert not Ensemble([protonet, maml]).splits_prediction
    assert not Ensemble([maml, protonet]).splits_prediction


def test_test_views_set_when_serving_reach_every_member_and_change_the_features(make_method):
    protonet = make_method("method.name=protonet", "method.test_views=5").eval()
    maml = make_method("method.name=maml")
    ensemble = Ensemble([protonet, make_method("method.name=protonet").eval()])
    assert (protonet.test_views, maml.test_views, ensemble.test_views) == (5, 1, 5)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        five = protonet.features(x)
        ensemble.with_test_views(1)
        assert [m.test_views for m in ensemble.members] == [1, 1]
        # One view is the image alone: the embedding of x itself.
        torch.testing.assert_close(protonet.features(x), protonet.embed(x), atol=1e-6, rtol=0)
    assert (protonet.features(x) - five).abs().max() > 1e-4
    assert maml.with_test_views(3).test_views == 1  # a method without views is unchanged
