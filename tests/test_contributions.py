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
