"""Child-Tuning (Xu et al., EMNLP 2021): gradient masks on a "child network".

* CT_F (task-free): each step a fresh Bernoulli(p_F) mask multiplies every
  trainable parameter's gradient, scaled by 1/p_F so the update is unbiased.
* CT_D (task-driven): a fixed mask keeping the top p_D fraction of encoder-layer
  parameters by Fisher information (:mod:`privtune.childtuning.fisher`); no rescaling.

Masks act on ``p.grad`` after clipping and noise and before the optimizer, as
in the official code: with Adam, a masked coordinate still moves by its
momentum, and weight decay still applies to it. These are the paper's choices
and kept by default (``child.strict: false``). With ``child.strict: true`` a
masked coordinate does not move at all in that step: :func:`snapshot` before the
optimizer step and :func:`restore_masked_` after it put its old value back.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from privtune.choices import CHILD_METHODS  # noqa: E402,F401 (re-exported)

_ENCODER_LAYER = re.compile(r"(^|\.)(layer|layers|h|block)\.\d+\.")


def is_encoder_layer(name: str) -> bool:
    """Parameters of the stacked transformer blocks (BERT ``layer.N``, Llama ``layers.N``, GPT-2 ``h.N``)."""
    return bool(_ENCODER_LAYER.search(name))


Kept = list[tuple[nn.Parameter, torch.Tensor]]  # (parameter, boolean mask of its coordinates that update)


def ct_f_mask_(params, p_f: float, generator: torch.Generator | None = None, return_masks: bool = True) -> Kept:
    """In place: ``g ← g ⊙ Bernoulli(p_F) / p_F`` for every parameter with a gradient; returns the masks
    (none with ``return_masks=False``, so that each is freed as soon as it is applied)."""
    if not 0 < p_f <= 1:
        raise ValueError(f"p_F must be in (0, 1], got {p_f}")
    kept = []
    for p in params:
        if p.grad is None:
            continue
        dev = generator.device if generator is not None else p.device
        keep = (torch.rand(p.shape, generator=generator, device=dev, dtype=torch.float32) < p_f).to(p.device)
        p.grad.mul_(keep.to(dtype=p.grad.dtype)).div_(p_f)
        if return_masks:
            kept.append((p, keep))
    return kept


def fixed_mask_(model: nn.Module, masks: dict[str, torch.Tensor]) -> Kept:
    """In place: ``g ← g ⊙ mask`` for the parameters named in ``masks`` (CT_D); returns the masks."""
    named = dict(model.named_parameters())
    kept = []
    for name, mask in masks.items():
        p = named[name]
        keep = mask.to(device=p.device, dtype=torch.bool)
        if p.grad is not None:
            p.grad.mul_(keep.to(dtype=p.grad.dtype))
        kept.append((p, keep))
    return kept


def snapshot(kept: Kept) -> list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]]:
    """The current values of the masked parameters (taken before ``optimizer.step()``)."""
    return [(p, keep, p.detach().clone()) for p, keep in kept]


def restore_masked_(saved) -> None:
    """After ``optimizer.step()``: masked coordinates get their old values back (strict Child-Tuning)."""
    with torch.no_grad():
        for p, keep, before in saved:
            p.copy_(torch.where(keep, p, before))


def check_mask_fits(model: nn.Module, masks: dict[str, torch.Tensor], source: str) -> None:
    """A mask file made for another model is an error naming the first mismatch."""
    named = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in named:
            raise ValueError(f"Fisher mask {source} names parameter '{name}' that this model does not have: "
                             "it was computed for another model; rerun the fisher_mask rule for this model")
        if tuple(mask.shape) != tuple(named[name].shape):
            raise ValueError(f"Fisher mask {source}: parameter '{name}' has shape {tuple(mask.shape)} in the mask "
                             f"but {tuple(named[name].shape)} in the model; it was computed for another model")
