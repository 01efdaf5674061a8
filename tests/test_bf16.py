"""The engine on bf16 models: per-example norms and the clipped sum against a float64 reference of the same
(bf16-rounded) weights, within bf16's tolerance, and no example's clipped contribution above C."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from privtune.dp.engine import GhostClipEngine
from privtune.models.architectures import tiny_config

B, T, VOCAB = 6, 9, 128
RTOL = 5e-2  # bf16 (8 significant bits) through a whole forward and backward


def _model(arch: str):
    torch.manual_seed(11)
    if arch == "gpt2":
        return AutoModelForCausalLM.from_config(tiny_config("gpt2"), dtype=torch.bfloat16).eval()
    return AutoModelForSequenceClassification.from_config(tiny_config(arch, num_labels=2), dtype=torch.bfloat16).eval()


def _losses(model, arch: str, ids: torch.Tensor) -> torch.Tensor:
    if arch == "gpt2":
        logits = model(input_ids=ids).logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)
    labels = torch.arange(ids.shape[0]) % 2
    return torch.nn.functional.cross_entropy(model(input_ids=ids).logits.float(), labels, reduction="none")


def _reference(model, arch, ids, clip):
    """Per-example norms and the clipped sum, one float64 backward per example, same weights."""
    ref = copy.deepcopy(model).double()
    params = [p for p in ref.parameters() if p.requires_grad]
    losses = _losses(ref, arch, ids)
    norms, total = [], [torch.zeros_like(p) for p in params]
    for b in range(ids.shape[0]):
        grads = torch.autograd.grad(losses[b], params, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        n = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
        norms.append(n)
        total = [t + min(1.0, clip / n) * g for t, g in zip(total, grads)]
    return torch.tensor(norms, dtype=torch.float64), total


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("mode", ["bk", "ghost"])
@pytest.mark.parametrize("strategy", ["ghost", "instantiate"])
def test_bf16_norms_and_clipped_sum_match_float64(arch, mode, strategy):
    model = _model(arch)
    ids = torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(3))
    want_norms, want_sum = _reference(model, arch, ids, clip=0.5)
    engine = GhostClipEngine(model, clip_norm=0.5, mode=mode, norm_strategy=strategy, allow_rounded_sum=True)
    engine.zero_grad()
    with engine.capture(batch_size=B):
        losses = _losses(model, arch, ids)
    norms = engine.backward(losses)
    engine.detach()
    assert norms.dtype == torch.float32 and (want_norms > 0.5).any(), "vacuous unless some examples are clipped"
    torch.testing.assert_close(norms.double(), want_norms, rtol=RTOL, atol=0)
    got = torch.cat([p.grad.double().flatten() for p in engine.params])
    want = torch.cat([w.flatten() for w in want_sum])
    assert all(p.grad.dtype == torch.bfloat16 for p in engine.params)
    assert float((got - want).norm() / want.norm()) < RTOL


@pytest.mark.parametrize("strategy", ["ghost", "instantiate"])
def test_no_bf16_clipped_contribution_exceeds_the_clipping_norm(strategy):
    """Each example alone, heavily clipped: the gradient the engine writes (bf16, after every rounding) has
    norm at most C, by the margin on the clip factors."""
    model = _model("gpt2")
    clip = 1e-3
    for seed in range(4):
        ids = torch.randint(3, VOCAB, (1, T), generator=torch.Generator().manual_seed(seed))
        engine = GhostClipEngine(model, clip_norm=clip, norm_strategy=strategy, allow_rounded_sum=True)
        engine.zero_grad()
        with engine.capture(batch_size=1):
            losses = _losses(model, "gpt2", ids)
        norms = engine.backward(losses)
        engine.detach()
        written = float(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in engine.params)))
        assert float(norms[0]) > 100 * clip
        assert written <= clip, f"seed {seed}: a clipped contribution of norm {written:.6g} > C = {clip}"
        assert written >= 0.95 * clip  # clipped to C, less the margin, not to much less


def test_bf16_parameters_are_refused_unless_their_rounded_sum_is_allowed():
    """A bf16 parameter's gradient would be the clipped sum rounded to bf16 before the noise: refused, naming
    the parameter and the way out, at construction and (a model cast since) at the backward."""
    with pytest.raises(ValueError, match=r"'transformer\.wte\.weight' \(bfloat16\).*allow_rounded_sum=True"):
        GhostClipEngine(_model("gpt2"), clip_norm=1.0)
    model = _model("gpt2").float()
    engine = GhostClipEngine(model, clip_norm=1.0)
    model.to(torch.bfloat16)
    ids = torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(3))
    with engine.capture(batch_size=B):
        losses = _losses(model, "gpt2", ids)
    with pytest.raises(ValueError, match="rounded to that dtype before the noise"):
        engine.backward(losses)
    engine.detach()


@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_one_more_example_moves_the_autocast_clipped_sum_by_its_own_contribution(mode):
    """Under autocast the factors are bf16 but the physical batch's clipped sum is formed and kept in float32:
    adding an example to a batch of 255 copies of another, all clipped to C, moves the sum by that example's
    own contribution. A sum with a bf16 result would be off by up to 2⁻⁹ of the whole sum (255 C here), far
    more than C allows for; so would the two-pass mode's second backward, which low precision does not take."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 64))
    clip, n = 1e-3, 255
    same, new = torch.randn(1, 8, 64), torch.randn(1, 8, 64)

    def clipped_sum(x):
        engine = GhostClipEngine(model, clip_norm=clip, mode=mode)
        engine.zero_grad()
        with engine.capture(batch_size=x.shape[0]), torch.autocast("cpu", dtype=torch.bfloat16):
            losses = model(x).float().pow(2).mean((1, 2))
        norms = engine.backward(losses)
        engine.detach()
        assert bool((norms > 10 * clip).all()) and all(p.grad.dtype == torch.float32 for p in engine.params)
        return torch.cat([p.grad.double().flatten() for p in engine.params])

    base = clipped_sum(same.expand(n, -1, -1).contiguous())
    more = clipped_sum(torch.cat([same.expand(n, -1, -1), new]))
    alone = clipped_sum(new)
    assert float(base.norm()) > 0.9 * n * clip * (1 - 2**-6)  # aligned: the sum is about n C long
    assert float(alone.norm()) <= clip
    assert float((more - base - alone).norm()) < 0.01 * clip


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("strategy", ["ghost", "instantiate"])
def test_autocast_norms_and_clipped_sum_match_autograd_and_keep_bf16_inputs(arch, strategy):
    """A float32 model under CPU autocast (``train.precision: bf16``): the engine's norms and clipped sum
    against one autograd backward per example of the same autocast forward, and the inputs it keeps for
    matrix-product layers are the bf16 ones the products used, not float32 copies."""
    model = _model(arch).float()
    ids = torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(5))
    clip = 0.5
    engine = GhostClipEngine(model, clip_norm=clip, norm_strategy=strategy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = _losses(model, arch, ids)
    want_norms, want_sum = [], [torch.zeros_like(p, dtype=torch.float64) for p in engine.params]
    for b in range(B):
        grads = torch.autograd.grad(losses[b], engine.params, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g.double() for p, g in zip(engine.params, grads)]
        n = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
        want_norms.append(n)
        want_sum = [t + min(1.0, clip / n) * g for t, g in zip(want_sum, grads)]
    engine.zero_grad()
    with engine.capture(batch_size=B), torch.autocast("cpu", dtype=torch.bfloat16):
        losses = _losses(model, arch, ids)
    kept = [r.input.dtype for r in engine._records if type(r.module).__name__ in ("Linear", "Conv1D")]
    assert kept and all(dtype == torch.bfloat16 for dtype in kept)
    norms = engine.backward(losses)
    engine.detach()
    assert (torch.tensor(want_norms) > clip).any(), "vacuous unless some examples are clipped"
    torch.testing.assert_close(norms.double(), torch.tensor(want_norms, dtype=torch.float64), rtol=RTOL, atol=0)
    got = torch.cat([p.grad.double().flatten() for p in engine.params])
    want = torch.cat([w.flatten() for w in want_sum])
    assert all(p.grad.dtype == torch.float32 for p in engine.params)
    assert float((got - want).norm() / want.norm()) < RTOL


def test_autocast_input_changed_in_place_between_two_layers_is_read_again():
    """Two Linears read one tensor, changed in place between them (autograd allows it under autocast: each
    product saved its own bf16 copy): the second layer's norms come from the changed input, not from the
    first layer's rounded copy."""

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            h = x * 1.0
            a = self.first(h)
            h.mul_(3)
            return a.float().pow(2).sum((1, 2)) + self.second(h).float().sum((1, 2))

    torch.manual_seed(0)
    model, x = Twice(), torch.randn(B, T, 8)
    engine = GhostClipEngine(model, clip_norm=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(x)
    want = torch.stack([torch.sqrt(sum(g.double().pow(2).sum() for g in torch.autograd.grad(
        losses[b], engine.params, retain_graph=True))) for b in range(B)])
    with engine.capture(batch_size=B), torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(x)
    norms = engine.backward(losses)
    engine.detach()
    torch.testing.assert_close(norms.double(), want, rtol=RTOL, atol=0)


class _Flipped(torch.nn.Linear):
    """A Linear whose product reads its input reversed along the sequence: not ``x``'s rows in order."""

    def forward(self, x):
        return torch.nn.functional.linear(x.flip(1), self.weight, self.bias)


def _layers():
    from transformers.pytorch_utils import Conv1D

    return {"linear": torch.nn.Linear(8, 4), "linear, no bias": torch.nn.Linear(8, 4, bias=False),
            "conv1d": Conv1D(4, 8), "flipped": _Flipped(8, 4)}


@pytest.mark.parametrize("name", ["linear", "linear, no bias", "conv1d", "flipped"])
@pytest.mark.parametrize("input_grad", [True, False])
def test_autocast_inputs_kept_are_autograds_saved_copies(name, input_grad):
    """Under autocast the engine keeps, of a matrix-product layer's float32 input, the bf16 copy that the
    product read and autograd saved for its backward (the same memory: no second copy held to the clipped
    sum), where the graph shows it is that input's elements in order; else (no graph to the input, or a
    product that reads the input otherwise) a copy of its own. Either way the values are the input's, rounded."""
    torch.manual_seed(0)
    layer = _layers()[name]
    leaf = torch.randn(B, T, 8, requires_grad=input_grad)
    x = leaf * 1.0  # a non-leaf input, as every layer input in a model is
    engine = GhostClipEngine(layer, clip_norm=1.0)
    with engine.capture(batch_size=B), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    (record,) = engine._records
    kept = record.input
    torch.testing.assert_close(kept, x.detach().to(torch.bfloat16), rtol=0, atol=0)
    saved = [t for t in _saved_tensors(out.grad_fn) if t.dtype == torch.bfloat16 and t.numel() == x.numel()
             and t.shape[-1] == 8]
    assert saved, "autograd saved the product's bf16 input"
    shares = any(t.untyped_storage().data_ptr() == kept.untyped_storage().data_ptr() for t in saved)
    assert shares == (input_grad and name != "flipped")
    engine.backward(out.float().pow(2).sum((1, 2)))  # and the step runs on it
    engine.detach()


def _saved_tensors(node, depth: int = 4):
    """The tensors autograd saved in ``node`` and the nodes up to ``depth`` below it."""
    if node is None or depth == 0:
        return []
    found = []
    for attr in dir(node):
        if attr.startswith("_saved_"):
            value = getattr(node, attr)
            if isinstance(value, torch.Tensor):
                found.append(value)
    return found + [t for nxt, _ in node.next_functions for t in _saved_tensors(nxt, depth - 1)]


def test_under_saved_tensor_hooks_the_engine_keeps_its_own_copy_and_reads_nothing_saved():
    """Activation checkpointing and offloading pack what autograd saves: reading a saved tensor in the forward
    would run their unpacking (a recomputation), so there the engine rounds the input itself."""
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(8, 4), torch.randn(B, T, 8, requires_grad=True) * 1.0
    unpacked = []
    engine = GhostClipEngine(layer, clip_norm=1.0)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: unpacked.append(t) or t), \
            engine.capture(batch_size=B), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert unpacked == []
    (record,) = engine._records
    torch.testing.assert_close(record.input, x.detach().to(torch.bfloat16), rtol=0, atol=0)
    engine.backward(out.float().pow(2).sum((1, 2)))
    engine.detach()
