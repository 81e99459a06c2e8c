"""MAML (Finn et al., 2017): learn an initialisation that adapts in a few SGD steps.

Inner loop, on the support set:  theta' = theta - inner_lr * grad L_support(theta)
Outer loop: the query loss of theta', differentiated through the inner loop
(second order), or with the inner gradients treated as constants (first order).

The inner loop is functional (`torch.func.functional_call` on a dict of adapted
tensors): the module's own parameters are never overwritten, so autograd, DDP
and gradient all-reduce see ordinary parameters. learn2learn's `clone()` /
`adapt()` pattern, without mutating modules.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.func import functional_call

from fewshot.data.episodes import Episode
from fewshot.methods.base import FewShotMethod, Loss, MethodParams, register


class MAMLParams(MethodParams):
    inner_steps: int = Field(5, ge=1)
    eval_inner_steps: int | None = Field(None, ge=1)  # None: inner_steps
    inner_lr: float = Field(0.4, gt=0)
    first_order: bool = False
    # Which parameters the inner loop adapts: all, or the last block and the head
    # (DATG's protocol), or the head only.
    adapt: Literal["all", "last_block", "head"] = "all"


@register
class MAML(FewShotMethod):
    name = "maml"
    Params = MAMLParams
    running_stats = False
    fixed_way = True

    def __init__(self, backbone, params, shape):
        super().__init__(backbone, params, shape)
        self.head = nn.Linear(backbone.feature_dim(shape.channels, shape.image_size), shape.n_way)
        last = f"backbone.blocks.{backbone.n_layers - 1}."
        keep = {"all": ("",), "last_block": (last, "head."), "head": ("head.",)}[params.adapt]
        self.adapted_names = [n for n, _ in self.named_parameters() if n.startswith(keep)]

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Images (start 0) or layer-`start` representations -> logits [B, N]."""
        return self.head(self.backbone.head(self.backbone.forward_layers(x, start)))

    def mixup_layers(self) -> int:
        """Task mixup happens below the adapted layers: the inner loop must see the
        mixed representations as its input."""
        return {"all": 0, "last_block": self.backbone.n_layers - 1, "head": self.backbone.n_layers}[
            self.params.adapt
        ]

    def hidden(self, episode: Episode, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Support and query run as separate batches, as in `loss` (batch statistics).
        layers = self.backbone.forward_layers
        return layers(episode.support_x, 0, layer), layers(episode.query_x, 0, layer)

    def adapt(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        steps: int,
        create_graph: bool,
        start: int = 0,
    ) -> dict[str, torch.Tensor]:
        """The parameters after `steps` SGD steps on the support loss (a dict)."""
        params = dict(self.named_parameters())
        for _ in range(steps):
            logits = functional_call(self, params, (support_x,), {"start": start})
            loss = F.cross_entropy(logits.float(), support_y)
            tensors = [params[n] for n in self.adapted_names]
            grads = torch.autograd.grad(loss, tensors, create_graph=create_graph)
            for name, grad in zip(self.adapted_names, grads, strict=True):
                params[name] = params[name] - self.params.inner_lr * grad
        return params

    def loss(self, episode: Episode, start: int = 0) -> Loss:
        params = self.adapt(
            episode.support_x,
            episode.support_y,
            self.params.inner_steps,
            create_graph=not self.params.first_order,
            start=start,
        )
        logits = functional_call(self, params, (episode.query_x,), {"start": start})
        ce = F.cross_entropy(logits.float(), episode.query_y)
        return Loss(total=ce, logits=logits, parts={"ce": ce})

    def predict(self, support_x, support_y, query_x):
        steps = self.params.eval_inner_steps or self.params.inner_steps
        with torch.enable_grad():  # adaptation needs gradients even under no_grad
            params = self.adapt(support_x, support_y, steps, create_graph=False)
        with torch.no_grad():
            return functional_call(self, params, (query_x,))
