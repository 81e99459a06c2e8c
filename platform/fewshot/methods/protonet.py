"""Prototypical Networks (Snell et al., 2017).

prototype c_n = mean of the support embeddings of class n;
logits = -||f(q) - c_n||^2 / temperature   (euclidean, the paper's choice)
      or  cos(f(q), c_n) / temperature    (cosine);

the temperature is a setting, or with `learn_temperature` a parameter exp(log_temperature)
trained with the backbone from the setting's value.

At test time f may be averaged over `test_views` fixed shifts of each image
(models/views.py): a cheap test-time augmentation that travels with the model.

Transductive inference (evaluate.transductive, off by default): one soft k-means step
refines the prototypes with the episode's queries (Ren et al. 2018, "Meta-Learning for
Semi-Supervised Few-Shot Classification"), each query weighted by the model's own
posterior over the classes (its logits, temperature included, where Ren et al. soften
the raw distances: a model trained at temperature 8 is calibrated at 8),

    w_jn = softmax_n(logits(q_j))
    c'_n = (sum_{i in S_n} f(x_i) + sum_j w_jn f(q_j)) / (|S_n| + sum_j w_jn),

and the queries are then scored against c'. A query's answer then depends on the
other queries, which is why it is a separate, labelled figure.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fewshot.data.episodes import Episode
from fewshot.methods.base import FewShotMethod, Loss, MethodParams, register
from fewshot.models.views import VIEW_SHIFTS, fixed_views


class ProtoNetParams(MethodParams):
    distance: Literal["euclidean", "cosine"] = "euclidean"
    temperature: float = Field(1.0, gt=0)
    # True: the temperature is learned with the backbone, starting at `temperature`
    # (a parameter log_temperature; Oreshkin et al. 2018 learn such a metric scale).
    learn_temperature: bool = False
    test_views: int = Field(1, ge=1, le=len(VIEW_SHIFTS))  # 1: no test-time augmentation


def prototypes(support_z: torch.Tensor, support_y: torch.Tensor, n_way: int) -> torch.Tensor:
    """support_z [N*K, D], support_y [N*K] -> class means [N, D]."""
    one_hot = F.one_hot(support_y, n_way).to(support_z.dtype)  # [N*K, N]
    return (one_hot.T @ support_z) / one_hot.sum(dim=0, keepdim=True).T


def squared_distances(query_z: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """[M, D], [N, D] -> [M, N] squared euclidean distances."""
    return (
        query_z.pow(2).sum(1, keepdim=True)
        - 2 * query_z @ centres.T
        + centres.pow(2).sum(1).unsqueeze(0)
    ).clamp_min(0)


def refined_prototypes(
    support_z: torch.Tensor, support_y: torch.Tensor, query_z: torch.Tensor, logits: torch.Tensor
) -> torch.Tensor:
    """One soft k-means step: support [N*K, D] with labels [N*K], queries [M, D] and their
    logits [M, N] -> prototypes [N, D], each the mean of its supports and of the queries
    weighted by softmax(logits)."""
    n_way = logits.shape[1]
    one_hot = F.one_hot(support_y, n_way).to(support_z.dtype)  # [N*K, N]
    weights = logits.softmax(dim=1).to(support_z.dtype)  # [M, N]
    total = one_hot.T @ support_z + weights.T @ query_z
    return total / (one_hot.sum(0) + weights.sum(0)).unsqueeze(1)


@register
class ProtoNet(FewShotMethod):
    name = "protonet"
    Params = ProtoNetParams
    splits_prediction = True
    transductive = True

    def __init__(self, backbone, params: ProtoNetParams, shape) -> None:
        super().__init__(backbone, params, shape)
        if params.learn_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(params.temperature)))

    @property
    def temperature(self) -> torch.Tensor | float:
        if self.params.learn_temperature:
            return self.log_temperature.float().exp()
        return self.params.temperature

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> embeddings [B, D], averaged over the test views."""
        views = 1 if self.training else self.params.test_views
        z = self.embed(fixed_views(x, views) if views > 1 else x)
        return z.view(views, len(x), -1).mean(0)

    # Means and distances in fp32 under bf16 autocast too: |q|^2 - 2 q.c + |c|^2 in bf16
    # loses the difference between near classes (an exact copy of a support image is then
    # not nearest its own prototype). They are [N*K, D] and [M, D] sized: cheap in fp32.
    def prepare(self, support_z, support_y):
        with torch.autocast(support_z.device.type, enabled=False):
            n_way = int(support_y.max()) + 1
            return {"prototypes": prototypes(support_z.float(), support_y, n_way)}

    def score(self, prepared, query_z):
        """[M, D] against the prototypes [N, D] -> logits [M, N]."""
        with torch.autocast(query_z.device.type, enabled=False):
            query_z, centres = query_z.float(), prepared["prototypes"]
            if self.params.distance == "cosine":
                scores = F.normalize(query_z, dim=1) @ F.normalize(centres, dim=1).T
            else:
                scores = -squared_distances(query_z, centres)
            return scores / self.temperature

    def predict(self, support_x, support_y, query_x):
        # One forward over support and query: one batch, one set of batch statistics.
        return self.split_predict(support_x, support_y, query_x)

    def predict_transductive(self, support_x, support_y, query_x):
        z = self.features(torch.cat([support_x, query_x]))
        support_z, query_z = z[: len(support_x)], z[len(support_x) :]
        logits = self.score(self.prepare(support_z, support_y), query_z)
        with torch.autocast(query_z.device.type, enabled=False):  # fp32, as in `prepare`
            centres = refined_prototypes(support_z.float(), support_y, query_z.float(), logits)
        return self.score({"prototypes": centres}, query_z)

    def mixup_layers(self) -> int:
        return self.backbone.n_layers  # any layer, up to the last feature map

    def loss(self, episode: Episode, start: int = 0) -> Loss:
        z = self.embed(torch.cat([episode.support_x, episode.query_x]), start)
        n_support = len(episode.support_x)
        logits = self.score(self.prepare(z[:n_support], episode.support_y), z[n_support:])
        ce = F.cross_entropy(logits, episode.query_y)
        return Loss(total=ce, logits=logits, parts={"ce": ce}, embeddings=z)
