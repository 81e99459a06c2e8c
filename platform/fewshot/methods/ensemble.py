"""An ensemble of trained methods: the mean of their log-probabilities.

Not a training method (it has no `loss`): independently trained members, each with
its own seed, combined at test time. log p(n | q) = mean_m log_softmax(logits_m)[n].
"""

from __future__ import annotations

import torch
from torch import nn

from fewshot.methods.base import FewShotMethod


class Ensemble(nn.Module):
    def __init__(self, members: list[FewShotMethod]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def predict(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor
    ) -> torch.Tensor:
        """The members' `predict` inputs -> mean log-probabilities [M, N]."""
        log_probs = [
            m.predict(support_x, support_y, query_x).float().log_softmax(1) for m in self.members
        ]
        return torch.stack(log_probs).mean(0)
