"""A user's own dataset (``user_tasks:`` in the config), read through Hugging Face ``datasets``.

Local files (offline) are loaded with the packaged builders, by extension: ``.csv``, ``.tsv`` (CSV with
tabs), ``.json`` / ``.jsonl`` (JSON lines, or a JSON array) and ``.parquet``; a Hub dataset (with
internet) by its id, config and revision. Rows become the records every other stage reads:

* classification / regression: ``{"text_a", "text_b" (None for one text column), "label"}``; a class
  label may be written as its name (``labels:``) or as its id; an empty label is ``None`` (unlabelled);
* table-to-text: ``{"source", "references"}``, rows sharing a source grouped, in first-seen order.

Errors name the config key, the file and the row (the n-th record, header not counted).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from privtune.data.download import MalformedDataError
from privtune.tasks import Task

BUILDERS = {".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"}), ".json": ("json", {}),
            ".jsonl": ("json", {}), ".parquet": ("parquet", {})}


def _where(task: Task, split: str) -> str:
    return f"user_tasks.{task.name}.{'files' if task.source.get('files') else 'hub.splits'}.{split}"


def load_split(task: Task, split: str):
    """The ``datasets.Dataset`` of one split of a user task."""
    from datasets import load_dataset

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
        return load_dataset(builder, data_files={split: str(path.resolve())}, split=split, **kw), str(path)
    hub = src["hub"]
    ds = load_dataset(hub["id"], hub.get("config"), revision=hub.get("revision"), split=splits[split])
    return ds, f"{hub['id']}@{hub.get('revision') or 'main'}:{splits[split]}"


def _label(task: Task, value: Any, origin: str, row: int):
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if task.kind == "regression":
        try:
            return float(value)
        except (TypeError, ValueError):
            raise MalformedDataError(origin, f"row {row}: label {value!r} is not a number") from None
    text = str(value).strip()
    if text in task.labels:
        return task.labels.index(text)
    try:
        i = int(text)
    except ValueError:
        i = -1
    if 0 <= i < len(task.labels) and str(i) == text:
        return i
    raise MalformedDataError(origin, f"row {row}: label {value!r} is neither one of user_tasks.{task.name}.labels "
                                     f"{list(task.labels)} nor a label id in [0, {len(task.labels)})")


def read_user_split(task: Task, split: str) -> list[dict[str, Any]]:
    """The records of one split of a user task (see the module docstring); a missing column or an unreadable
    label is an error naming it."""
    ds, origin = load_split(task, split)
    text, label = list(task.source["text"]), task.source["label"]
    missing = [c for c in [*text, label] if c not in ds.column_names]
    if missing:
        raise ValueError(f"{origin}: no column {missing} (user_tasks.{task.name}.text / label); its columns are "
                         f"{ds.column_names}")
    cols = ds.select_columns(list(dict.fromkeys([*text, label]))).to_dict()
    n = len(cols[label])
    if task.kind == "table2text":
        groups: dict[str, list[str]] = {}
        for i in range(n):
            source, ref = cols[text[0]][i], cols[label][i]
            if source is None or not str(source).strip():
                raise MalformedDataError(origin, f"row {i + 1}: empty {text[0]!r}")
            refs = groups.setdefault(str(source), [])
            if ref is not None and str(ref).strip():
                refs.append(str(ref))
        return [{"source": s, "references": refs} for s, refs in groups.items()]
    out = []
    for i in range(n):
        a = cols[text[0]][i]
        if a is None:
            raise MalformedDataError(origin, f"row {i + 1}: empty {text[0]!r}")
        out.append({"text_a": str(a), "text_b": None if len(text) == 1 else str(cols[text[1]][i] or ""),
                    "label": _label(task, cols[label][i], origin, i + 1)})
    return out
