import pytest
import torch

from fewshot.errors import ConfigError
from fewshot.models.backbones import build_backbone


@pytest.mark.parametrize(
    ("name", "channels", "size", "width", "feature"),
    [
        ("conv4", 1, 28, None, (64, 1, 1)),
        ("conv4", 3, 84, None, (64, 5, 5)),
        ("conv4_nopool", 3, 84, None, (64, 21, 21)),  # TRML: 84 px -> 21x21 maps
        ("resnet12", 3, 32, 16, (160, 2, 2)),
        ("wrn28_10", 3, 32, 1, (64, 8, 8)),
    ],
)
def test_feature_map_shapes(name, channels, size, width, feature):
    backbone = build_backbone(name, channels, width)
    assert backbone.output_shape(channels, size) == feature
    x = torch.randn(3, channels, size, size)
    assert backbone(x).shape[0] == 3


@pytest.mark.parametrize("name", ["conv4", "conv4_nopool", "resnet12", "wrn28_10"])
def test_running_up_to_a_layer_and_on_from_it_equals_the_whole(name):
    torch.manual_seed(0)
    backbone = build_backbone(
        name, 3, 8 if name == "resnet12" else (1 if name == "wrn28_10" else 16)
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    whole = backbone(x)
    for layer in range(backbone.n_layers + 1):
        hidden = backbone.forward_layers(x, 0, layer)
        torch.testing.assert_close(backbone.head(backbone.forward_layers(hidden, layer)), whole)


def test_functional_backbones_keep_no_running_statistics():
    assert list(build_backbone("conv4", 1, running_stats=False).buffers()) == []
    assert len(list(build_backbone("conv4", 1).buffers())) == 12  # mean, var, count x 4


def test_dry_runs_do_not_touch_running_statistics():
    backbone = build_backbone("conv4", 1)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone.output_shape(1, 28)
    backbone.feature_dim(1, 28)
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


def test_unknown_backbone():
    with pytest.raises(ConfigError, match="backbone.name"):
        build_backbone("vgg", 3)
