"""How the clipping benchmark measures: time per step, peak memory, the largest batch that runs, the
methods alternated in one process with book-keeping's profile, and the two norm strategies."""
from __future__ import annotations

import gc
import os
import resource
import time
from functools import partial

from privtune.bench.steps import CLIP, Phases, autocast
from privtune.bench.steps import ready as ready_step
from privtune.bench import workload

def rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0



def timed(step, parts, dev) -> float:
    import torch

    t = time.perf_counter()
    step(parts)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def threads() -> int:
    return int(os.environ.get("PRIVTUNE_BENCH_THREADS", os.cpu_count() or 1))


def set_threads() -> None:
    import torch

    torch.set_num_threads(threads())


def error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:400]


def is_oom(e: BaseException) -> bool:
    return "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"


def _reset_cpu_peak() -> bool:
    """Reset this process's peak RSS (VmHWM), where the kernel allows it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def tensor_peak_mb(step, parts) -> float:
    """Peak memory of live tensors over one more step on a CPU, in MB: the tensors alive when it starts (the
    model, the optimizer's state, the batch; found by the garbage collector, each storage once) plus the
    largest total the step's own allocations reach (the profiler's allocation events, frees negative).
    Unlike the resident-set peak it depends neither on what the allocator kept from earlier work nor on the
    machine's other processes: one shape, method and precision give one number, in a shared process too."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    held = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and obj.layout == torch.strided:
                storage = obj.untyped_storage()
                held[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without storage of its own (a wrapper subclass)
            continue
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(parts)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    total = peak = 0
    for _, nbytes in events:
        total += nbytes
        peak = max(peak, total)
    return (sum(held.values()) + peak) / 2**20


def measure_one(shape: dict, method: str, batch: int, seq: int, steps: int, device: str,
                precision: str = "fp32", fit: dict | None = None, shared_process: bool = False) -> dict:
    """Run in the current process; returns time per step and peak memory (and, with ``fit``
    = {"limit", "deadline"}, the largest batch that runs: GPT-2 shapes only).

    ``shared_process``: other methods ran in this process before. A GPU's peak is still this
    method's; a CPU's resident-set peak is not (freed memory stays with the process), so it is
    left out there; a CPU's tensor peak (:func:`tensor_peak_mb`, one more step) is measured either way."""
    import torch

    set_threads()
    dev = torch.device(device)
    base_rss = rss_mb()
    model, parts, step, info = ready_step(shape, method, batch, seq, dev, precision)
    n_params = sum(p.numel() for p in model.parameters())
    first = None
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()  # the model and the optimizer's state
    times = sorted(timed(step, parts, dev) for _ in range(steps))
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
    if dev.type == "cpu":
        try:
            out["tensor_peak_mb"] = tensor_peak_mb(step, parts)
        except Exception as e:  # a diagnostic (the profiler's interface is PyTorch's to change): recorded
            out["tensor_peak_error"] = error(e)
    if fit is not None and workload.arch(shape) != "bert":
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
            failed = "out of memory" if is_oom(e) else error(e)
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
            rec = {"method": method, "status": "out of memory" if is_oom(e) else "error", "error": error(e)}
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

    set_threads()
    dev = torch.device(device)
    ready, out, phases = {}, {}, {}
    for method in ["nonprivate", *[m for m in methods if m != "nonprivate"]]:
        ph = Phases(dev) if profile and method in ("nonprivate", "ours_bk") else None
        try:
            ready[method] = ready_step(shape, method, batch, seq, dev, precision, phases=ph)
            if ph is not None:
                phases[method] = (ph, [])
        except Exception as e:  # a refusal (Opacus ghost on a tied model) is a result
            out[method] = {"interleaved_error": error(e)}
    if "nonprivate" not in ready:
        return out
    times = {m: [] for m in ready}
    try:
        for _ in range(rounds):
            for method, (_, parts, step, _) in ready.items():
                if method in phases:
                    phases[method][0].s.clear()
                times[method].append(timed(step, parts, dev))
                if method in phases:
                    phases[method][1].append(dict(phases[method][0].s))
    except Exception as e:  # all the models at once may not fit (a GPU): a result, not a crash
        return {**out, **{m: {"interleaved_error": error(e)} for m in ready}}
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


def _baddbmm_flops(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    """The in-place ``baddbmm_`` (a wide Gram summed slice by slice) as PyTorch counts ``baddbmm``."""
    b, m, k = a_shape
    return 2 * b * m * b_shape[-1] * k


def matmul_flops(fn) -> int:
    """The floating-point operations of the matrix products ``fn()`` runs, as PyTorch's ``FlopCounterMode``
    counts them (2 per multiply-add; elementwise work is not counted), the in-place ``baddbmm_`` included."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.baddbmm_: _baddbmm_flops}) as fc:
        fn()
    return fc.get_total_flops()


def norm_strategies(shape: dict, batch: int, seq: int, device: str, precision: str = "fp32",
                    max_elements: float = 6e7) -> dict:
    """The per-example norms of one step's contributions timed both ways, ghost (Gram products) and
    instantiation (per-example gradients), per parameter: what the engine's FLOP-based ``auto``
    choice costs against the measured-faster one. Instantiation is skipped where the per-example
    gradients would exceed ``max_elements`` values (an embedding: B × vocabulary × width).

    ``matmul_gflop`` counts the matrix products (:func:`matmul_flops`) of a non-private forward and backward
    and of the engine's norms as a step forms them (padded rows left out, shared Grams formed once): where
    the norms' share of the time is about their share of these FLOPs, they run at the step's own rate, and
    only fewer products would make them cheaper."""
    import torch

    from privtune.dp.contributions import squared_norms
    from privtune.dp.engine import GhostClipEngine

    set_threads()
    dev = torch.device(device)
    model = workload.build_model(shape, untie=False, device=dev).train()
    torch.manual_seed(1)
    parts, _, _ = workload.inputs(shape, batch, seq, dev)

    def nonprivate_backward():
        for b in parts:
            with autocast(precision, dev):
                losses = workload.losses(workload.arch(shape), model, b)
            losses.sum().backward()

    step_flops = matmul_flops(nonprivate_backward)
    model.zero_grad(set_to_none=True)
    engine = GhostClipEngine(model, CLIP)
    per_param: dict[str, dict] = {}
    norm_flops = 0

    def timed_norms(cs, how):
        t = time.perf_counter()
        squared_norms(cs, how)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    held = {"layer_inputs_mb": 0.0, "output_gradients_and_other_mb": 0.0}

    def storages(ts):
        return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts if t is not None}

    for b in parts:
        size = b["input_ids"].shape[0]
        with engine.capture(batch_size=size, lengths=workload.lengths(b)), autocast(precision, dev):
            losses = workload.losses(workload.arch(shape), model, b)
        inputs = storages(r.input for r in engine._records)
        contribs = engine._contributions(losses, retain_graph=False)
        norm_flops += matmul_flops(partial(engine._norms, contribs, size, dev, *engine._padding(contribs, size, dev)))
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
            rec["ghost_s"] += timed_norms(cs, "ghost")
            big = sum(c.batch * c.rows * c.cols for c in cs) > max_elements
            rec["instantiate_s"] = None if big or rec["instantiate_s"] is None else rec["instantiate_s"] + timed_norms(cs, "instantiate")
        del contribs, losses
    engine.detach()
    auto = sum(r["ghost_s"] if r["auto"] == "ghost" or r["instantiate_s"] is None else r["instantiate_s"]
               for r in per_param.values())
    best = sum(min(r["ghost_s"], r["instantiate_s"]) if r["instantiate_s"] is not None else r["ghost_s"]
               for r in per_param.values())
    faster = sorted(n for n, r in per_param.items() if r["instantiate_s"] is not None
                    and (r["instantiate_s"] < r["ghost_s"]) != (r["auto"] == "instantiate"))
    return {"auto_s": auto, "measured_best_s": best, "ghost_only_s": sum(r["ghost_s"] for r in per_param.values()),
            "auto_picks_the_slower_for": faster, "held_until_the_clipped_sum": held,
            "matmul_gflop": {"nonprivate_step": step_flops / 1e9, "norms": norm_flops / 1e9,
                             "norms_share": norm_flops / step_flops if step_flops else None},
            "per_parameter": per_param}

