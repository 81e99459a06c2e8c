import pytest
import torch
import torch.nn.functional as F

from fewshot.data.episodes import Episode
from fewshot.errors import ConfigError
from fewshot.models.backbones import build_backbone


@pytest.fixture
def make(make_method):
    return lambda *overrides: make_method(
        "method.name=mtl", "pretrain.steps=1", "episode.n_way=2", "method.inner_lr=0.5", *overrides
    )


def episode(seed=1):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([0, 1, 0, 1])
    return Episode(
        torch.randn(4, 1, 16, 16, generator=g), y, torch.randn(4, 1, 16, 16, generator=g), y, y
    )


@pytest.mark.parametrize("backbone", ["conv4", "resnet12"])
def test_at_initialisation_features_are_the_frozen_extractors(backbone, make):
    method = make(f"backbone.name={backbone}").train()
    plain = build_backbone(backbone, 1, 4)
    plain.load_state_dict(method.backbone.state_dict())
    plain.eval()
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(method.embed(x), plain(x))


def test_scale_and_shift_act_per_filter_as_the_formula_says(make):
    method = make()
    conv = method.backbone.blocks[0][0]
    ss = method.scale_shift[0]
    with torch.no_grad():
        ss.scale.copy_(torch.linspace(0.5, 2.0, 4))
        ss.shift.copy_(torch.linspace(-1.0, 1.0, 4))
    x = torch.randn(2, 1, 16, 16)
    expected = F.conv2d(
        x, conv.weight * ss.scale.view(-1, 1, 1, 1), conv.bias + ss.shift, padding=1
    )
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)


def test_only_scale_shift_and_classifier_receive_gradients(make):
    method = make().train()
    method.loss(episode()).total.backward()
    assert all(p.grad is None for p in method.backbone.parameters())
    assert all(not p.requires_grad for p in method.backbone.parameters())
    ss_grads = [p.grad.abs().sum() for p in method.scale_shift.parameters()]
    assert len(ss_grads) == 8 and all(g > 0 for g in ss_grads)  # 4 convs x (scale, shift)
    assert method.classifier.weight.grad.abs().sum() > 0


def test_inner_step_is_one_sgd_step_on_the_classifier(make):
    method = make("method.inner_steps=1").eval()
    e = episode()
    with torch.no_grad():
        support_z = method.features(e.support_x)
    w = method.classifier.weight.detach().clone().requires_grad_()
    b = method.classifier.bias.detach().clone().requires_grad_()
    F.cross_entropy(F.linear(support_z, w, b), e.support_y).backward()
    weight, bias = method.adapt(support_z, e.support_y, 1, create_graph=False)
    torch.testing.assert_close(weight, w - 0.5 * w.grad)
    torch.testing.assert_close(bias, b - 0.5 * b.grad)


def test_bad_combinations_are_refused(make):
    with pytest.raises(ConfigError, match="evaluate.n_way"):
        make("evaluate.n_way=5")
    with pytest.raises(ConfigError, match="method.hard_tasks"):
        make("method.hard_tasks=1", "distributed.workers=2")
    with pytest.raises(ConfigError, match="pretrain.steps"):
        make("pretrain.steps=0")
