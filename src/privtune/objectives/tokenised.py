"""Encoded examples of a records file through ``datasets.Dataset.map``, cached beside the file.

Training and evaluation encode a prepared JSONL file with their objective (:meth:`Objective.encode`). Here
that is a batched ``Dataset.map`` whose Arrow output is kept in ``.tokenised/`` next to the records file,
named by a key of everything the encoding reads: the file's bytes, the objective (kind, task, name, labels,
prompt, family) and the task's definition, ``max_length``, the tokenizer (datasets' own fingerprint of it)
and the source of the encoding code. A rerun, or another seed or method on the same data, model and
objective, reads the cache instead of tokenising again; a change to any of those inputs makes a new key.
The cache holds token ids of the records file beside it (the same data, already on disk there), and is
removed with that folder.

The records themselves stay Python objects (the map runs over row indices), so a cached example equals
a freshly encoded one field for field (tested).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import typing
from pathlib import Path

from privtune.io import file_sha256, read_jsonl

FORMAT = 1
CACHE_DIR = ".tokenised"
_TYPE = "__encoded_type__"


def _code_version() -> str:
    """A hash of the encoding code (the objectives package and the task definitions)."""
    import privtune.tasks as tasks_module

    here = Path(__file__).parent
    files = sorted(here.glob("*.py")) + [Path(tasks_module.__file__)]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def cache_key(obj, tokenizer, records_file: Path, max_length: int) -> str:
    from datasets.fingerprint import Hasher

    from privtune.tasks import task as task_info

    definition = repr(task_info(obj.task)) if obj.task else ""
    parts = [FORMAT, file_sha256(Path(records_file)), obj.kind, obj.task, obj.name, obj.num_labels,
             repr(sorted(obj.prompt.items())), obj.family, definition, max_length, Hasher.hash(tokenizer),
             _code_version()]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]


def _tuple_fields(cls) -> set[str]:
    hints = typing.get_type_hints(cls)
    return {f.name for f in dataclasses.fields(cls) if typing.get_origin(hints[f.name]) is tuple}


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value


def _rebuild(rows: dict) -> list:
    """The encoded dataclasses back from the cached columns (lists that were tuples made tuples again)."""
    names = rows.pop(_TYPE)
    if not names:
        return []
    module, _, qualname = names[0].rpartition(":")
    cls = getattr(importlib.import_module(module), qualname)
    tuples = _tuple_fields(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    return [cls(**{k: _as_tuple(rows[k][i]) if k in tuples else rows[k][i] for k in fields})
            for i in range(len(names))]


def encode_file(obj, tokenizer, records_file: Path, max_length: int, cache: bool = True) -> list:
    """``obj.encode`` of the records in ``records_file``, through a cached ``Dataset.map`` (``cache=False``:
    encoded in memory, nothing written)."""
    records = read_jsonl(records_file)
    if not cache or not records:
        return obj.encode(tokenizer, records, max_length)
    from datasets import Dataset

    from privtune.data.hf import quiet_progress

    path = Path(records_file).parent / CACHE_DIR / f"{Path(records_file).stem}-{cache_key(obj, tokenizer, records_file, max_length)}.arrow"
    path.parent.mkdir(parents=True, exist_ok=True)

    def encode_batch(batch: dict) -> dict:
        encoded = obj.encode(tokenizer, [records[i] for i in batch["row"]], max_length)  # never empty
        cls = type(encoded[0])
        columns = {f.name: [getattr(e, f.name) for e in encoded] for f in dataclasses.fields(cls)}
        return {_TYPE: [f"{cls.__module__}:{cls.__qualname__}"] * len(encoded), **columns}

    with quiet_progress():
        ds = Dataset.from_dict({"row": list(range(len(records)))}).map(
            encode_batch, batched=True, batch_size=1000, remove_columns=["row"], cache_file_name=str(path),
            load_from_cache_file=True, desc=f"encoding {Path(records_file).name}")
        return _rebuild(ds.to_dict())
