"""A run's random streams, each independent of the others.

Two roots:

* the **secret root** feeds what ε assumes nobody can recompute: the Gaussian noise and which
  examples join each Poisson batch. It is the run's seed (reproducible, for research) or, under
  ``train.secure_rng``, 128 bits from the operating system (:func:`secrets.randbits`), kept only
  in the run's checkpoint while the run lasts;
* the **public root**, always the run's seed, feeds what a released model shows anyway: CT_F's
  Bernoulli masks (a masked coordinate does not move, so the masks can be read off successive
  iterates). Nothing about the secret root can be learnt from them.

Each stream is a child of its root by NumPy's :class:`numpy.random.SeedSequence` (a spawn key
per stream and per step), the construction NumPy documents for drawing independent streams in
parallel: no stream is the continuation of another's output, so rebuilding one generator's state
from what it drew says nothing about the others.

=========  =====================================================  =======================
stream     SeedSequence                                           root
=========  =====================================================  =======================
noise      ``SeedSequence(root, spawn_key=(1, step))``            secret
sampler    ``default_rng([root, step])`` (Poisson batches)        secret
masks      ``SeedSequence(seed, spawn_key=(2, 0))`` → generator   public
DP Fisher  ``SeedSequence(root, spawn_key=(3, 0))``               secret
dropout    ``SeedSequence(seed, spawn_key=(4, step, rank))``      public (data-parallel)
=========  =====================================================  =======================

Why they cannot coincide: a SeedSequence hashes its entropy words, zero-padded to its pool of four
32-bit words, then any further words. A spawn key is appended after the entropy padded to the pool,
so every keyed stream above hashes the (padded) root and then two more words; the sampler's
``[root, step]`` hashes the root and one more word at most (a 128-bit root fills the pool). Two
keyed streams differ in their first key word.
"""
from __future__ import annotations

import secrets

import numpy as np
import torch

NOISE, MASK, FISHER, DROPOUT = 1, 2, 3, 4
SECURE_BITS = 128


def secret_root(seed: int, secure: bool) -> int:
    """The root of the noise and the sampler: ``seed``, or 128 fresh bits from the OS (``secure``)."""
    return secrets.randbits(SECURE_BITS) if secure else int(seed)


def noise_key(root: int, step: int) -> np.random.SeedSequence:
    """The key of step ``step``'s noise (:func:`privtune.dp.noise.privatize_` draws every chunk from it)."""
    return np.random.SeedSequence(root, spawn_key=(NOISE, int(step)))


def fisher_key(root: int) -> np.random.SeedSequence:
    """The key of the DP Fisher's one noisy release."""
    return np.random.SeedSequence(root, spawn_key=(FISHER, 0))


def mask_generator(seed: int, device) -> torch.Generator:
    """CT_F's mask generator, from the public root (the run's seed) alone."""
    word = int(np.random.SeedSequence(int(seed), spawn_key=(MASK, 0)).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(word)


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """The seed of torch's global generator (dropout) for ``step`` on ``rank`` of a data-parallel run:
    from the public seed, a stream of its own (not the sampler's ``[seed, step]``)."""
    return int(np.random.SeedSequence(int(seed), spawn_key=(DROPOUT, int(step), int(rank))).generate_state(1)[0])


def words(root: int, n: int = SECURE_BITS // 32) -> list[int]:
    """``root`` as ``n`` 32-bit words, low first (what a process group broadcasts)."""
    if not 0 <= root < 2 ** (32 * n):
        raise ValueError(f"a root must be a non-negative integer below 2**{32 * n}, got {root}")
    return [(root >> (32 * k)) & 0xFFFFFFFF for k in range(n)]


def from_words(ws) -> int:
    return sum(int(w) << (32 * k) for k, w in enumerate(ws))
