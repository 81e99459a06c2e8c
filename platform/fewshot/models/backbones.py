"""Feature extractors that can run layer by layer.

A `Backbone` is a list of blocks plus a head that turns the last feature map into
a vector (flatten for conv4, global average pooling for the residual networks).
`forward_layers(x, start, end)` runs blocks[start:end], so a method can stop at
layer l, mix hidden representations, and continue from l (DATG's task mixup):

    h = backbone.forward_layers(x, 0, l)       # layer 0 is the input itself
    z = backbone.head(backbone.forward_layers(h, l))

Shapes (28 px, 1 channel): conv4 [B,1,28,28] -> [B,64]; conv4_nopool keeps
[B,64,7,7] spatial maps; resnet12 and wrn28_10 end in [B,640].
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fewshot.errors import ConfigError


def _bn(channels: int, running_stats: bool) -> nn.BatchNorm2d:
    # MAML-style methods normalise with the episode's own statistics (no running
    # buffers), which keeps the inner loop purely functional.
    return nn.BatchNorm2d(channels, track_running_stats=running_stats)


class ConvBlock(nn.Sequential):
    """3x3 conv, batch-norm, ReLU, optional 2x2 max-pool."""

    def __init__(self, cin: int, cout: int, pool: bool, running_stats: bool = True) -> None:
        layers = [nn.Conv2d(cin, cout, 3, padding=1), _bn(cout, running_stats), nn.ReLU()]
        if pool:
            layers.append(nn.MaxPool2d(2))
        super().__init__(*layers)


class ResBlock(nn.Module):
    """ResNet-12 block: three 3x3 convs with a 1x1 shortcut, then 2x2 max-pool."""

    def __init__(self, cin: int, cout: int, running_stats: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            _bn(cout, running_stats),
            nn.LeakyReLU(0.1),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            _bn(cout, running_stats),
            nn.LeakyReLU(0.1),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            _bn(cout, running_stats),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), _bn(cout, running_stats))
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x) + self.shortcut(x))


class WideBlock(nn.Module):
    """Pre-activation wide residual block (Zagoruyko & Komodakis)."""

    def __init__(self, cin: int, cout: int, stride: int, running_stats: bool = True) -> None:
        super().__init__()
        self.bn1, self.bn2 = _bn(cin, running_stats), _bn(cout, running_stats)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(pre))))
        skip = x if isinstance(self.shortcut, nn.Identity) else self.shortcut(pre)
        return out + skip


class Backbone(nn.Module):
    """Blocks run in order, then `head` maps the last feature map to a vector."""

    def __init__(self, blocks: list[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def forward_layers(self, x: torch.Tensor, start: int = 0, end: int | None = None):
        for block in self.blocks[start:end]:
            x = block(x)
        return x

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> the last feature map [B, C', H', W']."""
        return self.forward_layers(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, D]."""
        return self.head(self.forward_layers(x))

    @torch.no_grad()
    def output_shape(self, channels: int, size: int) -> tuple[int, ...]:
        """Shape of one image's feature map, by a dry run on a copy (buffers untouched)."""
        probe = copy.deepcopy(self).train()
        return tuple(probe.feature_maps(torch.zeros(2, channels, size, size)).shape[1:])

    @torch.no_grad()
    def feature_dim(self, channels: int, size: int) -> int:
        """Length of the vector `forward` returns for one image."""
        probe = copy.deepcopy(self).train()
        return probe(torch.zeros(2, channels, size, size)).shape[1]


class GlobalAvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def conv4(channels: int, width: int = 64, pool_last: bool = True, running_stats: bool = True):
    pools = [True, True, pool_last, pool_last]
    blocks = [
        ConvBlock(channels if i == 0 else width, width, pool, running_stats)
        for i, pool in enumerate(pools)
    ]
    return Backbone(blocks, nn.Flatten())


def resnet12(channels: int, width: int = 64, running_stats: bool = True) -> Backbone:
    widths = [width, width * 5 // 2, width * 5, width * 10]  # 64, 160, 320, 640
    cins = [channels, *widths[:-1]]
    blocks = [ResBlock(cin, cout, running_stats) for cin, cout in zip(cins, widths, strict=True)]
    return Backbone(blocks, GlobalAvgPool())


def wrn28_10(channels: int, width: int = 10, running_stats: bool = True) -> Backbone:
    """WRN-28-k: a stem conv, three stages of four wide blocks, BN-ReLU, average pool."""
    widths = [16 * width, 32 * width, 64 * width]
    blocks: list[nn.Module] = [nn.Conv2d(channels, 16, 3, padding=1, bias=False)]
    cin = 16
    for stage, cout in enumerate(widths):
        stride = 1 if stage == 0 else 2
        stage_blocks = [
            WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, running_stats)
            for i in range(4)
        ]
        blocks.append(nn.Sequential(*stage_blocks))
        cin = cout
    blocks.append(nn.Sequential(_bn(cin, running_stats), nn.ReLU()))
    return Backbone(blocks, GlobalAvgPool())


DEFAULT_WIDTH = {"conv4": 64, "conv4_nopool": 64, "resnet12": 64, "wrn28_10": 10}


def build_backbone(
    name: str, channels: int, width: int | None = None, running_stats: bool = True
) -> Backbone:
    width = width or DEFAULT_WIDTH.get(name, 0)
    if name == "conv4":
        return conv4(channels, width, pool_last=True, running_stats=running_stats)
    if name == "conv4_nopool":
        return conv4(channels, width, pool_last=False, running_stats=running_stats)
    if name == "resnet12":
        return resnet12(channels, width, running_stats)
    if name == "wrn28_10":
        return wrn28_10(channels, width, running_stats)
    raise ConfigError(f"backbone.name: unknown backbone {name!r}; use one of {list(DEFAULT_WIDTH)}")
