"""Fixed test-time views of a batch, and the affine resampling they share with training
augmentation (augment/images.py).

`fixed_views`: deterministic shifts by 5% of the image side whose embeddings a method
may average at test time (ProtoNet's `test_views`). They belong to the model, not to
the data pipeline: a served model applies them itself, so they need no config.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Shifts of the test views, as fractions of the image side: the identity first.
VIEW_SHIFTS = [(0.0, 0.0), (0.05, 0.0), (-0.05, 0.0), (0.0, 0.05), (0.0, -0.05)]


def affine_grids(theta: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sample `like` [B, C, H, W] through the affine maps theta [B, 2, 3]; zero outside."""
    grid = F.affine_grid(theta.to(like.dtype), list(like.shape), align_corners=False)
    return F.grid_sample(like, grid, align_corners=False, padding_mode="zeros")


def fixed_views(x: torch.Tensor, count: int) -> torch.Tensor:
    """x [B, C, H, W] -> [count * B, C, H, W]: the first `count` of VIEW_SHIFTS, view-major."""
    if count > len(VIEW_SHIFTS):
        raise ValueError(f"at most {len(VIEW_SHIFTS)} test views, got {count}")
    b = len(x)
    theta = torch.zeros(count, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = 2 * torch.tensor(VIEW_SHIFTS[:count])  # grid units span 2 per side
    theta = theta.repeat_interleave(b, 0).to(x.device)
    return affine_grids(theta, x.repeat(count, 1, 1, 1))
