"""Sampling, the noisy step and Child-Tuning masks."""
import numpy as np
import pytest
import torch
from torch import nn

from privtune.childtuning.mask import ct_f_mask_, fixed_mask_, is_encoder_layer, restore_masked_, snapshot
from privtune.dp.noise import privatize_
from privtune.dp.sampling import logical_batches
from privtune.childtuning.fisher import mask_density, top_fraction_mask


def test_poisson_batches_have_the_expected_rate_and_are_reproducible():
    a = [idx for _, idx in logical_batches(1000, 50, 200, seed=3)]
    b = [idx for _, idx in logical_batches(1000, 50, 200, seed=3)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    sizes = np.array([len(x) for x in a])
    assert abs(sizes.mean() - 50) < 2 and sizes.std() > 2  # variable sizes around q·n
    resumed = [idx for _, idx in logical_batches(1000, 50, 200, seed=3, start=150)]
    assert all(np.array_equal(x, y) for x, y in zip(a[150:], resumed))


def test_shuffle_batches_are_fixed_size_and_cover_each_epoch():
    batches = [idx for _, idx in logical_batches(100, 10, 10, seed=0, scheme="shuffle")]
    assert all(len(b) == 10 for b in batches)
    assert sorted(np.concatenate(batches)) == list(range(100))


def test_privatize_adds_noise_of_the_right_scale():
    p = nn.Parameter(torch.zeros(200_000))
    p.grad = torch.ones_like(p) * 3.0
    g = torch.Generator().manual_seed(0)
    privatize_([p], noise_multiplier=2.0, clip_norm=0.5, expected_batch_size=10, generator=g)
    noise = p.grad * 10 - 3.0
    assert abs(noise.mean().item()) < 0.01
    assert abs(noise.std().item() - 1.0) < 0.01  # σ·C = 1
    q = nn.Parameter(torch.zeros(3))  # a parameter the batch never touched still gets noise
    privatize_([q], 1.0, 1.0, 1.0, torch.Generator().manual_seed(1))
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_ct_f_mask_has_mean_p_and_is_unbiased():
    p_f = 0.3
    p = nn.Parameter(torch.zeros(100_000))
    g = torch.Generator().manual_seed(0)
    p.grad = torch.full_like(p, 2.0)
    ct_f_mask_([p], p_f, g)
    kept = (p.grad != 0).float().mean().item()
    assert abs(kept - p_f) < 0.005
    assert abs(p.grad.mean().item() - 2.0) < 0.05  # E[mask/p] = 1


def test_fisher_mask_density_is_exact_and_ties_are_broken():
    torch.manual_seed(0)
    scores = {"a": torch.rand(37, 11), "b": torch.zeros(100), "c": torch.rand(5)}
    total = sum(s.numel() for s in scores.values())
    for frac in (0.1, 0.3, 0.9):
        m = top_fraction_mask(scores, frac)
        assert sum(int(x.sum()) for x in m.values()) == round(frac * total)
        assert abs(mask_density(m) - frac) <= 1 / total
    m = top_fraction_mask(scores, 0.1)
    kept = torch.cat([scores[k][m[k]] for k in m])
    dropped = torch.cat([scores[k][~m[k]] for k in m])
    assert kept.min() >= dropped.max()


def test_ct_d_masked_coordinates_do_not_move_without_weight_decay():
    lin = nn.Linear(4, 4)
    mask = {"weight": torch.rand(4, 4) > 0.5, "bias": torch.ones(4, dtype=torch.bool)}
    opt = torch.optim.Adam(lin.parameters(), lr=0.1)
    before = lin.weight.detach().clone()
    for _ in range(3):
        lin(torch.randn(8, 4)).pow(2).sum().backward()
        fixed_mask_(lin, mask)
        opt.step()
        opt.zero_grad()
    moved = (lin.weight.detach() != before)
    assert not moved[~mask["weight"]].any() and moved[mask["weight"]].all()


@pytest.mark.parametrize("method", ["ct_f", "ct_d"])
def test_strict_child_tuning_freezes_masked_coordinates_that_weight_decay_and_momentum_move(method):
    """The official code's trap (decay and Adam momentum move masked coordinates), and the strict fix."""
    def train(strict):
        torch.manual_seed(0)
        lin = nn.Linear(6, 6)
        opt = torch.optim.AdamW(lin.parameters(), lr=0.1, weight_decay=0.1)
        gen = torch.Generator().manual_seed(1)
        fixed = {"weight": torch.rand(6, 6, generator=gen) > 0.5, "bias": torch.ones(6, dtype=torch.bool)}
        moved_while_masked = torch.zeros(6, 6, dtype=torch.bool)
        for _ in range(4):
            lin(torch.randn(8, 6, generator=gen)).pow(2).sum().backward()
            kept = ct_f_mask_(list(lin.parameters()), 0.5, gen) if method == "ct_f" else fixed_mask_(lin, fixed)
            before = lin.weight.detach().clone()
            saved = snapshot(kept) if strict else []
            opt.step()
            restore_masked_(saved)
            keep = dict((id(p), k) for p, k in kept)[id(lin.weight)]
            moved_while_masked |= (lin.weight.detach() != before) & ~keep
            opt.zero_grad()
        return moved_while_masked

    assert train(strict=False).any()      # faithful to the official code: masked coordinates still move
    assert not train(strict=True).any()   # strict: they do not


@pytest.mark.parametrize("name,expected", [("bert.encoder.layer.3.attention.self.query.weight", True),
                                           ("model.layers.10.mlp.up_proj.weight", True),
                                           ("transformer.h.0.attn.c_attn.weight", True),
                                           ("bert.embeddings.word_embeddings.weight", False),
                                           ("classifier.weight", False), ("bert.pooler.dense.weight", False)])
def test_encoder_layer_selection(name, expected):
    assert is_encoder_layer(name) is expected


def test_privatize_draws_the_same_noise_as_one_randn_per_parameter():
    """The CPU path draws in chunks into a reused buffer; the values must equal a plain randn per parameter."""
    from privtune.dp.noise import NOISE_CHUNK

    shapes = [(2,), (5,), (NOISE_CHUNK * 2 + 7,), (NOISE_CHUNK + 16,), (300, 77)]
    params = [nn.Parameter(torch.zeros(s)) for s in shapes]
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    privatize_(params, noise_multiplier=0.7, clip_norm=0.3, expected_batch_size=4,
               generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    for p in params:
        want = (0.5 + torch.randn(p.shape, generator=g) * (0.7 * 0.3)) / 4
        assert torch.equal(p.grad, want), p.shape


@pytest.mark.parametrize("mode", ["bk", "ghost"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_one_non_finite_example_leaves_the_clipped_sum_of_the_others(float64, mode, bad):
    """A NaN or infinite loss gives that example weight 0, and its contribution is selected away:
    the sum is exactly the clipped sum of the other examples (no NaN, sensitivity still C)."""
    from transformers import AutoModelForCausalLM

    from privtune.models.architectures import tiny_config
    from privtune.dp.engine import GhostClipEngine

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gpt2", vocab_size=50), dtype=torch.float64).eval()
    ids = torch.randint(0, 50, (4, 7))

    def losses_of(x, scale=None):
        logits = model(input_ids=x).logits[:, :-1]
        tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").mean(1)
        return tok if scale is None else tok * scale

    engine = GhostClipEngine(model, clip_norm=0.01, mode=mode)
    engine.zero_grad()
    with engine.capture(batch_size=3):
        losses = losses_of(ids[[0, 2, 3]])
    engine.backward(losses)
    want = [p.grad.clone() for p in engine.params]

    engine.zero_grad()
    scale = torch.ones(4, dtype=torch.float64)
    scale[1] = bad
    with engine.capture(batch_size=4):
        losses = losses_of(ids, scale)
    norms = engine.backward(losses)
    assert not torch.isfinite(norms[1]) and torch.isfinite(norms[[0, 2, 3]]).all()
    for p, w in zip(engine.params, want):
        assert torch.isfinite(p.grad).all(), engine.param_names[id(p)]
        torch.testing.assert_close(p.grad, w, rtol=1e-9, atol=1e-12)
    engine.detach()
