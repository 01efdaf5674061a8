"""Data-parallel training over several processes: one per GPU (NCCL), or gloo on the CPU.

With ``train.world_size = W > 1``, :func:`privtune.training.loop.run` starts W processes
(:func:`launch`) that rendezvous on a free localhost port. A step then runs so:

1. Every rank holds the same model (same seed, same checkpoint on resume), computes
   the same privacy plan and the same logical batch: the sampler is a pure function
   of ``(seed, step)``. Rank r processes its shard ``idx[r::W]`` (:func:`shard`) in
   physical batches, accumulating in ``p.grad`` the sum of its examples' clipped
   gradients. Under Poisson sampling a shard may be empty: it contributes zeros but
   still joins the collectives.
2. :func:`all_reduce_grads` sums ``p.grad`` over the ranks, so each rank holds the
   clipped sum of the *whole* logical batch: what a single process would hold, up to
   float rounding of the summation order.
3. Each rank calls :func:`privtune.dp.noise.privatize_` on that sum with the same
   key: the step's child of the run's secret root (:mod:`privtune.dp.rng`; with
   ``secure_rng`` rank 0 draws the 128-bit root from the OS and :func:`broadcast_seed`
   sends it to the others). Every rank therefore adds the *same* sample
   z ~ N(0, σ²C²I) to the *same* sum, and the released gradient (Σ clipped + z) / B is
   the one the accountant analyses: noise added once. Child-Tuning_F masks come from a
   generator seeded from the run's seed on every rank, so they agree too, and so does
   each optimizer step: the replicas
   stay identical without a broadcast of parameters (:func:`check_replicas`
   verifies it after the first step and at the end).

Why not let each rank draw its own noise? Drawn independently on each rank before
the all-reduce, the sum would carry W samples: variance Wσ²C², W times the noise
the accountant calibrated (scaling each share by 1/√W would restore σ, but then the
guarantee rests on every share reaching the sum). Drawn independently after the
all-reduce, each rank would release a different noisy copy of the same sum: the
replicas would diverge, and W copies averaged hold noise of only σC/√W, a weaker
guarantee than the one reported.

Only rank 0 writes outputs and checkpoints. Dropout is the one randomness that
differs between ranks: each rank reseeds torch's global generator at each step
from ``(seed, step, rank)`` (:func:`privtune.dp.rng.dropout_seed`), so ranks do not share dropout masks
and a resumed run (every rank loads rank 0's checkpoint) draws what an
uninterrupted one would. A failed rank makes :func:`launch` stop the others and
raise :class:`RankError` naming it; collectives time out after
``PRIVTUNE_DIST_TIMEOUT_S`` seconds (default 1800), so a lost peer cannot hang a run.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_ENV = "PRIVTUNE_DIST_TIMEOUT_S"


class RankError(RuntimeError):
    """A rank of a multi-process run failed; the message names the rank and carries its traceback."""

    def __init__(self, rank: int, world_size: int, detail: str, later: str = ""):
        lines = [line for line in detail.strip().splitlines() if line.strip()]
        last = lines[-1].strip() if lines else "no message"
        super().__init__(f"train.world_size = {world_size}: rank {rank} failed: {last}\n\n{detail.strip()}"
                         + (f"\n\nthen {later}" if later else ""))
        self.rank = rank


def free_port() -> int:
    """A TCP port free on localhost now (bound to port 0, then released; rank 0 binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes outputs."""
    return not is_initialized() or dist.get_rank() == 0


def rank_and_world(expected: int) -> tuple[int, int]:
    """``(rank, world size)`` of this process: ``(0, 1)`` without a process group.

    A process group of another size than ``train.world_size`` is an error.
    """
    world = dist.get_world_size() if is_initialized() else 1
    if world != expected:
        raise ValueError(f"train.world_size = {expected} but this process group has {world} processes")
    return (dist.get_rank() if world > 1 else 0), world


def local_device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` (the rank itself under :func:`launch`), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", dist.get_rank() if is_initialized() else 0))
    torch.cuda.set_device(index % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def init(rank: int, world_size: int, port: int) -> None:
    """Join the process group at ``tcp://127.0.0.1:port``: NCCL with one GPU per rank, else gloo."""
    os.environ["LOCAL_RANK"] = str(rank)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        local_device()
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 1800)))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timeout)


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()


def _entry(rank: int, fn, world_size: int, port: int, args: tuple, reports: str) -> None:
    """Body of each spawned process: join the group, run ``fn(*args)``, leave the group.

    A failure is also written to ``reports`` with the time it happened, so that
    :func:`launch` can name the rank that failed first (its peers fail after it,
    their collectives broken).
    """
    if not torch.cuda.is_available():  # share the CPU cores between the ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        init(rank, world_size, port)
        fn(*args)
    except BaseException:
        report = {"rank": rank, "time_ns": time.time_ns(), "traceback": traceback.format_exc()}
        (Path(reports) / f"rank{rank}.json").write_text(json.dumps(report))
        raise
    destroy()


def _first_failure(reports: Path, error: Exception, world_size: int) -> RankError:
    """The :class:`RankError` of the rank that failed first, the later failures listed after it."""
    found = sorted((json.loads(f.read_text()) for f in reports.glob("rank*.json")), key=lambda r: r["time_ns"])
    if not found:  # killed (out of memory, a signal) before it could say why
        return RankError(error.error_index, world_size, str(error))
    first, later = found[0], found[1:]
    return RankError(first["rank"], world_size, first["traceback"],
                     "; ".join(f"rank {r['rank']} failed too: {r['traceback'].strip().splitlines()[-1]}"
                               for r in later))


@contextlib.contextmanager
def _main_not_rerun(fn):
    """While processes start: hide the parent's main script from them.

    A spawned process first re-runs the parent's ``__main__`` file, and a script
    without an ``if __name__ == "__main__"`` guard (Snakemake's ``script:`` files)
    would then redo its work (open its log, start training) in every rank. The
    ranks only need ``fn``, from an importable module; a ``fn`` defined in the main
    script itself keeps the usual behaviour.
    """
    main = sys.modules.get("__main__")
    if main is None or getattr(fn, "__module__", None) == "__main__":
        yield
        return
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def launch(fn, world_size: int, args: tuple) -> None:
    """Run ``fn(*args)`` in ``world_size`` fresh processes joined in one process group.

    Returns when all have finished. If one fails, the others are stopped and
    :class:`RankError` names the rank that failed first, with its traceback.
    """
    if torch.cuda.is_available() and torch.cuda.device_count() < world_size:
        raise ValueError(f"train.world_size = {world_size} but only {torch.cuda.device_count()} GPUs are visible")
    with tempfile.TemporaryDirectory(prefix="privtune-ranks-") as reports:
        with _main_not_rerun(fn):
            ctx = mp.start_processes(_entry, args=(fn, world_size, free_port(), args, reports), nprocs=world_size,
                                     join=False, start_method="spawn")
        try:
            while not ctx.join():
                pass
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            raise _first_failure(Path(reports), e, world_size) from None
        finally:
            for f in ctx.error_files:  # torch's own per-process error files
                Path(f).unlink(missing_ok=True)


def shard(idx, rank: int, world_size: int):
    """This rank's part of a logical batch: every ``world_size``-th index from ``rank`` (possibly none)."""
    return idx[rank::world_size]


def all_reduce_grads(params) -> None:
    """In place: ``p.grad ← Σ_ranks p.grad`` for every parameter.

    A missing gradient counts as zeros (so that every rank sends the same shapes);
    a parameter with no gradient on any rank is left without one, as it would be
    in a single process.
    """
    params = list(params)
    if not params:
        return
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        elif not p.grad.is_contiguous():
            p.grad = p.grad.contiguous()
    works = [dist.all_reduce(p.grad, async_op=True) for p in params]
    works.append(dist.all_reduce(present, async_op=True))
    for w in works:
        w.wait()
    for p, n in zip(params, present.tolist()):
        if n == 0:
            p.grad = None


def check_replicas(params) -> None:
    """Raise on every rank if any rank's parameters differ from rank 0's.

    The replicas start equal and take the same steps (the same summed gradient,
    the same noise), so they stay bit-identical, as data-parallel training assumes;
    a difference means a bug (noise drawn per rank, say), and rank 0's model would
    not be the one the privacy report describes. Compared by float64 sums.
    """
    params = list(params)
    digest = torch.stack([p.detach().double().sum() for p in params])
    reference = digest.clone()
    dist.broadcast(reference, src=0)
    differs = torch.tensor([float(not torch.equal(digest, reference))], dtype=torch.float64, device=digest.device)
    dist.all_reduce(differs, op=dist.ReduceOp.MAX)
    if differs.item():
        raise RuntimeError("the ranks' parameters diverged: data-parallel replicas must stay identical "
                           "(the same summed gradient and the same noise on every rank)")


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers (a loss total, an example count) over the ranks, in float64."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_seed(seed: int, device: torch.device) -> int:
    """Rank 0's ``seed`` (up to 128 bits: a secure run's root) on every rank (unchanged without a process group)."""
    if not is_initialized():
        return seed
    from privtune.dp import rng

    t = torch.tensor(rng.words(seed), dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return rng.from_words(t.tolist())
