"""An ensemble of trained methods: the mean of their log-probabilities.

Not a training method (it has no `loss`): independently trained members, each with
its own seed or settings, combined at test time,

    log p(n | q) = mean_m log_softmax(logits_m(q))[n]          [M, N],

a normalised geometric mean of the members' probabilities once softmaxed again. It
keeps the prediction contract (`Predictor`, methods/base.py) member by member: its
features and its prepared support set are the tuples of its members', its score the
same mean of the members' scores, so it splits where every member splits. It answers
where every member answers (`answers_way`), and to the registry, the gate and serving
it is one model (model_file.py writes its members into one model file).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fewshot.methods.base import Features, FewShotMethod, Prepared


def mean_log_probs(logits: Iterable[torch.Tensor]) -> torch.Tensor:
    """The members' logits, each [M, N] -> mean_m log_softmax(logits_m) [M, N] (fp32)."""
    return torch.stack([x.float().log_softmax(1) for x in logits]).mean(0)


class Ensemble(nn.Module):
    name = "ensemble"

    def __init__(self, members: list[FewShotMethod]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    @property
    def shape(self):
        """The first member's training shape (channels, ways), which the others share."""
        return self.members[0].shape

    @property
    def splits_prediction(self) -> bool:
        return all(m.splits_prediction for m in self.members)

    @property
    def transductive(self) -> bool:
        return all(m.transductive for m in self.members)

    def answers_way(self, n_way: int) -> bool:
        return all(m.answers_way(n_way) for m in self.members)

    @property
    def test_views(self) -> int:
        return max(m.test_views for m in self.members)

    def with_test_views(self, views: int) -> Ensemble:
        for member in self.members:
            member.with_test_views(views)
        return self

    def predict(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor
    ) -> torch.Tensor:
        """The members' `predict` inputs -> mean log-probabilities [M, N]."""
        return mean_log_probs(m.predict(support_x, support_y, query_x) for m in self.members)

    def predict_transductive(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor
    ) -> torch.Tensor:
        """The mean of the members' transductive log-probabilities [M, N]."""
        return mean_log_probs(
            m.predict_transductive(support_x, support_y, query_x) for m in self.members
        )

    def features(self, x: torch.Tensor) -> tuple[Features, ...]:
        """Images [B, C, H, W] -> each member's features, [B, ...] each."""
        return tuple(m.features(x) for m in self.members)

    def prepare(self, support_z: tuple[Features, ...], support_y: torch.Tensor) -> Prepared:
        """Each member's support features, labels [S] -> each member's prepared set."""
        return tuple(m.prepare(z, support_y) for m, z in zip(self.members, support_z, strict=True))

    def score(self, prepared: tuple[Prepared, ...], query_z: tuple[Features, ...]) -> torch.Tensor:
        """Each member's prepared set and query features -> mean_m log_softmax(score_m)
        [M, N], as `predict`."""
        members = zip(self.members, prepared, query_z, strict=True)
        return mean_log_probs(m.score(p, z) for m, p, z in members)
