"""Batch samplers: Poisson subsampling (what the accountant assumes) and
fixed-size shuffled batches (what Li et al.'s code did).

Both yield lists of example indices, one list per logical batch (optimizer
step), and are deterministic given the seed and restartable at a given step.
"""
from __future__ import annotations

import math

import numpy as np

SAMPLING = ("poisson", "shuffle")


def num_steps(n: int, batch_size: int, epochs: float) -> int:
    return max(1, int(math.ceil(epochs * n / batch_size)))


def logical_batches(n: int, batch_size: int, steps: int, seed: int, scheme: str = "poisson",
                    start: int = 0):
    """Yield ``(step, indices)`` for steps ``start .. steps-1``.

    ``poisson``: each example joins each batch independently with probability
    q = batch_size / n, so batch sizes vary around ``batch_size``.
    ``shuffle``: a fresh permutation each epoch cut into batches of exactly
    ``batch_size`` (the last, short one of an epoch is dropped).
    """
    if scheme not in SAMPLING:
        raise ValueError(f"unknown sampling scheme {scheme!r}; choose one of {SAMPLING}")
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}] for {n} training examples, got {batch_size}")
    q = batch_size / n
    per_epoch = n // batch_size
    for step in range(start, steps):
        rng = np.random.default_rng([seed, step] if scheme == "poisson" else [seed, step // per_epoch])
        if scheme == "poisson":
            yield step, np.flatnonzero(rng.random(n) < q)
        else:
            perm = rng.permutation(n)
            k = step % per_epoch
            yield step, perm[k * batch_size:(k + 1) * batch_size]


def physical_batches(indices, lengths, max_examples: int, max_tokens: int | None = None) -> list[list[int]]:
    """Split one logical batch into the physical batches that are run through the model.

    Without ``max_tokens``: consecutive slices of ``max_examples`` (every batch is padded to
    its longest example). With it: the examples sorted by length, then cut greedily so that
    no physical batch exceeds ``max_examples`` examples or ``max_tokens`` padded tokens
    (count × longest length); an example longer than ``max_tokens`` goes alone. Short
    sentences then stop paying for the longest one's padding. The split changes no
    privatized quantity: each example's clipped gradient depends on that example alone, and
    the clipped sum (and the noise added to it once per logical batch) on the set of examples.
    """
    indices = [int(i) for i in indices]
    if max_tokens is None:
        return [indices[lo: lo + max_examples] for lo in range(0, len(indices), max_examples)]
    if max_tokens < 1:
        raise ValueError(f"train.physical_tokens must be >= 1 (padded tokens per physical batch), got {max_tokens}")
    out: list[list[int]] = []
    current: list[int] = []
    for i in sorted(indices, key=lambda j: (lengths[j], j)):
        # sorted ascending: the example being added is the longest of the batch so far
        if current and (len(current) >= max_examples or (len(current) + 1) * lengths[i] > max_tokens):
            out.append(current)
            current = []
        current.append(i)
    if current:
        out.append(current)
    return out
