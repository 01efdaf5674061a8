"""The optimizer a run steps with: DP-SGD / DP-Adam once :func:`privtune.dp.noise.privatize_` has
replaced each gradient by its privatized value (the optimizer itself is post-processing)."""
from __future__ import annotations

import torch


def build_optimizer(name: str, params, lr: float, weight_decay: float = 0.0,
                    betas=(0.9, 0.999), eps: float = 1e-8, momentum: float = 0.0):
    """``sgd``, ``adam`` or ``adamw`` (DP-SGD / DP-Adam once gradients are privatized)."""
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose sgd, adam or adamw")
