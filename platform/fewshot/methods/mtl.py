"""MTL, meta-transfer learning (seed 004; Sun et al., CVPR 2019).

The backbone is pre-trained on all base classes (`pretrain.steps`) and frozen. Every
conv layer (weights W, bias b) gets per-filter scaling and shifting parameters:

    SS(X) = (W * phi_s1) conv X + (b + phi_s2),   phi_s1 = 1, phi_s2 = 0 at the start.

Because phi_s1 scales whole output filters, SS(X) = phi_s1 (W conv X) + b + phi_s2, which
is what a forward hook on each conv computes: the frozen conv runs unchanged.

Base learner: a linear classifier theta [N, D] on the features, fitted to the support
set by `inner_steps` steps  theta' = theta - inner_lr * grad L_support(theta).
Meta learner: the query loss of theta' updates phi_s1, phi_s2 and theta's
initialisation (second order through the features; the inner loop itself is cheap,
it only touches theta). Meta-test: SS fixed, theta adapts on each support set.

Hard tasks (`hard_tasks` > 0): after each meta-batch the loop records every task's
failure class (lowest query accuracy) and runs an extra meta-batch of tasks built
from the recorded failure classes, with fresh images (methods/hard_tasks.py).

Decision: the frozen backbone's batch-norm keeps the pre-training statistics (eval
mode), so at the start MTL's features are exactly the frozen extractor's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fewshot.data.episodes import Episode
from fewshot.errors import ConfigError
from fewshot.methods.base import FewShotMethod, Loss, MethodParams, register


class MTLParams(MethodParams):
    inner_steps: int = Field(10, ge=1)
    eval_inner_steps: int | None = Field(None, ge=1)  # None: inner_steps
    inner_lr: float = Field(0.1, gt=0)
    hard_tasks: int = Field(2, ge=0)  # tasks of the hard-task meta-batch; 0: none


class ScaleShift(nn.Module):
    """phi_s1 and phi_s2 of one conv layer, applied to its output by a forward hook."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(conv.out_channels))
        self.shift = nn.Parameter(torch.zeros(conv.out_channels))
        conv.register_forward_hook(self.hook)

    def hook(self, conv: nn.Conv2d, inputs, output: torch.Tensor) -> torch.Tensor:
        # (output - b) * scale + b + shift, as one fused multiply-add over the feature map
        offset = self.shift if conv.bias is None else conv.bias * (1 - self.scale) + self.shift
        view = (1, -1, 1, 1)  # in the conv's dtype: bf16 under autocast stays bf16
        return torch.addcmul(
            offset.view(view).to(output.dtype), output, self.scale.view(view).to(output.dtype)
        )


@register
class MTL(FewShotMethod):
    name = "mtl"
    splits_prediction = True
    Params = MTLParams
    fixed_way = True
    pretrains = True

    def __init__(self, backbone, params, shape):
        super().__init__(backbone, params, shape)
        convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
        self.scale_shift = nn.ModuleList(ScaleShift(conv) for conv in convs)
        self.classifier = nn.Linear(
            backbone.feature_dim(shape.channels, shape.image_size), shape.n_way
        )
        self.freeze_backbone()

    @classmethod
    def check(cls, config, params: MTLParams) -> None:
        hard = params.hard_tasks
        workers = config.distributed.max_workers
        if 0 < hard < workers:
            raise ConfigError(
                f"method.hard_tasks: {hard} hard tasks cannot be shared by "
                f"distributed.workers = {workers}; raise it to at least the number of workers"
            )
        super().check(config, params)

    def hard_tasks(self) -> int:
        return self.params.hard_tasks

    def adapt(
        self, support_z: torch.Tensor, support_y: torch.Tensor, steps: int, create_graph: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """theta' = (weight [N, D], bias [N]) after `steps` SGD steps on the support loss."""
        weight, bias = self.classifier.weight, self.classifier.bias
        for _ in range(steps):
            loss = F.cross_entropy(F.linear(support_z, weight, bias), support_y)
            grad_w, grad_b = torch.autograd.grad(loss, (weight, bias), create_graph=create_graph)
            weight = weight - self.params.inner_lr * grad_w
            bias = bias - self.params.inner_lr * grad_b
        return weight, bias

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> [B, D] features of the frozen backbone with scaling and shifting."""
        return self.embed(x)

    def prepare(self, support_z, support_y):
        """The base learner fine-tuned on the support features: theta' (weight, bias)."""
        steps = self.params.eval_inner_steps or self.params.inner_steps
        with torch.enable_grad():  # the base learner needs gradients even under no_grad
            weight, bias = self.adapt(support_z.detach(), support_y, steps, create_graph=False)
        return {"weight": weight.detach(), "bias": bias.detach()}

    def score(self, prepared, query_z):
        return F.linear(query_z, prepared["weight"], prepared["bias"])

    def loss(self, episode: Episode, start: int = 0) -> Loss:
        z = self.features(torch.cat([episode.support_x, episode.query_x]))
        support_z, query_z = z[: len(episode.support_x)], z[len(episode.support_x) :]
        weight, bias = self.adapt(
            support_z, episode.support_y, self.params.inner_steps, create_graph=True
        )
        logits = F.linear(query_z, weight, bias)
        ce = F.cross_entropy(logits, episode.query_y)
        return Loss(total=ce, logits=logits, parts={"ce": ce})

    def predict(self, support_x, support_y, query_x):
        return self.split_predict(support_x, support_y, query_x)
