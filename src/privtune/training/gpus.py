"""Which GPUs a job uses when Snakemake runs several on one machine.

Snakemake's ``--resources gpu=N`` bounds how many GPUs are busy at once but does not
say *which* a job gets. :func:`claim` locks ``n`` free GPUs for the calling process
(an exclusive ``flock`` per GPU, released when the process ends, even if it is
killed) and restricts ``CUDA_VISIBLE_DEVICES`` to them, so two concurrent jobs never
share a device. Under SLURM the scheduler has already set ``CUDA_VISIBLE_DEVICES``
to the job's own GPUs, and nothing is locked. Call it before CUDA is initialised.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

_HELD: list = []  # open lock files: kept for the life of the process


def visible_gpus() -> list[str]:
    """GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else those ``nvidia-smi -L`` lists."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def claim(n: int, devices: list[str] | None = None, lock_dir: str | Path | None = None,
          timeout_s: float = 3600.0, poll_s: float = 2.0) -> list[str]:
    """Lock ``n`` of ``devices`` (default: :func:`visible_gpus`) and make only them visible.

    Returns the ids claimed (``[]`` when ``n`` is 0, under SLURM, or without GPUs). Waits for
    a GPU to be freed up to ``timeout_s``, then raises naming the lock folder.
    """
    if n <= 0 or os.environ.get("SLURM_JOB_ID"):
        return []
    devices = visible_gpus() if devices is None else devices
    if not devices:
        return []
    if n > len(devices):
        raise RuntimeError(f"this job asks for {n} GPUs (config gpu × train.world_size) but only "
                           f"{len(devices)} are visible ({','.join(devices)})")
    lock_dir = Path(lock_dir or os.environ.get("PRIVTUNE_GPU_LOCK_DIR") or Path(tempfile.gettempdir()) / "privtune-gpus")
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    while True:
        got = []
        for d in devices:
            f = open(lock_dir / f"gpu-{d}.lock", "w")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            got.append((d, f))
            if len(got) == n:
                break
        if len(got) == n:
            _HELD.extend(f for _, f in got)
            ids = [d for d, _ in got]
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
            return ids
        for _, f in got:
            f.close()  # releases the lock: do not hold part of a claim while waiting
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {n} free GPU(s) among {devices} within {timeout_s:.0f} s "
                               f"(locks in {lock_dir}); is another job holding them?")
        time.sleep(poll_s)
