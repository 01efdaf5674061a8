"""The private step: Gaussian noise on the sum of clipped per-example
gradients, divided by the expected batch size, then an ordinary optimizer.

``privatize_`` is the only place noise is added; everything between it and
``optimizer.step()`` (Child-Tuning masks, for instance) is post-processing.

How the noise is drawn on the CPU. torch's CPU normal sampler is single-threaded
(0.49 s per 124M values, GPT-2 small's size, on the 2-core benchmark machine: a third
of book-keeping's overhead there), so each call draws its noise in parallel from
*keyed streams*:

* one key per call, a :class:`numpy.random.SeedSequence`: in a run, the noise stream's
  child for the step (:func:`privtune.dp.rng.noise_key`: the run's seed, or 128 secret bits
  from the OS under ``secure_rng``, and the step), so a resumed run redraws what the
  uninterrupted one drew and nothing else in the run draws from it. Called with a torch
  generator instead (an own training loop), the key is 128 bits drawn from that generator
  together with its full 64-bit initial seed;
* each parameter (by its position in ``params``) is cut into chunks of
  :data:`NOISE_CHUNK` values, fixed by the parameter's size alone; chunk ``c`` of
  parameter ``i`` is drawn by torch's own sampler (``Tensor.normal_``) from an
  MT19937 generator whose whole 19,937-bit state is
  the key's child ``SeedSequence(key.entropy, spawn_key=(*key.spawn_key, i, c))
  .generate_state(624)`` (the construction numpy seeds its own MT19937 with);
* the chunks are filled, added to the gradient and squared-summed in a thread pool
  of ``torch.get_num_threads()`` workers, each slice divided by the expected batch size
  while it is in cache. A chunk's values depend on (key, i, c) only, and the noise
  norm is summed in chunk order, so the result is the same with any number of
  threads (tested), and reruns stay reproducible. Measured on the 2-core machine,
  idle, for GPT-2 small's 124M values: 0.60 s with one thread, 0.33 s with two (the
  former single-stream code: 0.54-0.57 s with either).

Why not ``torch.Generator().manual_seed(hash(key, i, c))`` per chunk: torch's CPU
generator keeps only the low 32 bits of a seed, so among the millions of chunks of a
long GPT-2 run some pairs would share a stream, and a released gradient coordinate
pair carrying the *same* noise sample cancels it in their difference (noise that is
not independent is not what the accountant analyses). A full-state seed has no such
collisions (2^-128 per pair).

On a GPU: one draw per parameter from the caller's generator, or, given a key, from a CUDA
generator per device seeded with 64 bits of the key's child for that device (CUDA's Philox takes a
64-bit seed), which is fastest there. Devices are numbered in the order the parameters meet them
(:func:`cuda_seed`), so every rank of a data-parallel run, each on its own GPU, draws the same noise.

Why torch's sampler with a written generator state rather than NumPy's Philox or PCG64
generators: measured on the 2-core machine for 124M float32 values in chunks of NOISE_CHUNK, one
thread, NumPy's ``standard_normal`` took 2.5-3 times as long as torch's ``normal_`` (1.1-1.3 s
against 0.43 s), and the noise is on every DP step's critical path. The layout written is checked
once per process against a seeded generator (:func:`_mt_template`); a layout that moved is an
error, never a weaker generator.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

# Noise is drawn into a reused buffer of this many elements per worker on the CPU: drawing into a
# fresh tensor the size of the parameter costs as much in page faults as the draw itself (measured:
# 0.76 s vs 0.49 s for 124M values). It is also the unit of the parallel streams: changing it
# changes the noise values.
NOISE_CHUNK = 1 << 18
CUDA_STREAM = 0xC0DA  # the spawn-key word of a key's per-device CUDA generators (CPU chunks use (i, c))

# torch's CPU generator state (a ByteTensor of 5,056 bytes in torch 2.x): the legacy TH layout
# {uint64 initial_seed; int left; int seeded; uint64 next; uint64 state[624]; ...}. Checked once per
# process against a seeded generator (:func:`_mt_template`): a layout that moved is an error, never
# a silently weaker generator.
_MT_WORDS = 624
_MT_OFFSET = 24

_local = threading.local()
_pool_lock = threading.Lock()
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, pool)
_template: np.ndarray | None = None


def _chunks(n: int, chunk: int = NOISE_CHUNK):
    """(chunk index, start, stop) slices of ``range(n)`` of ``chunk`` values (the last one shorter)."""
    for c, a in enumerate(range(0, n, chunk)):
        yield c, a, min(n, a + chunk)


def _mt_template() -> np.ndarray:
    """A CPU generator state to overwrite, after checking where its MT19937 words live."""
    global _template
    if _template is None:
        probe = torch.Generator().manual_seed(20240607)
        state = probe.get_state().numpy().copy()
        words = state[_MT_OFFSET: _MT_OFFSET + 8 * _MT_WORDS].view(np.uint64)
        fresh = torch.Generator().get_state().numpy().copy()
        fresh[_MT_OFFSET: _MT_OFFSET + 8 * _MT_WORDS] = words.view(np.uint8)
        fresh[8:24] = state[8:24]  # left, seeded, next
        g = torch.Generator()
        g.set_state(torch.from_numpy(fresh))
        want = torch.randn(64, generator=probe)
        if (int(words[0]) != 20240607 or int(words.max()) >= 2**32
                or not torch.equal(torch.randn(64, generator=g), want)):
            raise RuntimeError(
                f"torch {torch.__version__} stores its CPU generator state in an unexpected layout; "
                "privtune.dp.noise cannot seed its noise streams. Refusing to draw noise.")
        _template = fresh
    return _template


def _stream(key: np.random.SeedSequence, i: int, c: int) -> torch.Generator:
    """The generator of chunk ``c`` of parameter ``i``: MT19937 with its whole state from the key's child."""
    state = _mt_template().copy()
    child = np.random.SeedSequence(key.entropy, spawn_key=(*key.spawn_key, i, c))
    words = child.generate_state(_MT_WORDS, np.uint32)
    if not words.any():  # the one state MT19937 cannot leave (numpy guards its own seeding so too)
        words[0] = 0x80000000
    state[_MT_OFFSET: _MT_OFFSET + 8 * _MT_WORDS] = words.astype(np.uint64).view(np.uint8)
    g = torch.Generator()
    g.set_state(torch.from_numpy(state))
    return g


def _buffer() -> torch.Tensor:
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = torch.empty(NOISE_CHUNK, dtype=torch.float32)
    return buf


def _executor(workers: int) -> ThreadPoolExecutor:
    """A pool kept between calls (new after a fork: a forked child has none of its threads)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid() or _pool[1] != workers:
            if _pool is not None and _pool[0] == os.getpid():
                _pool[2].shutdown(wait=False)
            _pool = (os.getpid(), workers, ThreadPoolExecutor(workers, thread_name_prefix="privtune-noise"))
        return _pool[2]


def _fill(task) -> float:
    """Draw one chunk, put ``std ·`` it into its slice, divide the slice by the expected batch size,
    and return the chunk's sum of squares (unscaled).

    A float32 CPU gradient is updated through numpy (one thread per chunk: torch's elementwise
    kernels would start an OpenMP team from every worker), while the slice is in cache: the
    division costs no second pass over the gradient."""
    key, i, c, dst, a, b, std, div = task
    z = _buffer()[: b - a].normal_(generator=_stream(key, i, c))
    zn = z.numpy()
    sq = float(np.einsum("i,i->", zn, zn))
    if isinstance(dst, np.ndarray):  # a float32 CPU gradient: in place
        zn *= np.float32(std)
        seg = dst[a:b]
        seg += zn
        np.divide(seg, np.float32(div), out=seg)
    elif std is None:  # a CPU staging tensor for a gradient on another device: copied, scaled there
        dst[a:b].copy_(z)
    else:  # a CPU gradient of another dtype
        dst[a:b].add_((z * std).to(dst.dtype)).div_(div)
    return sq


def _call_key(generator: torch.Generator | None) -> np.random.SeedSequence:
    """128 bits from the caller's generator and its 64-bit initial seed: this call's streams' key."""
    draw = torch.randint(-2**63, 2**63 - 1, (2,), dtype=torch.int64, generator=generator)
    seed = generator.initial_seed() if generator is not None else torch.initial_seed()
    return np.random.SeedSequence([seed % 2**64, *(int(v) % 2**64 for v in draw)])


def cuda_seed(key: np.random.SeedSequence, stream: int) -> int:
    """The 64-bit seed of the generator of the ``stream``-th GPU a call meets (in the order of the
    parameters), not of the GPU's index: each rank of a data-parallel run holds its replica on its
    own ``cuda:rank`` and must add the same noise to the same all-reduced sum (one sample, as the
    accountant assumes), while parameters on different GPUs of one process get independent streams."""
    child = np.random.SeedSequence(key.entropy, spawn_key=(*key.spawn_key, CUDA_STREAM, stream))
    return int(child.generate_state(1, np.uint64)[0])


def standard_normal(numel: int, key: np.random.SeedSequence, index: int = 0) -> torch.Tensor:
    """``numel`` float32 N(0, 1) values on the CPU from the key's streams for parameter ``index``
    (the values :func:`privatize_` would add there, unscaled)."""
    _mt_template()
    out = torch.empty(numel, dtype=torch.float32)
    for c, a, b in _chunks(numel):
        out[a:b].normal_(generator=_stream(key, index, c))
    return out


def privatize_(params, noise_multiplier: float, clip_norm: float, expected_batch_size: float,
               generator: torch.Generator | None = None, *, key: np.random.SeedSequence | None = None) -> float:
    """In place: ``p.grad ← (p.grad + N(0, σ²C²)) / expected_batch_size``.

    ``p.grad`` must hold the *sum* of clipped per-example gradients (a missing
    gradient counts as zero: a parameter untouched by the batch still gets
    noise). Returns the norm of the noise added divided by ``expected_batch_size``
    (for the run's diagnostics). The noise is drawn in float32 on the generator's
    device: on the CPU from keyed parallel streams (module docstring), on a GPU
    one ``normal_`` per parameter from the generator itself. ``key`` (a
    :class:`numpy.random.SeedSequence`, :func:`privtune.dp.rng.noise_key`) replaces the
    generator: the call's noise is then a function of the key alone.
    """
    if key is not None and generator is not None:
        raise ValueError("privatize_ takes a generator or a key, not both")
    params = list(params)
    std = noise_multiplier * clip_norm
    sq: dict[torch.device, torch.Tensor] = {}  # per device, summed once at the end (one sync on a GPU)
    tasks, staged, divided = [], [], set()
    cuda_gens: dict[torch.device, torch.Generator] = {}
    call_key = key
    for i, p in enumerate(params):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        elif not p.grad.is_contiguous():
            p.grad = p.grad.contiguous()
        if std <= 0:
            continue
        dev = generator.device if generator is not None else p.device
        flat = p.grad.view(-1)
        if dev.type != "cpu":  # a caching allocator: no page faults to avoid, and one kernel per parameter
            gen = generator
            if key is not None:  # CUDA's Philox takes a 64-bit seed: the key's own child for each device
                if dev not in cuda_gens:
                    cuda_gens[dev] = torch.Generator(device=dev).manual_seed(cuda_seed(key, len(cuda_gens)))
                gen = cuda_gens[dev]
            z = torch.empty(flat.numel(), dtype=torch.float32, device=dev).normal_(generator=gen).mul_(std)
            sq[z.device] = sq.get(z.device, 0) + torch.dot(z, z).double()
            flat.add_(z.to(device=p.device, dtype=p.grad.dtype))
            continue
        _mt_template()  # checked once per process, here rather than in a worker
        if call_key is None:
            call_key = _call_key(generator)
        if flat.device.type == "cpu":  # divided by the workers, chunk by chunk
            dst, scale = (flat.detach().numpy(), std) if flat.dtype == torch.float32 else (flat, std)
            divided.add(i)
        else:  # a CPU generator for a GPU parameter: draw on the CPU, move once
            dst, scale = torch.empty(flat.numel(), dtype=torch.float32), None
            staged.append((flat, dst))
        tasks += [(call_key, i, c, dst, a, b, scale, expected_batch_size) for c, a, b in _chunks(flat.numel())]
    cpu_sq = 0.0
    if tasks:
        workers = max(1, min(torch.get_num_threads(), len(tasks)))
        parts = map(_fill, tasks) if workers == 1 else _executor(workers).map(_fill, tasks)
        cpu_sq = sum(parts) * std * std  # in chunk order whatever the number of workers
    for flat, noise in staged:
        flat.add_(noise.to(device=flat.device).mul_(std).to(flat.dtype))
    for i, p in enumerate(params):
        if i not in divided:
            p.grad.div_(expected_batch_size)
    return (cpu_sq + sum(float(v) for v in sq.values())) ** 0.5 / expected_batch_size
