"""The ghost norm in float32 where per-token gradients cancel: the cancellation guard recomputes the
affected examples in float64, so a small norm is read correctly (not as a larger one, a negative square
or NaN, which would drop the example from the sum)."""
import pytest
import torch
from torch import nn

from privtune.dp import contributions
from privtune.dp.contributions import OuterSum, ghost_inner, squared_norms
from privtune.dp.engine import GhostClipEngine


def cancelling(B=4, T=64, d=128, p=128, noise=1e-4, seed=0):
    """Factors whose per-token gradients cancel in pairs, up to ``noise``; the float64 truth of the norms."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, T, d, dtype=torch.float64, generator=g)
    u[:, 1::2] = -u[:, 0::2] + noise * torch.randn(B, T // 2, d, dtype=torch.float64, generator=g)
    v = torch.randn(B, 1, p, dtype=torch.float64, generator=g).expand(B, T, p).contiguous()
    truth = torch.einsum("btr,btc->brc", u, v).flatten(1).norm(dim=1)
    return u, v, truth


def test_unguarded_float32_ghost_norms_are_wrong_here():
    """The case is hard: the plain float32 sum of terms is far off (negative squares)."""
    u, v, truth = cancelling()
    c = OuterSum(v=v.float(), rows=u.shape[-1], u=u.float())
    raw = ghost_inner(c, c)
    assert (raw < 0).any() or not torch.allclose(raw.clamp_min(0).sqrt().double(), truth, rtol=0.1)


def test_the_guard_recomputes_cancelling_examples_in_float64():
    u, v, truth = cancelling()
    c = OuterSum(v=v.float(), rows=u.shape[-1], u=u.float())
    sq, how = squared_norms([c], "ghost")
    assert how == "ghost" and sq.dtype == torch.float32
    torch.testing.assert_close(sq.sqrt().double(), truth, rtol=1e-3, atol=0)


def test_well_conditioned_examples_are_not_recomputed(monkeypatch):
    g = torch.Generator().manual_seed(1)
    c = OuterSum(v=torch.randn(3, 16, 32, generator=g), rows=24, u=torch.randn(3, 16, 24, generator=g))
    taken = []
    monkeypatch.setattr(OuterSum, "take", lambda self, idx, dtype: taken.append(idx) or self)
    sq, _ = squared_norms([c], "ghost")
    assert not taken
    torch.testing.assert_close(sq, c.instantiate().flatten(1).pow(2).sum(1), rtol=1e-4, atol=0)


def test_only_the_flagged_examples_are_recomputed(monkeypatch):
    u, v, truth = cancelling(B=2)
    g = torch.Generator().manual_seed(2)
    u = torch.cat([u, torch.randn(1, *u.shape[1:], dtype=torch.float64, generator=g)])  # a third, plain example
    v = torch.cat([v, torch.randn(1, *v.shape[1:], dtype=torch.float64, generator=g)])
    c = OuterSum(v=v.float(), rows=u.shape[-1], u=u.float())
    real, seen = OuterSum.take, []
    monkeypatch.setattr(OuterSum, "take", lambda self, idx, dtype: seen.append(idx.tolist()) or real(self, idx, dtype))
    squared_norms([c], "ghost")
    assert seen == [[0, 1]]


def test_tied_contributions_are_guarded_with_their_cross_terms():
    """Two contributions to one parameter (a tied embedding): cross terms are in the check and in the
    recomputation."""
    u, v, truth = cancelling(B=3, T=32)
    half = u.shape[1] // 2
    a = OuterSum(v=v[:, :half].float(), rows=u.shape[-1], u=u[:, :half].float())
    b = OuterSum(v=v[:, half:].float(), rows=u.shape[-1], u=u[:, half:].float())
    sq, _ = squared_norms([a, b], "ghost")
    torch.testing.assert_close(sq.sqrt().double(), truth, rtol=1e-3, atol=0)


@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_the_engine_reads_a_small_float32_norm_correctly(mode):
    """A linear layer whose per-token gradients cancel: the engine's float32 norms against float64 autograd."""
    torch.manual_seed(0)
    B, T, d = 3, 64, 96
    layer = nn.Linear(d, d, bias=False)
    x = torch.randn(B, T, d)
    x[:, 1::2] = -x[:, 0::2] + 1e-4 * torch.randn(B, T // 2, d)
    engine = GhostClipEngine(layer, clip_norm=1.0, mode=mode, norm_strategy="ghost")
    with engine.capture(batch_size=B):
        losses = layer(x).sum(dim=(1, 2))
    norms = engine.backward(losses)
    w64, x64 = layer.weight.detach().double().requires_grad_(), x.double()
    truth = torch.stack([torch.autograd.grad((x64[b] @ w64.T).sum(), w64)[0].norm() for b in range(B)])
    assert torch.isfinite(norms).all()
    torch.testing.assert_close(norms.double(), truth, rtol=1e-3, atol=0)


def test_the_threshold_is_what_the_guard_uses(monkeypatch):
    """With the guard off (threshold 0: only negative or NaN squares recomputed) the case above reads
    wrong norms in float32: the guard, not luck, makes it right."""
    u, v, truth = cancelling(noise=1e-3)  # norms positive but ~8 % off without the guard
    c = OuterSum(v=v.float(), rows=u.shape[-1], u=u.float())
    monkeypatch.setattr(contributions, "CANCELLATION", 0.0)
    off, _ = squared_norms([c], "ghost")
    monkeypatch.undo()
    on, _ = squared_norms([c], "ghost")
    err_off = ((off.clamp_min(0).sqrt().double() - truth).abs() / truth).max()
    err_on = ((on.sqrt().double() - truth).abs() / truth).max()
    assert err_on < 1e-3 < err_off


@pytest.fixture
def medium_matmul_precision():
    """The process asks for fast float32 products (oneDNN's bf16 mode on a CPU, TF32 on a GPU), as a user may."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    yield
    torch.set_float32_matmul_precision(before)


def _exact_square(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.einsum("btr,btc->brc", u.double(), v.double()).pow(2).sum((1, 2))


@pytest.mark.parametrize("strategy", ["ghost", "instantiate"])
def test_float32_norms_and_sums_ignore_a_reduced_global_matmul_precision(strategy, medium_matmul_precision):
    """With ``torch.set_float32_matmul_precision("medium")`` a CPU with bf16 arithmetic rounds the inputs of
    float32 products to bf16 (relative error near 1e-3, checked first: where the CPU does not, the test would
    be vacuous and is skipped); the engine's norms and clipped sums stay float32-exact, and the process'
    setting is left as it was."""
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(3, 32, 96, generator=g), torch.randn(3, 32, 384, generator=g)
    lossy = torch.bmm(v, v.transpose(1, 2)).double()
    if float(((lossy - torch.bmm(v.double(), v.double().transpose(1, 2))).abs().max() / lossy.abs().max())) < 1e-4:
        pytest.skip("this CPU's float32 products stay exact under 'medium': nothing for the engine to undo")
    c = OuterSum(u=u, v=v, rows=96)
    got, how = squared_norms([c], strategy)
    assert how == strategy
    torch.testing.assert_close(got.double(), _exact_square(u, v), rtol=1e-5, atol=0)
    w = torch.tensor([0.5, -1.0, 2.0])
    want_sum = torch.einsum("b,btr,btc->rc", w.double(), u.double(), v.double())
    torch.testing.assert_close(c.weighted_sum(w).double(), want_sum, rtol=1e-5, atol=1e-5)
    assert torch.get_float32_matmul_precision() == "medium"
    assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"


@pytest.mark.parametrize("length", [8, contributions.BF16_PRODUCT_MIN_ROWS, 48])
def test_bf16_factors_give_float32_exact_norms_on_either_product_path(length):
    """bf16 factors: their Grams are float32 products (rows below BF16_PRODUCT_MIN_ROWS) or bf16 products
    with float32 accumulation (from it on), both exact for bf16 inputs: the norm agrees with float64 from
    the same bf16 values to float32's rounding, far inside bf16's 2⁻⁸."""
    before = torch.backends.mkldnn.matmul.fp32_precision
    g = torch.Generator().manual_seed(1)
    u = torch.randn(4, length, 64, generator=g).bfloat16()
    v = torch.randn(4, length, 384, generator=g).bfloat16()
    got, _ = squared_norms([OuterSum(u=u, v=v, rows=64)], "ghost")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _exact_square(u, v), rtol=2e-6, atol=0)
    assert torch.backends.mkldnn.matmul.fp32_precision == before  # restored


def test_a_wide_bf16_factor_is_widened_in_slices_with_the_same_norms(monkeypatch):
    """A bf16 factor whose float32 copy exceeds WIDE_BYTES (a vocabulary-wide output gradient) has its Gram
    summed over slices of its width, the last one shorter: the norm still agrees with float64 from the same
    bf16 values to float32's rounding, on both product paths (short and long rows)."""
    calls = []
    monkeypatch.setattr(contributions, "WIDE_BYTES", 0)
    monkeypatch.setattr(contributions, "SLICE_BYTES", 0)  # slices of the least width, 256
    first, more = torch.bmm, torch.Tensor.baddbmm_  # a Gram's first slice, and each further one
    monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(1) or first(*a))
    monkeypatch.setattr(torch.Tensor, "baddbmm_", lambda self, *a: calls.append(1) or more(self, *a))
    g = torch.Generator().manual_seed(2)
    for length in (8, 32):
        u = torch.randn(3, length, 700, generator=g).bfloat16()  # 256 + 256 + 188 columns
        v = torch.randn(3, length, 96, generator=g).bfloat16()
        calls.clear()
        got, _ = squared_norms([OuterSum(u=u, v=v, rows=700)], "ghost")
        assert len(calls) == 3 + 1  # u's three slices; v's 96 columns are one slice
        torch.testing.assert_close(got.double(), _exact_square(u, v), rtol=2e-6, atol=0)


def test_product_precision_is_set_inside_and_restored_after_an_error():
    """exact_products: full float32 (ieee) for both backends; within it, bf16 factors with rows enough switch to
    bf16 / TF32 products, and a float16 factor, short rows or a float32 factor do not; every setting comes back
    as it was, after an error too."""
    settings = lambda: (torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision)  # noqa: E731
    before = settings()
    rows = contributions.BF16_PRODUCT_MIN_ROWS
    bf16 = torch.zeros(1, rows, 2, dtype=torch.bfloat16)
    cases = [((bf16,), ("bf16", "tf32")), ((bf16, bf16), ("bf16", "tf32")), ((bf16.half(),), ("ieee", "ieee")),
             ((bf16[:, :rows - 1],), ("ieee", "ieee")), ((bf16, bf16.float()), ("ieee", "ieee"))]
    for factors, inside in cases:
        with pytest.raises(RuntimeError, match="inside"):
            with contributions.exact_products():
                outer = settings()
                with contributions._bf16_products(*factors):
                    seen = settings()
                    raise RuntimeError("inside")
        assert outer == ("ieee", "ieee")
        assert seen == inside, factors
        assert settings() == before
