"""Ghost clipping: per-example gradient norms and the clipped gradient sum.

Usage (one physical batch)::

    engine = GhostClipEngine(model, clip_norm=0.1)
    with engine.capture():
        losses = per_example_losses(model, batch)      # shape (B,)
    norms = engine.backward(losses)                    # adds Σ_b c_b ∇L_b into p.grad

``mode="bk"`` (book-keeping, the default) takes one backward pass: autograd is
asked only for the gradients of the hooked layers' *outputs* (no weight
gradients are formed), norms come from those and the stored inputs, and the
clipped sum is formed directly from the same factors. Each hooked output passes
through an identity node (:class:`_Tap`) that hands its gradient to the engine
during that backward pass, so the engine keeps no reference to the outputs
themselves: they are freed as in non-private training (a 206 MB logits tensor
for GPT-2 at batch 8 × 128 tokens). ``mode="ghost"`` is the
paper's two-pass ghost clipping: norms from a first pass, then a standard
backward pass of ``Σ_b c_b L_b``.

Privacy is the security model here: every trainable parameter must belong to a
layer with a registered norm function (else :class:`UnsupportedLayerError` at
construction), a layer output modified in place after the hook saw it is an
error (autograd refuses in-place changes to a custom Function's view), and
:meth:`verify` checks once that the engine's unclipped gradient sum equals
autograd's for every parameter, so a parameter reaching the loss outside its
hooked layer cannot go unclipped.
"""
from __future__ import annotations

import weakref
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from privtune.dp import padding
from privtune.dp.contributions import (LOW_PRECISION, Contribution, Grams, exact_products, settle, squared_norms,
                                       unsettled_squared_norms)
from privtune.dp.layers import (AUTOCAST_MATMUL, Handler, UnsupportedLayerError, embedding, find_handler,
                                needs_probe, probe_affine_norm)

_HANDLED_NAMES = {"weight", "bias"}
# With bf16 factors three roundings, each at most bf16's unit roundoff 2^-8 relative, can lift an example's
# clipped contribution above C: of its clip factor, of the factor times it, and (instantiated norms) of the
# per-example gradient its norm is read from. Clip factors are shrunk by 4 × 2^-8 (1.6 %) to cover them.
LOW_PRECISION_MARGIN = 2.0 ** -6


@dataclass
class _Record:
    name: str
    module: nn.Module
    handler: Handler
    input: Tensor
    grad: Tensor | None = None
    collect: bool = False


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes matrix products in on ``device`` now, or None when it is off."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


# Autograd nodes that change neither the values nor the row-major order of a tensor's elements: views and
# reshapes, and the dtype conversion autocast inserts.
_ORDER_KEEPING = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "ToCopyBackward0"})
# A layer's matrix product as autograd records it: the node, the name of its saved left operand and that
# operand's edge (F.linear and Conv1D's addmm on the flattened input; mm without a bias).
_PRODUCTS = {"AddmmBackward0": ("_saved_mat1", 1), "MmBackward0": ("_saved_self", 0)}


def _saved_operand(output: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor | None:
    """The ``dtype`` copy of ``x`` that the matrix product computing ``output`` read and that autograd saved for
    its backward, shaped as ``x``; None unless the graph shows it is exactly that: ``output`` is (a view of) an
    addmm/mm whose left operand comes from ``x`` through views and dtype conversions only (so its elements are
    ``x``'s, rounded, in the same order), and is a contiguous ``dtype`` tensor of ``x``'s rows. None too under
    saved-tensor hooks (activation checkpointing, offloading): reading a saved tensor there would run them."""
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        return None
    node = output.grad_fn
    if node is not None and type(node).__name__ in _ORDER_KEEPING:
        node = node.next_functions[0][0]
    product = _PRODUCTS.get(type(node).__name__) if node is not None else None
    if product is None or x.grad_fn is None:
        return None
    attr, edge = product
    step = node.next_functions[edge][0]
    for _ in range(8):
        if step is x.grad_fn:
            break
        if step is None or type(step).__name__ not in _ORDER_KEEPING:
            return None
        step = step.next_functions[0][0]
    else:
        return None
    try:
        operand = getattr(node, attr)
    except RuntimeError:  # already freed (not in a forward hook)
        return None
    width = x.shape[-1] if x.dim() else 1
    if operand.dtype != dtype or not operand.is_contiguous() or tuple(operand.shape) != (x.numel() // width, width):
        return None
    return operand.view(x.shape)


class _Tap(torch.autograd.Function):
    """Identity on a layer's output whose backward hands the output gradient to the record.

    ``anchor`` is a scalar leaf every tap (on its device) depends on: asking autograd for the
    anchors' gradients makes it traverse every path to every tap (and to no weight), so the layer outputs
    never need to be kept alive to be named as ``inputs``. The output is a view made inside a
    custom Function, so autograd itself refuses to let it be modified in place.
    """

    @staticmethod
    def forward(ctx, output: Tensor, anchor: Tensor, record: _Record) -> Tensor:
        ctx.record = record
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.record.collect:
            ctx.record.grad = grad
        return grad, None, None


class GhostClipEngine:
    def __init__(
        self,
        model: nn.Module,
        clip_norm: float,
        mode: str = "bk",
        norm_strategy: str = "auto",
        eps: float = 1e-6,
        allow_rounded_sum: bool = False,
    ) -> None:
        """``allow_rounded_sum``: accept trainable parameters in bf16/fp16, whose gradient, the clipped sum,
        is rounded to their dtype before the noise is added (:meth:`_check_dtypes`); refused by default."""
        if clip_norm <= 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        if mode not in ("bk", "ghost"):
            raise ValueError(f"unknown clipping mode {mode!r}; use 'bk' (single backward) or 'ghost' (two passes)")
        self.model, self.clip_norm, self.mode, self.norm_strategy, self.eps = model, clip_norm, mode, norm_strategy, eps
        self._layers: dict[str, tuple[nn.Module, Handler]] = {}
        self.params: list[nn.Parameter] = []
        self.param_names: dict[int, str] = {}
        seen: set[int] = set()
        owners = [(name, module, [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad])
                  for name, module in model.named_modules()]
        # A module is hooked when a handler covers all its trainable parameters. A parameter
        # registered twice (BERT/RoBERTa MLM heads hold the decoder bias as ``bias`` of the head
        # and as ``decoder.bias``) is clipped through whichever hooked module owns it; only a
        # parameter no hooked module owns is an error.
        hooked: dict[str, Handler] = {}
        for name, module, direct in owners:
            handler = find_handler(module) if direct and all(n in _HANDLED_NAMES for n, _ in direct) else None
            if handler is not None:
                hooked[name] = handler
        covered = {id(p) for name, _, direct in owners if name in hooked for _, p in direct}
        for name, module, direct in owners:
            if not direct:
                continue
            if name not in hooked:
                uncovered = [n for n, p in direct if id(p) not in covered]
                if not uncovered:
                    continue
                raise UnsupportedLayerError(
                    f"module '{name}' of type {type(module).__module__}.{type(module).__qualname__} has trainable "
                    f"parameter(s) [{', '.join(uncovered)}] that ghost clipping cannot handle. Freeze them "
                    "(requires_grad=False) or register a per-example norm function with "
                    "privtune.dp.layers.register_layer. Refusing to train with an unclipped gradient."
                )
            handler = hooked[name]
            if needs_probe(module):
                probe_affine_norm(module, name)
            if handler is embedding and type(module).forward is not nn.Embedding.forward:
                # a subclass that computes its indices itself (learned positions from an attention mask or
                # from the ids' length): its first argument is not the rows it reads
                raise UnsupportedLayerError(
                    f"module '{name}' ({type(module).__qualname__}) is an nn.Embedding whose forward computes the "
                    "rows it reads from its arguments, so the engine cannot know which row each example used. "
                    "Freeze it (learned positions usually stay frozen under DP) or register a handler with "
                    "privtune.dp.layers.register_layer.")
            self._layers[name] = (module, handler)
            for n, p in direct:
                if id(p) not in seen:
                    seen.add(id(p))
                    self.params.append(p)
                    self.param_names[id(p)] = f"{name}.{n}" if name else n
        if not self.params:
            raise ValueError("the model has no trainable parameters: nothing to train")
        self.allow_rounded_sum = allow_rounded_sum
        self._check_dtypes()
        self._records: list[_Record] = []
        # layers seen with an input shared by every example (positions computed once per batch): such a
        # layer stays shared when, at a later batch, its length happens to equal the number of examples
        self._shared: set[str] = set()
        self._anchors: dict[torch.device, Tensor] = {}
        self._casts: dict[int, tuple[weakref.ref, int, Tensor]] = {}
        self._capturing = False
        self._batch_size: int | None = None
        self._lengths: list[int] | None = None  # the captured batch's example lengths (a hint, see capture)
        self._hooks = [m.register_forward_hook(self._make_hook(n, m, h), with_kwargs=True)
                       for n, (m, h) in self._layers.items()]
        self.last_strategies: dict[str, str] = {}

    def _check_dtypes(self) -> None:
        """A bf16/fp16 parameter's gradient is the clipped sum rounded to its dtype before the noise is added: an
        error of up to 2⁻⁹ of the sum of the whole batch, which grows with the batch where the sensitivity is C,
        so a neighbouring batch could move the released gradient by more than C. Refused unless allowed; float32
        parameters under autocast (privtune's ``train.precision: bf16``) keep the sum in float32 until the noise."""
        if self.allow_rounded_sum:
            return
        low = [f"'{self.param_names[id(p)]}' ({str(p.dtype).removeprefix('torch.')})"
               for p in self.params if p.dtype in LOW_PRECISION]
        if low:
            raise ValueError(
                f"trainable parameter{'s' if len(low) > 1 else ''} {', '.join(low[:3])}{' and others' if len(low) > 3 else ''}"
                " would receive the clipped gradient sum rounded to that dtype before the noise is added, an error "
                "that grows with the batch where the sensitivity is the clipping norm C. Keep trainable parameters in "
                "float32 and run the forward pass under torch.autocast (train.precision: bf16 does), or pass "
                "GhostClipEngine(..., allow_rounded_sum=True) to accept the rounding.")

    # -- hooks ------------------------------------------------------------
    def _make_hook(self, name: str, module: nn.Module, handler: Handler) -> Callable:
        def hook(mod, args, kwargs, output):
            if not self._capturing or not torch.is_grad_enabled():
                return None
            x = args[0] if args else next(iter(kwargs.values()))
            if not isinstance(output, Tensor):
                raise UnsupportedLayerError(f"module '{name}' returned {type(output).__name__}, expected a tensor")
            if not output.requires_grad:
                return None
            new = None
            b = self._batch_size
            # A layer called once for the whole batch and broadcast (position embeddings: ids of shape
            # (1, T) or (T,)). Expanding its output to (B, ...) gives autograd one row per example, so the
            # per-example gradients stay exact; downstream broadcasting is unchanged. A 1-D index input of
            # length B is ambiguous (B positions, or one index per example): it counts as shared once the
            # layer was seen shared, and verify() settles the first batch.
            one_d = isinstance(module, nn.Embedding) and x.dim() == 1
            if b is not None and (output.shape[0] != b or (one_d and name in self._shared)):
                if output.shape[0] == 1 and x.shape[0] == 1:
                    new = output.expand(b, *output.shape[1:])
                    x = x.expand(b, *x.shape[1:])
                    self._shared.add(name)
                elif one_d:
                    new = output.unsqueeze(0).expand(b, *output.shape)
                    x = x.unsqueeze(0).expand(b, -1)
                    self._shared.add(name)
            out = output if new is None else new
            if handler in AUTOCAST_MATMUL and x.dtype != out.dtype and _autocast_dtype(out.device) == out.dtype:
                x = self._rounded(x, out.dtype, output)  # the input the product used: autocast rounded it so
            anchor = self._anchors.get(out.device)
            if anchor is None:  # one per device, so a model split over devices keeps every tap reachable
                anchor = self._anchors[out.device] = torch.zeros((), device=out.device, requires_grad=True)
            record = _Record(name, module, handler, x.detach())
            self._records.append(record)
            return _Tap.apply(out, anchor, record)

        return hook

    def _rounded(self, x: Tensor, dtype: torch.dtype, output: Tensor) -> Tensor:
        """``x`` in ``dtype``, one copy per tensor: layers that read one input (BERT's query, key and value)
        share it, and the norms' Gram products of it are then formed once (the tensor is checked by a weak
        reference and its version counter, so neither a freed input's reused memory nor an input changed in place
        after an earlier layer read it is taken for it). The copy is the one autocast made for the layer's
        product and autograd keeps for its backward, where the graph shows it (:func:`_saved_operand`), so
        the engine holds no second copy of it; else one of its own."""
        hit = self._casts.get(id(x))
        if hit is not None and hit[0]() is x and hit[1] == x._version and hit[2].dtype == dtype:
            return hit[2]
        cast = _saved_operand(output, x, dtype)
        if cast is None:
            cast = x.detach().to(dtype)  # and a copy of an input changed in place since is made again
        self._casts[id(x)] = (weakref.ref(x), x._version, cast)
        return cast

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @contextmanager
    def capture(self, batch_size: int | None = None, lengths=None) -> Iterator[None]:
        """Record layer inputs (and tap layer outputs) of the forward pass run inside this block.

        ``batch_size`` lets layers that run once per batch and broadcast (position
        embeddings) be split into per-example rows; pass it whenever it is known.
        ``lengths`` (each example's unpadded length, right padding, the longest one the batch's
        padded length) lets the norms and the clipped sum skip padded rows, where they are checked
        to add nothing (:mod:`privtune.dp.padding`): wrong lengths cost time, never exactness; a
        count that is not the batch size, or a negative length, is an error.
        """
        self._records = []
        self._anchors = {}
        self._capturing = True
        self._batch_size = batch_size
        self._lengths = None if lengths is None else [int(x) for x in lengths]
        try:
            yield
        finally:
            self._capturing = False
            self._batch_size = None
            self._casts = {}

    # -- core -------------------------------------------------------------
    def _contributions(self, losses: Tensor, retain_graph: bool) -> dict[int, list[Contribution]]:
        if losses.dim() != 1:
            raise ValueError(f"expected per-example losses of shape (B,), got {tuple(losses.shape)}")
        if not self._records:
            raise RuntimeError("no layer calls were captured: run the forward pass inside engine.capture()")
        batch = losses.shape[0]
        records = self._records
        for r in records:
            r.collect = True
        try:
            torch.autograd.grad(losses.sum(), list(self._anchors.values()), allow_unused=True,
                                retain_graph=retain_graph)
        finally:
            for r in records:
                r.collect = False
        contribs: dict[int, list[Contribution]] = defaultdict(list)
        for r in records:
            # The tap nodes keep their records for as long as the caller keeps the graph (its
            # losses); empty them, or every layer input would live on into the next step.
            g, x, r.grad, r.input = r.grad, r.input, None, None
            if g is None:
                continue
            if g.shape[0] != batch and not (g.dim() == 1 and batch == 1):
                raise UnsupportedLayerError(
                    f"module '{r.name}' output has leading dimension {g.shape[0]} but the batch has {batch} "
                    "examples; the engine needs batch-first layer inputs"
                )
            for pname, c in r.handler(r.module, x, g).items():
                contribs[id(getattr(r.module, pname))].append(c)
        self._records = []  # the contributions hold what is still needed
        return contribs

    def _padding(self, contribs: dict[int, list[Contribution]], batch: int, device
                 ) -> tuple[padding.Layout | None, set[int]]:
        """The captured batch's padding layout, and the parameters whose padded rows were checked zero."""
        lengths, self._lengths = self._lengths, None
        if lengths is not None and len(lengths) != batch:
            raise ValueError(f"engine.capture(lengths=...) was given {len(lengths)} lengths for a batch of {batch} "
                             "examples; pass one length per example (or none)")
        lay = padding.layout(lengths, device)
        return lay, (padding.checked(contribs, lay) if lay is not None else set())

    @staticmethod
    def _pieces(cs: list[Contribution], lay: padding.Layout | None, trimmed: bool
                ) -> list[tuple[slice, list[Contribution]]]:
        """(examples, their contributions) whose squared norms make the parameter's: a trimmed parameter's
        runs, each to its longest example, else the whole batch."""
        return padding.by_runs(cs, lay) if trimmed else [(slice(None), cs)]

    @staticmethod
    def _summands(cs: list[Contribution], lay: padding.Layout | None, trimmed: bool
                  ) -> Iterator[tuple[slice | Tensor, Contribution]]:
        """(the examples of its rows, a contribution) whose weighted sums make the parameter's clipped sum:
        a trimmed parameter's kept rows in chunks, one row per entry, else each contribution whole."""
        for c in cs:
            if trimmed:
                yield from padding.packed(c, lay)
            else:
                yield slice(None), c

    def _norms(self, contribs: dict[int, list[Contribution]], batch: int, device,
               lay: padding.Layout | None = None, trimmed: set[int] = frozenset()) -> Tensor:
        sq = torch.zeros(batch, dtype=torch.float64 if self._float64() else torch.float32, device=device)
        self.last_strategies = {}
        pieces = {pid: self._pieces(cs, lay, pid in trimmed) for pid, cs in contribs.items()}
        # the contribs keep the factors alive for as long as the Grams live
        parts, grams = [], Grams([c for ps in pieces.values() for _, cs in ps for c in cs])
        with exact_products():  # once here rather than once per parameter
            for p in self.params:
                for rows, cs in pieces.get(id(p), ()):
                    n2, how, flags = unsettled_squared_norms(cs, self.norm_strategy, grams)
                    parts.append((rows, cs, n2, flags))
                    self.last_strategies[self.param_names[id(p)]] = how  # a trimmed parameter's: its last run's
        flagged = [f.any() for *_, f in parts if f is not None]
        if flagged and bool(torch.stack(flagged).any()):  # one host synchronisation per physical batch
            parts = [(rows, cs, settle(cs, n2, flags), None) for rows, cs, n2, flags in parts]
        for rows, _, n2, _ in parts:
            sq[rows] += n2.to(sq.dtype)
        return sq.sqrt()

    def _float64(self) -> bool:
        return self.params[0].dtype == torch.float64

    def clip_factors(self, norms: Tensor) -> Tensor:
        """``min(1, C / ‖∇L_b‖)``, and 0 for an example whose norm is not finite (NaN or inf): such an
        example is dropped from the sum, which stays the clipped sum of the others (sensitivity C)."""
        factors = (self.clip_norm / (norms + self.eps)).clamp(max=1.0)
        return torch.where(torch.isfinite(norms), factors, torch.zeros_like(factors))

    def per_example_norms(self, losses: Tensor) -> Tensor:
        """Per-example gradient norms only (no gradient is written)."""
        contribs = self._contributions(losses, retain_graph=False)
        return self._norms(contribs, losses.shape[0], losses.device,
                           *self._padding(contribs, losses.shape[0], losses.device))

    def backward(self, losses: Tensor) -> Tensor:
        """Accumulate ``Σ_b min(1, C/‖∇L_b‖) ∇L_b`` into ``p.grad``; return the per-example norms."""
        if losses.dim() == 1 and losses.shape[0] == 0:
            # an empty physical batch (Poisson sampling draws one now and then) adds nothing
            self._records, self._lengths = [], None
            return losses.detach().new_zeros(0)
        self._check_dtypes()  # again: a model may have been cast since the engine was built
        contribs = self._contributions(losses, retain_graph=self.mode == "ghost")
        lay, trimmed = self._padding(contribs, losses.shape[0], losses.device)
        norms = self._norms(contribs, losses.shape[0], losses.device, lay, trimmed)
        factors = self.clip_factors(norms)
        low = any(c.dtype in LOW_PRECISION for cs in contribs.values() for c in cs)
        if low:
            # bf16/fp16 factors: the clip factor is rounded to their dtype before it scales them (and an
            # instantiated norm is read from bf16-rounded per-example gradients); shrunk by LOW_PRECISION_MARGIN
            # so that neither rounding can lift an example's contribution above C
            factors = factors * (1 - LOW_PRECISION_MARGIN)
        # An example with a non-finite norm has weight 0, but 0 · inf is NaN: its contributions are
        # selected away (torch.where), not multiplied. Checked once per physical batch; the usual
        # all-finite case pays nothing more. The two-pass mode's second backward would multiply too,
        # so such a batch takes the book-keeping sums from the first pass instead. So does a batch of bf16/fp16
        # factors: the second backward's weight gradients would be products with bf16 results, the physical
        # batch's clipped sum rounded once per entry (an error of up to 2⁻⁹ of the whole batch's sum, not of one
        # example's C), where book-keeping's sum is formed and kept in float32 (contributions._widened_sum).
        keep = None
        if not bool(torch.isfinite(norms).all()):
            keep = torch.isfinite(norms)
        if self.mode == "ghost" and keep is None and not low:
            del contribs  # the second pass needs only the factors
            with exact_products():  # its weight-gradient products are the clipped sum: full float32, as the norms
                (losses * factors.detach().to(losses.dtype)).sum().backward()
        else:
            with exact_products():  # once here rather than once per summand
                self._clipped_sum(contribs, factors, lay, trimmed, keep)
        self._records = []
        return norms

    def _clipped_sum(self, contribs: dict[int, list[Contribution]], factors: Tensor, lay: padding.Layout | None,
                     trimmed: set[int], keep: Tensor | None) -> None:
        """Adds ``Σ_b factors_b G_b`` into each parameter's ``.grad`` (book-keeping), the contributions freed as
        they are used: book-keeping's memory peaks here."""
        for p in self.params:
            cs = contribs.pop(id(p), None)
            if not cs:
                continue
            # Summed in place into p.grad when it is float32 or float64 (and the contributions'
            # dtype); else the first summand starts a sum of that dtype (float32 for bf16 factors), and a
            # bf16 gradient (allow_rounded_sum) gets that float32 sum, cast once.
            acc, acc_dtype = p.grad, torch.promote_types(cs[0].dtype, torch.float32)
            if acc is not None and (acc.dtype != acc_dtype or not acc.is_contiguous()):
                acc = None
            for rows, c in self._summands(cs, lay, id(p) in trimmed):
                kept = None if keep is None else keep[rows]
                if acc is None:
                    acc = c.weighted_sum(factors[rows], keep=kept).to(acc_dtype).contiguous().view(p.shape)
                else:
                    c.weighted_sum(factors[rows], out=acc.view(c.sum_shape), keep=kept)
            if acc is not p.grad:
                acc = acc.to(p.dtype)
                p.grad = acc if p.grad is None else p.grad + acc

    def _check_examples(self, contribs, losses: Tensor, rtol: float, examples: int,
                        lay: padding.Layout | None = None, trimmed: set[int] = frozenset()) -> None:
        """Each parameter's per-example squared norm from the engine against autograd, for a few examples."""
        if losses.shape[0] < 2:
            return  # one example: the sum check below is the per-example check
        picks = sorted({0, losses.shape[0] - 1, *range(1, min(examples, losses.shape[0]) - 1)})
        mine = {}
        for p in self.params:
            if cs := contribs.get(id(p)):
                sq = torch.zeros(losses.shape[0], dtype=torch.float64, device=losses.device)
                for rows, piece in self._pieces(cs, lay, id(p) in trimmed):
                    sq[rows] += squared_norms(piece, self.norm_strategy)[0].double()
                mine[id(p)] = sq
        for b in picks:
            grads = torch.autograd.grad(losses[b], self.params, allow_unused=True, retain_graph=True)
            total = sum(float(g.double().pow(2).sum()) for g in grads if g is not None)
            for p, g in zip(self.params, grads):
                want = 0.0 if g is None else float(g.double().pow(2).sum())
                got = float(mine[id(p)][b]) if id(p) in mine else 0.0
                # squared norms: relative to this parameter's, with a floor at the example's whole norm
                if abs(got - want) > 2 * rtol * want + 1e-8 * total + 1e-30:
                    raise UnsupportedLayerError(
                        f"parameter '{self.param_names[id(p)]}': the engine's squared gradient norm for example {b} "
                        f"is {got:.6g}, one backward of that example's loss gives {want:.6g}. Its layer's input "
                        "rows are not the batch's examples (an input shared by every example, or sequence-first); "
                        "refusing to clip with wrong norms. Make the layer batch-first or freeze it.")

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def verify(self, losses: Tensor, rtol: float = 1e-3, examples: int = 3) -> None:
        """Check that the engine sees every path from each parameter to the loss, and that it splits the
        gradient into the right examples.

        Compares the engine's unclipped gradient sum with autograd's for every trainable parameter, and
        the per-example norms of ``examples`` examples, parameter by parameter, with one backward pass of
        each example's loss (a layer whose rows are not examples, e.g. positions shared by the batch or a
        sequence-first input whose length equals the batch size, fails here, named). Call inside/after a
        ``capture()`` forward; it consumes the graph. Raises :class:`UnsupportedLayerError` on mismatch.
        """
        with exact_products():  # both sides' products in full float32 (a TF32 reference is 1e-3 off)
            self._verify(losses, rtol, examples)

    def _verify(self, losses: Tensor, rtol: float, examples: int) -> None:
        contribs = self._contributions(losses, retain_graph=True)
        lay, trimmed = self._padding(contribs, losses.shape[0], losses.device)  # the path training takes
        self._check_examples(contribs, losses, rtol, examples, lay, trimmed)
        ref = torch.autograd.grad(losses.sum(), self.params, allow_unused=True)
        ones = torch.ones(losses.shape[0], dtype=losses.dtype, device=losses.device)
        ref = [torch.zeros_like(p) if w is None else w for p, w in zip(self.params, ref)]
        # Gradients that vanish in exact arithmetic (an attention key bias: softmax ignores a shift)
        # are rounding noise on both sides; compare them at the scale of the whole gradient.
        floor = 1e-5 * torch.sqrt(sum(w.double().pow(2).sum() for w in ref))
        for p, want in zip(self.params, ref):
            cs = contribs.get(id(p), [])
            summands = self._summands(cs, lay, id(p) in trimmed)
            got = sum(c.weighted_sum(ones[rows]) for rows, c in summands).view(p.shape) if cs else torch.zeros_like(p)
            err = (got.to(want.dtype) - want).norm()
            if err > rtol * want.norm() + floor:
                raise UnsupportedLayerError(
                    f"parameter '{self.param_names[id(p)]}' receives gradient outside the layers the engine "
                    f"hooks (relative error {float(err / (want.norm() + 1e-30)):.2e}); it would be trained "
                    "without clipping. Freeze it or make the model use it through its module."
                )
        self._records = []
