"""Per-example gradient contributions and their algebra.

A layer call contributes to each of its parameters' per-example gradients in
one of two forms:

* :class:`OuterSum`: ``G_b = sum_t u_bt v_btᵀ`` with the parameter of shape
  ``(rows, cols)``. The row factor ``u`` is either dense ``(B, T, rows)`` or a
  one-hot given by indices ``(B, T)`` (embeddings). Linear, Conv1D and
  Embedding weights are of this form. Its squared norm can be taken without
  materialising ``G_b`` (the "ghost norm", ``<u uᵀ, v vᵀ>``, O(T²(r+c))) or by
  materialising it (O(T r c)); :func:`squared_norms` picks the cheaper one by a
  cost model (:data:`MEMORY_COST`).
* :class:`Direct`: the per-example gradient itself, ``(B, *shape)``: biases and
  norm-layer scales, whose per-example gradients are as small as the parameter.

Several calls may contribute to one parameter (a word embedding tied to the LM
head); their per-example gradients are summed *before* the norm, so cross terms
``2<G_j, G_l>`` are included.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


# What the norm strategies are priced in: one multiply-add inside a matrix product is 1; one element
# of a per-example intermediate that is written and read back (the (B, rows, cols) gradients that
# instantiation materialises, the (B, T, T) kernels of the ghost norm) is MEMORY_COST, and one element
# scattered into it (a one-hot row factor) half that. Both kinds of work are bound by different things
# (arithmetic vs memory traffic), so a count of FLOPs alone picks instantiation for position and
# token-type embeddings where it is 3 to 50 times slower. Fitted on the benchmark's CPU
# (all-MiniLM's and GPT-2's embeddings and linear layers, T from 16 to 512): the model picks the
# measured-faster strategy, or one within 30 % of it, for each, and predicts the ratio of their times
# within a factor of 2 (the benchmark's norm_strategies records both times per parameter); a
# GPU's ratio of memory bandwidth to arithmetic is smaller still, so the same order holds there.
MEMORY_COST = 128


LOW_PRECISION = (torch.bfloat16, torch.float16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms and sums are accumulated in at least float32 (bf16/fp16 activations)."""
    return torch.promote_types(dtype, torch.float32)


# The shortest rows (a factor's T) whose Gram runs as a bf16 product on a CPU: below it oneDNN's float32
# kernel is the faster one (measured on a 2-core CPU with AVX512-BF16 and AMX: T = 4 to 12 up to 1.8x slower
# in bf16, T >= 16 1.3x to 2.4x faster, widths 384 to 50,257).
BF16_PRODUCT_MIN_ROWS = 16


def _bf16_exact(factors: tuple[Tensor, ...]) -> bool:
    return (all(f.dtype == torch.bfloat16 for f in factors)
            and (factors[0].device.type != "cpu" or factors[0].shape[-2] >= BF16_PRODUCT_MIN_ROWS))


_CPU, _CUDA = torch.backends.mkldnn.matmul, torch.backends.cuda.matmul


@contextlib.contextmanager
def _precision(cpu: str, cuda: str) -> Iterator[None]:
    saved = _CPU.fp32_precision, _CUDA.fp32_precision
    if saved == (cpu, cuda):
        yield
        return
    _CPU.fp32_precision, _CUDA.fp32_precision = cpu, cuda
    try:
        yield
    finally:
        _CPU.fp32_precision, _CUDA.fp32_precision = saved


def exact_products() -> contextlib.AbstractContextManager:
    """Float32 matrix products at full float32 precision inside this block, whatever the process set
    elsewhere: ``torch.set_float32_matmul_precision("high" | "medium")``, TF32 on a GPU and oneDNN's bf16
    mode round float32 inputs to 10 or 8 significant bits, which moves a per-example norm by up to 1e-3 of
    itself with no margin for it (the clipped contribution could exceed C). Every public function here that
    forms a product holds it (the Gram helpers run inside them); the engine holds it once around its norms
    and its clipped sum."""
    return _precision("ieee", "ieee")


def _bf16_products(*factors: Tensor) -> contextlib.AbstractContextManager:
    """Inside :func:`exact_products`: the float32 products of ``factors`` widened from bf16 (as the caller holds
    them, before widening) run as bf16 products with float32 accumulation (oneDNN's bf16 mode on a CPU, for rows
    of at least :data:`BF16_PRODUCT_MIN_ROWS`; TF32 on a CUDA GPU), which is exact: each widened factor converts
    back to bf16 (or TF32, whose 10 mantissa bits hold bf16's 7) without rounding, and the product of two such
    numbers is exact in float32. The result is the float32 product's, summed in another order (a kernel may
    flush subnormal inputs, below 2⁻¹²⁶, to zero). Any other factor (float16 has 10 mantissa bits) leaves the
    block's full float32. Both settings are process-wide: a float32 product another thread runs meanwhile
    would be rounded too (the engine runs none)."""
    return _precision("bf16", "tf32") if _bf16_exact(factors) else contextlib.nullcontext()


@dataclass
class OuterSum:
    """Per-example gradient ``G_b = Σ_t u_bt ⊗ v_bt`` for a parameter of shape (rows, cols)."""

    v: Tensor  # (B, T, cols), dense
    rows: int
    u: Tensor | None = None  # (B, T, rows) dense row factor, or
    u_idx: Tensor | None = None  # (B, T) indices of a one-hot row factor
    # which factor is the layer's output gradient ("u" or "v"), zero at the positions the loss does not
    # read: where padded rows are dropped it is checked first (:mod:`privtune.dp.padding`); None: unknown
    grad_side: str | None = None

    def __post_init__(self) -> None:
        # The factors stay in the dtype the backward gave them (bf16 under mixed precision: no float32
        # copy of every layer's input and output gradient is held until the clipped sum); products
        # that need float32 widen the factors they multiply for as long as they run.
        if (self.u is None) == (self.u_idx is None):
            raise ValueError("OuterSum needs exactly one of u (dense) or u_idx (one-hot)")
        if self.u is not None and self.u.dtype != self.v.dtype:
            self.u = self.u.to(torch.promote_types(self.u.dtype, self.v.dtype))
            self.v = self.v.to(self.u.dtype)

    @property
    def batch(self) -> int:
        return self.v.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.v.dtype

    @property
    def sum_shape(self) -> tuple[int, ...]:
        return (self.rows, self.cols)

    @property
    def length(self) -> int:
        return self.v.shape[1]

    @property
    def cols(self) -> int:
        return self.v.shape[2]

    def ghost_cost(self) -> float:
        """Per example: the two (T × T) Gram products and their elementwise product (:data:`MEMORY_COST`)."""
        t2 = float(self.length) ** 2
        r = self.rows if self.u is not None else 0  # a one-hot row kernel is a comparison, no product
        return t2 * (r + self.cols) + t2 * MEMORY_COST

    def instantiate_cost(self) -> float:
        """Per example: the (rows × cols) gradient, formed by a product (dense) or a scatter (one-hot),
        written and read back for its norm (:data:`MEMORY_COST`)."""
        size = float(self.rows) * self.cols
        if self.u is not None:
            return float(self.length) * size + size * MEMORY_COST
        return size * MEMORY_COST + float(self.length) * self.cols * (MEMORY_COST // 2)

    def take(self, idx: Tensor, dtype: torch.dtype) -> "OuterSum":
        """The examples ``idx`` of this contribution, its factors in ``dtype``."""
        return OuterSum(v=self.v[idx].to(dtype), rows=self.rows, u=None if self.u is None else self.u[idx].to(dtype),
                        u_idx=None if self.u_idx is None else self.u_idx[idx])

    def narrow(self, start: int, stop: int, length: int) -> "OuterSum":
        """Examples ``start:stop``, their first ``length`` rows (views of the factors)."""
        return OuterSum(v=self.v[start:stop, :length], rows=self.rows,
                        u=None if self.u is None else self.u[start:stop, :length],
                        u_idx=None if self.u_idx is None else self.u_idx[start:stop, :length],
                        grad_side=self.grad_side)

    def instantiate(self) -> Tensor:
        """(B, rows, cols) per-example gradients (in the factors' dtype: a bf16 product accumulates in
        float32 and is rounded once per entry, as the non-private backward's weight gradient is)."""
        if self.u is not None:
            with exact_products():
                return torch.einsum("btr,btc->brc", self.u, self.v)
        out = self.v.new_zeros(self.batch, self.rows, self.cols)
        return out.scatter_add_(1, self.u_idx.unsqueeze(-1).expand_as(self.v), self.v)

    def weighted_sum(self, weights: Tensor, out: Tensor | None = None, keep: Tensor | None = None) -> Tensor:
        """``Σ_b w_b G_b`` (rows, cols) without per-example gradients (book-keeping).

        With ``out`` (rows, cols) the sum is added into it in place (no temporary of the
        parameter's size: a tied GPT-2 embedding's two contributions are 154 MB each).
        ``keep`` (B,) bool: examples outside it are left out by selection, so a non-finite
        factor of theirs cannot reach the sum (0 · inf would be NaN).
        """
        w = weights.to(self.v.dtype).view(-1, 1, 1)  # bf16 factors: the engine's margin covers this rounding
        u, v = self.u, self.v
        if u is not None and u.shape[-1] < v.shape[-1]:
            u = u * w  # the weights go on the smaller factor: the scaled copy is the smaller one
        else:
            v = v * w
        if keep is not None:
            v = torch.where(keep.view(-1, 1, 1), v, torch.zeros((), dtype=v.dtype, device=v.device))
            if u is not None:
                u = torch.where(keep.view(-1, 1, 1), u, torch.zeros((), dtype=u.dtype, device=u.device))
        v = v.reshape(-1, self.cols)
        if u is not None:
            u = u.reshape(-1, self.rows).transpose(0, 1)
            with exact_products():
                if v.dtype in LOW_PRECISION:
                    return _widened_sum(u, v, out)
                return u @ v if out is None else out.addmm_(u, v)
        if out is None:
            out = v.new_zeros(self.rows, self.cols, dtype=_acc_dtype(v.dtype))
        return out.index_add_(0, self.u_idx.reshape(-1), v.to(out.dtype))


@dataclass
class Direct:
    """Per-example gradients given directly, (B, *shape)."""

    grad: Tensor

    def __post_init__(self) -> None:
        self.grad = self.grad.to(_acc_dtype(self.grad.dtype))

    @property
    def batch(self) -> int:
        return self.grad.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.grad.dtype

    @property
    def sum_shape(self) -> tuple[int, ...]:
        return tuple(self.grad.shape[1:])

    def instantiate(self) -> Tensor:
        return self.grad

    def weighted_sum(self, weights: Tensor, out: Tensor | None = None, keep: Tensor | None = None) -> Tensor:
        grad = self.grad
        if keep is not None:
            shape = (-1,) + (1,) * (grad.dim() - 1)
            grad = torch.where(keep.view(shape), grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
        with exact_products():
            g = torch.einsum("b...,b->...", grad, weights.to(grad.dtype))
        return g if out is None else out.add_(g)


Contribution = OuterSum | Direct


def _row_kernel(p: OuterSum, q: OuterSum) -> Tensor:
    """(B, Tp, Tq) inner products of row factors ⟨u_t, u'_s⟩."""
    if p.u is not None and q.u is not None:
        with exact_products():
            return torch.bmm(p.u, q.u.transpose(1, 2))
    if p.u_idx is not None and q.u_idx is not None:
        return (p.u_idx.unsqueeze(2) == q.u_idx.unsqueeze(1)).to(p.v.dtype)
    if p.u_idx is not None:  # one-hot p against dense q: q.u[b, s, idx_t]
        idx = p.u_idx.unsqueeze(1).expand(-1, q.length, -1)  # (B, Tq, Tp)
        return torch.gather(q.u, 2, idx).transpose(1, 2)
    return _row_kernel(q, p).transpose(1, 2)


def _ghost_terms(p: OuterSum, q: OuterSum) -> Tensor:
    """(B, Tp, Tq) terms ⟨u_t,u'_s⟩⟨v_t,v'_s⟩ whose sum over (t, s) is ``⟨G_b, G'_b⟩``, in at least
    float32: products of bf16 numbers are exact in float32, so the factors of each product are widened
    for it; a dense row factor met by a one-hot one is gathered, exactly, not widened (GPT-2's tied head:
    its 50,257-wide output gradient)."""
    acc = _acc_dtype(torch.promote_types(p.v.dtype, q.v.dtype))
    if p.u is not None and q.u is not None:
        with _bf16_products(p.u, q.u):
            k_u = torch.bmm(p.u.to(acc), q.u.to(acc).transpose(1, 2))
    else:
        k_u = _row_kernel(p, q).to(acc)
    with _bf16_products(p.v, q.v):
        return k_u * torch.bmm(p.v.to(acc), q.v.to(acc).transpose(1, 2))


def ghost_inner(p: OuterSum, q: OuterSum) -> Tensor:
    """Per-example ``⟨G_b, G'_b⟩`` from the factors alone: Σ_{t,s} ⟨u_t,u'_s⟩⟨v_t,v'_s⟩."""
    with exact_products():
        return _ghost_terms(p, q).sum(dim=(1, 2))


# A ghost squared norm is a sum of T² terms of both signs: when the per-token gradients nearly cancel, the
# sum is far smaller than its terms and float32 rounding of the terms (relative 1e-7 each) swamps it (a norm
# of 3e-4 read as 1e-3, or a negative square). An example whose sum is below CANCELLATION · ε_float · Σ|terms|
# (a relative error that may exceed 1/CANCELLATION) has its norm recomputed in float64 from the same
# factors; the check costs one pass over the (B, T, T) terms, the recomputation only the flagged examples.
CANCELLATION = 1e3


def _key(t: Tensor) -> tuple:
    return t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype


def _factors(contribs) -> Iterator[Tensor]:
    """The dense factors (u and v) of the :class:`OuterSum` contributions among ``contribs``."""
    for c in contribs:
        if isinstance(c, OuterSum):
            yield from (t for t in (c.u, c.v) if t is not None)


class Grams:
    """Per-example Grams ``t tᵀ`` of the factors several contributions share (BERT's query, key and value
    read one input), formed once and kept until their last user took them. Keyed by the factor's memory:
    the caller keeps every factor alive for as long as this lives."""

    def __init__(self, contribs) -> None:
        self.left = Counter(_key(t) for t in _factors(contribs))
        self.kept: dict[tuple, Tensor] = {}

    def __call__(self, t: Tensor) -> Tensor:
        key = _key(t)
        k = self.kept.get(key)
        if k is None:
            k = _gram(t)
        self._used(key, k)
        return k

    def skip(self, contribs) -> None:
        """``contribs`` take no Gram (their parameter's norm is instantiated): their factors' uses end here."""
        for t in _factors(contribs):
            self._used(_key(t))

    def _used(self, key: tuple, gram: Tensor | None = None) -> None:
        self.left[key] -= 1
        if self.left[key] <= 0:
            self.kept.pop(key, None)
        elif gram is not None:
            self.kept[key] = gram


# A bf16 factor is widened to float32 for its Gram. On a CPU, one whose float32 copy would exceed WIDE_BYTES
# (GPT-2's tied head: 8 × 128 tokens × 50,257 = 206 MB) is widened a slice of its width at a time, each slice
# of about SLICE_BYTES multiplied while it is in cache and summed into the Gram: measured on the benchmark's
# 2-core CPU, that head's Gram takes 31-63 ms instead of 72-76 ms, of which the whole copy alone took 51 ms. Below
# it slicing measured slower (all-MiniLM's and GPT-2's layers, 0.5 to 24 MB). Not done on a GPU: not measured.
WIDE_BYTES = 1 << 26
SLICE_BYTES = 1 << 22


def _widening_step(length: int, other: int, acc: torch.dtype, device: torch.device) -> int:
    """How much of a factor's ``length`` dimension to widen to ``acc`` at a time, the factor holding ``length`` ×
    ``other`` values: all of it, or on a CPU, where the whole copy would exceed WIDE_BYTES, slices of about
    SLICE_BYTES (at least 256 along ``length``)."""
    if device.type == "cpu" and length * other * acc.itemsize > WIDE_BYTES:
        return max(256, SLICE_BYTES // (other * acc.itemsize))
    return max(length, 1)


def _widened_sum(u: Tensor, v: Tensor, out: Tensor | None) -> Tensor:
    """``out + u @ v`` in float32 from low-precision factors (u: (rows, N), v: (N, cols)), each widened exactly
    and multiplied as a bf16 product with float32 accumulation (:func:`_bf16_products`): the physical batch's
    clipped sum. A product with a bf16 result would round that sum once per entry, an error of up to 2⁻⁹ of the
    sum of all the batch's examples, not of one example's C, which no margin on the clip factors covers: a
    neighbouring batch could then move the released sum by more than C. A factor whose float32 copy would
    exceed WIDE_BYTES (GPT-2's tied head) is widened a slice of its rows at a time, as for a Gram."""
    acc, rows = _acc_dtype(v.dtype), u.shape[0]
    step = _widening_step(rows, u.shape[1], acc, u.device)
    with _bf16_products(u, v):
        wide_v = v.to(acc)
        if out is None and step >= rows:  # the first summand of a parameter: no zeros to add it to
            return u.to(acc) @ wide_v
        if out is None:
            out = torch.zeros(rows, v.shape[1], dtype=acc, device=u.device)
        for a in range(0, rows, step):
            out[a:a + step].addmm_(u[a:a + step].to(acc), wide_v)
    return out


def _gram(t: Tensor) -> Tensor:
    """``t tᵀ`` per example, (B, T, T), in at least float32."""
    acc, width = _acc_dtype(t.dtype), t.shape[-1]
    rows = t.shape[0] * t.shape[1]
    # one slice, the whole factor, when there is nothing to widen
    step = _widening_step(width, rows, acc, t.device) if acc != t.dtype else max(width, 1)
    out = None
    with _bf16_products(t):
        for a in range(0, max(width, 1), step):
            w = t[..., a:a + step].to(acc)
            out = torch.bmm(w, w.transpose(1, 2)) if out is None else out.baddbmm_(w, w.transpose(1, 2))
    return out


def _ghost_sum(contribs: list[OuterSum], grams: Grams | None = None) -> tuple[Tensor, Tensor]:
    """(Σ_b of ‖Σ_j G_jb‖², the sum of the absolute values of its terms), per example, from float32 (or
    float64) Gram products whatever the factors' dtype: a bf16 Gram's rounding would be amplified by
    the cancellation the guard below looks for. A contribution's own Grams come from ``grams`` if given."""
    gram = grams or _gram
    total = magnitude = 0
    for i, p in enumerate(contribs):
        for q in contribs[i + 1:]:  # cross terms (tied layers)
            terms = _ghost_terms(p, q)
            total = total + 2 * terms.sum(dim=(1, 2))
            magnitude = magnitude + 2 * terms.abs().sum(dim=(1, 2))
        k_v = gram(p.v)
        k_u = gram(p.u) if p.u is not None else _row_kernel(p, p)  # one-hot rows: a comparison, no product
        terms = k_u * k_v
        total = total + terms.sum(dim=(1, 2))
        magnitude = magnitude + terms.abs().sum(dim=(1, 2))
    return total, magnitude


def cancelled(sq: Tensor, magnitude: Tensor) -> Tensor | None:
    """(B,) bool: the examples whose float32 ghost square may be swamped by rounding (NaN and negative
    squares included); None in float64. No host synchronisation."""
    if sq.dtype == torch.float64:
        return None
    return ~(sq >= CANCELLATION * torch.finfo(sq.dtype).eps * magnitude)


def settle(contribs: list[Contribution], sq: Tensor, flags: Tensor | None) -> Tensor:
    """``sq`` with the ``flags`` examples recomputed in float64 from the same factors (clamped at 0: a
    square; NaN stays NaN, and the engine then drops that example)."""
    if flags is None or not bool(flags.any()):
        return sq
    idx = flags.nonzero().squeeze(1)
    exact, _ = _ghost_sum([c.take(idx, torch.float64) for c in contribs])
    return sq.index_put((idx,), exact.clamp_min(0).to(sq.dtype))


def unsettled_squared_norms(contribs: list[Contribution], strategy: str = "auto", grams: Grams | None = None
                            ) -> tuple[Tensor, str, Tensor | None]:
    """:func:`squared_norms` without the float64 recomputation: (squares, strategy, the examples to settle
    or None). The engine settles every parameter after one host synchronisation per physical batch, and
    passes one :class:`Grams` for all of them."""
    if strategy not in ("auto", "ghost", "instantiate"):
        raise ValueError(f"unknown norm strategy {strategy!r}; use auto, ghost or instantiate")
    ghostable = all(isinstance(c, OuterSum) for c in contribs)
    if ghostable and strategy != "instantiate":
        k = len(contribs)
        ghost = sum(c.ghost_cost() for c in contribs) * k
        inst = sum(c.instantiate_cost() for c in contribs)
        if strategy == "ghost" or ghost <= inst:
            with exact_products():
                sq, magnitude = _ghost_sum(contribs, grams)
            return sq, "ghost", cancelled(sq, magnitude)
    if grams is not None:
        grams.skip(contribs)
    return _instantiated_squares(contribs), "instantiate", None


def squared_norms(contribs: list[Contribution], strategy: str = "auto") -> tuple[Tensor, str]:
    """Per-example squared norm of the sum of ``contribs`` (all for one parameter).

    ``strategy``: ``auto`` (the cheaper of ghost and instantiation by the cost model above, which
    leaves out the cancellation check's one pass over the (B, T, T) terms), ``ghost`` or
    ``instantiate``. Returns the norms and the strategy used.
    """
    sq, how, flags = unsettled_squared_norms(contribs, strategy)
    return settle(contribs, sq, flags), how


def _instantiated_squares(contribs: list[Contribution]) -> Tensor:
    grad = contribs[0].instantiate()
    for c in contribs[1:]:
        grad = grad + c.instantiate().to(grad.dtype)
    if grad.dtype in LOW_PRECISION:  # squares of positive terms: no cancellation; summed in float32
        return grad.flatten(1).float().pow(2).sum(1)
    return grad.flatten(1).pow(2).sum(1)
