"""An ensemble of trained methods: the mean of their log-probabilities.

Not a training method (it has no `loss`): independently trained members, each with
its own seed or settings, combined at test time,

    log p(n | q) = mean_m log_softmax(logits_m(q))[n]          [M, N],

a normalised geometric mean of the members' probabilities once softmaxed again. It
answers where every member answers (`answers_way`), and to the registry, the gate and
serving it is one model (model_file.py writes its members into one model file).
"""

from __future__ import annotations

import torch
from torch import nn

from fewshot.methods.base import FewShotMethod


class Ensemble(nn.Module):
    name = "ensemble"
    splits_prediction = False  # serving calls `predict` on the whole task

    def __init__(self, members: list[FewShotMethod]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    @property
    def shape(self):
        """The first member's training shape (channels, ways), which the others share."""
        return self.members[0].shape

    @property
    def transductive(self) -> bool:
        return all(m.transductive for m in self.members)

    def answers_way(self, n_way: int) -> bool:
        return all(m.answers_way(n_way) for m in self.members)

    def predict(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor
    ) -> torch.Tensor:
        """The members' `predict` inputs -> mean log-probabilities [M, N]."""
        predicts = [m.predict for m in self.members]
        return self._mean_log_probs(predicts, support_x, support_y, query_x)

    def predict_transductive(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor
    ) -> torch.Tensor:
        """The mean of the members' transductive log-probabilities [M, N]."""
        predicts = [m.predict_transductive for m in self.members]
        return self._mean_log_probs(predicts, support_x, support_y, query_x)

    @staticmethod
    def _mean_log_probs(predicts, *task: torch.Tensor) -> torch.Tensor:
        return torch.stack([predict(*task).float().log_softmax(1) for predict in predicts]).mean(0)
