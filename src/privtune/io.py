"""Small I/O helpers. Every output is written atomically: to a temporary name in the
same folder, then renamed, so a failed or killed job leaves either the previous file
or none, never a partial one that Snakemake would take as finished."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary file path beside ``path`` (same suffix); on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (an old one is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def output_file(example: str):
    """An argparse ``type`` for a file a command writes when its work is done: an existing folder is refused
    when the arguments are read, not after the work (the rename into it would fail and lose the work).
    ``example``: a file name the error suggests inside that folder."""
    import argparse

    def parse(value: str) -> Path:
        path = Path(value)
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{value} is a folder; give the file to write, e.g. {path / example}")
        return path

    return parse


def write_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_figure(fig, path: str | Path, **kwargs) -> None:
    """``fig.savefig`` through a temporary file (the format follows ``path``'s suffix)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **kwargs)


def torch_save(obj, path: str | Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def read_json(path: str | Path):
    with open(path) as f:
        return json.load(f)


def write_jsonl(path: str | Path, records) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def log_to(snakemake) -> None:
    """In a rule script: send stdout/stderr (tqdm progress included) to the rule's log file."""
    import sys

    if snakemake.log:
        f = open(snakemake.log[0], "w", buffering=1)
        sys.stdout.flush()
        sys.stderr.flush()
        # at the descriptor level too, so that processes the job starts (data-parallel ranks) log there
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        sys.stdout = sys.stderr = f


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
