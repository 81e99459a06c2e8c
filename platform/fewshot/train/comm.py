"""How workers combine results: the one all-reduce of a step."""

from __future__ import annotations

import torch
from torch import nn


class Comm:
    """One process: nothing to combine. `train.distributed` sums over Ray workers."""

    rank = 0
    world_size = 1

    def all_reduce_sum(self, flat: torch.Tensor) -> torch.Tensor:
        return flat


def all_reduce_gradients(params: list[nn.Parameter], extras: torch.Tensor, comm: Comm):
    """Sum the gradients of `params` and the vector `extras` over the workers in one
    all-reduce; the sums replace the gradients, and the summed extras are returned.
    A parameter without a gradient sends zeros, so every rank sends the same layout."""
    grads = [p.new_zeros(p.numel()) if p.grad is None else p.grad.reshape(-1) for p in params]
    flat = comm.all_reduce_sum(torch.cat(grads + [extras.to(grads[0].dtype)]))
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat[offset:]
