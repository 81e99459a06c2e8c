"""The interface every method implements, and the registry that names them.

A method owns only the mathematics: given an episode it returns a loss with named
parts, and given a support set it classifies queries. The training loop owns the
optimiser, precision, distribution, logging and checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from fewshot.data.episodes import Episode
from fewshot.models.backbones import Backbone


class MethodParams(BaseModel):
    """A method's own settings (the keys under `method:` besides `name`)."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class Loss:
    """total: the scalar to minimise; parts: its named terms (ce, mmd, ...), for logging;
    logits: [N*Q, N] query logits, for accuracy."""

    total: torch.Tensor
    logits: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)

    def accuracy(self, query_y: torch.Tensor) -> torch.Tensor:
        return (self.logits.argmax(dim=1) == query_y).float().mean()


@dataclass(frozen=True)
class Shape:
    """What a method needs to know about its inputs and episodes when built."""

    channels: int
    image_size: int
    n_way: int


class FewShotMethod(nn.Module):
    """Base class. Subclasses set `name` and `Params`, and implement `predict`.

    The default `loss` is cross-entropy of `predict`'s logits on the queries;
    methods with extra terms or an inner loop override it.
    """

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    # False for methods whose inner loop runs the backbone functionally: batch-norm
    # then uses each batch's statistics at train and test time (as MAML does).
    running_stats: ClassVar[bool] = True

    def __init__(self, backbone: Backbone, params: MethodParams, shape: Shape) -> None:
        super().__init__()
        self.backbone = backbone
        self.params = params
        self.shape = shape

    def predict(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor
    ) -> torch.Tensor:
        """support_x [N*K, C, H, W], support_y [N*K] in 0..N-1, query_x [M, C, H, W]
        -> logits [M, N]."""
        raise NotImplementedError

    def loss(self, episode: Episode) -> Loss:
        logits = self.predict(episode.support_x, episode.support_y, episode.query_x)
        ce = F.cross_entropy(logits.float(), episode.query_y)
        return Loss(total=ce, logits=logits, parts={"ce": ce})

    @classmethod
    def check(cls, config) -> None:  # noqa: B027 - optional hook
        """Refuse a bad combination of settings before training (raise ConfigError)."""


METHODS: dict[str, type[FewShotMethod]] = {}


def register(cls: type[FewShotMethod]) -> type[FewShotMethod]:
    METHODS[cls.name] = cls
    return cls
