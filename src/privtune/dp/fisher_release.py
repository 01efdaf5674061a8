"""The DP Fisher: the Child-Tuning_D scores released once with Gaussian noise, and its accounting event.

Each example's gradient over the selected parameters is clipped to norm ``C_F`` (jointly, not
per tensor, so that one example changes the summed squares by at most ``C_F²`` in L2 norm),
squared, summed over one full pass, and released once with Gaussian noise ``σ_F·C_F²``: one
Gaussian mechanism (sampling rate 1, one step) whose cost the accountant composes with
training's, so the ε a run reports covers both. The mask
(:func:`privtune.childtuning.fisher.top_fraction_mask`) is post-processing of that release.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from privtune.dp import accounting
from privtune.dp.noise import standard_normal


def dp_fisher_information(model: nn.Module, examples: Iterable, loss_fn: Callable, select: Callable[[str], bool],
                          clip: float, noise_multiplier: float, key: np.random.SeedSequence) -> dict[str, torch.Tensor]:
    """``{name: Σ_i clip_C(g_i)² + N(0, (σ·C²)²)}``, shifted to be non-negative (order kept).

    ``examples`` yields batches of **one** example each; ``g_i`` is that example's
    gradient over the selected parameters, clipped to norm ``clip`` jointly.
    The scores are unnormalised: the mask depends on their order only. The model stays in the mode
    the caller set (dropout's draws are not data: they change nothing in the sensitivity). The noise is drawn from
    ``key``'s streams (:func:`privtune.dp.rng.fisher_key`), one per selected tensor.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and select(n)}
    if not params:
        raise ValueError("no parameter is selected for the Fisher mask (check the model's layer names)")
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    for batch in examples:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        if loss.numel() != 1:
            raise ValueError(f"the DP Fisher needs one example per batch, got {loss.numel()}")
        loss.sum().backward()
        grads = {n: p.grad.float() for n, p in params.items() if p.grad is not None}
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
        factor = (clip / (norm + 1e-12)).clamp(max=1.0)
        for n, g in grads.items():
            total[n] += (g * factor).pow(2)
    model.zero_grad(set_to_none=True)
    std = noise_multiplier * clip ** 2
    for i, t in enumerate(total.values()):
        t += standard_normal(t.numel(), key, i).view(t.shape).to(t.device) * std
    low = min(float(t.min()) for t in total.values())
    return {n: t - low for n, t in total.items()}


def dp_fisher_event(fisher_epsilon: float, delta: float):
    """The DP Fisher as an accounting event: one Gaussian release (rate 1) calibrated to ``fisher_epsilon``."""
    if not fisher_epsilon or fisher_epsilon <= 0:
        raise ValueError("child.fisher_source: dp needs child.fisher_epsilon > 0 (the ε spent on the Fisher)")
    sigma = accounting.calibrate_noise(fisher_epsilon, delta, 1.0, 1)
    return accounting.GaussianEvent(sigma, 1.0, 1, "dp_fisher")
