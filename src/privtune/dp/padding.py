"""Padded positions: the per-example norms and the clipped sum leave out rows whose terms are checked zero.

A physical batch is padded to its longest example. Where the loss does not read a padded position, the
gradient of every layer output there is zero, so a layer's per-example gradient ``G_b = Σ_t u_bt v_btᵀ``
gets nothing from those rows; yet the ghost norm's Gram products cost T² per example and the clipped
sum's product T. Given each example's length (a hint, ``engine.capture(lengths=...)``):

* the clipped sum is one product over the kept rows ``t < length_b`` of all examples, each row weighted
  by its example's clip factor (:func:`packed`);
* the norms are taken over a few runs of consecutive examples, each trimmed to its longest example
  (:func:`runs`; privtune's physical batches are sorted by length, so a run's examples are alike).

The hint is never trusted: a parameter is trimmed only when each of its contributions has, in every
dropped row, a factor that is zero and one that is finite, checked on the factors themselves
(:func:`checked`): every dropped term is then exactly zero. A wrong hint (left padding, a loss that
reads padded positions, a layer whose rows are not positions) costs the check's time and leaves that
parameter whole: it cannot change a norm or the clipped sum. The check reads only the dropped rows, once
per factor (query, key and value share theirs). A batch padded beyond its longest length (to a fixed
``max_length``) is not trimmed: the hint's longest length must be the batch's padded length.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from privtune.dp.contributions import Contribution, OuterSum, _key

MAX_RUNS = 4  # runs per physical batch: each is one more product per parameter
MIN_SAVING = 0.05  # trim only when padding is at least this fraction of the batch's rows


def runs(lengths: Sequence[int], max_runs: int = MAX_RUNS) -> list[tuple[int, int, int]]:
    """Consecutive runs ``(start, stop, length)`` covering the batch, each trimmed to its longest example,
    that keep the fewest rows ``Σ (stop − start) · length`` (dynamic programming over the points where the
    length changes; the lengths should be sorted, as privtune's physical batches are)."""
    n = len(lengths)
    if n == 0:
        return []
    lengths = [int(x) for x in lengths]
    # candidate ends of a run: after each maximal block of equal lengths (or every example, unsorted)
    ends = [i + 1 for i in range(n) if i + 1 == n or lengths[i + 1] != lengths[i]]
    if len(ends) > 64:  # bound the search: 64 evenly spaced candidates
        ends = sorted({ends[round(k * (len(ends) - 1) / 63)] for k in range(64)} | {n})
    starts = [0] + ends[:-1]
    block = [max(lengths[a:b]) for a, b in zip(starts, ends)]
    longest = {}  # (i, j): the longest length among examples [starts[i], ends[j])
    for i in range(len(ends)):
        m = 0
        for j in range(i, len(ends)):
            m = max(m, block[j])
            longest[i, j] = m
    inf = float("inf")
    # best[k][j]: fewest rows covering examples [0, ends[j]) with k + 1 runs; back[k][j]: where its last run starts
    best = [[inf] * len(ends) for _ in range(max_runs)]
    back = [[0] * len(ends) for _ in range(max_runs)]
    for j in range(len(ends)):
        best[0][j] = ends[j] * longest[0, j]
    for k in range(1, max_runs):
        for j in range(len(ends)):
            for i in range(1, j + 1):
                cost = best[k - 1][i - 1] + (ends[j] - ends[i - 1]) * longest[i, j]
                if cost < best[k][j]:
                    best[k][j], back[k][j] = cost, i
    last = len(ends) - 1
    k = min(range(max_runs), key=lambda r: (best[r][last], r))
    out, j = [], last
    while k >= 0:
        i = back[k][j] if k > 0 else 0
        out.append((starts[i], ends[j], longest[i, j]))
        j, k = i - 1, k - 1
    return out[::-1]


@dataclass
class Layout:
    """Where a physical batch's padding is: the runs the norms take, and the rows the clipped sum keeps."""

    runs: list[tuple[int, int, int]]  # (start, stop, length) per run of examples (:func:`runs`)
    batch: int  # examples
    padded: int  # the batch's padded length
    kept: Tensor  # (N,) flat indices b·T + t of the rows t < length_b
    dropped: Tensor  # the other rows'
    examples: Tensor  # (N,) the example of each kept row


def layout(lengths: Sequence[int] | None, device) -> Layout | None:
    """The batch's :class:`Layout`, or None where padding is less than :data:`MIN_SAVING` of its rows."""
    if not lengths:
        return None
    lengths = [int(x) for x in lengths]
    if min(lengths) < 0:
        raise ValueError(f"engine.capture(lengths=...) got a negative length ({min(lengths)}); pass each example's "
                         "unpadded length")
    padded = max(lengths)
    if sum(lengths) > (1 - MIN_SAVING) * len(lengths) * padded:
        return None
    plan = runs(lengths)
    n = torch.as_tensor(lengths, device=device)
    inside = (torch.arange(padded, device=device)[None] < n[:, None]).flatten()
    flat = torch.arange(inside.numel(), device=device)
    return Layout(plan, len(lengths), padded, flat[inside], flat[~inside],
                  torch.arange(len(lengths), device=device).repeat_interleave(n))


def _pairs(c: OuterSum) -> list[tuple[Tensor, Tensor | None]]:
    """(the factor that may be zero in the dropped rows, the other one, which must then be finite there),
    the layer's output gradient first (usually the zero one)."""
    if c.u is None:
        return [(c.v, None)]  # a one-hot row factor is never zero, and always finite
    return [(c.v, c.u), (c.u, c.v)] if c.grad_side == "v" else [(c.u, c.v), (c.v, c.u)]


def checked(contribs: dict[int, list[Contribution]], lay: Layout) -> set[int]:
    """The parameters each of whose contributions has, in every row the layout drops, one factor that is
    zero and another that is finite: each term ``u_t v_tᵀ`` of those rows is then exactly zero (0·NaN is
    not), so each example's gradient is the sum over its kept rows, as without the hint. The output
    gradients are tried first, then, where that failed, the other factors: at most two host
    synchronisations per physical batch."""
    ranges: dict[tuple, tuple[Tensor, Tensor]] = {}

    def extremes(t: Tensor) -> tuple[Tensor, Tensor]:
        """The least and greatest value in the factor's dropped rows (NaN if one is NaN), read once."""
        key = _key(t)
        if key not in ranges:
            ranges[key] = torch.aminmax(t.reshape(-1, t.shape[-1]).index_select(0, lay.dropped))
        return ranges[key]

    def holds(pair: tuple[Tensor, Tensor | None]) -> Tensor:
        z, other = pair
        lo, hi = extremes(z)
        ok = (lo == 0) & (hi == 0)  # exact: a NaN or a subnormal is not zero
        if other is not None:
            lo, hi = extremes(other)
            ok = ok & torch.isfinite(lo) & torch.isfinite(hi)
        return ok

    items = []  # (parameter, the pairs to try)
    for pid, cs in contribs.items():
        # (B, T, ·) factors of this batch only: not biases, norm scales or pooled heads
        if all(isinstance(c, OuterSum) and c.batch == lay.batch and c.length == lay.padded for c in cs):
            items += [(pid, _pairs(c)) for c in cs]
    passed = [False] * len(items)
    todo = list(range(len(items)))
    for level in (0, 1):
        todo = [i for i in todo if level < len(items[i][1])]
        if not todo:
            break
        found = torch.stack([holds(items[i][1][level]) for i in todo]).tolist()
        for i, ok in zip(todo, found):
            passed[i] = ok
        todo = [i for i, ok in zip(todo, found) if not ok]
    return {pid for pid, _ in items} - {pid for (pid, _), ok in zip(items, passed) if not ok}


def by_runs(cs: list[Contribution], lay: Layout) -> list[tuple[slice, list[Contribution]]]:
    """A checked parameter's contributions as one piece per run, each trimmed to its run's length (views)."""
    return [(slice(b0, b1), [c.narrow(b0, b1, keep) for c in cs]) for b0, b1, keep in lay.runs]


PACK_BYTES = 1 << 26  # the kept rows of a contribution are copied this many bytes at a time for its sum


def packed(c: OuterSum, lay: Layout) -> Iterator[tuple[Tensor, OuterSum]]:
    """A checked contribution's kept rows, in chunks of at most :data:`PACK_BYTES` (at least 256 rows):
    (the example of each row, the rows as a contribution of one-row "examples", (n, 1, ·)). The sum of the
    chunks' weighted sums, each row weighted by its example's factor, is the clipped sum without the
    dropped rows: one product per chunk over the rows that count."""
    width = sum(t.shape[-1] * t.element_size() for t in (c.u, c.v) if t is not None) + 8
    step = max(256, PACK_BYTES // width)
    for a in range(0, lay.kept.numel(), step):
        idx = lay.kept[a:a + step]

        def rows(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.reshape(-1, *t.shape[2:]).index_select(0, idx).unsqueeze(1)
        yield lay.examples[a:a + step], OuterSum(v=rows(c.v), rows=c.rows, u=rows(c.u), u_idx=rows(c.u_idx),
                                                 grad_side=c.grad_side)
