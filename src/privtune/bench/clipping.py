"""Speed and memory of DP clipping against non-private training and Opacus, in one run.

Each (shape, method) is measured in a fresh subprocess, so that a method that
runs out of memory or refuses the model is *recorded* (status and message)
instead of ending the benchmark. Models have random weights (weights change
neither FLOPs nor bytes) and are built offline:

* GPT-2 shapes (``n_embd``, ``n_layer``, ``n_head``): a causal LM on a batch of
  ``--batch`` × ``--seq`` random tokens, the mean token loss per example;
* ``minilm-sst2``: a BERT with all-MiniLM-L6-v2's configuration (6 layers, hidden
  384, 12 heads, intermediate 1536, vocabulary 30,522) on one logical SST-2 batch
  of 512 sentences (``privtune.bench.batches``' default; the claims preset trains with
  1,024, where noise and the optimizer weigh half as much per example), split into
  length-sorted physical batches under a 4,096-token budget
  (:func:`privtune.dp.sampling.physical_batches`, the pipeline's ``physical_tokens``),
  with the pipeline's objective for sentence encoders (cosine similarity to a
  description of each label, :mod:`privtune.objectives.similarity`). The sentence
  lengths are SST-2's (:func:`sst2_lengths`).

    python -m privtune.bench.clipping --device cpu --interleave 5 --out results/benchmarks/clipping_cpu.json

Methods: ``nonprivate``; ``ours_bk`` (single backward, book-keeping) and
``ours_ghost`` (two passes, Li et al.'s ghost clipping); ``opacus_hooks``
(per-sample gradients) and ``opacus_ghost`` (Opacus 1.6 fast gradient clipping).
Opacus' ghost mode refuses tied embeddings, so it runs on the untied variant of
the model as well (``opacus_ghost_untied``); its refusal on the tied one is kept
as a result. ``--precision fp32 bf16`` measures each in both (bf16: autocast, the
pipeline's ``train.precision: bf16``).

Separate processes run one after another, so a shared machine's drift lands in
the time ratios. ``--interleave N`` also times non-private and our two modes
alternated in one process, N rounds, and records the median over rounds of each
one's time over the non-private time of the same round (``time_ratio_interleaved``),
and for book-keeping where the extra time goes (``profile``: seconds per phase of
both, alternated too). Opacus is left out of it: its ratios are far from the
targets, and its models would share the process's memory.

On a GPU (``--fit``, the default there) each method's largest batch (powers of two)
is searched too. ``--group`` runs all methods of a (shape, precision) in one process
(the GPU default: one CUDA start instead of one per method; peak memory is still
per method there, but not on the CPU, where it is then left out), and
``--budget-s`` bounds the whole run: what is not reached in time is recorded as
``skipped (time budget)``. ``scripts/gpu-check.sh`` runs it so on one GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from privtune.io import read_jsonl, write_json

METHODS = ("nonprivate", "ours_bk", "ours_ghost", "opacus_hooks", "opacus_ghost", "opacus_ghost_untied")
PRECISIONS = ("fp32", "bf16")
# all-MiniLM-L6-v2's configuration (its config.json), random weights; the batch: one logical SST-2 batch
MINILM_SST2 = dict(arch="bert", hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                   vocab_size=30522, data="sst2", logical_batch=512, physical_batch=256, physical_tokens=4096,
                   max_length=64)
CPU_SHAPES = {"gpt2-2layer": dict(n_embd=768, n_layer=2, n_head=12), "gpt2": dict(n_embd=768, n_layer=12, n_head=12),
              "minilm-sst2": MINILM_SST2}
GPU_SHAPES = {"gpt2": dict(n_embd=768, n_layer=12, n_head=12), "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
              "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20)}
CLIP, SIGMA = 0.1, 1.0
INTERLEAVED = ("nonprivate", "ours_bk", "ours_ghost")  # timed alternated in one process by --interleave
TIME_TARGET, MEMORY_TARGET = 1.10, 1.05  # book-keeping against non-private (issue 18)

# Wordpiece lengths ([CLS] and [SEP] included, truncated at 64) of SST-2's 67,349 training sentences under
# all-MiniLM-L6-v2's tokenizer, counted once; entry i is the number of sentences of 3 + i tokens (mean 13.3,
# median 10, 99th percentile 44). The distribution :func:`sst2_lengths` falls back to without the data.
SST2_LENGTH_COUNTS = (1978, 5322, 6065, 5345, 4749, 4155, 3713, 3267, 2947, 2650, 2413, 2138, 1950, 1777, 1661,
                      1515, 1373, 1285, 1132, 1106, 1046, 909, 820, 806, 733, 692, 628, 538, 491, 442, 448, 400,
                      337, 304, 286, 242, 195, 203, 192, 155, 148, 130, 89, 82, 85, 73, 55, 42, 50, 40, 36, 19,
                      21, 22, 15, 8, 6, 3, 2, 5, 5, 5)
LABEL_LENGTH = 6  # "[CLS] it was terrible . [SEP]", "[CLS] it was great . [SEP]"
ROOT = Path(__file__).resolve().parents[3]


# -- the SST-2 batch ------------------------------------------------------------------------------
def approx_wordpieces(text: str, max_length: int = 64) -> int:
    """BERT-uncased wordpieces of a (lower-cased, space-tokenised) SST-2 sentence, approximately: one
    per word of up to 7 characters, one more per further 7. Against all-MiniLM's tokenizer on SST-2's
    training set: mean 13.1 vs 13.3 tokens, mean absolute error 1.3."""
    return min(max_length, 2 + sum(1 + (len(w) - 1) // 7 for w in text.split()))


def _sst2_texts() -> tuple[list[str], str] | None:
    jsonl = ROOT / "results/data/sst2/train.jsonl"
    if jsonl.exists():
        return [r["text_a"] for r in read_jsonl(jsonl)], str(jsonl.relative_to(ROOT))
    dirs = [os.environ.get("PRIVTUNE_DATA_DIR"), ROOT / "resources/data", ROOT.parent / "shared/data"]
    for d in dirs:
        tsv = Path(d) / "glue/SST-2/train.tsv" if d else None
        if tsv is not None and tsv.exists():
            from privtune.data.readers import read_split

            return [r["text_a"] for r in read_split("sst2", "train", d, verify_size=False)], str(tsv)
    return None


def sst2_lengths(max_length: int = 64) -> tuple[list[int], str]:
    """Token lengths of SST-2 training sentences, and where they came from: the prepared training file
    (``results/data/sst2/train.jsonl``) or the raw ``glue/SST-2/train.tsv``, tokenized with
    all-MiniLM's tokenizer when ``results/models/minilm`` is there and with :func:`approx_wordpieces`
    otherwise; without either file, the fixed distribution :data:`SST2_LENGTH_COUNTS`."""
    found = _sst2_texts()
    if found is None:
        lengths = [3 + i for i, n in enumerate(SST2_LENGTH_COUNTS) for _ in range(n)]
        return [min(max_length, n) for n in lengths], "fixed distribution (SST2_LENGTH_COUNTS)"
    texts, where = found
    model_dir = ROOT / "results/models/minilm"
    if (model_dir / "tokenizer_config.json").exists() or (model_dir / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        ids = tok(texts, truncation=True, max_length=max_length)["input_ids"]
        return [len(x) for x in ids], f"{where}, all-MiniLM's tokenizer"
    return [approx_wordpieces(t, max_length) for t in texts], f"{where}, approximate wordpieces"


def _sst2_batches(spec: dict, dev, batch: int | None = None) -> tuple[list[dict], dict]:
    """One logical SST-2 batch as length-sorted physical batches (random token ids, the real lengths)."""
    import numpy as np
    import torch

    from privtune.dp.sampling import physical_batches

    lengths, source = sst2_lengths(spec.get("max_length", 64))
    rng = np.random.default_rng(0)
    n = batch or spec["logical_batch"]
    pick = rng.choice(len(lengths), size=n, replace=n > len(lengths))
    lens = [int(lengths[i]) for i in pick]
    parts = physical_batches(range(n), lens, spec["physical_batch"], spec["physical_tokens"])
    gen = torch.Generator().manual_seed(0)
    vocab = spec["vocab_size"]
    label_ids = torch.randint(1000, vocab, (2, LABEL_LENGTH), generator=gen)
    label_ids[:, 0], label_ids[:, -1] = 101, 102
    out = []
    for part in parts:
        longest = max(lens[i] for i in part)
        ids = torch.zeros(len(part), longest, dtype=torch.long)
        mask = torch.zeros(len(part), longest, dtype=torch.long)
        for row, i in enumerate(part):
            k = lens[i]
            ids[row, :k] = torch.randint(1000, vocab, (k,), generator=gen)
            ids[row, 0], ids[row, k - 1] = 101, 102  # [CLS], [SEP]; 0 is [PAD]
            mask[row, :k] = 1
        out.append({"input_ids": ids.to(dev), "attention_mask": mask.to(dev),
                    "labels": torch.randint(0, 2, (len(part),), generator=gen).to(dev),
                    "label_input_ids": label_ids.to(dev), "label_attention_mask": torch.ones_like(label_ids).to(dev)})
    info = {"lengths_source": source, "mean_length": float(np.mean(lens)), "max_length": max(lens),
            "physical_batches": len(parts), "padded_tokens": sum(len(p) * max(lens[i] for i in p) for p in parts),
            "tokens": sum(lens)}
    return out, info


# -- models, losses, steps ------------------------------------------------------------------------
def _arch(spec: dict) -> str:
    return spec.get("arch", "gpt2")


def _model(shape: dict, untie: bool, device):
    import torch

    torch.manual_seed(0)
    if _arch(shape) == "bert":
        from transformers import BertConfig, BertModel

        cfg = BertConfig(**{k: shape[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                   "intermediate_size", "vocab_size")})
        with torch.device(device):  # initialised where it runs (a GPU builds the large shapes in seconds)
            return BertModel(cfg, add_pooling_layer=False)  # the pooler: unused by mean pooling
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(**{k: shape[k] for k in ("n_embd", "n_layer", "n_head")}, tie_word_embeddings=not untie)
    with torch.device(device):
        return GPT2LMHeadModel(cfg)


def _rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _pos(ids):
    import torch

    return torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous()  # Opacus .view()s it


def _token_losses(logits, ids):
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


def _embed(model, ids, mask):
    """:func:`privtune.objectives.similarity.embed` with explicit (B, T) position and token-type ids
    (Opacus' per-sample hooks need a batch dimension on every layer input)."""
    import torch

    from privtune.objectives.similarity import embed

    return embed(model, ids, mask, position_ids=_pos(ids), token_type_ids=torch.zeros_like(ids))


def _logits_targets(arch: str, model, b: dict):
    """(logits, targets, shape) of a physical batch: what a criterion of the whole batch takes."""
    import torch

    if arch == "bert":  # the similarity objective: label embeddings are constants of the step
        from privtune.objectives.templates import TEMPERATURE

        with torch.no_grad():
            model.eval()
            labels = _embed(model, b["label_input_ids"], b["label_attention_mask"])
            model.train()
        x = _embed(model, b["input_ids"], b["attention_mask"])
        return x @ labels.to(x.dtype).T / TEMPERATURE, b["labels"], None
    ids = b["input_ids"]
    logits = model(input_ids=ids, position_ids=_pos(ids)).logits[:, :-1]
    return logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), logits.shape


def _losses(arch: str, model, b: dict):
    """Per-example losses (B,) of a physical batch."""
    import torch.nn.functional as F

    if arch == "bert":
        logits, targets, _ = _logits_targets(arch, model, b)
        return F.cross_entropy(logits, targets, reduction="none")
    ids = b["input_ids"]
    return _token_losses(model(input_ids=ids, position_ids=_pos(ids)).logits, ids)


def _autocast(precision: str, dev):
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}; use fp32 or bf16")


class _Phases:
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


def _make_step(method: str, model, batch: int, arch: str = "gpt2", precision: str = "fp32", lr=1e-4,
               phases: _Phases | None = None):
    """A closure running one full training step (forward, backward, clip, noise, update) on a list of
    physical batches (one for GPT-2 shapes) that make one logical batch of ``batch`` examples.

    Every method is given explicit (B, T) position ids: Opacus' per-sample hooks need a batch
    dimension on every layer input, and HF GPT-2 otherwise feeds (1, T) ids to its position
    embedding. Our engine handles either; the same inputs keep the comparison fair.
    ``phases`` (non-private and ours only) times forward, backward, noise and optimizer.
    """
    import torch

    from privtune.dp.engine import GhostClipEngine
    from privtune.dp.noise import privatize_

    dev = next(model.parameters()).device
    ph = phases or _nophase
    if method == "nonprivate":
        opt = torch.optim.Adam(model.parameters(), lr=lr)

        def step(parts):
            for b in parts:
                with ph("forward"), _autocast(precision, dev):
                    losses = _losses(arch, model, b)
                with ph("backward"):
                    (losses.sum() / batch).backward()
            with ph("optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)
        return step
    if method in ("ours_bk", "ours_ghost"):
        engine = GhostClipEngine(model, CLIP, mode="bk" if method == "ours_bk" else "ghost")
        opt = torch.optim.Adam(engine.params, lr=lr)
        gen = torch.Generator(device=dev).manual_seed(0)
        if phases is not None:  # the engine's own phases, by wrapping its two inner steps
            for name, label in (("_contributions", "backward: output gradients"), ("_norms", "norms")):
                def timed(*a, _f=getattr(engine, name), _label=label, **k):
                    with phases(_label):
                        return _f(*a, **k)
                setattr(engine, name, timed)

        def step(parts):
            for b in parts:
                with ph("forward"), engine.capture(batch_size=b["input_ids"].shape[0]), _autocast(precision, dev):
                    losses = _losses(arch, model, b)
                with ph("backward (engine, all)"):
                    engine.backward(losses)
            with ph("noise"):
                privatize_(engine.params, SIGMA, CLIP, batch, gen)
            with ph("optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)
        return step
    if method == "opacus_hooks":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        opt = DPOptimizer(torch.optim.Adam(gsm.parameters(), lr=lr), noise_multiplier=SIGMA, max_grad_norm=CLIP,
                          expected_batch_size=batch, loss_reduction="sum")

        def step(parts):
            for b in parts:
                with _autocast(precision, dev):
                    losses = _losses(arch, gsm, b)
                losses.sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    if method.startswith("opacus_ghost"):
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                                   max_grad_norm=CLIP, use_ghost_clipping=True)
        opt = DPOptimizerFastGradientClipping(torch.optim.Adam(gsm.parameters(), lr=lr), noise_multiplier=SIGMA,
                                              max_grad_norm=CLIP, expected_batch_size=batch, loss_reduction="mean")
        crit = DPLossFastGradientClipping(gsm, opt, torch.nn.CrossEntropyLoss(reduction="mean"), "mean")

        def step(parts):
            for b in parts:
                with _autocast(precision, dev):
                    logits, targets, shape = _logits_targets(arch, gsm, b)
                crit(logits, targets, shape=shape).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    raise ValueError(f"unknown method {method!r}")


def _inputs(shape: dict, batch: int, seq: int, dev) -> tuple[list[dict], int, dict]:
    """(physical batches, logical batch size, description of the batch)."""
    import torch

    if _arch(shape) == "bert":
        parts, info = _sst2_batches(shape, dev)
        return parts, sum(p["input_ids"].shape[0] for p in parts), info
    ids = torch.randint(0, 50257, (batch, seq), device=dev)  # GPT-2's vocabulary
    return [{"input_ids": ids}], batch, {}


def _ready(shape: dict, method: str, batch: int, seq: int, dev, precision: str = "fp32", phases=None):
    """(model, physical batches, step closure, batch info) after one warm-up step (Opacus' / our
    engine's first-call work)."""
    import torch

    model = _model(shape, untie=method == "opacus_ghost_untied", device=dev)
    model.train()
    torch.manual_seed(1)
    parts, n, info = _inputs(shape, batch, seq, dev)
    step = _make_step(method, model, n, _arch(shape), precision, phases=phases)
    step(parts)
    if phases is not None:
        phases.s.clear()  # the warm-up is not profiled
    return model, parts, step, info


def _timed(step, parts, dev) -> float:
    import torch

    t = time.perf_counter()
    step(parts)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _threads() -> int:
    return int(os.environ.get("PRIVTUNE_BENCH_THREADS", os.cpu_count() or 1))


def _set_threads() -> None:
    import torch

    torch.set_num_threads(_threads())


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:400]


def _is_oom(e: BaseException) -> bool:
    return "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"


def _reset_cpu_peak() -> bool:
    """Reset this process's peak RSS (VmHWM), where the kernel allows it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_one(shape: dict, method: str, batch: int, seq: int, steps: int, device: str,
                precision: str = "fp32", fit: dict | None = None, shared_process: bool = False) -> dict:
    """Run in the current process; returns time per step and peak memory (and, with ``fit``
    = {"limit", "deadline"}, the largest batch that runs: GPT-2 shapes only).

    ``shared_process``: other methods ran in this process before. A GPU's peak is still this
    method's; a CPU's resident-set peak is not (freed memory stays with the process), so it is
    left out there."""
    import torch

    _set_threads()
    dev = torch.device(device)
    base_rss = _rss_mb()
    model, parts, step, info = _ready(shape, method, batch, seq, dev, precision)
    n_params = sum(p.numel() for p in model.parameters())
    first = None
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()  # the model and the optimizer's state
    times = sorted(_timed(step, parts, dev) for _ in range(steps))
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        # where the largest-batch search starts: the batch that would fill 85% of the GPU if a step's
        # memory grew in proportion to the batch (an underestimate: part of it, the gradients, does not)
        per_example = max(1.0, (peak * 2**20 - held) / batch)
        room = 0.85 * torch.cuda.get_device_properties(dev).total_memory - held
        first = int(room / per_example) if room > 0 else None
    elif shared_process:
        peak = None
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
    out = {"status": "ok", "time_s": times[len(times) // 2], "peak_mb": peak, "parameters": n_params,
           "threads": torch.get_num_threads(), **info}
    if fit is not None and _arch(shape) != "bert":
        del parts
        out.update(_largest_batch(step, model, batch, seq, dev, fit["limit"], fit.get("deadline"), first))
    return out


def _largest_batch(step, model, start: int, seq: int, dev, limit: int, deadline: float | None,
                   first: int | None = None) -> dict:
    """The largest power-of-two multiple of ``start`` up to ``limit`` (``start`` ran) for which one step
    runs, in this process, doubling from ``first`` (rounded down to such a multiple; default
    ``2 · start``): the first failure (a GPU's out-of-memory error) ends the search, since a model
    that failed mid-step is not reused. A first try that fails leaves the answer at ``start``."""
    import torch

    b = start * 2
    while first is not None and b * 2 <= min(first, limit):
        b *= 2
    best, why, tried = start, "limit", []
    while b <= limit:
        if deadline is not None and time.time() > deadline:
            why = "time budget"
            break
        ids = torch.randint(0, 50257, (b, seq), device=dev)
        failed = None
        try:
            step([{"input_ids": ids}])
            if dev.type == "cuda":
                torch.cuda.synchronize()
        except Exception as e:  # out of memory: the answer (anything else: recorded)
            failed = "out of memory" if _is_oom(e) else _error(e)
        del ids
        tried.append([b, failed or "ok"])
        if failed:
            why = failed if best >= b // 2 else f"{failed} at the first try ({b}); below it not searched"
            for p in model.parameters():
                p.grad = None
                if hasattr(p, "grad_sample"):
                    p.grad_sample = None
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            break
        best, b = b, b * 2
    return {"largest_batch": best, "largest_batch_stopped_by": why, "largest_batch_tried": tried}


def measure_group(shape: dict, methods: list[str], batch: int, seq: int, steps: int, device: str,
                  precision: str, fit: dict | None, deadline: float | None):
    """Every method of ``methods`` in this process, one after another; yields one record each."""
    import torch

    for i, method in enumerate(methods):
        if deadline is not None and time.time() > deadline:
            yield {"method": method, "status": "skipped (time budget)", "error": "no time left in the budget"}
            continue
        mine = fit
        if fit is not None and fit.get("deadline"):  # the group's time for searching, shared out fairly
            mine = {**fit, "deadline": time.time() + max(0.0, fit["deadline"] - time.time()) / (len(methods) - i)}
        try:
            rec = {"method": method, **measure_one(shape, method, batch, seq, steps, device, precision, mine,
                                                   shared_process=True)}
        except Exception as e:
            rec = {"method": method, "status": "out of memory" if _is_oom(e) else "error", "error": _error(e)}
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        yield rec


def measure_interleaved(shape: dict, methods: list[str], batch: int, seq: int, rounds: int, device: str,
                        precision: str = "fp32", profile: bool = False) -> dict:
    """Time ratios to non-private with every method's step alternated in this process.

    Each method gets its own model (same seed) and one warm-up step; then ``rounds`` rounds
    run every method once. Returns {method: {"time_ratio_interleaved", "round_ratios"}} or
    {method: {"interleaved_error": ...}} for a method that cannot be built or run. With
    ``profile``, non-private and book-keeping also get ``profile``: seconds per step of each phase
    (forward, backward, norms, noise, optimizer), medians over the rounds.
    """
    import statistics

    import torch

    _set_threads()
    dev = torch.device(device)
    ready, out, phases = {}, {}, {}
    for method in ["nonprivate", *[m for m in methods if m != "nonprivate"]]:
        ph = _Phases(dev) if profile and method in ("nonprivate", "ours_bk") else None
        try:
            ready[method] = _ready(shape, method, batch, seq, dev, precision, phases=ph)
            if ph is not None:
                phases[method] = (ph, [])
        except Exception as e:  # a refusal (Opacus ghost on a tied model) is a result
            out[method] = {"interleaved_error": _error(e)}
    if "nonprivate" not in ready:
        return out
    times = {m: [] for m in ready}
    try:
        for _ in range(rounds):
            for method, (_, parts, step, _) in ready.items():
                if method in phases:
                    phases[method][0].s.clear()
                times[method].append(_timed(step, parts, dev))
                if method in phases:
                    phases[method][1].append(dict(phases[method][0].s))
    except Exception as e:  # all the models at once may not fit (a GPU): a result, not a crash
        return {**out, **{m: {"interleaved_error": _error(e)} for m in ready}}
    finally:
        ready.clear()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    for method, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times["nonprivate"])]
        out[method] = {"time_ratio_interleaved": statistics.median(ratios), "round_ratios": ratios,
                       "time_s_interleaved": statistics.median(ts)}
        if method in phases:
            per_round = phases[method][1]
            names = sorted({k for r in per_round for k in r})
            out[method]["profile"] = {k: statistics.median(r.get(k, 0.0) for r in per_round) for k in names}
    return out


def overhead_profile(np_profile: dict, bk_profile: dict, np_time: float, bk_time: float) -> dict:
    """Where book-keeping's extra time per step goes: seconds, and fractions of non-private's step.

    ``backward`` is the engine's backward less the norms (the output-gradient pass, which is
    non-private's backward without its weight gradients, then the clipped sum, which forms them
    with each example scaled) less non-private's whole backward."""
    bw = bk_profile.get("backward (engine, all)", 0.0)
    norms = bk_profile.get("norms", 0.0)
    grads = bk_profile.get("backward: output gradients", 0.0)
    seconds = {"forward": bk_profile.get("forward", 0.0) - np_profile.get("forward", 0.0),
               "backward": bw - norms - np_profile.get("backward", 0.0),
               "norms": norms,
               "noise": bk_profile.get("noise", 0.0),
               "optimizer": bk_profile.get("optimizer", 0.0) - np_profile.get("optimizer", 0.0)}
    seconds["unaccounted"] = (bk_time - np_time) - sum(seconds.values())
    return {"extra_s": bk_time - np_time, "seconds": seconds,
            "fraction_of_nonprivate_step": {k: v / np_time for k, v in seconds.items()},
            "engine_backward_split_s": {"output_gradient_pass": grads, "norms": norms,
                                        "clipped_sum": bw - grads - norms},
            "phases_s": {"nonprivate": np_profile, "ours_bk": bk_profile}}


def norm_strategies(shape: dict, batch: int, seq: int, device: str, precision: str = "fp32",
                    max_elements: float = 6e7) -> dict:
    """The per-example norms of one step's contributions timed both ways, ghost (Gram products) and
    instantiation (per-example gradients), per parameter: what the engine's FLOP-based ``auto``
    choice costs against the measured-faster one. Instantiation is skipped where the per-example
    gradients would exceed ``max_elements`` values (an embedding: B × vocabulary × width)."""
    import torch

    from privtune.dp.contributions import squared_norms
    from privtune.dp.engine import GhostClipEngine

    _set_threads()
    dev = torch.device(device)
    model = _model(shape, untie=False, device=dev).train()
    torch.manual_seed(1)
    parts, _, _ = _inputs(shape, batch, seq, dev)
    engine = GhostClipEngine(model, CLIP)
    per_param: dict[str, dict] = {}

    def timed(cs, how):
        t = time.perf_counter()
        squared_norms(cs, how)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    held = {"layer_inputs_mb": 0.0, "output_gradients_and_other_mb": 0.0}

    def storages(ts):
        return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts if t is not None}

    for b in parts:
        with engine.capture(batch_size=b["input_ids"].shape[0]), _autocast(precision, dev):
            losses = _losses(_arch(shape), model, b)
        inputs = storages(r.input for r in engine._records)
        contribs = engine._contributions(losses, retain_graph=False)
        # what book-keeping holds from the output-gradient pass until the clipped sum: the layer inputs
        # (non-private's backward frees them as it goes) and the output gradients (non-private frees each
        # once its layer's backward is done)
        kept = storages(t for cs in contribs.values() for c in cs
                        for t in (getattr(c, "u", None), getattr(c, "v", None), getattr(c, "grad", None)))
        mb = {"layer_inputs_mb": sum(n for k, n in kept.items() if k in inputs) / 2**20,
              "output_gradients_and_other_mb": sum(n for k, n in kept.items() if k not in inputs) / 2**20}
        held = {k: max(held[k], v) for k, v in mb.items()}
        for p in engine.params:
            cs = contribs.get(id(p))
            if not cs or not all(hasattr(c, "ghost_cost") for c in cs):
                continue  # Direct contributions (biases, norm scales): one way only
            name = engine.param_names[id(p)]
            rec = per_param.setdefault(name, {"ghost_s": 0.0, "instantiate_s": 0.0, "auto": None})
            rec["auto"] = squared_norms(cs, "auto")[1]
            rec["ghost_s"] += timed(cs, "ghost")
            big = sum(c.batch * c.rows * c.cols for c in cs) > max_elements
            rec["instantiate_s"] = None if big or rec["instantiate_s"] is None else rec["instantiate_s"] + timed(cs, "instantiate")
        del contribs, losses
    engine.detach()
    auto = sum(r["ghost_s"] if r["auto"] == "ghost" or r["instantiate_s"] is None else r["instantiate_s"]
               for r in per_param.values())
    best = sum(min(r["ghost_s"], r["instantiate_s"]) if r["instantiate_s"] is not None else r["ghost_s"]
               for r in per_param.values())
    faster = sorted(n for n, r in per_param.items() if r["instantiate_s"] is not None
                    and (r["instantiate_s"] < r["ghost_s"]) != (r["auto"] == "instantiate"))
    return {"auto_s": auto, "measured_best_s": best, "ghost_only_s": sum(r["ghost_s"] for r in per_param.values()),
            "auto_picks_the_slower_for": faster, "held_until_the_clipped_sum": held, "per_parameter": per_param}


# -- running it -----------------------------------------------------------------------------------
def _spec_of(shape: str, spec: dict | None) -> dict:
    return spec or {**CPU_SHAPES, **GPU_SHAPES}[shape]


def _subprocess(cmd: list[str], timeout: float):
    """(returncode or None on timeout, stdout lines, last stderr line)."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, out.strip().splitlines(), ""
    err = (p.stderr.strip().splitlines() or ["(no message)"])[-1]
    if "out of memory" in p.stderr.lower():
        err = "out of memory: " + err
    return p.returncode, p.stdout.strip().splitlines(), err


def _failed(rc, err: str, timeout: float) -> dict:
    if rc is None:
        return {"status": "timeout", "error": f"no result within {timeout:.0f} s"}
    status = "killed (out of memory)" if rc in (-9, 137) else "out of memory" if err.startswith("out of memory") else "error"
    return {"status": status, "error": err[:400]}


def _base(shape: str, spec: dict, batch: int, seq: int, device: str, precision: str) -> dict:
    """A record's identity; a BERT shape's batch is its logical SST-2 batch (lengths vary: no ``seq``)."""
    if _arch(spec) == "bert":
        batch, seq = spec["logical_batch"], None
    return {"shape": shape, "batch": batch, "seq": seq, "device": device, "precision": precision}


def run_isolated(shape: str, method: str, batch: int, seq: int, steps: int, device: str, timeout: int,
                 spec: dict | None = None, precision: str = "fp32", fit: dict | None = None) -> dict:
    """Measure one (shape, method) in a fresh process; ``spec`` is the shape (default: the named one
    of ``CPU_SHAPES`` / ``GPU_SHAPES``)."""
    spec = _spec_of(shape, spec)
    cmd = [sys.executable, "-m", "privtune.bench.clipping", "--one", json.dumps(spec), method, str(batch), str(seq),
           str(steps), device, "--precision", precision, *(["--fit-json", json.dumps(fit)] if fit else [])]
    rec = {**_base(shape, spec, batch, seq, device, precision), "method": method}
    rc, lines, err = _subprocess(cmd, timeout)
    if rc == 0 and lines:
        return {**rec, **json.loads(lines[-1])}
    return {**rec, **_failed(rc, err, timeout)}


def run_group(shape: str, methods: list[str], batch: int, seq: int, steps: int, device: str, timeout: float,
              spec: dict | None = None, precision: str = "fp32", fit: dict | None = None,
              deadline: float | None = None) -> list[dict]:
    """All ``methods`` of one (shape, precision) in one fresh process (one record per method; those
    the process did not reach, when it died or ran out of time, get its failure)."""
    spec = _spec_of(shape, spec)
    cmd = [sys.executable, "-m", "privtune.bench.clipping", "--group-one", json.dumps(spec), json.dumps(methods),
           str(batch), str(seq), str(steps), device, "--precision", precision,
           *(["--fit-json", json.dumps(fit)] if fit else []), *(["--deadline", str(deadline)] if deadline else [])]
    rc, lines, err = _subprocess(cmd, timeout)
    got = {}
    for line in lines:
        with contextlib.suppress(ValueError):
            r = json.loads(line)
            if isinstance(r, dict) and "method" in r:
                got[r["method"]] = r
    base = _base(shape, spec, batch, seq, device, precision)
    lost = _failed(rc, err if rc else "the process ended before measuring it", timeout)
    return [{**base, **got[m]} if m in got else {**base, "method": m, **lost} for m in methods]


def largest_batch(shape: str, method: str, seq: int, device: str, start: int, limit: int, timeout: int,
                  spec: dict | None = None, precision: str = "fp32") -> int:
    """The largest batch that runs (a GPU), searched in one fresh process."""
    r = run_isolated(shape, method, start, seq, 1, device, timeout, spec, precision, fit={"limit": limit})
    return r.get("largest_batch", 0) if r["status"] == "ok" else 0


def with_ratios(records: list[dict]) -> list[dict]:
    def key(r):
        return r["shape"], r["batch"], r["seq"], r.get("precision", "fp32")

    base = {key(r): r for r in records if r["method"] == "nonprivate" and r["status"] == "ok"}
    for r in records:
        b = base.get(key(r))
        if b and r["status"] == "ok":
            r["time_ratio"] = r["time_s"] / b["time_s"]
            r["memory_ratio"] = (r["peak_mb"] / b["peak_mb"] if r.get("peak_mb") is not None
                                 and b.get("peak_mb") and b["peak_mb"] > 0 else None)
    return records


def targets(records: list[dict], shapes: list[str]) -> dict:
    """Book-keeping against issue 18's targets (time ≤ 1.10×, memory ≤ 1.05× non-private) per shape:
    the interleaved time ratio where measured, else the separate-process one."""
    out = {}
    for shape in shapes:
        for r in records:
            if r["shape"] == shape and r["method"] == "ours_bk" and r["status"] == "ok" and "time_ratio" in r:
                t = r.get("time_ratio_interleaved", r["time_ratio"])
                m = r.get("memory_ratio")
                out[f"{shape}/{r.get('precision', 'fp32')}"] = {
                    "time_ratio": t, "time_ratio_kind": "interleaved" if "time_ratio_interleaved" in r else "separate",
                    "time_met": t <= TIME_TARGET, "memory_ratio": m,
                    "memory_met": None if m is None else m <= MEMORY_TARGET}
    return {"time_target": TIME_TARGET, "memory_target": MEMORY_TARGET, "ours_bk": out}


def _add_interleaved(records: list[dict], got: dict, strategies) -> None:
    """Put :func:`measure_interleaved`'s results into one (shape, precision)'s records: the ratios, and
    for book-keeping its overhead profile with ``strategies()`` (:func:`norm_strategies`) in it."""
    for r in records:
        if r["method"] not in got:
            continue
        r.update({k: v for k, v in got[r["method"]].items() if k != "profile"})
        if r["method"] == "ours_bk" and "profile" in got["ours_bk"] and "profile" in got["nonprivate"]:
            np_, bk = got["nonprivate"], got["ours_bk"]
            r["profile"] = overhead_profile(np_["profile"], bk["profile"], np_["time_s_interleaved"],
                                            bk["time_s_interleaved"])
            try:
                r["profile"]["norm_strategies"] = strategies()
            except Exception as e:  # a diagnostic: its failure is recorded, not fatal
                r["profile"]["norm_strategies"] = {"error": _error(e)}
        elif r["method"] == "nonprivate" and "profile" in got["nonprivate"]:
            r["phases"] = got["nonprivate"]["profile"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m privtune.bench.clipping", description=__doc__.split("\n\n")[0])
    ap.add_argument("--one", nargs=6, metavar=("SHAPE", "METHOD", "BATCH", "SEQ", "STEPS", "DEVICE"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--group-one", nargs=6, metavar=("SHAPE", "METHODS", "BATCH", "SEQ", "STEPS", "DEVICE"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--fit-json", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--shapes", nargs="*", help="names from CPU_SHAPES / GPU_SHAPES")
    ap.add_argument("--shapes-json", help='{"name": {"n_embd": .., "n_layer": .., "n_head": ..}, ...} instead')
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--precision", nargs="+", default=["fp32"], choices=PRECISIONS,
                    help="fp32 and/or bf16 (autocast, as train.precision: bf16)")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per measuring process")
    ap.add_argument("--interleave", type=int, default=0, metavar="N",
                    help="also time the methods alternated in one process, N rounds, with book-keeping's profile "
                         "(0: off)")
    ap.add_argument("--fit", action=argparse.BooleanOptionalAction, default=None,
                    help="search each method's largest batch (default: on a GPU)")
    ap.add_argument("--fit-limit", type=int, default=4096)
    ap.add_argument("--group", action=argparse.BooleanOptionalAction, default=None,
                    help="all methods of a (shape, precision) in one process (default: on a GPU)")
    ap.add_argument("--budget-s", type=float, default=0, help="stop starting work after this many seconds (0: none)")
    ap.add_argument("--out", default="results/benchmarks/bench.json")
    a = ap.parse_args(argv)
    precision = a.precision[0]
    fit = json.loads(a.fit_json) if a.fit_json else None
    if a.one:
        shape, method, batch, seq, steps, device = a.one
        print(json.dumps(measure_one(json.loads(shape), method, int(batch), int(seq), int(steps), device, precision,
                                     fit)))
        return
    if a.group_one:
        shape, methods, batch, seq, steps, device = a.group_one
        for rec in measure_group(json.loads(shape), json.loads(methods), int(batch), int(seq), int(steps), device,
                                 precision, fit, a.deadline):
            print(json.dumps(rec), flush=True)
        return
    t0 = time.time()
    load0 = list(os.getloadavg())  # a shared machine's other work lands in the separate-process ratios
    deadline = t0 + a.budget_s if a.budget_s else None

    def left() -> float:
        return a.timeout if deadline is None else min(a.timeout, deadline - time.time())

    known = {**CPU_SHAPES, **GPU_SHAPES}
    if a.shapes_json:
        specs = json.loads(a.shapes_json)
    else:
        names = a.shapes or list(GPU_SHAPES if a.device == "cuda" else CPU_SHAPES)
        unknown = [n for n in names if n not in known]
        if unknown:
            ap.error(f"unknown shape(s) {unknown}; known: {sorted(known)} (or give --shapes-json)")
        specs = {n: known[n] for n in names}
    shapes = list(specs)
    batch = a.batch or (32 if a.device == "cuda" else 8)
    do_fit = a.device == "cuda" if a.fit is None else a.fit
    group = a.device == "cuda" if a.group is None else a.group
    records = []
    groups = [(prec, shape) for prec in a.precision for shape in shapes]
    for g, (prec, shape) in enumerate(groups):
        # the largest-batch searches get a fair share of what is left (so every shape and precision is
        # timed within the budget); what a fast one leaves passes on to the next
        fit = None
        if do_fit:
            share = None if deadline is None else time.time() + (deadline - time.time()) / (len(groups) - g)
            fit = {"limit": a.fit_limit, "deadline": share}
        if group:
            todo = left()
            if todo <= 0:
                recs = [{**_base(shape, specs[shape], batch, a.seq, a.device, prec), "method": m,
                         "status": "skipped (time budget)"} for m in a.methods]
            else:
                recs = run_group(shape, a.methods, batch, a.seq, a.steps, a.device, todo, specs[shape], prec,
                                 fit, deadline)
        else:
            recs = []
            for method in a.methods:
                todo = left()
                recs.append(run_isolated(shape, method, batch, a.seq, a.steps, a.device, todo, specs[shape],
                                         prec, fit) if todo > 0 else
                            {**_base(shape, specs[shape], batch, a.seq, a.device, prec), "method": method,
                             "status": "skipped (time budget)"})
        for r in recs:
            records.append(r)
            ok = r["status"] == "ok"
            mem = f"{r['peak_mb']:.0f} MB" if ok and r.get("peak_mb") is not None else ""
            print(f"{shape:12s} {prec:5s} {r['method']:20s} {r['status']:10s} "
                  + (f"{r['time_s']:.3f} s/step  {mem}" if ok else r.get("error", ""))
                  + (f"  largest batch {r['largest_batch']}" if "largest_batch" in r else ""), flush=True)
    with_ratios(records)
    if a.interleave:  # last: this process then holds models (and on a GPU, a CUDA context)
        for prec in a.precision:
            for shape in shapes:
                if left() <= 0:
                    break
                mine = [r for r in records if r["shape"] == shape and r.get("precision", "fp32") == prec]
                ok = [r["method"] for r in mine if r["status"] == "ok" and r["method"] in INTERLEAVED]
                got = measure_interleaved(specs[shape], ok, batch, a.seq, a.interleave, a.device, prec,
                                          profile="ours_bk" in ok)
                _add_interleaved(mine, got, lambda: norm_strategies(specs[shape], batch, a.seq, a.device, prec))
    out = Path(a.out)
    import torch

    write_json(out, {"device": a.device, "batch": batch, "seq": a.seq, "precisions": a.precision,
                     "load_average_at_start": load0, "load_average_at_end": list(os.getloadavg()),
                     "threads": _threads(),
                     "torch": torch.__version__, "seconds": time.time() - t0,
                     "targets": targets(records, shapes), "records": records})
    from privtune.report.figures import benchmark as benchmark_figure

    # one figure per precision (the first at the usual name), so no line mixes two of them
    for i, prec in enumerate(a.precision):
        png = out.with_suffix(".png") if i == 0 else out.with_name(f"{out.stem}_{prec}.png")
        benchmark_figure([out], png, precision=prec if len(a.precision) > 1 else None)
    print("\nratios to non-private (time, memory):")
    for r in records:
        if r.get("time_ratio"):
            mem = f"{r['memory_ratio']:.2f}" if r.get("memory_ratio") else "n/a"
            inter = (f"  (alternated in one process: {r['time_ratio_interleaved']:.2f}x, median of "
                     f"{len(r['round_ratios'])})") if "time_ratio_interleaved" in r else ""
            print(f"  {r['shape']:12s} {r.get('precision', 'fp32'):5s} {r['method']:20s} time {r['time_ratio']:.2f}x"
                  f"  memory {mem}x{inter}")
        elif r["status"] != "ok":
            print(f"  {r['shape']:12s} {r.get('precision', 'fp32'):5s} {r['method']:20s} {r['status']}: "
                  f"{r.get('error', '')[:120]}")


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
