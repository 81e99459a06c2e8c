"""CFN, the category-fusion network (seed 000): each class's classifier is predicted
from the support samples of every class of the episode, not only its own.

    a(x)   the pre-trained feature extractor (frozen unless `finetune_extractor`)
    A      [N, n], row y = mean of class y's support features
    L      = phi(A), a fusion module mixing the rows of A:
             cim  L = W_CIM A, with a learned W_CIM [N, N]
             srm  L_i = alpha_i A_i + beta_i mean_j A_j, (alpha_i, beta_i) = g(A_i),
                  g = Linear(n, n), ReLU, Linear(n, 2)
             frm  L = w(A A^T) A, w = Linear(N^2, N^2), ReLU, Linear(N^2, N^2)
             ensemble: the average of the three modules' softmax outputs
    W_L    = L Psi, Psi [n, n] the parameter predictor
    logit  = scale * W_L[y] . a(x)

Decisions:
- Every fusion module and Psi start as the identity (W_CIM = I; g's last layer 0 with
  bias (1, 0); w's last layer 0 with bias vec(I); Psi = I), so an untrained CFN is the
  no-fusion baseline: a dot product with the class prototype.
- Features are L2-normalised and the logits scaled by a learned `scale` (init
  `scale_init`): raw dot products of pre-trained features saturate the softmax.
- The SRM mixes with the mean row (the seed's text), not the sum.
- `cim`, `frm` and `ensemble` have N x N parameters, so they test only at the
  training n_way; `srm` works at any n_way.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fewshot.errors import ConfigError
from fewshot.methods.base import FewShotMethod, MethodParams, register
from fewshot.methods.protonet import prototypes

FUSIONS = ("cim", "srm", "frm")


class CFNParams(MethodParams):
    fusion: Literal["cim", "srm", "frm", "ensemble"] = "cim"
    finetune_extractor: bool = False
    scale_init: float = Field(10.0, gt=0)


class CIM(nn.Module):
    """L = W A, W [N, N] learned, initialised to the identity."""

    def __init__(self, n_way: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(n_way))

    def fusion_matrix(self, prototypes: torch.Tensor) -> torch.Tensor:
        return self.weight

    def forward(self, prototypes: torch.Tensor) -> torch.Tensor:
        """A [N, n] -> L [N, n]."""
        return self.fusion_matrix(prototypes) @ prototypes


class SRM(nn.Module):
    """L_i = alpha_i A_i + beta_i mean_j A_j, with (alpha_i, beta_i) predicted from A_i."""

    def __init__(self, n_way: int, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 2))
        nn.init.zeros_(self.net[2].weight)
        with torch.no_grad():
            self.net[2].bias.copy_(torch.tensor([1.0, 0.0]))

    def fusion_matrix(self, prototypes: torch.Tensor) -> torch.Tensor:
        """W[i, i] = alpha_i + beta_i / N, W[i, j] = beta_i / N (the mean over N rows)."""
        alpha, beta = self.net(prototypes).unbind(1)
        n = len(prototypes)
        return torch.diag(alpha) + beta[:, None].expand(n, n) / n

    def forward(self, prototypes: torch.Tensor) -> torch.Tensor:
        return self.fusion_matrix(prototypes) @ prototypes


class FRM(nn.Module):
    """L = w(A A^T) A: the fusion matrix is predicted from the Gram matrix of A."""

    def __init__(self, n_way: int, dim: int) -> None:
        super().__init__()
        size = n_way * n_way
        self.net = nn.Sequential(nn.Linear(size, size), nn.ReLU(), nn.Linear(size, size))
        nn.init.zeros_(self.net[2].weight)
        with torch.no_grad():
            self.net[2].bias.copy_(torch.eye(n_way).flatten())

    def fusion_matrix(self, prototypes: torch.Tensor) -> torch.Tensor:
        n = len(prototypes)
        return self.net((prototypes @ prototypes.T).flatten()).view(n, n)

    def forward(self, prototypes: torch.Tensor) -> torch.Tensor:
        return self.fusion_matrix(prototypes) @ prototypes


MODULES = {"cim": CIM, "srm": SRM, "frm": FRM}


@register
class CFN(FewShotMethod):
    name = "cfn"
    splits_prediction = True
    Params = CFNParams
    pretrains = True

    def __init__(self, backbone, params, shape):
        super().__init__(backbone, params, shape)
        dim = backbone.feature_dim(shape.channels, shape.image_size)
        names = FUSIONS if params.fusion == "ensemble" else (params.fusion,)
        self.fusions = nn.ModuleDict({n: MODULES[n](shape.n_way, dim) for n in names})
        self.predictor = nn.Linear(dim, dim, bias=False)  # Psi
        nn.init.eye_(self.predictor.weight)
        self.log_scale = nn.Parameter(torch.tensor(params.scale_init).log())
        if not params.finetune_extractor:
            self.freeze_backbone()

    @classmethod
    def supports_way(cls, n_way: int, trained_way: int, params: CFNParams) -> bool:
        return params.fusion == "srm" or n_way == trained_way

    @classmethod
    def check(cls, config, params: CFNParams) -> None:
        eval_way = config.eval_episode().n_way
        if not cls.supports_way(eval_way, config.episode.n_way, params):
            raise ConfigError(
                f"evaluate.n_way: cfn's {params.fusion} fusion has episode.n_way = "
                f"{config.episode.n_way} rows, got {eval_way}; use method.fusion=srm or "
                f"train a separate model for {eval_way}-way"
            )
        super().check(config, params)

    def classifier(self, prototypes: torch.Tensor, fusion: str) -> torch.Tensor:
        """A [N, n] -> class weight vectors W_L = phi(A) Psi [N, n]."""
        return self.predictor(self.fusions[fusion](prototypes))

    def features(self, x):
        """Images -> unit-length embeddings [B, n]."""
        return F.normalize(self.embed(x), dim=1)

    def prepare(self, support_z, support_y):
        return {"prototypes": prototypes(support_z, support_y, int(support_y.max()) + 1)}

    def predict(self, support_x, support_y, query_x):
        return self.split_predict(support_x, support_y, query_x)

    def score(self, prepared, query_z):
        """[M, n] against the class weight vectors of each fusion -> logits [M, N]."""
        centres = prepared["prototypes"]
        scale = self.log_scale.exp()
        logits = [scale * query_z @ self.classifier(centres, n).T for n in self.fusions]
        if len(logits) == 1:
            return logits[0]
        # The ensemble averages probabilities; their log keeps cross-entropy and argmax.
        return torch.stack([x.softmax(1) for x in logits]).mean(0).log()
