"""Fisher information and the Child-Tuning_D mask.

The empirical Fisher of each parameter is estimated over one pass of the
training set: the squared gradient of each batch's loss, averaged over batches.
As in the official Child-Tuning code (AliceMind ChildTuning/ChildTuningD.py,
``calculate_fisher``), each tensor's gradient is clipped to norm ``clip`` (1.0)
before squaring, and the model is in train mode (dropout on; ``child.fisher_mode:
eval`` turns it off).

Three sources of the mask (``child.fisher_source``):

* ``train``: the training data, no noise (the paper's method). Under DP its ε
  does not cover the mask; the run's privacy report says so loudly.
* ``public``: another dataset or split named in the config (no privacy cost,
  provided that data really is public).
* ``dp``: a differentially private Fisher (:mod:`privtune.dp.fisher_release`): each
  example's gradient over the selected parameters is clipped to norm ``C_F``
  (jointly, not per tensor, so that one example changes the summed squares by at
  most ``C_F²`` in L2 norm), squared, summed over one full pass, and released
  once with Gaussian noise ``σ_F·C_F²``: one Gaussian mechanism (sampling rate 1,
  one step) whose cost the accountant composes with training's, so the ε a run
  reports covers both. The mask is post-processing of that release.

The mask keeps the top ``p_D`` fraction of the *selected* parameters (encoder
layers by default) under one global threshold. The threshold is found by
bisection on the IEEE-754 bit patterns of the (non-negative) scores, counting
per tensor on its own device: no host-side concatenation of every parameter,
so it scales to bert-large and beyond. Ties at the threshold are broken by
position (parameter order, then flat index), so the mask keeps exactly
``round(p_D · N)`` entries.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Callable, Iterable

import torch
from torch import nn

from privtune.dp.fisher_release import dp_fisher_event, dp_fisher_information  # noqa: F401 (re-exported)

FISHER_SOURCES = ("train", "public", "dp")


def fisher_information(model: nn.Module, batches: Iterable, loss_fn: Callable, select: Callable[[str], bool],
                       clip: float | None = 1.0, mode: str = "train") -> dict[str, torch.Tensor]:
    """``{name: mean over batches of clip(grad)²}`` for trainable parameters with ``select(name)``, the
    model in ``mode`` (``train``: dropout on, as the official code; ``eval``: off)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and select(n)}
    if not params:
        raise ValueError("no parameter is selected for the Fisher mask (check the model's layer names)")
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = 0
    _set_mode(model, mode)
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).mean().backward()
        for n, p in params.items():
            if p.grad is None:
                continue
            g = p.grad.float()
            if clip is not None:
                norm = g.norm()
                if norm > clip:
                    g = g * (clip / norm)
            fisher[n] += g.pow(2)
        count += 1
    model.zero_grad(set_to_none=True)
    if count == 0:
        raise ValueError("no batches: the Fisher estimate needs training data")
    return {n: f / count for n, f in fisher.items()}


FISHER_MODES = ("train", "eval")


def _set_mode(model: nn.Module, mode: str) -> None:
    if mode not in FISHER_MODES:
        raise ValueError(f"child.fisher_mode must be one of {FISHER_MODES}, got {mode!r}")
    model.train(mode == "train")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Order-preserving int32 view of non-negative float32 scores."""
    t = t.detach().float().clamp_min(0)
    return t.view(torch.int32)


def top_fraction_mask(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Boolean masks keeping exactly ``round(fraction · N)`` of the largest scores overall."""
    if not 0 < fraction <= 1:
        raise ValueError(f"p_D must be in (0, 1], got {fraction}")
    total = sum(s.numel() for s in scores.values())
    k = int(round(fraction * total))
    bits = {n: _bits(s) for n, s in scores.items()}
    # Largest threshold v with count(bits >= v) >= k: the k-th largest score.
    lo, hi = 0, 0x7F800000  # [0, +inf]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(int((b >= mid).sum()) for b in bits.values()) >= k:
            lo = mid
        else:
            hi = mid - 1
    masks, need_ties = {}, k - sum(int((b > lo).sum()) for b in bits.values())
    for n, b in bits.items():
        m = b > lo
        if need_ties > 0:
            tie = (b == lo).flatten()
            pos = torch.nonzero(tie).flatten()[:need_ties]
            flat = m.flatten().clone()
            flat[pos] = True
            m = flat.view_as(b)
            need_ties -= len(pos)
        masks[n] = m
    return masks


def mask_density(masks: dict[str, torch.Tensor]) -> float:
    return sum(int(m.sum()) for m in masks.values()) / max(1, sum(m.numel() for m in masks.values()))


def compute_mask_file(model_dir, train_file, out_file, kind: str, num_labels: int, p_d: float,
                      batch_size: int = 16, max_length: int = 128, seed: int = 0, threads: int | None = None,
                      source: str = "train", fisher_epsilon: float | None = None, fisher_clip: float = 1.0,
                      mode: str = "train",
                      delta: float | str = "auto", secure_noise: bool = False) -> dict:
    """The ``fisher_mask`` rule: Fisher over one pass of ``train_file``, top-p_D encoder-layer mask, saved.

    ``source`` is ``train`` or ``public`` (plain Fisher of ``train_file``) or ``dp``
    (:func:`dp_fisher_information` at ``fisher_epsilon``, δ as training's: ``auto`` = n^-1.1).
    """
    from privtune.objectives import head
    from privtune.childtuning.mask import is_encoder_layer
    from privtune.dp import accounting
    from privtune.io import read_jsonl, torch_save
    from privtune.models.load import default_device, load_for_task, load_tokenizer
    from privtune.dp import rng
    from privtune.dp.plan import noise_rng_record

    if source not in FISHER_SOURCES:
        raise ValueError(f"child.fisher_source must be one of {FISHER_SOURCES}, got {source!r}")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)  # the classifier head is initialised as in training with this seed
    device = default_device()
    tok = load_tokenizer(model_dir)
    model = load_for_task(model_dir, kind, num_labels).to(device)
    data = head.encode(tok, read_jsonl(train_file), kind, max_length)
    info = {"p_d": p_d, "source": source, "mode": mode, "data": str(train_file), "model": str(model_dir),
            "seed": seed,
            "examples": len(data), "private": source == "dp"}
    events = []

    def loss_fn(m, b):
        return head.per_example_loss(m, b, kind)

    if source == "dp":
        n = len(data)
        delta = accounting.default_delta(n) if delta == "auto" else float(delta)
        event = dp_fisher_event(fisher_epsilon, delta)
        sigma = event.noise_multiplier
        key = rng.fisher_key(rng.secret_root(seed, secure_noise))
        singles = (head.collate([e], tok.pad_token_id, kind, device) for e in data)
        _set_mode(model, mode)
        scores = dp_fisher_information(model, singles, loss_fn, is_encoder_layer, fisher_clip, sigma, key)
        events = [asdict(event)]
        d = sum(t.numel() for t in scores.values())
        info.update(fisher_epsilon=fisher_epsilon, delta=delta, noise_multiplier=sigma, clip=fisher_clip,
                    noise_rng=("keyed by 128 bits from the operating system's entropy, never stored"
                               if secure_noise else noise_rng_record(False)),
                    # public numbers: noise norm over the largest possible signal norm (n·C²)
                    noise_to_max_signal=sigma * math.sqrt(d) / n)
    else:
        batches = (head.collate(data[i: i + batch_size], tok.pad_token_id, kind, device)
                   for i in range(0, len(data), batch_size))
        scores = fisher_information(model, batches, loss_fn, is_encoder_layer, mode=mode)
    masks = top_fraction_mask(scores, p_d)
    info.update(density=mask_density(masks), parameters=sum(m.numel() for m in masks.values()))
    torch_save({"masks": {n: m.cpu() for n, m in masks.items()}, "info": info, "privacy_events": events}, out_file)
    return info
