"""Locate data files under ``data_dir`` and fetch missing ones from their official sources.

Every file the readers open is named by its path relative to ``data_dir``, in the
layout of the ``shared/data`` mirror (``glue/SST-2/train.tsv``, ``e2e/devset.csv``,
``dart/dart-v1.1.1-full-dev.json``, ``lmbff_k_shot/MNLI/16-42/train.tsv``, ...).
:data:`OFFICIAL_SOURCES` maps each such path to where it officially comes from:

* ``"https://.../X.zip#MEMBER"``: member ``MEMBER`` of the zip archive at that URL
  (the GLUE zips; e.g. ``SST-2.zip#SST-2/train.tsv``);
* ``"https://.../file"``: the file itself (E2E and DART raw GitHub files, MRPC SentEval files);
* anything else: a note on how the file is produced (derived MRPC splits, LM-BFF k-shot splits).

:func:`ensure_file` returns the path when the file is there; otherwise it downloads it
(urllib, 30 s timeout, atomic write via a temporary file and ``os.replace``) or raises
:class:`DataFileError` saying where it looked and how to get the file. Set the
environment variable ``PRIVTUNE_OFFLINE=1`` to never attempt a download.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

__all__ = [
    "DOWNLOAD_TIMEOUT_S",
    "OFFICIAL_SOURCES",
    "DataFileError",
    "data_file_error",
    "ensure_file",
    "source_for",
]

DOWNLOAD_TIMEOUT_S = 30

_GLUE = "https://dl.fbaipublicfiles.com/glue/data"
_SENTEVAL = "https://dl.fbaipublicfiles.com/senteval/senteval_data"
_E2E = "https://raw.githubusercontent.com/tuetschek/e2e-dataset/ab0d967dd5729ce455ef14ba9ffafc456a335264"
_DART = "https://raw.githubusercontent.com/Yale-LILY/dart/bb644b12ec1d0264f96a31145534b9a94f6ff5f5/data/v1.1.1"

_MRPC_NOTE = (
    "derived from the MSRP files as GLUE's download_glue_data.py (format_mrpc) does: "
    f"{_SENTEVAL}/msr_paraphrase_train.txt split by the dev pair ids in {_GLUE}/mrpc_dev_ids.tsv"
)
_K_SHOT_NOTE = (
    "LM-BFF k-shot split: generate with LM-BFF tools/generate_k_shot_data.py "
    "(princeton-nlp/LM-BFF; K=16, seeds 13 21 42 87 100) from the GLUE data, "
    "which writes data/k-shot/{TASK}/16-{seed}/"
)
_K_SHOT_SEEDS = (13, 21, 42, 87, 100)
_K_SHOT_FILES = {
    "SST-2": ("train.tsv", "dev.tsv", "test.tsv"),
    "CoLA": ("train.tsv", "dev.tsv", "test.tsv"),
    "MRPC": ("train.tsv", "dev.tsv", "test.tsv"),
    "QNLI": ("train.tsv", "dev.tsv", "test.tsv"),
    "RTE": ("train.tsv", "dev.tsv", "test.tsv"),
    "STS-B": ("train.tsv", "dev.tsv", "test.tsv"),
    "QQP": ("train.tsv", "dev.tsv", "test.tsv"),
    "MNLI": ("train.tsv", "dev_matched.tsv", "test_matched.tsv", "test_mismatched.tsv"),
}


def _glue(zip_name: str, member: str) -> str:
    return f"{_GLUE}/{zip_name}.zip#{member}"


OFFICIAL_SOURCES: dict[str, str] = {
    # GLUE (official zips; RTE.zip has the GLUE layout, the mirror an HF-datasets export: both are read).
    "glue/SST-2/train.tsv": _glue("SST-2", "SST-2/train.tsv"),
    "glue/SST-2/dev.tsv": _glue("SST-2", "SST-2/dev.tsv"),
    "glue/SST-2/test.tsv": _glue("SST-2", "SST-2/test.tsv"),
    # GLUE CoLA/{train,dev}.tsv are the raw in-domain files (same headerless 4-column layout).
    "glue/CoLA/raw/in_domain_train.tsv": _glue("CoLA", "CoLA/train.tsv"),
    "glue/CoLA/raw/in_domain_dev.tsv": _glue("CoLA", "CoLA/dev.tsv"),
    "glue/RTE/train.tsv": _glue("RTE", "RTE/train.tsv"),
    "glue/RTE/dev.tsv": _glue("RTE", "RTE/dev.tsv"),
    "glue/RTE/test.tsv": _glue("RTE", "RTE/test.tsv"),
    "glue/STS-B/train.tsv": _glue("STS-B", "STS-B/train.tsv"),
    "glue/STS-B/dev.tsv": _glue("STS-B", "STS-B/dev.tsv"),
    "glue/STS-B/test.tsv": _glue("STS-B", "STS-B/test.tsv"),
    "glue/QNLI/train.tsv": _glue("QNLIv2", "QNLI/train.tsv"),
    "glue/QNLI/dev.tsv": _glue("QNLIv2", "QNLI/dev.tsv"),
    "glue/MNLI/train.tsv": _glue("MNLI", "MNLI/train.tsv"),
    "glue/MNLI/dev_matched.tsv": _glue("MNLI", "MNLI/dev_matched.tsv"),
    "glue/MNLI/dev_mismatched.tsv": _glue("MNLI", "MNLI/dev_mismatched.tsv"),
    "glue/QQP/train.tsv": _glue("QQP-clean", "QQP/train.tsv"),
    "glue/QQP/dev.tsv": _glue("QQP-clean", "QQP/dev.tsv"),
    "glue/MRPC/train.tsv": _MRPC_NOTE,
    "glue/MRPC/dev.tsv": _MRPC_NOTE,
    "glue/MRPC/raw/msr_paraphrase_train.txt": f"{_SENTEVAL}/msr_paraphrase_train.txt",
    "glue/MRPC/raw/msr_paraphrase_test.txt": f"{_SENTEVAL}/msr_paraphrase_test.txt",
    # E2E NLG challenge (tuetschek/e2e-dataset).
    "e2e/trainset.csv": f"{_E2E}/trainset.csv",
    "e2e/devset.csv": f"{_E2E}/devset.csv",
    "e2e/testset_w_refs.csv": f"{_E2E}/testset_w_refs.csv",
    # DART v1.1.1 (Yale-LILY/dart).
    "dart/dart-v1.1.1-full-train.json": f"{_DART}/dart-v1.1.1-full-train.json",
    "dart/dart-v1.1.1-full-dev.json": f"{_DART}/dart-v1.1.1-full-dev.json",
    "dart/dart-v1.1.1-full-test.xml": f"{_DART}/dart-v1.1.1-full-test.xml",
    # LM-BFF 16-shot splits.
    **{
        f"lmbff_k_shot/{task}/16-{seed}/{name}": _K_SHOT_NOTE
        for task, names in _K_SHOT_FILES.items()
        for seed in _K_SHOT_SEEDS
        for name in names
    },
}


class MalformedDataError(ValueError):
    """A data file is present but a row/entry cannot be parsed.

    The message names the file, the 1-based line number (when known) and what is wrong.
    """

    def __init__(self, path: str | Path, problem: str, line: int | None = None) -> None:
        self.path, self.line, self.problem = Path(path), line, problem
        where = f"{path}, line {line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {problem}")


class DataFileError(FileNotFoundError):
    """A data file is missing, empty or truncated.

    The message names the file, the ``data_dir`` searched and how to get the file.
    """


def source_for(relpath: str) -> str | None:
    """Official source (URL, ``URL#zip-member`` or note) of ``relpath``, or None if unknown."""
    relpath = Path(relpath).as_posix()
    if relpath in OFFICIAL_SOURCES:
        return OFFICIAL_SOURCES[relpath]
    if relpath.startswith("lmbff_k_shot/"):
        return _K_SHOT_NOTE
    return None


def data_file_error(relpath: str, data_dir: str | Path, reason: str) -> DataFileError:
    """Build the :class:`DataFileError` for ``relpath`` with the standard how-to-get-it text."""
    path = Path(data_dir) / relpath
    source = source_for(relpath)
    if source is None:
        how = "no official source is recorded for this path"
    elif _is_url(source):
        url, _, member = source.partition("#")
        how = f"official source: {url}" + (f" (zip member {member})" if member else "")
    else:
        how = f"how to get it: {source}"
    return DataFileError(
        f"data file {path} {reason}.\n"
        f"  data_dir searched: {data_dir}\n"
        f"  {how}\n"
        f"  Place the file at {path}, or set data_dir in config.yaml / PRIVTUNE_DATA_DIR "
        "to a directory laid out like shared/data."
    )


def ensure_file(relpath: str, data_dir: str | Path) -> Path:
    """Return ``data_dir / relpath``, downloading it from its official source if missing.

    Raises :class:`DataFileError` when the file is absent (or empty) and cannot be
    downloaded: no URL known, downloads disabled (``PRIVTUNE_OFFLINE``), or any
    network / archive / file-system failure.
    """
    path = Path(data_dir) / relpath
    if _present(path):
        return path
    source = source_for(relpath)
    if source is None or not _is_url(source):
        raise data_file_error(relpath, data_dir, "is missing")
    if os.environ.get("PRIVTUNE_OFFLINE", "") not in ("", "0"):
        raise data_file_error(relpath, data_dir, "is missing (downloads disabled by PRIVTUNE_OFFLINE)")
    try:
        _download(source, path, data_dir)
    except (OSError, zipfile.BadZipFile, KeyError, ValueError) as err:
        raise data_file_error(relpath, data_dir, f"is missing and downloading it failed ({err})") from err
    if not _present(path):
        raise data_file_error(relpath, data_dir, "is missing (download produced no data)")
    return path


def _is_url(source: str) -> bool:
    return source.startswith(("https://", "http://", "file://"))


def _present(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _download(source: str, dest: Path, data_dir: str | Path) -> None:
    """Fetch ``source`` to ``dest``; for ``URL#member`` also fill missing siblings from the same zip."""
    url, _, member = source.partition("#")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fetch_to_temp(url, dest.parent)
    try:
        if not member:
            os.replace(tmp, dest)
            return
        with zipfile.ZipFile(tmp) as archive:
            _extract_atomic(archive, member, dest)
            for sib_relpath, sib_member in _zip_siblings(url, data_dir):
                if sib_member != member and sib_member in archive.namelist():
                    _extract_atomic(archive, sib_member, Path(data_dir) / sib_relpath)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fetch_to_temp(url: str, directory: Path) -> str:
    """Download ``url`` into a temporary file in ``directory``; return its path."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".download-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            shutil.copyfileobj(resp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def _extract_atomic(archive: zipfile.ZipFile, member: str, dest: Path) -> None:
    """Write zip ``member`` to ``dest`` via a temporary file and ``os.replace``."""
    if _present(dest):
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, archive.open(member) as src:
            shutil.copyfileobj(src, out)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _zip_siblings(url: str, data_dir: str | Path) -> list[tuple[str, str]]:
    """(relpath, member) of every missing file that comes from the same zip ``url``."""
    siblings = []
    for relpath, source in OFFICIAL_SOURCES.items():
        sib_url, _, member = source.partition("#")
        if sib_url == url and member and not _present(Path(data_dir) / relpath):
            siblings.append((relpath, member))
    return siblings
