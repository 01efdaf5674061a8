"""The papers' data files read through Hugging Face ``datasets``' packaged builders (``csv``, ``json``,
``text``), from the mirror layout or as downloaded from their official sources into it; a user's own files
go through the same builders in :mod:`privtune.data.user`.

Each load converts in a temporary cache that is deleted when the rows have been read, so that no copy of a
(possibly private) training set is left in the Hugging Face cache and a changed file is never answered
from a stale one. Text tables are read with every cell as text (``007`` stays ``007``, ``NA`` stays
``NA``). A row with more fields than the header is an error naming the file and line (pandas' parser
finds it); in tab-separated files without quoting (GLUE's), a row with fewer fields is one too.
"""
from __future__ import annotations

import csv
import json
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from privtune.data.download import MalformedDataError


@contextmanager
def quiet_progress() -> Iterator[None]:
    """datasets' per-file progress bars off (a rule's log keeps the pipeline's own), and back as they were."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_on = not are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            enable_progress_bars()


def _cause(err: BaseException, kind: type) -> BaseException | None:
    """The first exception of ``kind`` in ``err``'s chain (datasets wraps the parser's own error)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


@dataclass(frozen=True)
class Table:
    """The columns of a text table (every cell a string) and where each row starts in its file."""

    columns: dict[str, list[str]]
    line_of: Callable[[int], int]  # 0-based row -> 1-based line of the file

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), []))


def header(path: Path, delimiter: str, quoting: int = csv.QUOTE_MINIMAL) -> list[str]:
    """The first row of a text table (a leading BOM ignored); [] for an empty file."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        return next(csv.reader(f, delimiter=delimiter, quoting=quoting), [])


def _row_lines(path: Path, delimiter: str, quoting: int, skip: int) -> list[int]:
    """The 1-based line on which each non-blank row after the first ``skip`` starts (quoted fields may span
    lines); read only to name the line of an error."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader, starts, line = csv.reader(f, delimiter=delimiter, quoting=quoting), [], 1
        for fields in reader:
            if fields:
                starts.append(line)
            line = reader.line_num + 1
    return starts[skip:]


def _check_unquoted_field_counts(path: Path, n_fields: int, skip: int) -> None:
    """In a tab-separated file without quoting, every non-blank line is one row: each must have
    ``n_fields`` fields (pandas would fill a short row with empty cells)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        for line, text in enumerate(f, start=1):
            text = text.rstrip("\r\n")
            if line > skip and text and (got := text.count("\t") + 1) != n_fields:
                raise MalformedDataError(path, f"expected {n_fields} tab-separated fields, got {got}", line)


def read_table(path: Path, *, delimiter: str = ",", quoting: int = csv.QUOTE_MINIMAL,
               names: list[str] | None = None) -> Table:
    """A CSV/TSV file through ``load_dataset("csv")``: the header row names the columns unless ``names`` (a
    headerless file) is given. Every cell is text; blank lines are skipped."""
    from datasets import Features, Value, load_dataset
    from pandas.errors import ParserError

    columns = list(names) if names is not None else [c.strip() for c in header(path, delimiter, quoting)]
    if not columns:
        return Table({}, lambda i: i + 1)
    if len(set(columns)) != len(columns):
        raise MalformedDataError(path, f"repeated column names in the header {columns}", 1)
    skip = 0 if names is not None else 1
    what = "tab-separated" if delimiter == "\t" else f"{delimiter!r}-separated"
    if quoting == csv.QUOTE_NONE and delimiter == "\t":
        _check_unquoted_field_counts(path, len(columns), skip)
    try:
        with tempfile.TemporaryDirectory(prefix="privtune-datasets-") as cache, quiet_progress():
            ds = load_dataset("csv", data_files={"rows": str(Path(path).resolve())}, split="rows", cache_dir=cache,
                              sep=delimiter, quoting=quoting, keep_default_na=False, encoding="utf-8-sig",
                              features=Features({c: Value("string") for c in columns}),
                              names=columns, header=None, skiprows=skip)
            cols = ds.to_dict()
    except Exception as err:
        if isinstance(err, ValueError) and "corresponds to no data" in str(err):
            return Table({c: [] for c in columns}, lambda i: i + 1 + skip)  # no rows: the caller decides
        parser = _cause(err, ParserError)
        found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(parser)) if parser else None
        if found:
            raise MalformedDataError(path, f"expected {found[1]} {what} fields, got {found[3]}",
                                     int(found[2])) from None
        if parser is not None:
            raise MalformedDataError(path, f"cannot parse the file ({str(parser).strip()})") from None
        raise
    cols = {c: ["" if v is None else v for v in cols[c]] for c in columns}

    def line_of(row: int) -> int:
        return _row_lines(path, delimiter, quoting, skip)[row]

    return Table(cols, line_of)


def read_json_records(path: Path) -> list:
    """A JSON array (or JSON lines) of objects through ``load_dataset("json")``; invalid JSON is an error
    naming the line where the parser stopped."""
    from datasets import load_dataset

    try:
        with tempfile.TemporaryDirectory(prefix="privtune-datasets-") as cache, quiet_progress():
            return load_dataset("json", data_files={"rows": str(Path(path).resolve())}, split="rows",
                                cache_dir=cache).to_list()
    except Exception:
        try:  # name the line: the standard parser says where it stopped
            with open(path, encoding="utf-8") as f:
                json.load(f)
        except json.JSONDecodeError as err:
            raise MalformedDataError(path, f"invalid JSON ({err.msg}; truncated?)", err.lineno) from None
        raise


def read_document(path: Path) -> str:
    """A whole file's text (an XML file, say) through ``load_dataset("text", sample_by="document")``. (The
    ``xml`` builder of datasets 5.2.0 cannot open a local file: it passes the file iterator as a path.)"""
    from datasets import load_dataset

    with tempfile.TemporaryDirectory(prefix="privtune-datasets-") as cache, quiet_progress():
        rows = load_dataset("text", data_files={"rows": str(Path(path).resolve())}, split="rows",
                            cache_dir=cache, sample_by="document", keep_linebreaks=True)["text"]
    return rows[0] if rows else ""
