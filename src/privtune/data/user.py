"""A user's own dataset (``user_tasks:`` in the config), read through Hugging Face ``datasets``.

Local files (offline) are loaded with the packaged builders, by extension: ``.csv``, ``.tsv`` (CSV with
tabs), ``.json`` / ``.jsonl`` (JSON lines, or a JSON array) and ``.parquet``; a Hub dataset (with
internet) by its id, config and revision. Rows become the records every other stage reads:

* classification / regression: ``{"text_a", "text_b" (None for one text column), "label"}``; a class
  label column holds either the label names (``labels:``) or the label ids, one or the other throughout;
  every row needs a label (training and evaluation both read it);
* table-to-text: ``{"source", "references"}``, rows sharing a source grouped, in first-seen order; a
  source without any reference is left out (as the DART reader does), and the count is printed.

CSV and TSV cells are read as text (``007`` stays ``007``, ``NA`` stays ``NA``; an empty cell is empty).
Local files are converted in a temporary cache that is deleted after reading: no copy of a user's
(private) training data is left in the Hugging Face cache.

Errors name the config key, the file and the row (the n-th record, header not counted).
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from privtune.data.download import MalformedDataError
from privtune.data.hf import header
from privtune.tasks import Task

BUILDERS = {".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"}), ".json": ("json", {}),
            ".jsonl": ("json", {}), ".parquet": ("parquet", {})}


def _where(task: Task, split: str) -> str:
    return f"user_tasks.{task.name}.{'files' if task.source.get('files') else 'hub.splits'}.{split}"


def load_split(task: Task, split: str, cache_dir: str | None = None):
    """(the ``datasets.Dataset`` of one split of a user task, where it came from)."""
    from datasets import Features, Value, load_dataset

    src = task.source
    splits = src.get("files") or src["hub"].get("splits") or {}
    if split not in splits:
        raise ValueError(f"{_where(task, split)}: task {task.name} has no split {split!r} (it has {sorted(splits)}); "
                         f"datasets.{task.name}.train_split / eval_split must name one of them")
    if src.get("files"):
        path = Path(splits[split]).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{_where(task, split)}: {path} does not exist (a relative path is read from "
                                    f"the folder Snakemake runs in, {Path.cwd()})")
        if path.suffix.lower() not in BUILDERS:
            raise ValueError(f"{_where(task, split)}: {path.name} is not one of {sorted(BUILDERS)} (by extension)")
        builder, kw = BUILDERS[path.suffix.lower()]
        if builder == "csv":  # every cell as text: numbers and "NA" are not reinterpreted
            columns = header(path, kw.get("delimiter", ","))
            kw = {**kw, "keep_default_na": False, "features": Features({c: Value("string") for c in columns})}
        ds = load_dataset(builder, data_files={split: str(path.resolve())}, split=split, cache_dir=cache_dir, **kw)
        return ds, str(path)
    hub = src["hub"]
    ds = load_dataset(hub["id"], hub.get("config"), revision=hub.get("revision"), split=splits[split])
    return ds, f"{hub['id']}@{hub.get('revision') or 'main'}:{splits[split]}"


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and not value.strip())


def _as_id(value: Any) -> int | None:
    """A label id written as an integer, a whole float (1.0) or their text; None otherwise."""
    try:
        x = float(str(value).strip())
    except ValueError:
        return None
    return int(x) if math.isfinite(x) and x.is_integer() else None


def _labels(task: Task, values: list, origin: str) -> list:
    """The label column as class ids (classification: all names or all ids) or numbers (regression)."""
    for i, v in enumerate(values):
        if _missing(v):
            raise MalformedDataError(origin, f"row {i + 1}: no label in column {task.source['label']!r} (every "
                                             "row of a split that trains or evaluates needs one)")
    if task.kind == "regression":
        out = []
        for i, v in enumerate(values):
            try:
                x = float(v)
            except (TypeError, ValueError):
                x = math.nan
            if not math.isfinite(x):
                raise MalformedDataError(origin, f"row {i + 1}: label {v!r} is not a finite number")
            out.append(x)
        return out
    names = [str(v).strip() for v in values]
    if all(n in task.labels for n in names):
        return [task.labels.index(n) for n in names]
    ids = [_as_id(v) for v in values]
    is_id = [x is not None and 0 <= x < len(task.labels) for x in ids]
    if all(is_id):
        return ids
    # the first row that breaks the column's reading (names, unless most rows are ids)
    as_names = sum(n in task.labels for n in names) >= sum(is_id)
    bad = next(i for i, (n, ok) in enumerate(zip(names, is_id)) if (n not in task.labels if as_names else not ok))
    raise MalformedDataError(origin, f"row {bad + 1}: label {values[bad]!r} is not one of user_tasks.{task.name}."
                                     f"labels {list(task.labels)}, and the column is not all label ids in "
                                     f"[0, {len(task.labels)}) either (one or the other throughout)")


def _text(value: Any) -> str:
    return "" if _missing(value) else str(value)


def read_user_split(task: Task, split: str) -> list[dict[str, Any]]:
    """The records of one split of a user task (see the module docstring); a missing column or an unreadable
    label is an error naming it."""
    with tempfile.TemporaryDirectory(prefix="privtune-datasets-") as cache:
        ds, origin = load_split(task, split, cache_dir=cache if task.source.get("files") else None)
        text, label = list(task.source["text"]), task.source["label"]
        missing = [c for c in [*text, label] if c not in ds.column_names]
        if missing:
            raise ValueError(f"{origin}: no column {missing} (user_tasks.{task.name}.text / label); its columns "
                             f"are {ds.column_names}")
        cols = ds.select_columns(list(dict.fromkeys([*text, label]))).to_dict()
    n = len(cols[label])
    for i, a in enumerate(cols[text[0]]):
        if _missing(a):
            raise MalformedDataError(origin, f"row {i + 1}: empty {text[0]!r}")
    if task.kind == "table2text":
        groups: dict[str, list[str]] = {}
        for source, ref in zip(cols[text[0]], cols[label]):
            refs = groups.setdefault(str(source), [])
            if not _missing(ref):
                refs.append(str(ref))
        empty = [s for s, refs in groups.items() if not refs]
        if empty:
            print(f"{origin}: {len(empty)} table(s) without a reference left out", flush=True)
        return [{"source": s, "references": refs} for s, refs in groups.items() if refs]
    labels = _labels(task, cols[label], origin)
    return [{"text_a": str(cols[text[0]][i]), "text_b": None if len(text) == 1 else _text(cols[text[1]][i]),
             "label": labels[i]} for i in range(n)]
