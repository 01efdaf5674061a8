"""Ghost clipping against brute force (one backward per example), in float64."""
import pytest
import torch
from torch import nn
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification)
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.pytorch_utils import Conv1D

from privtune.models.architectures import tiny_config
from privtune.dp.engine import GhostClipEngine
from privtune.dp.layers import UnsupportedLayerError

B, T = 4, 7


pytestmark = pytest.mark.usefixtures("float64")  # every test in float64 (conftest; restored after each)


def brute_force(params, loss_fn, clip):
    """Per-example norms and clipped sum from one backward per example."""
    losses = loss_fn()
    norms, total = [], [torch.zeros_like(p) for p in params]
    for b in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[b], params, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        n = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        norms.append(n)
        c = min(1.0, clip / (float(n) + 1e-6))
        total = [t + c * g for t, g in zip(total, grads)]
    return torch.stack(norms), total


def check(model, loss_fn, clip=0.5, mode="bk", strategy="auto"):
    engine = GhostClipEngine(model, clip_norm=clip, mode=mode, norm_strategy=strategy)
    want_norms, want_sum = brute_force(engine.params, loss_fn, clip)
    engine.zero_grad()
    with engine.capture(batch_size=B):
        losses = loss_fn()
    norms = engine.backward(losses)
    torch.testing.assert_close(norms, want_norms, rtol=1e-5, atol=1e-12)
    for p, w in zip(engine.params, want_sum):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-10, msg=engine.param_names[id(p)])
    assert (norms > clip).any(), "test is vacuous unless some examples are clipped"
    engine.detach()
    return engine


class Wrap(nn.Module):
    def __init__(self, *layers):
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


def seq_loss(model, x):
    return lambda: model(x).pow(2).flatten(1).sum(1).sin() + model(x).flatten(1).sum(1)


@pytest.mark.parametrize("strategy", ["ghost", "instantiate", "auto"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear(strategy, bias):
    torch.manual_seed(0)
    m = Wrap(nn.Linear(5, 6, bias=bias), nn.Tanh(), nn.Linear(6, 3, bias=bias))
    x = torch.randn(B, T, 5)
    check(m, seq_loss(m, x), strategy=strategy)


@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_linear_2d_input_and_modes(mode):
    torch.manual_seed(1)
    m = Wrap(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))
    x = torch.randn(B, 5)
    check(m, seq_loss(m, x), mode=mode)


def test_conv1d():
    torch.manual_seed(2)
    m = Wrap(Conv1D(6, 5), nn.GELU(), Conv1D(3, 6))
    for layer in m.layers:
        if isinstance(layer, Conv1D):
            nn.init.normal_(layer.bias)
    check(m, seq_loss(m, torch.randn(B, T, 5)))


@pytest.mark.parametrize("strategy", ["ghost", "instantiate"])
def test_embedding_with_padding_idx(strategy):
    torch.manual_seed(3)
    m = Wrap(nn.Embedding(11, 4, padding_idx=0), nn.Linear(4, 2))
    x = torch.randint(0, 11, (B, T))
    x[:, -2:] = 0
    x[0, 0] = x[0, 1] = 5  # a repeated token: its two gradients add before the norm
    check(m, seq_loss(m, x), strategy=strategy)


@pytest.mark.parametrize("norm", [lambda: nn.LayerNorm(5), lambda: LlamaRMSNorm(5), lambda: nn.RMSNorm(5)])
def test_norm_layers(norm):
    torch.manual_seed(4)
    layer = norm()
    with torch.no_grad():
        layer.weight.normal_()
        if getattr(layer, "bias", None) is not None:
            layer.bias.normal_()
    m = Wrap(nn.Linear(3, 5), layer, nn.Linear(5, 2, bias=False))
    check(m, seq_loss(m, torch.randn(B, T, 3)))


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(13, 6)
        self.pos = nn.Embedding(T, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 13, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        h = self.emb(x) + self.pos(torch.arange(x.shape[1]))
        return self.head(torch.tanh(self.mid(h)))


@pytest.mark.parametrize("strategy", ["ghost", "instantiate", "auto"])
def test_tied_embedding_cross_terms(strategy):
    torch.manual_seed(5)
    m = TiedLM()
    x = torch.randint(0, 13, (B, T))
    loss = lambda: torch.nn.functional.cross_entropy(m(x).transpose(1, 2), x, reduction="none").sum(1)
    eng = check(m, loss, strategy=strategy)
    assert len(eng.params) == 4  # emb (tied with head), pos, mid.weight, mid.bias


def _batch(vocab, pad_id, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -3:] = 0
    mask[3, -5:] = 0
    ids[mask == 0] = pad_id
    return ids, mask


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_whole_encoders_with_padding(arch, mode):
    torch.manual_seed(6)
    model = AutoModelForSequenceClassification.from_config(tiny_config(arch, num_labels=3), dtype=torch.float64)
    model.eval()
    ids, mask = _batch(128, model.config.pad_token_id or 0)
    labels = torch.tensor([0, 1, 2, 1])
    loss = lambda: torch.nn.functional.cross_entropy(
        model(input_ids=ids, attention_mask=mask).logits, labels, reduction="none")
    check(model, loss, clip=0.05, mode=mode)


def test_layers_reading_one_input_share_its_gram(monkeypatch):
    """BERT's query, key and value read one input: its Gram is formed once, not three times, and the norms
    are those of forming it each time."""
    from privtune.dp import contributions

    torch.manual_seed(6)
    model = AutoModelForSequenceClassification.from_config(tiny_config("bert", num_labels=3), dtype=torch.float64)
    model.eval()
    ids, mask = _batch(128, 0)
    labels = torch.tensor([0, 1, 2, 1])
    engine = GhostClipEngine(model, clip_norm=0.05, norm_strategy="ghost")
    formed = []
    real = contributions._gram
    monkeypatch.setattr(contributions, "_gram", lambda t: formed.append(t) or real(t))

    def norms():
        with engine.capture(batch_size=B):
            losses = torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels,
                                                       reduction="none")
        return engine.per_example_norms(losses)

    shared, once = norms(), len(formed)
    assert once == len({contributions._key(t) for t in formed})  # no factor's Gram formed twice
    monkeypatch.setattr(contributions, "Grams", lambda cs: None)  # no sharing: every Gram formed again
    import privtune.dp.engine as engine_module
    monkeypatch.setattr(engine_module, "Grams", lambda cs: None)
    formed.clear()
    torch.testing.assert_close(norms(), shared, rtol=1e-12, atol=0)
    assert len(formed) >= once + 2 * model.config.num_hidden_layers  # key and value took query's input Gram


def test_shared_grams_are_released_when_a_sharer_instantiates(monkeypatch):
    """Two layers read one input and their norms take different strategies (one ghost, one instantiated):
    the ghost one's Gram is not kept for the other, and nothing is kept once the norms are formed."""
    import privtune.dp.engine as engine_module
    from privtune.dp import contributions

    made = []

    class Recorded(contributions.Grams):
        def __init__(self, cs):
            super().__init__(cs)
            made.append(self)

    monkeypatch.setattr(engine_module, "Grams", Recorded)
    wide, narrow = nn.Linear(256, 512), nn.Linear(256, 1)  # instantiation is cheap for the narrow one only
    model = Wrap(wide)
    model.narrow = narrow
    model.forward = lambda x: wide(x).pow(2).sum((1, 2)) + narrow(x).sum((1, 2))
    x = torch.randn(B, 64, 256)
    engine = GhostClipEngine(model, clip_norm=0.5)
    want, _ = brute_force(engine.params, lambda: model(x), 0.5)
    with engine.capture(batch_size=B):
        losses = model(x)
    norms = engine.per_example_norms(losses)
    torch.testing.assert_close(norms, want, rtol=1e-6, atol=1e-12)
    strategies = {engine.last_strategies[n] for n in ("layers.0.weight", "narrow.weight")}
    assert strategies == {"ghost", "instantiate"}, engine.last_strategies
    assert made and made[-1].kept == {}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_whole_causal_lms_with_padding(arch):
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float64)
    model.eval()
    pad = model.config.pad_token_id or 0
    ids, mask = _batch(128, pad, seed=1)

    def loss():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        tgt = ids[:, 1:]
        tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, reduction="none")
        m = mask[:, 1:].to(tok.dtype)
        return (tok * m).sum(1) / m.sum(1)

    eng = check(model, loss, clip=0.05)
    names = set(eng.param_names.values())
    if arch == "gpt2":
        assert "transformer.wpe.weight" in names and "transformer.h.0.attn.c_attn.weight" in names
    else:
        assert "model.layers.0.input_layernorm.weight" in names
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x) * self.scale


def test_unsupported_trainable_layer_is_a_hard_error():
    with pytest.raises(UnsupportedLayerError, match=r"module '' of type .*Odd.*\[scale\]"):
        GhostClipEngine(Odd(), clip_norm=1.0)
    m = Odd()
    m.scale.requires_grad_(False)  # frozen parameters are fine
    GhostClipEngine(m, clip_norm=1.0)


class GemmaStyleNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


def test_norm_matched_by_behaviour_refuses_other_behaviour():
    with pytest.raises(UnsupportedLayerError, match="GemmaStyleNorm"):
        GhostClipEngine(Wrap(nn.Linear(3, 4), GemmaStyleNorm(4)), clip_norm=1.0)


class Leaky(nn.Module):
    """Uses its Linear's weight a second time outside the module call."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x) + x @ self.lin.weight


def test_verify_catches_a_parameter_used_outside_its_module():
    m = Leaky()
    eng = GhostClipEngine(m, clip_norm=1.0)
    x = torch.randn(B, T, 3)
    with eng.capture():
        losses = m(x).pow(2).flatten(1).sum(1)
    with pytest.raises(UnsupportedLayerError, match="lin.weight"):
        eng.verify(losses)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_verify_passes_on_whole_float32_models(arch):
    """The first-step audit must not trip on gradients that vanish in exact arithmetic (key biases)."""
    torch.manual_seed(8)
    if arch == "bert":
        model = AutoModelForSequenceClassification.from_config(tiny_config(arch, num_labels=2), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    ids, mask = _batch(128, 0, seed=2)
    eng = GhostClipEngine(model, clip_norm=1.0)
    with eng.capture(batch_size=B):
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        losses = logits.flatten(1).pow(2).mean(1)
    eng.verify(losses)


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        h = self.lin(x)
        h.mul_(2.0)  # the gradient the hook would see is no longer the layer output's
        return h


def test_a_layer_output_modified_in_place_is_refused_under_capture():
    m = InPlace()
    m(torch.randn(B, T, 3))  # fine without the engine
    eng = GhostClipEngine(m, clip_norm=1.0)
    with pytest.raises(RuntimeError, match="modified inplace"):
        with eng.capture():
            m(torch.randn(B, T, 3))


def test_the_engine_keeps_no_layer_output_alive():
    """Only the layer inputs are kept for book-keeping; an output the graph does not save is freed at once."""
    import weakref

    lin = nn.Linear(3, 5)
    seen = []
    lin.register_forward_hook(lambda mod, args, out: seen.append(weakref.ref(out)))  # runs before the engine's
    eng = GhostClipEngine(lin, clip_norm=1.0)
    with eng.capture():
        losses = lin(torch.randn(B, T, 3)).sum((1, 2))  # sum saves no tensor
    assert seen and seen[0]() is None
    norms = eng.backward(losses)  # and the gradients still arrive through the tap
    assert norms.shape == (B,) and lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_micro_batches_accumulate_into_the_gradient(dtype):
    """A second physical batch adds its clipped sum to p.grad (in place when the dtypes allow it,
    through a float32 sum for bf16 parameters); the tied embedding has two contributions to add."""
    torch.manual_seed(6)
    m = TiedLM()
    xs = [torch.randint(0, 13, (B, T)) for _ in range(2)]

    def clipped_sum(model, x):
        eng = GhostClipEngine(model, clip_norm=0.5, allow_rounded_sum=True)  # bf16 parameters: their sum is rounded
        with eng.capture(batch_size=B):
            losses = torch.nn.functional.cross_entropy(model(x).transpose(1, 2).double(), x, reduction="none").sum(1)
        eng.backward(losses)
        eng.detach()
        return eng.params

    want = None
    for x in xs:  # reference: each batch alone, summed outside the engine
        m.zero_grad(set_to_none=True)
        params = clipped_sum(m, x)
        want = [p.grad.clone() for p in params] if want is None else [w + p.grad for w, p in zip(want, params)]
    m = m.to(dtype)
    m.zero_grad(set_to_none=True)
    for x in xs:
        params = clipped_sum(m, x)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    for p, w in zip(params, want):
        assert p.grad.dtype == dtype
        torch.testing.assert_close(p.grad, w.to(dtype), **tol)


@pytest.mark.parametrize("name, rows, cols, length, dense, want", [
    ("BERT position embedding", 512, 384, 64, False, "ghost"),  # instantiation: 18x slower, measured
    ("GPT-2 position embedding", 1024, 768, 128, False, "ghost"),  # 11x
    ("BERT token-type embedding", 2, 384, 16, False, "ghost"),  # 2.7x
    ("short linear", 384, 384, 64, True, "ghost"),  # 10x
    ("long linear", 384, 384, 512, True, "instantiate"),  # ghost 2.6x slower
])
def test_the_norm_cost_model_prices_memory_traffic(name, rows, cols, length, dense, want):
    """`auto` counts the (B, rows, cols) per-example gradients instantiation writes, not its FLOPs
    alone: a FLOP count picks instantiation for position embeddings, where it is far slower."""
    from privtune.dp.contributions import OuterSum, squared_norms

    v = torch.randn(2, length, cols)
    c = (OuterSum(v=v, rows=rows, u=torch.randn(2, length, rows)) if dense
         else OuterSum(v=v, rows=rows, u_idx=torch.arange(length).remainder(rows).expand(2, length)))
    norms, how = squared_norms([c])
    assert how == want, name
    torch.testing.assert_close(norms, squared_norms([c], "ghost" if want == "instantiate" else "instantiate")[0])


@pytest.mark.parametrize("rows, cols", [(3, 9), (9, 3)])
def test_weighted_sum_scales_either_factor(rows, cols):
    """The clipped sum scales the smaller factor; either way it equals Σ_b w_b G_b (and leaves out
    the examples outside ``keep``)."""
    from privtune.dp.contributions import OuterSum

    o = OuterSum(v=torch.randn(4, 5, cols), rows=rows, u=torch.randn(4, 5, rows))
    w = torch.rand(4)
    torch.testing.assert_close(o.weighted_sum(w), torch.einsum("brc,b->rc", o.instantiate(), w))
    keep = torch.tensor([True, False, True, True])
    torch.testing.assert_close(o.weighted_sum(w, keep=keep), torch.einsum("brc,b->rc", o.instantiate()[keep], w[keep]))


@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_an_empty_physical_batch_adds_nothing(mode):
    """Poisson sampling draws an empty batch now and then: a zero contribution, not a reshape error."""
    model = Wrap(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2))
    engine = GhostClipEngine(model, clip_norm=0.5, mode=mode)
    with engine.capture(batch_size=0):
        losses = model(torch.zeros(0, 5)).pow(2).sum(1)
    norms = engine.backward(losses)
    assert norms.shape == (0,) and all(p.grad is None for p in engine.params)
    x = torch.randn(B, 5)  # the engine works as before on the next batch
    check(model, lambda: model(x).pow(2).sum(1).sin() + model(x).sum(1), clip=0.1, mode=mode)


class NanoPositions(nn.Module):
    """nanoGPT's embedding: ``wte(ids) + wpe(arange(T))``, the positions computed once for the batch."""

    def __init__(self, vocab=11, t_max=16, d=6):
        super().__init__()
        self.wte, self.wpe, self.head = nn.Embedding(vocab, d), nn.Embedding(t_max, d), nn.Linear(d, 3)

    def forward(self, ids):
        h = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        return self.head(torch.tanh(h)).sum(1)


def _nano_loss(model, ids, y):
    return lambda: nn.functional.cross_entropy(model(ids), y, reduction="none")


@pytest.mark.parametrize("mode", ["bk", "ghost"])
@pytest.mark.parametrize("strategy", ["ghost", "instantiate"])
def test_positions_shared_by_the_batch_stay_exact_when_their_length_equals_the_batch(mode, strategy):
    torch.manual_seed(0)
    model = NanoPositions()
    engine = GhostClipEngine(model, clip_norm=0.05, mode=mode, norm_strategy=strategy)
    for t in (T, B):  # first T != B (the positions are seen shared), then T == B by chance
        ids, y = torch.randint(0, 11, (B, t)), torch.randint(0, 3, (B,))
        want_norms, want_sum = brute_force(engine.params, _nano_loss(model, ids, y), 0.05)
        engine.zero_grad()
        with engine.capture(batch_size=B):
            losses = _nano_loss(model, ids, y)()
        norms = engine.backward(losses)
        torch.testing.assert_close(norms, want_norms, rtol=1e-5, atol=1e-12)
        for p, w in zip(engine.params, want_sum):
            torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-10, msg=engine.param_names[id(p)])


@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_a_first_batch_whose_length_equals_its_size_is_settled_by_verify(mode):
    """Positions (T,) with T == B at the very first batch look like one index per example: verify's
    per-example check refuses, naming the layer, instead of clipping with wrong norms."""
    torch.manual_seed(0)
    model = NanoPositions()
    engine = GhostClipEngine(model, clip_norm=0.05, mode=mode)
    ids, y = torch.randint(0, 11, (B, B)), torch.randint(0, 3, (B,))
    with engine.capture(batch_size=B):
        losses = _nano_loss(model, ids, y)()
    with pytest.raises(UnsupportedLayerError, match="wpe"):
        engine.verify(losses)


class SequenceFirst(nn.Module):
    def __init__(self, d=5):
        super().__init__()
        self.proj, self.out = nn.Linear(d, d), nn.Linear(d, 2)

    def forward(self, x):  # x: (B, T, d), projected sequence-first as (T, B, d)
        h = torch.tanh(self.proj(x.transpose(0, 1))).transpose(0, 1)
        return self.out(h).sum(1)


@pytest.mark.parametrize("t", [B, T])
def test_a_sequence_first_layer_is_refused_whatever_its_length(t):
    torch.manual_seed(0)
    model = SequenceFirst()
    engine = GhostClipEngine(model, clip_norm=0.05)
    x, y = torch.randn(B, t, 5), torch.randint(0, 2, (B,))
    with engine.capture(batch_size=B):
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    with pytest.raises(UnsupportedLayerError, match="proj"):
        engine.verify(losses)


@pytest.mark.parametrize("norm,match", [
    (lambda: nn.GroupNorm(2, 4), "GroupNorm"),
    (lambda: nn.GroupNorm(1, 4), "GroupNorm"),
    (lambda: nn.BatchNorm1d(4), "BatchNorm1d"),
    (lambda: nn.BatchNorm1d(3), "BatchNorm1d"),  # its channels happen to equal the probe's middle dimension
    (lambda: nn.InstanceNorm1d(4, affine=True), "InstanceNorm1d"),
    (lambda: nn.LayerNorm((2, 2)), "several trailing dimensions"),
    (lambda: nn.RMSNorm((2, 2)), "several trailing dimensions"),
])
def test_norm_layers_the_engine_cannot_clip_are_refused_by_name_at_initialisation(norm, match):
    """At weight 1 and bias 0 every affine norm looks alike: the probe uses random parameters, and layers
    that normalise over the batch, channels or several dimensions are refused, never a torch shape error."""
    model = Wrap(nn.Linear(3, 4), norm(), nn.Linear(4, 2)) if "several" not in match else \
        nn.Sequential(nn.Unflatten(-1, (2, 2)), norm(), nn.Flatten(-2))
    with pytest.raises(UnsupportedLayerError, match=match):
        GhostClipEngine(model, clip_norm=1.0)


def test_an_initialised_one_plus_weight_norm_is_refused():
    norm = GemmaStyleNorm(4)  # weight 0: (1 + w) = 1 passes a probe at the layer's own parameters
    with pytest.raises(UnsupportedLayerError, match="GemmaStyleNorm"):
        GhostClipEngine(Wrap(nn.Linear(3, 4), norm), clip_norm=1.0)


class MaskPositions(nn.Embedding):
    """OPT's learned positions: called with the attention mask, it computes the rows it reads."""

    def forward(self, attention_mask):
        return super().forward((attention_mask.cumsum(1) * attention_mask).long())


def test_an_embedding_that_computes_its_own_rows_is_refused_by_name():
    model = Wrap(nn.Linear(3, 3))
    model.pos = MaskPositions(8, 3)
    with pytest.raises(UnsupportedLayerError, match="'pos'.*MaskPositions"):
        GhostClipEngine(model, clip_norm=1.0)
    model.pos.weight.requires_grad_(False)  # frozen, it is no concern of the engine
    GhostClipEngine(model, clip_norm=1.0)


def test_opt_is_refused_at_construction_naming_its_positions():
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                    max_position_embeddings=32, word_embed_proj_dim=16)
    with pytest.raises(UnsupportedLayerError, match="embed_positions"):
        GhostClipEngine(OPTForCausalLM(cfg), clip_norm=1.0)
