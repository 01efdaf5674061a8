"""The optimizer a run steps with: DP-SGD / DP-Adam once :func:`privtune.dp.noise.privatize_` has
replaced each gradient by its privatized value (the optimizer itself is post-processing)."""
from __future__ import annotations

import torch


def param_groups(params, weight_decay: float, names: dict[int, str] | None = None, no_decay=()) -> list[dict]:
    """Two groups: decayed, and the parameters whose name contains any of ``no_decay`` (bias and LayerNorm
    weights in Hugging Face's convention, which Xu et al.'s code follows: AliceMind ChildTuning/ChildTuningD.py,
    ``create_optimizer_and_scheduler``), which are not. ``names``: ``{id(parameter): name}``; a parameter
    without a name is decayed."""
    params = list(params)
    if not weight_decay or not no_decay or names is None:
        return [{"params": params, "weight_decay": weight_decay}]
    keep = [p for p in params if any(k in names.get(id(p), "") for k in no_decay)]
    kept = {id(p) for p in keep}
    groups = [{"params": [p for p in params if id(p) not in kept], "weight_decay": weight_decay},
              {"params": keep, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(name: str, params, lr: float, weight_decay: float = 0.0,
                    betas=(0.9, 0.999), eps: float = 1e-8, momentum: float = 0.0,
                    names: dict[int, str] | None = None, no_decay=()):
    """``sgd``, ``adam`` or ``adamw`` (DP-SGD / DP-Adam once gradients are privatized); weight decay
    skips the parameters :func:`param_groups` exempts."""
    params = param_groups(params, weight_decay, names, no_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose sgd, adam or adamw")
