"""Methods by name. Adding one is one new module here plus its import below."""

from __future__ import annotations

from fewshot.errors import ConfigError
from fewshot.methods import cfn, maml, mtl, protonet, subspace, trml  # noqa: F401  (registers them)
from fewshot.methods.base import METHODS, FewShotMethod, Loss, MethodParams, Shape
from fewshot.models.backbones import build_backbone


def method_class(name: str) -> type[FewShotMethod]:
    if name not in METHODS:
        raise ConfigError(f"method.name: unknown method {name!r}; use one of {sorted(METHODS)}")
    return METHODS[name]


def build_method(config, channels: int) -> FewShotMethod:
    """The method of a validated `config` (fewshot.config.validate has checked it), with
    its backbone, for images with `channels` channels."""
    cls = method_class(config.method.name)
    backbone = build_backbone(
        config.backbone.name, channels, config.backbone.width, running_stats=cls.running_stats
    )
    shape = Shape(
        channels=channels,
        image_size=config.data.image_size,
        n_way=config.episode.n_way,
        k_shot=config.episode.k_shot,
    )
    return cls(backbone, config.method.settings, shape)


__all__ = [
    "METHODS",
    "FewShotMethod",
    "Loss",
    "MethodParams",
    "Shape",
    "build_method",
    "method_class",
]
