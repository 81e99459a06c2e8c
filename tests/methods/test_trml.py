import math

import pytest
import torch
import torch.nn.functional as F

from fewshot.errors import ConfigError
from fewshot.methods import build_method
from fewshot.methods.trml import dual_softmax

# conv4_nopool, width 4, at 16 px: feature maps [B, 4, 4, 4], 16 positions of 4 channels.
TINY = ["data.image_size=16", "backbone.name=conv4_nopool", "backbone.width=4", "method.name=trml"]


@pytest.fixture
def make(make_method):
    return lambda overrides=(): make_method(*TINY, *overrides).eval()


def test_scores_have_one_column_per_class(make):
    method = make(["method.proj_dim=3"])
    support_y = torch.tensor([0, 1, 2, 0, 1, 2])
    logits = method.predict(torch.randn(6, 1, 16, 16), support_y, torch.randn(5, 1, 16, 16))
    assert logits.shape == (5, 3)
    # A temperature of 10 times a mean of cosines: every score lies in [-10, 10].
    assert logits.abs().max() <= 10.0 + 1e-4


def test_dual_softmax_is_row_softmax_times_column_softmax():
    scores = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
    e = scores.exp()
    rows = e / e.sum(dim=1, keepdim=True)  # each row sums to 1
    cols = e / e.sum(dim=0, keepdim=True)  # each column sums to 1
    expected = torch.tensor(
        [[rows[i, j].item() * cols[i, j].item() for j in range(3)] for i in range(2)]
    )
    alpha = dual_softmax(scores)
    torch.testing.assert_close(alpha, expected)
    # Entry (0, 0) by hand: row 0 is (e, e^2, 1), column 0 is (e, e^0.5).
    by_hand = math.e / (math.e + math.e**2 + 1) * math.e / (math.e + math.e**0.5)
    assert alpha[0, 0].item() == pytest.approx(by_hand, rel=1e-6)
    assert (alpha <= rows).all() and (alpha <= cols).all()
    assert (alpha.sum(dim=1) < 1).all() and (alpha.sum(dim=0) < 1).all()


def test_identity_attention_is_a_cosine_classifier_on_class_mean_maps(make):
    method = make(["method.attention=identity", "method.proj_dim=4"])
    assert method.query is None and method.key is None
    with torch.no_grad():
        method.value.weight.copy_(torch.eye(4))
        method.out.weight.copy_(torch.eye(4))
        method.log_temperature.zero_()
    support_x, query_x = torch.randn(4, 1, 16, 16), torch.randn(3, 1, 16, 16)
    support_y = torch.tensor([0, 1, 1, 0])
    logits = method.predict(support_x, support_y, query_x)
    with torch.no_grad():
        maps = method.backbone.feature_maps(torch.cat([support_x, query_x]))  # [7, 4, 4, 4]
    support_maps, query_maps = maps[:4], maps[4:]
    expected = torch.empty(3, 2)
    for n in range(2):
        class_map = support_maps[support_y == n].mean(0)  # [C, H, W]
        for m in range(3):
            # cosine over channels at each of the 16 positions, then the mean
            cosines = F.cosine_similarity(query_maps[m], class_map, dim=0)  # [H, W]
            expected[m, n] = cosines.mean()
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_attention_makes_the_support_depend_on_the_query(make):
    method = make(["method.proj_dim=4"])
    class_maps = torch.randn(2, 16, 4)
    query_maps = torch.randn(2, 16, 4)
    with torch.no_grad():
        adapted = method.adapted_support(query_maps, class_maps)  # [M, N, P, C]
        q, k = method.query(query_maps), method.key(class_maps)
        alpha = dual_softmax(q[0] @ k[1].T / 2.0)  # query 0, class 1, sqrt(d) = 2
        expected = method.out(alpha @ method.value(class_maps[1]))
    assert adapted.shape == (2, 2, 16, 4)
    torch.testing.assert_close(adapted[0, 1], expected)
    assert not torch.allclose(adapted[0, 1], adapted[1, 1])


def test_temperature_scales_the_scores(make):
    method = make(["method.temperature_init=2.5"])
    support_x, query_x = torch.randn(3, 1, 16, 16), torch.randn(2, 1, 16, 16)
    support_y = torch.tensor([0, 1, 2])
    logits = method.predict(support_x, support_y, query_x)
    with torch.no_grad():
        method.log_temperature.zero_()
    torch.testing.assert_close(logits, 2.5 * method.predict(support_x, support_y, query_x))


def test_a_backbone_without_spatial_maps_is_refused(method_config):
    config = method_config("data.image_size=28", "method.name=trml")
    with pytest.raises(ConfigError, match=r"4x1x1 at 28 px; use backbone.name=conv4_nopool"):
        build_method(config, channels=1)


def test_value_and_output_projections_start_as_an_orthogonal_projector(make):
    method = make(["method.proj_dim=3"])  # d = 3 < C = 4
    w_v, w_o = method.value.weight, method.out.weight  # [d, C], [C, d]
    torch.testing.assert_close(w_o, w_v.T)
    torch.testing.assert_close(w_v @ w_v.T, torch.eye(3))
    projector = w_o @ w_v  # [C, C]
    torch.testing.assert_close(projector @ projector, projector)
