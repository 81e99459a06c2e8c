"""The interface every method implements, the prediction contract every model keeps
(`Predictor`: a method, or an ensemble of them), and the registry that names methods.

A method owns only the mathematics: given an episode it returns a loss with named
parts, and given a support set it classifies queries. The training loop owns the
optimiser, precision, distribution, logging and checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from fewshot.data.episodes import Episode
from fewshot.errors import ConfigError
from fewshot.models.backbones import Backbone


class MethodParams(BaseModel):
    """A method's own settings (the keys under `method:` besides `name`); as in every
    config section, no number is inf or nan."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


@dataclass
class Loss:
    """total: the scalar to minimise; parts: its named terms (ce, mmd, ...), for logging;
    logits: [N*Q, N] query logits, for accuracy; embeddings: [N*(K+Q), D] the final
    embeddings of support then query, where the method computes them (DATG's MMD)."""

    total: torch.Tensor
    logits: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    embeddings: torch.Tensor | None = None

    def accuracy(self, query_y: torch.Tensor) -> torch.Tensor:
        return (self.logits.argmax(dim=1) == query_y).float().mean()


# What a model computes of each image (`Predictor.features`): a tensor [B, ...]; an
# ensemble's is the tuple of its members'.
Features = torch.Tensor | tuple["Features", ...]
# A support set as a model's `score` takes it (`Predictor.prepare`): named tensors; an
# ensemble's is the tuple of its members'.
Prepared = dict[str, torch.Tensor] | tuple["Prepared", ...]


def map_tensors(function: Callable[[torch.Tensor], torch.Tensor], value):
    """`function` applied to every tensor of `value` (a tensor, or a dict or tuple of
    such values: features, a prepared support set), its structure kept."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, dict):
        return {key: map_tensors(function, v) for key, v in value.items()}
    return tuple(map_tensors(function, v) for v in value)


def tensors(value) -> Iterator[torch.Tensor]:
    """Every tensor of `value`, as `map_tensors` visits them."""
    if isinstance(value, torch.Tensor):
        yield value
    else:
        for v in value.values() if isinstance(value, dict) else value:
            yield from tensors(v)


def split_rows(z: Features, sizes: list[int]) -> list[Features]:
    """Features of a batch of sum(sizes) images -> those of each consecutive part, in the
    same structure (an ensemble's: each member's rows split alike)."""
    if isinstance(z, torch.Tensor):
        return list(z.split(sizes))
    return [tuple(part) for part in zip(*(split_rows(m, sizes) for m in z), strict=True)]


def cat_rows(parts: Sequence[Features]) -> Features:
    """The inverse of `split_rows`: features of consecutive parts -> those of all their
    rows, in order."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(list(parts))
    return tuple(cat_rows(members) for members in zip(*parts, strict=True))


@dataclass(frozen=True)
class Shape:
    """What a method needs to know about its inputs and episodes when built."""

    channels: int
    image_size: int
    n_way: int
    k_shot: int = 1


class Predictor(Protocol):
    """The prediction contract: what the pyfunc, both servers and evaluation ask of a
    model, a `FewShotMethod` or an `Ensemble` of them (methods/ensemble.py).

    A task is N classes given by supports support_x [S, C, H, W] with labels support_y
    [S] in 0..N-1, and queries query_x [M, C, H, W]. `predict` answers the whole task,
    logits [M, N]. Where `splits_prediction`, the same answer comes in two halves, so
    that a support set prepared once answers any number of queries (Ray Serve's
    /supports and /classify):

        predict(s_x, s_y, q_x) = score(prepare(features(s_x), s_y), features(q_x)),

    `features` a function of each image alone (in eval mode), so that any batching of the
    images gives the same answer (tests/methods/test_contract.py holds every model to it,
    to 1e-5). A model that adapts to the whole task (MAML: batch statistics of supports
    and queries together) does not split; its `prepare` raises NotImplementedError.
    """

    name: str
    shape: Shape  # the training shape: channels, image size, ways
    splits_prediction: bool
    transductive: bool  # whether it has `predict_transductive` (evaluate.transductive)

    def answers_way(self, n_way: int) -> bool:
        """Whether this trained model can answer `n_way`-way tasks."""
        ...

    @property
    def test_views(self) -> int:
        """Views of each image averaged at test time (models/views.py); 1: none."""
        ...

    def with_test_views(self, views: int) -> Predictor:
        """This model, computing `views` test views from now on (a serving setting: fewer
        views cost less); a model without test views is unchanged."""
        ...

    def predict(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor
    ) -> torch.Tensor:
        """The whole task -> logits [M, N]."""
        ...

    def predict_transductive(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor
    ) -> torch.Tensor:
        """`predict` with the queries seen together: each query's logits may depend on the
        others."""
        ...

    def features(self, x: torch.Tensor) -> Features:
        """Images [B, C, H, W] -> what `prepare` and `score` take of each image, [B, ...]."""
        ...

    def prepare(self, support_z: Features, support_y: torch.Tensor) -> Prepared:
        """Support features [S, ...], labels [S] -> the support set as `score` takes it."""
        ...

    def score(self, prepared: Prepared, query_z: Features) -> torch.Tensor:
        """A prepared support set of N classes, query features [M, ...] -> logits [M, N]."""
        ...


class FewShotMethod(nn.Module):
    """Base class, a `Predictor`. Subclasses set `name` and `Params`, and implement `predict`.

    The default `loss` is cross-entropy of `predict`'s logits on the queries;
    methods with extra terms or an inner loop override it.

    Task mixup (DATG, MLTI) needs two more things of a method: `mixup_layers`, the
    highest layer at which hidden representations may be mixed, and a `loss` that
    continues from layer `start` (the episode then holds hidden representations at
    that layer, as `hidden` returns them, instead of images).
    """

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    # False for methods whose inner loop runs the backbone functionally: batch-norm
    # then uses each batch's statistics at train and test time (as MAML does).
    running_stats: ClassVar[bool] = True
    # True for methods whose classifier has n_way outputs: they answer only n_way-way
    # tasks (`supports_way`).
    fixed_way: ClassVar[bool] = False
    # True for methods that start from a backbone pre-trained on whole base classes
    # (`pretrain.steps`, train/pretrain.py) and keep it frozen by default.
    pretrains: ClassVar[bool] = False
    # True for methods whose prediction splits in two (`features`, `prepare`, `score`;
    # `Predictor`): a support set prepared once then answers any number of queries.
    # False where prediction adapts to the whole episode: MAML's inner loop on the
    # supports and queries with batch statistics.
    splits_prediction: ClassVar[bool] = False
    # True for methods with `predict_transductive` (evaluate.transductive).
    transductive: ClassVar[bool] = False

    def __init__(self, backbone: Backbone, params: MethodParams, shape: Shape) -> None:
        super().__init__()
        self.backbone = backbone
        self.params = params
        self.shape = shape
        self.frozen_backbone = False

    @property
    def test_views(self) -> int:
        return getattr(self.params, "test_views", 1)

    def with_test_views(self, views: int) -> FewShotMethod:
        if hasattr(self.params, "test_views"):
            self.params = self.params.model_copy(update={"test_views": views})
        return self

    def freeze_backbone(self) -> None:
        """Meta-train on a fixed (pre-trained) backbone: no gradients, and batch-norm in
        eval mode, so it keeps the statistics of pre-training."""
        self.backbone.requires_grad_(False)
        self.frozen_backbone = True

    def train(self, mode: bool = True) -> FewShotMethod:
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()
        return self

    def hard_tasks(self) -> int:
        """Tasks of the extra meta-batch built from each step's failure classes (MTL)."""
        return 0

    def predict(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor
    ) -> torch.Tensor:
        """support_x [N*K, C, H, W], support_y [N*K] in 0..N-1, query_x [M, C, H, W]
        -> logits [M, N]."""
        raise NotImplementedError

    def predict_transductive(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor
    ) -> torch.Tensor:
        """`predict` with the queries seen together (evaluate.transductive): the logits of
        each query may depend on the others."""
        raise NotImplementedError(f"{self.name} has no transductive inference")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> what `prepare` and `score` take of each image, [B, ...]:
        a function of the image alone (in eval mode), so any batch gives the same."""
        raise NotImplementedError(f"{self.name} does not split its prediction")

    def prepare(self, support_z: torch.Tensor, support_y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Support features [N*K, ...], labels [N*K] -> the support set as `score` needs it,
        named tensors (ProtoNet: the prototypes)."""
        raise NotImplementedError(f"{self.name} does not split its prediction")

    def score(self, prepared: dict[str, torch.Tensor], query_z: torch.Tensor) -> torch.Tensor:
        """A prepared support set of N classes, query features [M, ...] -> logits [M, N]."""
        raise NotImplementedError(f"{self.name} does not split its prediction")

    def split_predict(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor
    ) -> torch.Tensor:
        """`predict` in one forward pass, through the split: what predict is, for the
        methods that split."""
        z = self.features(torch.cat([support_x, query_x]))
        n = len(support_x)
        return self.score(self.prepare(z[:n], support_y), z[n:])

    def loss(self, episode: Episode, start: int = 0) -> Loss:
        """The episode's loss; `start` > 0 only for methods with `mixup_layers`."""
        logits = self.predict(episode.support_x, episode.support_y, episode.query_x)
        ce = F.cross_entropy(logits.float(), episode.query_y)
        return Loss(total=ce, logits=logits, parts={"ce": ce})

    def embed(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Images (start 0) or layer-`start` representations -> embeddings [B, D] (fp32)."""
        return self.backbone.head(self.backbone.forward_layers(x, start)).float()

    def mixup_layers(self) -> int | None:
        """The highest layer l at which task mixup may mix (0: the images); None when
        the method cannot continue a forward pass from a hidden layer."""
        return None

    def hidden(self, episode: Episode, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Support and query representations at `layer` (blocks[:layer] of the backbone)."""
        h = self.backbone.forward_layers(torch.cat([episode.support_x, episode.query_x]), 0, layer)
        return h[: len(episode.support_x)], h[len(episode.support_x) :]

    @classmethod
    def supports_way(cls, n_way: int, trained_way: int, params: MethodParams) -> bool:
        """Whether a model of this method, trained on `trained_way`-way episodes with
        `params`, can answer `n_way`-way tasks."""
        return not cls.fixed_way or n_way == trained_way

    def answers_way(self, n_way: int) -> bool:
        """Whether this trained model can answer `n_way`-way tasks."""
        return self.supports_way(n_way, self.shape.n_way, self.params)

    @classmethod
    def check(cls, config, params: MethodParams) -> None:
        """Refuse a bad combination of settings before training (raise ConfigError);
        `params` are this method's parsed settings. Subclasses extend it and call
        super().check(config, params)."""
        eval_way = config.eval_episode().n_way
        if not cls.supports_way(eval_way, config.episode.n_way, params):
            raise ConfigError(
                f"evaluate.n_way: {cls.name}'s classifier has episode.n_way = "
                f"{config.episode.n_way} outputs, got {eval_way}; train a separate "
                f"model for {eval_way}-way"
            )
        if config.evaluate.transductive and not cls.transductive:
            raise ConfigError(
                f"evaluate.transductive: {cls.name} classifies each query on its own; "
                "set evaluate.transductive=false (protonet supports it)"
            )
        if cls.pretrains and config.pretrain.steps == 0:
            raise ConfigError(
                f"pretrain.steps: {cls.name} starts from a pre-trained backbone; "
                "set pretrain.steps > 0 (e.g. --set pretrain.steps=1000)"
            )


METHODS: dict[str, type[FewShotMethod]] = {}


def register(cls: type[FewShotMethod]) -> type[FewShotMethod]:
    METHODS[cls.name] = cls
    return cls
