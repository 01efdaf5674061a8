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


def _noisy(shapes, seed=3, threads=None, dtype=torch.float32, base=0.5, calls=1):
    """The gradients after ``calls`` privatize_ calls (σC = 0.21, B = 4) from a generator seeded ``seed``."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        params = [nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes]
        g = torch.Generator().manual_seed(seed)
        norms = []
        for _ in range(calls):
            for p in params:
                p.grad = torch.full_like(p, base)
            norms.append(privatize_(params, noise_multiplier=0.7, clip_norm=0.3, expected_batch_size=4, generator=g))
        return [p.grad for p in params], norms, g
    finally:
        torch.set_num_threads(before)


def test_noise_values_do_not_depend_on_the_number_of_threads():
    """The CPU noise is drawn in parallel, but each chunk from its own keyed stream: 1, 2 or 3 threads
    give bit-identical gradients and the same noise norm."""
    from privtune.dp.noise import NOISE_CHUNK

    shapes = [(2,), (5,), (NOISE_CHUNK * 2 + 7,), (NOISE_CHUNK + 16,), (300, 77), (NOISE_CHUNK * 3,)]
    one, n1, _ = _noisy(shapes, threads=1)
    for threads in (2, 3):
        other, n2, _ = _noisy(shapes, threads=threads)
        assert all(torch.equal(a, b) for a, b in zip(one, other)), threads
        assert n1 == n2
    again, _, _ = _noisy(shapes, threads=2)  # and a rerun from the same seed reproduces it
    assert all(torch.equal(a, b) for a, b in zip(one, again))


def test_cpu_noise_is_standard_normal_and_its_norm_is_reported():
    """~1M values over several chunks and parameters: mean, standard deviation and a KS test against
    N(0, σ²C²); the returned norm is that of the noise added, over the expected batch size."""
    from scipy import stats

    from privtune.dp.noise import NOISE_CHUNK

    shapes = [(NOISE_CHUNK * 3 + 1000,), (500, 300), (17,)]
    grads, norms, _ = _noisy(shapes, threads=2, base=0.0)
    z = torch.cat([g.reshape(-1) for g in grads]).double() * 4 / 0.21  # back to N(0, 1)
    n = z.numel()
    assert n > 900_000
    assert abs(float(z.mean())) < 5 / n ** 0.5
    assert abs(float(z.std()) - 1) < 5 / (2 * n) ** 0.5
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-4
    assert norms[0] == pytest.approx(float(z.norm()) * 0.21 / 4, rel=1e-5)


def test_chunks_parameters_and_steps_draw_independent_noise():
    """No two chunks, parameters or calls share (or correlate in) their noise; a generator state restored
    from a checkpoint draws what the uninterrupted run draws; the generator advances by the same amount
    whatever the model, so what is drawn after the noise (CT_F masks) agrees too."""
    from privtune.dp.noise import NOISE_CHUNK

    (a, b), _, g = _noisy([(2 * NOISE_CHUNK,), (2 * NOISE_CHUNK,)], base=0.0, calls=1)
    pieces = [a[:NOISE_CHUNK], a[NOISE_CHUNK:], b[:NOISE_CHUNK], b[NOISE_CHUNK:]]
    for i in range(4):
        for j in range(i + 1, 4):
            r = torch.corrcoef(torch.stack([pieces[i], pieces[j]]))[0, 1]
            assert abs(float(r)) < 0.01, (i, j)
    # successive calls (steps) differ; a restored generator redraws them
    p = nn.Parameter(torch.zeros(1000))
    gen = torch.Generator().manual_seed(11)
    saved = None
    draws = []
    for step in range(3):
        if step == 1:
            saved = gen.get_state()
        p.grad = torch.zeros_like(p)
        privatize_([p], 1.0, 1.0, 1.0, gen)
        draws.append(p.grad.clone())
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    resumed = torch.Generator()
    resumed.set_state(saved)
    p.grad = torch.zeros_like(p)
    privatize_([p], 1.0, 1.0, 1.0, resumed)
    assert torch.equal(p.grad, draws[1])
    # the generator's state after a call does not depend on the parameters' number or size
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    q = nn.Parameter(torch.zeros(3 * NOISE_CHUNK))
    q.grad = torch.zeros_like(q)
    privatize_([p, q], 1.0, 1.0, 1.0, g1)
    privatize_([p], 1.0, 1.0, 1.0, g2)
    assert torch.equal(torch.rand(8, generator=g1), torch.rand(8, generator=g2))


def test_noise_uses_the_whole_seed():
    """torch's CPU generator keeps only 32 bits of a seed; the noise streams do not: seeds that differ
    above bit 32 (secure_rng draws 63 bits) give different noise."""
    a, _, _ = _noisy([(64,)], seed=12345)
    b, _, _ = _noisy([(64,)], seed=12345 + 2**32)
    assert not torch.equal(a[0], b[0])


def test_a_runs_noise_is_keyed_by_its_root_and_step_alone():
    """In a run the noise of step t is a function of (secret root, t): reproducible, different at every
    step and for roots that differ only in their top bits (secure_rng draws 128), and unrelated to the CT_F
    mask generator, which depends on the run's seed only (masks are visible in released iterates)."""
    from privtune.dp import rng
    from privtune.dp.noise import NOISE_CHUNK

    def noise(root, step, shape=(NOISE_CHUNK + 100,)):
        p = nn.Parameter(torch.zeros(shape))
        p.grad = torch.zeros_like(p)
        norm = privatize_([p], 1.0, 1.0, 1.0, key=rng.noise_key(root, step))
        return p.grad, norm

    a, na = noise(7, 0)
    assert torch.equal(a, noise(7, 0)[0]) and na == pytest.approx(float(a.norm()), rel=1e-5)
    assert not torch.equal(a, noise(7, 1)[0])
    big = 2**127 + 7
    assert not torch.equal(noise(big, 0)[0], noise(big - 2**100, 0)[0])
    assert abs(float(torch.corrcoef(torch.stack([a, noise(8, 0)[0]]))[0, 1])) < 0.02
    with pytest.raises(ValueError, match="a generator or a key"):
        privatize_([nn.Parameter(torch.zeros(3))], 1.0, 1.0, 1.0, torch.Generator(), key=rng.noise_key(7, 0))
    m1, m2 = rng.mask_generator(3, "cpu"), rng.mask_generator(3, "cpu")
    assert torch.equal(torch.rand(16, generator=m1), torch.rand(16, generator=m2))
    assert not torch.equal(torch.rand(16, generator=rng.mask_generator(3, "cpu")),
                           torch.rand(16, generator=rng.mask_generator(4, "cpu")))
    assert rng.from_words(rng.words(big)) == big
    with pytest.raises(ValueError, match="below 2\\*\\*128"):
        rng.words(2**128)


def test_gpu_noise_streams_are_numbered_in_the_order_the_parameters_meet_them():
    """A CUDA generator's seed is the key's child for the n-th GPU a call meets, never for the GPU's
    index: each data-parallel rank holds its replica on cuda:rank and must add the same noise."""
    import inspect

    from privtune.dp import noise, rng

    key = rng.noise_key(7, 3)
    assert noise.cuda_seed(key, 0) == noise.cuda_seed(rng.noise_key(7, 3), 0)
    assert len({noise.cuda_seed(key, 0), noise.cuda_seed(key, 1), noise.cuda_seed(rng.noise_key(7, 4), 0)}) == 3
    assert 0 <= noise.cuda_seed(key, 1) < 2**64
    assert "device" not in inspect.signature(noise.cuda_seed).parameters


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_replicas_on_two_gpus_get_the_same_noise():
    from privtune.dp import rng

    grads = []
    for device in ("cuda:0", "cuda:1"):
        p = nn.Parameter(torch.zeros(10_000, device=device))
        p.grad = torch.zeros_like(p)
        privatize_([p], 1.0, 1.0, 1.0, key=rng.noise_key(7, 3))
        grads.append(p.grad.cpu())
    assert torch.equal(grads[0], grads[1]) and grads[0].std() > 0.5


def test_the_poisson_sampler_takes_a_128_bit_root():
    from privtune.dp import rng, sampling

    root = rng.secret_root(0, secure=True)
    first = [idx for _, idx in sampling.logical_batches(1000, 50, 3, root)]
    again = [idx for _, idx in sampling.logical_batches(1000, 50, 3, root)]
    other = [idx for _, idx in sampling.logical_batches(1000, 50, 3, root ^ (1 << 120))]
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not all(np.array_equal(x, y) for x, y in zip(first, other))


def test_other_gradient_dtypes_get_the_same_noise():
    """A float64 (and bf16) gradient gets the float32 draw of a float32 gradient, cast."""
    shapes = [(1000,), (33, 7)]
    f32, n32, _ = _noisy(shapes)
    f64, n64, _ = _noisy(shapes, dtype=torch.float64)
    bf16, _, _ = _noisy(shapes, dtype=torch.bfloat16)
    for a, b, c in zip(f32, f64, bf16):
        torch.testing.assert_close(b.float(), a, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(c.float(), a, rtol=2e-2, atol=2e-2)
    assert n64 == pytest.approx(n32, rel=1e-6)


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


def test_ct_f_masks_draw_from_a_stream_independent_of_the_noise(tiny_models, tmp_path):
    """The masks show in the released iterates; if they shared the noise's generator, what they reveal of it
    would reveal the noise. A CT_F run and a vanilla run with the same seed add the same noise, step by step."""
    import json

    from privtune.io import write_jsonl
    from privtune.training.loop import RunSettings, run

    write_jsonl(tmp_path / "train.jsonl", [{"text_a": f"s{i} good" if i % 2 else f"s{i} bad", "text_b": None,
                                            "label": i % 2} for i in range(32)])
    norms = {}
    for child in ("vanilla", "ct_f"):
        s = RunSettings(kind="classification", epsilon=8.0, delta=1e-3, batch_size=8, physical_batch_size=8,
                        steps=3, max_length=16, child=child, p_f=0.5, seed=3, diagnostics=True)
        run(s, tiny_models / "bert", tmp_path / "train.jsonl", tmp_path / child, progress=False)
        norms[child] = json.loads((tmp_path / child / "diagnostics_nonprivate.json").read_text())["noise_norm_mean"]
        assert json.loads((tmp_path / child / "privacy.json").read_text())["steps"] == 3
    assert norms["vanilla"] == norms["ct_f"]


def test_the_dropout_stream_is_its_own():
    """A data-parallel run's dropout seeds come from a keyed stream of the public seed: per rank and step,
    and not the sampler's SeedSequence([seed, step]) (rank 0's used to coincide with it)."""
    import numpy as np

    from privtune.dp import rng

    seeds = {(s, r): rng.dropout_seed(7, s, r) for s in range(3) for r in range(2)}
    assert len(set(seeds.values())) == len(seeds)
    sampler_words = {int(np.random.SeedSequence([7, s]).generate_state(1)[0]) for s in range(3)}
    assert not sampler_words & set(seeds.values())
