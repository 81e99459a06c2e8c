"""Task augmentation: task mixup (DATG and its ablation MLTI)."""
