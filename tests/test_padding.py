"""Padded rows left out of the norms and the clipped sum (privtune.dp.padding): exact whatever the hint."""
import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from privtune.dp import padding
from privtune.dp.contributions import OuterSum
from privtune.dp.engine import GhostClipEngine
from privtune.models.architectures import tiny_config

pytestmark = pytest.mark.usefixtures("float64")

LENGTHS = [2, 3, 3, 4, 6, 9, 9, 12, 16, 16, 20, 24]  # sorted, as privtune's physical batches are
B, T = len(LENGTHS), max(LENGTHS)


def _rows(plan):
    return sum((b1 - b0) * keep for b0, b1, keep in plan)


def _brute_runs(lengths, max_runs):
    """The fewest rows over every cut of the batch into at most ``max_runs`` consecutive runs."""
    n, best = len(lengths), None
    for k in range(max_runs):
        for cuts in itertools.combinations(range(1, n), k):
            bounds = (0, *cuts, n)
            rows = sum((b - a) * max(lengths[a:b]) for a, b in zip(bounds, bounds[1:]))
            best = rows if best is None else min(best, rows)
    return best


@pytest.mark.parametrize("lengths", [LENGTHS, [5] * 3 + [6] * 4 + [30], [1, 2, 3, 4, 5, 6, 7, 8],
                                     [3, 9, 2, 9, 4, 1, 9]])
def test_runs_cover_the_batch_and_keep_the_fewest_rows(lengths):
    plan = padding.runs(lengths)
    assert plan[0][0] == 0 and plan[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in zip(plan, plan[1:]))  # consecutive, no gap, no overlap
    assert all(keep == max(lengths[b0:b1]) for b0, b1, keep in plan)  # no example is cut short
    assert len(plan) <= padding.MAX_RUNS
    if sorted(lengths) == lengths:  # sorted: the search over length changes is exhaustive
        assert _rows(plan) == _brute_runs(lengths, padding.MAX_RUNS)
    assert _rows(plan) < len(lengths) * max(lengths)


def test_a_layout_keeps_each_examples_rows_and_skips_a_batch_with_little_padding():
    lay = padding.layout([1, 3, 3], "cpu")
    assert lay.kept.tolist() == [0, 3, 4, 5, 6, 7, 8] and lay.dropped.tolist() == [1, 2]
    assert lay.examples.tolist() == [0, 1, 1, 1, 2, 2, 2]
    assert padding.layout([10] * 20, "cpu") is None
    assert padding.layout([9] + [10] * 19, "cpu") is None  # 1 row in 200 is below MIN_SAVING
    assert padding.layout([], "cpu") is None


def _batch(vocab, pad_id, lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)), generator=g)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    ids[mask == 0] = pad_id
    return ids, mask


def _per_example(params, losses):
    """Each example's gradient, from one backward of its loss."""
    out = []
    for b in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[b], params, retain_graph=True, allow_unused=True)
        out.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
    return out


def _run(model, loss_fn, lengths, mode, monkeypatch):
    """The engine's norms and clipped sum with the hint ``lengths`` against one backward per example, C at
    the median norm; returns how many parameters were trimmed."""
    engine = GhostClipEngine(model, clip_norm=1.0, mode=mode)
    grads = _per_example(engine.params, loss_fn())
    want_norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in gs)) for gs in grads])
    engine.clip_norm = clip = float(want_norms.median())
    want_sum = [sum(min(1.0, clip / (float(n) + 1e-6)) * gs[i] for n, gs in zip(want_norms, grads))
                for i in range(len(engine.params))]
    trimmed = []
    real = padding.checked

    def spy(contribs, lay):
        out = real(contribs, lay)
        trimmed.append(len(out))
        return out

    monkeypatch.setattr(padding, "checked", spy)
    engine.zero_grad()
    with engine.capture(batch_size=len(lengths), lengths=lengths):
        losses = loss_fn()
    norms = engine.backward(losses)
    torch.testing.assert_close(norms, want_norms, rtol=1e-6, atol=1e-12)
    for p, w in zip(engine.params, want_sum):
        got = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-12, msg=engine.param_names[id(p)])
    engine.detach()
    return trimmed[0]


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_encoders_skip_padded_rows_and_stay_exact(arch, mode, monkeypatch):
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_config(tiny_config(arch, num_labels=3), dtype=torch.float64)
    model.eval()
    ids, mask = _batch(128, model.config.pad_token_id or 0)
    labels = torch.arange(B) % 3
    loss = lambda: torch.nn.functional.cross_entropy(
        model(input_ids=ids, attention_mask=mask).logits, labels, reduction="none")
    assert _run(model, loss, LENGTHS, mode, monkeypatch) > 0  # the layers' weights were trimmed


def _lm_loss(model, ids, mask):
    def loss():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        m = mask[:, 1:].to(tok.dtype)
        return (tok * m).sum(1) / m.sum(1).clamp_min(1)
    return loss


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_causal_lms_with_a_tied_head_skip_padded_rows_and_stay_exact(arch, monkeypatch):
    torch.manual_seed(4)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float64)
    model.eval()
    ids, mask = _batch(128, model.config.pad_token_id or 0, seed=1)
    assert _run(model, _lm_loss(model, ids, mask), LENGTHS, "bk", monkeypatch) > 0


@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_a_hint_shorter_than_what_the_loss_reads_trims_nothing(mode, monkeypatch):
    """The loss reads every position (no attention mask, padding tokens scored): the hint claims shorter
    examples, the dropped rows are not zero, and nothing is trimmed; the answer is still exact."""
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(tiny_config("gpt2"), dtype=torch.float64)
    model.eval()
    ids, _ = _batch(128, 0, seed=2)
    full = torch.ones_like(ids)
    assert _run(model, _lm_loss(model, ids, full), LENGTHS, mode, monkeypatch) == 0


def test_a_left_padded_batch_with_a_right_padding_hint_stays_exact(monkeypatch):
    torch.manual_seed(6)
    model = AutoModelForSequenceClassification.from_config(tiny_config("bert", num_labels=2), dtype=torch.float64)
    model.eval()
    ids, mask = _batch(128, 0)
    ids, mask = ids.flip(1), mask.flip(1)  # left padding
    labels = torch.arange(B) % 2
    loss = lambda: torch.nn.functional.cross_entropy(
        model(input_ids=ids, attention_mask=mask).logits, labels, reduction="none")
    _run(model, loss, LENGTHS, "bk", monkeypatch)


def test_a_contribution_is_trimmed_only_where_a_factor_is_zero_in_every_dropped_row():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(4, 6, 3, generator=g), torch.randn(4, 6, 5, generator=g)
    lay = padding.layout([2, 2, 5, 6], "cpu")
    for b, n in enumerate([2, 2, 5, 6]):
        u[b, n:] = 0
    assert padding.checked({0: [OuterSum(u=u, v=v, rows=3, grad_side="u")]}, lay) == {0}
    for bad in (1.0, float("nan")):  # one non-zero (or NaN) entry in a dropped row of each factor
        u2 = u.clone()
        u2[2, 5, 0] = bad
        assert padding.checked({0: [OuterSum(u=u2, v=v, rows=3, grad_side="u")]}, lay) == set()
    u3, v3 = u.clone(), v.clone()
    u3[1, 4, 0] = 1.0
    for b, n in enumerate([2, 2, 5, 6]):
        v3[b, n:] = 0  # the other factor is zero there: trimmed after the second check
    assert padding.checked({0: [OuterSum(u=u3, v=v3, rows=3, grad_side="u")]}, lay) == {0}
    v4 = v.clone()
    v4[2, 5, 1] = float("nan")  # u is zero there, but 0·NaN is not zero: the row is kept
    assert padding.checked({0: [OuterSum(u=u, v=v4, rows=3, grad_side="u")]}, lay) == set()
    # what is kept is what the whole contribution gives: the same per-example gradients and weighted sum,
    # in one chunk or in chunks of 256 rows at least
    c = OuterSum(u=u, v=v, rows=3, grad_side="u")
    w = torch.rand(4, generator=g)
    chunks = list(padding.packed(c, lay))
    assert len(chunks) == 1
    torch.testing.assert_close(sum(p.weighted_sum(w[rows]) for rows, p in chunks), c.weighted_sum(w))
    pieces = padding.by_runs([c], lay)
    assert [rows for rows, _ in pieces] == [slice(b0, b1) for b0, b1, _ in lay.runs]
    got = torch.cat([cs[0].instantiate() for _, cs in pieces])
    torch.testing.assert_close(got, c.instantiate())


def test_lengths_that_do_not_match_the_batch_are_refused():
    model = AutoModelForSequenceClassification.from_config(tiny_config("bert", num_labels=2), dtype=torch.float64)
    engine = GhostClipEngine(model, clip_norm=1.0)
    ids, mask = _batch(128, 0)
    with engine.capture(batch_size=B, lengths=LENGTHS[:-1]):
        logits = model(input_ids=ids, attention_mask=mask).logits
    with pytest.raises(ValueError, match="lengths"):
        engine.backward(logits.sum(-1))


def test_under_autocast_trimming_changes_no_norm_and_the_sum_within_bf16_rounding(monkeypatch):
    """bf16 factors (CPU autocast): the same per-example norms with and without the hint (the Grams of the
    kept rows are the same float32 products), and the clipped sums within one bf16 rounding."""
    torch.manual_seed(8)
    model = AutoModelForSequenceClassification.from_config(tiny_config("bert", num_labels=2), dtype=torch.float32)
    model.eval()
    ids, mask = _batch(128, 0)
    labels = torch.arange(B) % 2
    engine = GhostClipEngine(model, clip_norm=1.0)
    trimmed, real = [], padding.checked
    monkeypatch.setattr(padding, "checked", lambda c, lay: trimmed.append(real(c, lay)) or trimmed[-1])
    got = []
    for hint in (None, LENGTHS):
        engine.zero_grad()
        with engine.capture(batch_size=B, lengths=hint), torch.autocast("cpu", dtype=torch.bfloat16):
            losses = torch.nn.functional.cross_entropy(
                model(input_ids=ids, attention_mask=mask).logits.float(), labels, reduction="none")
        norms = engine.backward(losses)
        got.append((norms, torch.cat([p.grad.flatten() for p in engine.params if p.grad is not None])))
    assert trimmed and trimmed[0]
    torch.testing.assert_close(got[1][0], got[0][0], rtol=1e-5, atol=0)
    assert float((got[1][1] - got[0][1]).norm() / got[0][1].norm()) < 1e-2


def test_kept_rows_are_summed_in_chunks_of_bounded_size(monkeypatch):
    g = torch.Generator().manual_seed(1)
    lengths = [300, 500, 700, 900]
    u, v = torch.randn(4, 900, 3, generator=g), torch.randn(4, 900, 5, generator=g)
    for b, n in enumerate(lengths):
        u[b, n:] = 0
    lay = padding.layout(lengths, "cpu")
    c = OuterSum(u=u, v=v, rows=3, grad_side="u")
    monkeypatch.setattr(padding, "PACK_BYTES", 1)  # the floor: 256 rows per chunk
    chunks = list(padding.packed(c, lay))
    assert [p.batch for _, p in chunks] == [256] * 9 + [2400 - 9 * 256]
    w = torch.rand(4, generator=g)
    torch.testing.assert_close(sum(p.weighted_sum(w[rows]) for rows, p in chunks), c.weighted_sum(w))


class _EmbedLinear(torch.nn.Module):
    def __init__(self, tied=False):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 6)
        self.lin = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 16, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids, mask, read_padding=False):
        keep = torch.ones_like(mask) if read_padding else mask
        h = torch.where(keep[..., None] > 0, self.lin(self.emb(ids)), 0.0)  # padded outputs: gradient exactly 0
        return (self.head(torch.tanh(h)).logsumexp(-1) * keep).sum(1)


@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_a_non_finite_input_in_a_dropped_row_keeps_the_answer_of_the_untrimmed_engine(mode):
    """The padding token's embedding is NaN: the loss never reads padded positions, so the linear layer's
    output gradient is exactly zero there, but 0·NaN is NaN in its weight gradient. With or without the
    hint the engine gives the same norms (NaN for the padded examples, which are dropped) and the same
    sum."""
    lengths = [2, 3, 4, 5, 6, 7, 16, 16]
    torch.manual_seed(0)
    model = _EmbedLinear()
    with torch.no_grad():
        model.emb.weight[0] = float("nan")
    ids = torch.randint(1, 16, (8, 16))
    mask = (torch.arange(16)[None] < torch.tensor(lengths)[:, None]).long()
    ids[mask == 0] = 0
    got = []
    for hint in (None, lengths):
        engine = GhostClipEngine(model, clip_norm=1.0, mode=mode)
        with engine.capture(batch_size=8, lengths=hint):
            losses = model(ids, mask)
        norms = engine.backward(losses)
        got.append((norms, [p.grad.clone() for p in engine.params]))
        engine.detach()
        model.zero_grad(set_to_none=True)
    assert torch.isnan(got[0][0][:6]).all() and torch.isfinite(got[0][0][6:]).all()
    torch.testing.assert_close(got[1][0], got[0][0], equal_nan=True)
    for a, b in zip(got[1][1], got[0][1]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


def test_a_tied_parameter_is_trimmed_only_if_every_contribution_passes(monkeypatch):
    """The embedding's rows are dropped-zero, the tied head's are not (the loss reads every position): the
    shared weight stays whole, and its norms and sum are exact."""
    lengths = [2, 3, 5, 8, 8, 12]
    torch.manual_seed(1)
    model = _EmbedLinear(tied=True)
    ids = torch.randint(1, 16, (6, 12))
    mask = (torch.arange(12)[None] < torch.tensor(lengths)[:, None]).long()
    engine = GhostClipEngine(model, clip_norm=1.0)
    grads = _per_example(engine.params, model(ids, mask, read_padding=True))
    want = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in gs)) for gs in grads])
    seen = []
    real = padding.checked
    monkeypatch.setattr(padding, "checked", lambda c, lay: seen.append(real(c, lay)) or seen[-1])
    with engine.capture(batch_size=6, lengths=lengths):
        losses = model(ids, mask, read_padding=True)
    torch.testing.assert_close(engine.per_example_norms(losses), want)
    assert id(model.emb.weight) not in seen[0]


def test_per_example_norms_and_verify_take_the_trimmed_path(monkeypatch):
    torch.manual_seed(9)
    model = AutoModelForSequenceClassification.from_config(tiny_config("bert", num_labels=2), dtype=torch.float64)
    model.eval()
    ids, mask = _batch(128, 0)
    labels = torch.arange(B) % 2
    loss = lambda: torch.nn.functional.cross_entropy(
        model(input_ids=ids, attention_mask=mask).logits, labels, reduction="none")
    engine = GhostClipEngine(model, clip_norm=1.0)
    with engine.capture(batch_size=B):
        whole = engine.per_example_norms(loss())
    seen = []
    real = padding.checked
    monkeypatch.setattr(padding, "checked", lambda c, lay: seen.append(real(c, lay)) or seen[-1])
    with engine.capture(batch_size=B, lengths=LENGTHS):
        torch.testing.assert_close(engine.per_example_norms(loss()), whole, rtol=1e-12, atol=0)
    with engine.capture(batch_size=B, lengths=LENGTHS):
        engine.verify(loss(), rtol=1e-9, examples=B)
    assert len(seen) == 2 and all(seen)


def test_a_negative_length_is_refused():
    with pytest.raises(ValueError, match="negative length"):
        padding.layout([3, -1, 2], "cpu")
