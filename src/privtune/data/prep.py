"""Data preparation: read a task's raw split, subsample with a fixed seed, write JSONL."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from privtune.data.readers import read_split
from privtune.io import write_jsonl


def subsample(records: list[dict], size: int | None, seed: int) -> list[dict]:
    """``size`` records drawn without replacement with ``seed``, in their original order."""
    if size is None or size >= len(records):
        return records
    keep = np.sort(np.random.default_rng(seed).choice(len(records), size=size, replace=False))
    return [records[i] for i in keep]


def prepare(task: str, split: str, data_dir: Path, out: Path, size: int | None, seed: int,
            k_shot_seed: int | None = None, verify_size: bool = True) -> int:
    kwargs = {"k_shot_seed": k_shot_seed} if k_shot_seed is not None else {}
    records = subsample(read_split(task, split, Path(data_dir), verify_size=verify_size, **kwargs), size, seed)
    if not records:
        raise ValueError(f"task {task} split {split} is empty after sampling (size={size})")
    write_jsonl(out, records)
    return len(records)
