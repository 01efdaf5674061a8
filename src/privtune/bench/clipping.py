"""Speed and memory of DP clipping against non-private training and Opacus, in one run.

Each (shape, method) is measured in a fresh subprocess, so that a method that
runs out of memory or refuses the model is *recorded* (status and message)
instead of ending the benchmark. Models are the papers' GPT-2 shapes with
random weights (weights change neither FLOPs nor bytes), built offline.

    python -m privtune.bench.clipping --device cpu --out results/benchmarks/cpu.json

Methods: ``nonprivate``; ``ours_bk`` (single backward, book-keeping) and
``ours_ghost`` (two passes, Li et al.'s ghost clipping); ``opacus_hooks``
(per-sample gradients) and ``opacus_ghost`` (Opacus 1.6 fast gradient clipping).
Opacus' ghost mode refuses tied embeddings, so it runs on the untied variant of
the model as well (``opacus_ghost_untied``); its refusal on the tied one is kept
as a result.

Separate processes run one after another, so a shared machine's drift lands in
the time ratios. ``--interleave N`` also times non-private and our two modes
alternated in one process, N rounds, and records the median over rounds of each
one's time over the non-private time of the same round (``time_ratio_interleaved``).
Opacus is left out of it: its ratios are far from the targets, and its models would
share the process's memory.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from privtune.io import write_json

METHODS = ("nonprivate", "ours_bk", "ours_ghost", "opacus_hooks", "opacus_ghost", "opacus_ghost_untied")
CPU_SHAPES = {"gpt2-2layer": dict(n_embd=768, n_layer=2, n_head=12), "gpt2": dict(n_embd=768, n_layer=12, n_head=12)}
GPU_SHAPES = {"gpt2": dict(n_embd=768, n_layer=12, n_head=12), "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
              "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20)}
CLIP, SIGMA = 0.1, 1.0
INTERLEAVED = ("nonprivate", "ours_bk", "ours_ghost")  # timed alternated in one process by --interleave


def _model(shape: dict, untie: bool, device):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(**shape, tie_word_embeddings=not untie)
    return GPT2LMHeadModel(cfg).to(device)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _pos(ids):
    import torch

    return torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous()  # Opacus .view()s it


def _token_losses(logits, ids):
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


def _make_step(method: str, model, batch: int, lr=1e-4):
    """A closure running one full training step (forward, backward, clip, noise, update).

    Every method is given explicit (B, T) position ids: Opacus' per-sample hooks need a batch
    dimension on every layer input, and HF GPT-2 otherwise feeds (1, T) ids to its position
    embedding. Our engine handles either; the same inputs keep the comparison fair.
    """
    import torch

    from privtune.dp.engine import GhostClipEngine
    from privtune.dp.noise import privatize_

    if method == "nonprivate":
        opt = torch.optim.Adam(model.parameters(), lr=lr)

        def step(ids):
            _token_losses(model(input_ids=ids, position_ids=_pos(ids)).logits, ids).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    if method in ("ours_bk", "ours_ghost"):
        engine = GhostClipEngine(model, CLIP, mode="bk" if method == "ours_bk" else "ghost")
        opt = torch.optim.Adam(engine.params, lr=lr)
        gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)

        def step(ids):
            with engine.capture(batch_size=ids.shape[0]):
                losses = _token_losses(model(input_ids=ids, position_ids=_pos(ids)).logits, ids)
            engine.backward(losses)
            privatize_(engine.params, SIGMA, CLIP, batch, gen)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    if method == "opacus_hooks":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        opt = DPOptimizer(torch.optim.Adam(gsm.parameters(), lr=lr), noise_multiplier=SIGMA, max_grad_norm=CLIP,
                          expected_batch_size=batch, loss_reduction="sum")

        def step(ids):
            _token_losses(gsm(input_ids=ids, position_ids=_pos(ids)).logits, ids).sum().backward()
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

        def step(ids):
            logits = gsm(input_ids=ids, position_ids=_pos(ids)).logits[:, :-1]
            loss = crit(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), shape=logits.shape)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    raise ValueError(f"unknown method {method!r}")


def _ready(shape: dict, method: str, batch: int, seq: int, dev):
    """(model, token ids, step closure) after one warm-up step (Opacus' / our engine's first-call work)."""
    import torch

    model = _model(shape, untie=method == "opacus_ghost_untied", device=dev)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=dev)
    step = _make_step(method, model, batch)
    step(ids)
    return model, ids, step


def _timed(step, ids, dev) -> float:
    import torch

    t = time.perf_counter()
    step(ids)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _set_threads() -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("PRIVTUNE_BENCH_THREADS", os.cpu_count() or 1)))


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"[:400]


def measure_one(shape: dict, method: str, batch: int, seq: int, steps: int, device: str) -> dict:
    """Run in the current process; returns time per step and peak memory."""
    import torch

    _set_threads()
    dev = torch.device(device)
    base_rss = _rss_mb()
    model, ids, step = _ready(shape, method, batch, seq, dev)
    n_params = sum(p.numel() for p in model.parameters())
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = sorted(_timed(step, ids, dev) for _ in range(steps))
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
    return {"status": "ok", "time_s": times[len(times) // 2], "peak_mb": peak, "parameters": n_params}


def measure_interleaved(shape: dict, methods: list[str], batch: int, seq: int, rounds: int, device: str) -> dict:
    """Time ratios to non-private with every method's step alternated in this process.

    Each method gets its own model (same seed) and one warm-up step; then ``rounds`` rounds
    run every method once. Returns {method: {"time_ratio_interleaved", "round_ratios"}} or
    {method: {"interleaved_error": ...}} for a method that cannot be built or run.
    """
    import statistics

    import torch

    _set_threads()
    dev = torch.device(device)
    ready, out = {}, {}
    for method in ["nonprivate", *[m for m in methods if m != "nonprivate"]]:
        try:
            ready[method] = _ready(shape, method, batch, seq, dev)
        except Exception as e:  # a refusal (Opacus ghost on a tied model) is a result
            out[method] = {"interleaved_error": _error(e)}
    if "nonprivate" not in ready:
        return out
    times = {m: [] for m in ready}
    try:
        for _ in range(rounds):
            for method, (_, ids, step) in ready.items():
                times[method].append(_timed(step, ids, dev))
    except Exception as e:  # all the models at once may not fit (a GPU): a result, not a crash
        return {**out, **{m: {"interleaved_error": _error(e)} for m in ready}}
    finally:
        ready.clear()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    for method, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times["nonprivate"])]
        out[method] = {"time_ratio_interleaved": statistics.median(ratios), "round_ratios": ratios}
    return out


def run_isolated(shape: str, method: str, batch: int, seq: int, steps: int, device: str, timeout: int,
                 spec: dict | None = None) -> dict:
    """Measure one (shape, method) in a fresh process; ``spec`` is the GPT-2 shape (default: the
    named one of ``CPU_SHAPES`` / ``GPU_SHAPES``)."""
    spec = spec or {**CPU_SHAPES, **GPU_SHAPES}[shape]
    cmd = [sys.executable, "-m", "privtune.bench.clipping", "--one", json.dumps(spec), method, str(batch), str(seq),
           str(steps), device]
    rec = {"shape": shape, "method": method, "batch": batch, "seq": seq, "device": device}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**rec, "status": "timeout", "error": f"no result within {timeout} s"}
    if p.returncode == 0 and p.stdout.strip():
        return {**rec, **json.loads(p.stdout.strip().splitlines()[-1])}
    err = (p.stderr.strip().splitlines() or ["(no message)"])[-1]
    status = "killed (out of memory)" if p.returncode in (-9, 137) else "error"
    if "out of memory" in p.stderr.lower():
        status = "out of memory"
    return {**rec, "status": status, "error": err[:400]}


def largest_batch(shape: str, method: str, seq: int, device: str, start: int, limit: int, timeout: int,
                  spec: dict | None = None) -> int:
    """Doubling search for the largest batch that runs (GPU)."""
    best, b = 0, start
    while b <= limit:
        if run_isolated(shape, method, b, seq, 1, device, timeout, spec)["status"] != "ok":
            break
        best, b = b, b * 2
    return best


def with_ratios(records: list[dict]) -> list[dict]:
    base = {(r["shape"], r["batch"], r["seq"]): r for r in records if r["method"] == "nonprivate" and r["status"] == "ok"}
    for r in records:
        b = base.get((r["shape"], r["batch"], r["seq"]))
        if b and r["status"] == "ok":
            r["time_ratio"] = r["time_s"] / b["time_s"]
            r["memory_ratio"] = r["peak_mb"] / b["peak_mb"] if b["peak_mb"] > 0 else None
    return records


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--one", nargs=6, metavar=("SHAPE", "METHOD", "BATCH", "SEQ", "STEPS", "DEVICE"))
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--shapes", nargs="*", help="names from CPU_SHAPES / GPU_SHAPES")
    ap.add_argument("--shapes-json", help='{"name": {"n_embd": .., "n_layer": .., "n_head": ..}, ...} instead')
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--interleave", type=int, default=0, metavar="N",
                    help="also time the methods alternated in one process, N rounds (0: off)")
    ap.add_argument("--out", default="results/benchmarks/bench.json")
    a = ap.parse_args(argv)
    if a.one:
        shape, method, batch, seq, steps, device = a.one
        print(json.dumps(measure_one(json.loads(shape), method, int(batch), int(seq), int(steps), device)))
        return
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
    records = []
    for shape in shapes:
        for method in a.methods:
            r = run_isolated(shape, method, batch, a.seq, a.steps, a.device, a.timeout, specs[shape])
            records.append(r)
            print(f"{shape:12s} {method:20s} {r['status']:10s} "
                  + (f"{r['time_s']:.3f} s/step  {r['peak_mb']:.0f} MB" if r["status"] == "ok" else r.get("error", "")),
                  flush=True)
    with_ratios(records)
    if a.device == "cuda":
        for shape in shapes:
            for method in a.methods:
                fit = largest_batch(shape, method, a.seq, a.device, batch, 4096, a.timeout, specs[shape])
                for r in records:
                    if r["shape"] == shape and r["method"] == method:
                        r["largest_batch"] = fit
    if a.interleave:  # last: this process then holds models (and on a GPU, a CUDA context)
        for shape in shapes:
            ok = [r["method"] for r in records if r["shape"] == shape and r["status"] == "ok"
                  and r["method"] in INTERLEAVED]
            got = measure_interleaved(specs[shape], ok, batch, a.seq, a.interleave, a.device)
            for r in records:
                if r["shape"] == shape and r["method"] in got:
                    r.update(got[r["method"]])
    out = Path(a.out)
    write_json(out, {"device": a.device, "batch": batch, "seq": a.seq, "records": records})
    from privtune.report.figures import benchmark as benchmark_figure

    benchmark_figure([out], out.with_suffix(".png"))
    print("\nratios to non-private (time, memory):")
    for r in records:
        if r.get("time_ratio"):
            mem = f"{r['memory_ratio']:.2f}" if r.get("memory_ratio") else "n/a"
            inter = (f"  (alternated in one process: {r['time_ratio_interleaved']:.2f}x, median of "
                     f"{len(r['round_ratios'])})") if "time_ratio_interleaved" in r else ""
            print(f"  {r['shape']:12s} {r['method']:20s} time {r['time_ratio']:.2f}x  memory {mem}x{inter}")
        elif r["status"] != "ok":
            print(f"  {r['shape']:12s} {r['method']:20s} {r['status']}: {r.get('error', '')[:120]}")


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
