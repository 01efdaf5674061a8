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
  lengths are SST-2's (:func:`privtune.bench.workload.sst2_lengths`).

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

The parts: :mod:`privtune.bench.workload` (the shapes, their models, batches and losses),
:mod:`privtune.bench.steps` (the methods compared, one step factory each), :mod:`privtune.bench.measure`
(time, memory, the largest batch, the interleaved rounds and the profile), and this module (each
measurement in its own process, the ratios against non-private, the targets and the command line).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from privtune.bench.measure import (error, measure_group, measure_interleaved, measure_one, norm_strategies,
                                    overhead_profile, threads)
from privtune.bench.steps import METHODS
from privtune.bench.workload import CPU_SHAPES, GPU_SHAPES, arch
from privtune.io import output_file, write_json

PRECISIONS = ("fp32", "bf16")
INTERLEAVED = ("nonprivate", "ours_bk", "ours_ghost")  # timed alternated in one process by --interleave
TIME_TARGET, MEMORY_TARGET = 1.10, 1.05  # book-keeping against non-private (issue 18)


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
    if arch(spec) == "bert":
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
            for peak, ratio in (("peak_mb", "memory_ratio"), ("tensor_peak_mb", "tensor_memory_ratio")):
                if r.get(peak) is not None and b.get(peak):
                    r[ratio] = r[peak] / b[peak]
                elif ratio == "memory_ratio":
                    r[ratio] = None
    return records


def memory_ratio(r: dict) -> tuple[float | None, str]:
    """A record's peak memory × non-private and what it measures: live tensors where measured (a CPU; one
    number per shape), else the resident set (a CPU) or the GPU's allocations."""
    if r.get("tensor_memory_ratio") is not None:
        return r["tensor_memory_ratio"], "tensors"
    return r.get("memory_ratio"), "allocated" if str(r.get("device", "")).startswith("cuda") else "resident set"


def median_interval(xs: list[float], coverage: float = 0.95) -> tuple[float, float, float]:
    """A distribution-free interval for the median of what ``xs`` (independent draws) are drawn from: the
    k-th smallest to the k-th largest, k the largest whose coverage 1 − 2·P(Binomial(n, ½) < k) is at least
    ``coverage``; below 6 draws none reaches 0.95 and the range from the smallest to the largest is taken
    (coverage 1 − 2^(1−n): 0.75 for 3, 0.94 for 5). Returns (low, high, its coverage)."""
    n, xs = len(xs), sorted(xs)

    def cover(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n

    k = max([k for k in range(1, (n + 1) // 2 + 1) if cover(k) >= coverage] or [1])
    return xs[k - 1], xs[n - k], cover(k)


def time_verdict(rounds: list[float], target: float = TIME_TARGET) -> dict:
    """The spread of the alternated rounds' ratios and a verdict that respects it (:func:`median_interval`):
    ``met`` when the interval for the median ratio is at or below ``target``, ``not met`` when it is all
    above, ``inconclusive`` otherwise. Fewer than 3 rounds give no verdict."""
    if len(rounds) < 3:
        return {"time_range": None, "time_range_coverage": None, "time_verdict": None}
    lo, hi, cover = median_interval(rounds)
    verdict = "met" if hi <= target else "not met" if lo > target else "inconclusive"
    return {"time_range": [lo, hi], "time_range_coverage": cover, "time_verdict": verdict}


def targets(records: list[dict], shapes: list[str]) -> dict:
    """Book-keeping against issue 18's targets (time ≤ 1.10×, memory ≤ 1.05× non-private) per shape:
    the interleaved time ratio where measured, else the separate-process one; ``time_met`` reads the
    median, ``time_verdict`` the spread of the rounds (:func:`time_verdict`)."""
    out = {}
    for shape in shapes:
        for r in records:
            if r["shape"] == shape and r["method"] == "ours_bk" and r["status"] == "ok" and "time_ratio" in r:
                t = r.get("time_ratio_interleaved", r["time_ratio"])
                m, kind = memory_ratio(r)
                out[f"{shape}/{r.get('precision', 'fp32')}"] = {
                    "time_ratio": t, "time_ratio_kind": "interleaved" if "time_ratio_interleaved" in r else "separate",
                    "time_met": t <= TIME_TARGET, **time_verdict(r.get("round_ratios") or []),
                    "memory_ratio": m, "memory_ratio_kind": kind,
                    "memory_met": None if m is None else m <= MEMORY_TARGET}
    return {"time_target": TIME_TARGET, "memory_target": MEMORY_TARGET, "ours_bk": out}


def profile_line(r: dict) -> str | None:
    """Where book-keeping's extra time goes, one line: each phase's share of the non-private step, largest
    first, and the norms' share of the step's matrix-product FLOPs beside their share of its time."""
    frac = (r.get("profile") or {}).get("fraction_of_nonprivate_step")
    if not frac:
        return None
    share = ((r["profile"].get("norm_strategies") or {}).get("matmul_gflop") or {}).get("norms_share")
    flops = {} if share is None else {"norms": f" ({100 * share:.1f} % of its matrix-product FLOPs)"}
    parts = [f"{name} {100 * f:+.1f}{flops.get(name, '')}" for name, f in sorted(frac.items(), key=lambda kv: -kv[1])]
    return f"{_label(r)} extra time, % of the non-private step: " + ", ".join(parts)


def _label(r: dict) -> str:
    """A record's shape, precision and method, in columns: how each line of the summary starts."""
    return f"  {r['shape']:12s} {r.get('precision', 'fp32'):5s} {r['method']:20s}"


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
                r["profile"]["norm_strategies"] = {"error": error(e)}
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
    ap.add_argument("--out", type=output_file("clipping.json"), default="results/benchmarks/bench.json")
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
                     "threads": threads(),
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
            mem = f"{r['memory_ratio']:.2f}x" if r.get("memory_ratio") else "n/a"
            if r.get("tensor_memory_ratio"):
                mem += f" (live tensors {r['tensor_memory_ratio']:.2f}x)"
            rounds = r.get("round_ratios") or []
            v = time_verdict(rounds)
            spread = (f", {v['time_range_coverage']:.0%} interval {v['time_range'][0]:.2f}-{v['time_range'][1]:.2f}"
                      if v["time_range"] else "")
            inter = (f"  (alternated in one process: {r['time_ratio_interleaved']:.2f}x, median of {len(rounds)}"
                     f"{spread})") if "time_ratio_interleaved" in r else ""
            print(f"{_label(r)} time {r['time_ratio']:.2f}x"
                  f"  memory {mem}{inter}")
        elif r["status"] != "ok":
            print(f"{_label(r)} {r['status']}: {r.get('error', '')[:120]}")
    for r in records:
        if line := profile_line(r):
            print(line)


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()

