"""Prototypical Networks (Snell et al., 2017).

prototype c_n = mean of the support embeddings of class n;
logits = -||f(q) - c_n||^2 / temperature   (euclidean, the paper's choice)
      or  cos(f(q), c_n) / temperature    (cosine).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from fewshot.methods.base import FewShotMethod, MethodParams, register


class ProtoNetParams(MethodParams):
    distance: Literal["euclidean", "cosine"] = "euclidean"
    temperature: float = Field(1.0, gt=0)


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


@register
class ProtoNet(FewShotMethod):
    name = "protonet"
    Params = ProtoNetParams

    def predict(self, support_x, support_y, query_x):
        # One forward over support and query: one batch, one set of batch statistics.
        z = self.backbone(torch.cat([support_x, query_x])).float()
        support_z, query_z = z[: len(support_x)], z[len(support_x) :]
        n_way = int(support_y.max()) + 1
        centres = prototypes(support_z, support_y, n_way)
        if self.params.distance == "cosine":
            scores = F.normalize(query_z, dim=1) @ F.normalize(centres, dim=1).T
        else:
            scores = -squared_distances(query_z, centres)
        return scores / self.params.temperature
