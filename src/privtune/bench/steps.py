"""The methods the clipping benchmark compares, one step factory each in :data:`STEPS`: a closure that
runs one full training step (forward, backward, clip, noise, update) on one logical batch."""
from __future__ import annotations

import contextlib
import time
from functools import partial

from privtune.bench import workload

CLIP, SIGMA = 0.1, 1.0


def autocast(precision: str, dev):
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}; use fp32 or bf16")


class Phases:
    """Seconds per phase of the steps run while it is attached (``--interleave``'s profile)."""

    def __init__(self, dev):
        self.dev, self.s = dev, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        import torch

        if self.dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        try:
            yield
        finally:
            if self.dev.type == "cuda":
                torch.cuda.synchronize()
            self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t


def _nophase(_name):
    return contextlib.nullcontext()


def _nonprivate(model, batch: int, arch: str, precision: str, lr: float, ph):
    import torch

    dev = next(model.parameters()).device
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def step(parts):
        for b in parts:
            with ph("forward"), autocast(precision, dev):
                losses = workload.losses(arch, model, b)
            with ph("backward"):
                (losses.sum() / batch).backward()
        with ph("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def _ours(model, batch: int, arch: str, precision: str, lr: float, ph, mode: str):
    import torch

    from privtune.dp.engine import GhostClipEngine
    from privtune.dp.noise import privatize_

    dev = next(model.parameters()).device
    engine = GhostClipEngine(model, CLIP, mode=mode)
    opt = torch.optim.Adam(engine.params, lr=lr)
    gen = torch.Generator(device=dev).manual_seed(0)
    if ph is not _nophase:  # the engine's own phases, by wrapping its two inner steps
        for name, label in (("_contributions", "backward: output gradients"), ("_norms", "norms")):
            def timed(*a, _f=getattr(engine, name), _label=label, **k):
                with ph(_label):
                    return _f(*a, **k)
            setattr(engine, name, timed)

    def step(parts):
        for b in parts:
            with ph("forward"), engine.capture(batch_size=b["input_ids"].shape[0], lengths=workload.lengths(b)), \
                    autocast(precision, dev):
                losses = workload.losses(arch, model, b)
            with ph("backward (engine, all)"):
                engine.backward(losses)
        with ph("noise"):
            privatize_(engine.params, SIGMA, CLIP, batch, gen)
        with ph("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def _opacus_hooks(model, batch: int, arch: str, precision: str, lr: float, ph):
    import torch
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    dev = next(model.parameters()).device
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    opt = DPOptimizer(torch.optim.Adam(gsm.parameters(), lr=lr), noise_multiplier=SIGMA, max_grad_norm=CLIP,
                      expected_batch_size=batch, loss_reduction="sum")

    def step(parts):
        for b in parts:
            with autocast(precision, dev):
                losses = workload.losses(arch, gsm, b)
            losses.sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _opacus_ghost(model, batch: int, arch: str, precision: str, lr: float, ph):
    import torch
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    dev = next(model.parameters()).device
    gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                               max_grad_norm=CLIP, use_ghost_clipping=True)
    opt = DPOptimizerFastGradientClipping(torch.optim.Adam(gsm.parameters(), lr=lr), noise_multiplier=SIGMA,
                                          max_grad_norm=CLIP, expected_batch_size=batch, loss_reduction="mean")
    crit = DPLossFastGradientClipping(gsm, opt, torch.nn.CrossEntropyLoss(reduction="mean"), "mean")

    def step(parts):
        for b in parts:
            with autocast(precision, dev):
                logits, targets, shape = workload.logits_targets(arch, gsm, b)
            crit(logits, targets, shape=shape).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


# method -> step factory (model, logical batch, arch, precision, lr, phase timer) -> step(parts)
STEPS = {
    "nonprivate": _nonprivate,
    "ours_bk": partial(_ours, mode="bk"),  # single backward, book-keeping
    "ours_ghost": partial(_ours, mode="ghost"),  # two passes, Li et al.'s ghost clipping
    "opacus_hooks": _opacus_hooks,  # per-sample gradients
    "opacus_ghost": _opacus_ghost,  # Opacus 1.6 fast gradient clipping (refuses tied embeddings)
    "opacus_ghost_untied": _opacus_ghost,  # the same on the untied model (:func:`ready` unties it)
}
METHODS = tuple(STEPS)


def make_step(method: str, model, batch: int, arch: str = "gpt2", precision: str = "fp32", lr=1e-4,
              phases: Phases | None = None):
    """A closure running one full training step (forward, backward, clip, noise, update) on a list of
    physical batches (one for GPT-2 shapes) that make one logical batch of ``batch`` examples.

    Every method is given explicit (B, T) position ids: Opacus' per-sample hooks need a batch
    dimension on every layer input, and HF GPT-2 otherwise feeds (1, T) ids to its position
    embedding. Our engine handles either; the same inputs keep the comparison fair.
    ``phases`` (non-private and ours only) times forward, backward, noise and optimizer.
    """
    if method not in STEPS:
        raise ValueError(f"unknown method {method!r}; known: {METHODS}")
    return STEPS[method](model, batch, arch, precision, lr, phases or _nophase)


def ready(shape: dict, method: str, batch: int, seq: int, dev, precision: str = "fp32", phases=None):
    """(model, physical batches, step closure, batch info) after one warm-up step (Opacus' / our
    engine's first-call work)."""
    import torch

    model = workload.build_model(shape, untie=method == "opacus_ghost_untied", device=dev)
    model.train()
    torch.manual_seed(1)
    parts, n, info = workload.inputs(shape, batch, seq, dev)
    step = make_step(method, model, n, workload.arch(shape), precision, phases=phases)
    step(parts)
    if phases is not None:
        phases.s.clear()  # the warm-up is not profiled
    return model, parts, step, info

