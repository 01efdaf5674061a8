"""Per-layer ghost-norm functions, one small function per layer type, in a registry.

Each function receives the module, the input it was called with (the first
positional argument) and the gradient of the loss with respect to its output,
and returns ``{parameter name: Contribution}`` for the parameters that require
gradients. Registration is by class (``register_layer``) or by behaviour
(``register_matcher``): RMSNorm comes in many classes (Llama, Mistral, Qwen,
T5...), so any module that *behaves* as ``weight ⊙ f(x)`` is accepted after a
probe confirms it (see :func:`probe_affine_norm`).

A trainable parameter in a module no entry accepts is a hard error
(:class:`UnsupportedLayerError`) raised when the engine is attached.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from privtune.dp.contributions import LOW_PRECISION, Contribution, Direct, OuterSum

Handler = Callable[[nn.Module, Tensor, Tensor], dict[str, Contribution]]

_BY_TYPE: dict[type, Handler] = {}
_MATCHERS: list[tuple[Callable[[nn.Module], bool], Handler]] = []


class UnsupportedLayerError(TypeError):
    """A trainable parameter lives in a module the engine cannot clip exactly."""


def register_layer(*types: type) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        for t in types:
            _BY_TYPE[t] = fn
        return fn

    return deco


def register_matcher(predicate: Callable[[nn.Module], bool]) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        _MATCHERS.append((predicate, fn))
        return fn

    return deco


def find_handler(module: nn.Module) -> Handler | None:
    for klass in type(module).__mro__:
        if klass in _BY_TYPE:
            return _BY_TYPE[klass]
    for predicate, fn in _MATCHERS:
        if predicate(module):
            return fn
    return None


def _seq(t: Tensor) -> Tensor:
    """(B, ..., d) -> (B, T, d) with T the product of the middle dimensions."""
    if t.dim() == 1:
        return t.view(1, 1, -1)
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _trainable(module: nn.Module, name: str) -> bool:
    p = getattr(module, name, None)
    return isinstance(p, nn.Parameter) and p.requires_grad


@register_layer(nn.Linear)
def linear(module: nn.Linear, x: Tensor, g: Tensor) -> dict[str, Contribution]:
    a, g = _seq(x), _seq(g)
    out: dict[str, Contribution] = {}
    if _trainable(module, "weight"):  # weight (out, in): rows = g, cols = a
        out["weight"] = OuterSum(u=g, v=a, rows=module.out_features, grad_side="u")
    if _trainable(module, "bias"):
        out["bias"] = Direct(g.sum(1))
    return out


def _conv1d_types() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers not installed: no GPT-2 Conv1D to support
        return ()
    return (Conv1D,)


def conv1d(module: nn.Module, x: Tensor, g: Tensor) -> dict[str, Contribution]:
    """GPT-2's Conv1D: ``y = x W + b`` with W of shape (in, out)."""
    a, g = _seq(x), _seq(g)
    out: dict[str, Contribution] = {}
    if _trainable(module, "weight"):
        out["weight"] = OuterSum(u=a, v=g, rows=module.weight.shape[0], grad_side="v")
    if _trainable(module, "bias"):
        out["bias"] = Direct(g.sum(1))
    return out


for _t in _conv1d_types():
    register_layer(_t)(conv1d)

# Layers that are one matrix product of their input, which autocast runs in its lower precision (torch.linear
# and torch.addmm are on its lists): the product, and so the weight gradient the non-private backward forms,
# uses the input rounded to the output's dtype. The engine keeps that rounded input (half the memory of a
# float32 LayerNorm output) and forms the per-example norms and the clipped sum from it in the same dtype.
AUTOCAST_MATMUL: set[Handler] = {linear, conv1d}


@register_layer(nn.Embedding)
def embedding(module: nn.Embedding, x: Tensor, g: Tensor) -> dict[str, Contribution]:
    if module.max_norm is not None or module.scale_grad_by_freq:
        raise UnsupportedLayerError(
            f"nn.Embedding with max_norm or scale_grad_by_freq is not supported by ghost clipping "
            f"(module {module!r}); construct the embedding without them."
        )
    if not _trainable(module, "weight"):
        return {}
    idx = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.view(1, -1)
    e = _seq(g)
    if module.padding_idx is not None:  # PyTorch gives the padding row no gradient
        e = e * (idx != module.padding_idx).unsqueeze(-1).to(e.dtype)
    return {"weight": OuterSum(u_idx=idx, v=e, rows=module.num_embeddings, grad_side="v")}


def _affine_norm_parts(module: nn.Module, x: Tensor) -> Tensor:
    """The normalised input ``f(x)`` of a norm layer ``weight ⊙ f(x) + bias``.

    Computed by calling the module itself with unit weight and zero bias, so the
    module's own recipe (dtype casts, epsilon placement) is reproduced exactly.
    """
    params = {}
    if getattr(module, "weight", None) is not None:
        params["weight"] = torch.ones_like(module.weight, dtype=x.dtype)
    if getattr(module, "bias", None) is not None:
        params["bias"] = torch.zeros_like(module.bias, dtype=x.dtype)
    with torch.no_grad():
        return torch.func.functional_call(module, params, (x,))


def affine_norm(module: nn.Module, x: Tensor, g: Tensor) -> dict[str, Contribution]:
    g = _seq(g)
    out: dict[str, Contribution] = {}
    if _trainable(module, "weight"):
        xhat = _seq(_affine_norm_parts(module, x))
        out["weight"] = Direct((g * xhat.to(g.dtype)).sum(1))
    if _trainable(module, "bias"):
        out["bias"] = Direct(g.sum(1))
    return out


register_layer(nn.LayerNorm)(affine_norm)
if hasattr(nn, "RMSNorm"):
    register_layer(nn.RMSNorm)(affine_norm)


def _looks_like_rmsnorm(module: nn.Module) -> bool:
    names = {n for n, _ in module.named_parameters(recurse=False)}
    w = getattr(module, "weight", None)
    return (
        "norm" in type(module).__name__.lower()
        and names <= {"weight", "bias"}
        and isinstance(w, nn.Parameter)
        and w.dim() == 1
        and not list(module.children())
    )


register_matcher(_looks_like_rmsnorm)(affine_norm)


# Norm layers whose statistics are not taken over the last dimension of each example alone: the batch's
# (BatchNorm in training), a channel dimension (GroupNorm, InstanceNorm). Their weight does not act on the
# last dimension, and BatchNorm lets one example change every other example's gradient.
COUPLED_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def probe_affine_norm(module: nn.Module, name: str) -> None:
    """Confirm by behaviour that ``module(x) == weight ⊙ module₁,₀(x) + bias`` over the last dimension.

    The probe uses random weight and bias (at weight 1 and bias 0, as at initialisation, any layer passes
    trivially). Gemma-style ``(1 + weight)`` scaling, normalisation over several trailing dimensions or over
    channels, or anything else, is refused by name rather than clipped with a wrong gradient.
    """
    kind = type(module).__name__
    refuse = (f"module '{name}' ({kind}) looks like a norm layer but {{}}, so its per-example gradient "
              "cannot be derived exactly. Freeze its parameters or register a handler with "
              "privtune.dp.layers.register_layer.")
    if isinstance(module, COUPLED_NORMS):
        raise UnsupportedLayerError(refuse.format("normalises over the batch or over channels, not over each "
                                                  "example's last dimension"))
    w = module.weight
    if w.dim() != 1:
        raise UnsupportedLayerError(refuse.format(f"its weight has shape {tuple(w.shape)}: normalisation over "
                                                  "several trailing dimensions is not supported"))
    gen = torch.Generator(device="cpu").manual_seed(0)
    # a bf16/fp16 layer is probed in float64: the form is what is checked, and bf16 rounding alone would
    # exceed the comparison's tolerance
    like = dict(device=w.device, dtype=torch.float64 if w.dtype in LOW_PRECISION else w.dtype)
    params = {"weight": torch.randn(w.shape, generator=gen).to(**like)}
    if getattr(module, "bias", None) is not None:
        params["bias"] = torch.randn(module.bias.shape, generator=gen).to(**like)
    x = torch.randn(2, 3, w.shape[0], generator=gen).to(**like)
    try:
        with torch.no_grad():
            got = torch.func.functional_call(module, params, (x,))
            want = params["weight"] * _affine_norm_parts(module, x) + params.get("bias", 0)
    except (RuntimeError, ValueError, TypeError) as err:
        raise UnsupportedLayerError(refuse.format(f"fails on an input of shape (2, 3, {w.shape[0]}) ({err})")) \
            from err
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise UnsupportedLayerError(refuse.format("does not compute weight * normalise(x) + bias"))


def needs_probe(module: nn.Module) -> bool:
    return find_handler(module) is affine_norm
