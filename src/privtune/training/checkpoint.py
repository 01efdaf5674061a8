"""Training checkpoints: a killed run resumes where it stopped and ends exactly as an
uninterrupted run with the same seed would.

A checkpoint is one file, ``{run_dir}/checkpoint/state.pt``, written atomically, that
holds everything the rest of the run depends on: model and optimizer state, the
learning-rate schedule, the stateful random number generators (dropout, CT_F's masks), the
secret root that the noise and the Poisson batches are pure functions of (with the step:
:mod:`privtune.dp.rng`), the next step, the training log so far and the run's noise
multiplier. A small ``state.json`` beside it (step, pid, fingerprint, and whether the state
holds a secure_rng run's secret root) lets a person or a test see progress without loading it.

The checkpoint folder is not a Snakemake output, so it survives a failed job; the
run deletes it once its outputs are written. A checkpoint is only resumed when its
*fingerprint* matches the run: a hash of the run's settings and of its inputs
(training file, model weights, Child-Tuning mask). Anything else — another config,
a re-prepared model, an unreadable file — starts the run from scratch, with a
message saying why: resuming is an optimisation, never a source of a wrong result.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from privtune.io import read_json, torch_save, write_json

STATE, INFO = "state.pt", "state.json"
FORMAT = 2  # in the fingerprint: a checkpoint of another layout (another set of random streams) is not resumed
_UNHASHED_SETTINGS = ("threads", "checkpoint_every", "checkpoint_minutes")  # don't change the result


def _file_digest(path: Path, h) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def fingerprint(settings: dict, train_file: Path, model_dir: Path, mask_file: Path | None) -> str:
    """Hash of what determines a run's result: settings and input files.

    Model weights are identified by their provenance record and each weight file's
    size and modification time (hashing gigabytes at every start would be slow), so
    a re-prepared model never resumes an old checkpoint.
    """
    h = hashlib.sha256(f"checkpoint format {FORMAT}".encode())
    h.update(json.dumps({k: v for k, v in settings.items() if k not in _UNHASHED_SETTINGS},
                        sort_keys=True, default=str).encode())
    _file_digest(Path(train_file), h)
    if mask_file is not None:
        _file_digest(Path(mask_file), h)
    for f in sorted(Path(model_dir).iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def rng_state(generator: torch.Generator) -> dict:
    """Every stateful generator a run draws from (the global ones, for dropout, and ``generator``: CT_F's masks;
    the noise and the batches are functions of the secret root and the step); on a GPU only the current
    device's (a data-parallel rank touching the others would open a CUDA context on each)."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "generator": generator.get_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    generator.set_state(state["generator"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = state["cuda"]
        torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, (list, tuple)) else cuda)  # older: one per device


def save(folder: Path, state: dict, fp: str, secret: bool = False) -> None:
    """Write ``state`` (with ``state["step"]`` the next step to run) atomically. ``secret``: the state holds a
    secure_rng run's secret root, which ``state.json`` then says (readable without loading the state)."""
    folder = Path(folder)
    torch_save({**state, "fingerprint": fp}, folder / STATE)
    if secret:  # readable by its owner alone
        os.chmod(folder / STATE, 0o600)
    write_json(folder / INFO, {"step": state["step"], "pid": os.getpid(), "fingerprint": fp,
                               **({"secret": f"{STATE} holds the secret root of this secure_rng run's noise and "
                                             "batches: resume the run to finish it, or delete this folder"}
                                  if secret else {})})


def load(folder: Path, fp: str, log=print) -> dict | None:
    """The checkpoint in ``folder`` if it belongs to this run, else ``None`` (saying why)."""
    path = Path(folder) / STATE
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint means: start again
        log(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); starting this run from step 0")
        return None
    if state.get("fingerprint") != fp:
        log(f"checkpoint {path} belongs to other settings or inputs; starting this run from step 0")
        return None
    return state


def info(folder: Path) -> dict | None:
    path = Path(folder) / INFO
    return read_json(path) if path.exists() else None


def clear(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
