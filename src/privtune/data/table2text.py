"""The table-to-text readers: E2E's CSV (rows sharing a meaning representation grouped into one record)
and DART's JSON and XML (one record per entry), with the linearisations of Li & Liang and
private-transformers. Each returns ``{"source": str, "references": [str, ...]}`` records; a row that
cannot be parsed is a :class:`~privtune.data.download.MalformedDataError` naming the file and line.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from privtune.data.download import MalformedDataError
from privtune.data.hf import read_document, read_json_records, read_table


# --------------------------------------------------------------------------- E2E

# Key names as in the prefix-tuning (Li & Liang) E2E files; other keys: camelCase -> lower-case words.
_E2E_KEYS = {"eatType": "Type", "priceRange": "price", "familyFriendly": "family friendly"}
_MR_ITEM = re.compile(r"\s*([^\[\],]+?)\s*\[([^\[\]]*)\]\s*(?:,|$)")


def _e2e_key(key: str) -> str:
    return _E2E_KEYS.get(key, re.sub(r"(?<=[a-z])(?=[A-Z])", " ", key).lower())


def _e2e_value(value: str) -> str:
    """Space-separate '£' and '-' as the Li & Liang data does: '£20-25' -> '£ 20 - 25'."""
    return " ".join(re.sub(r"([£\-])", r" \1 ", value).split())


def _parse_mr(mr: str) -> list[tuple[str, str]]:
    """``name[X], area[Y]`` -> [("name", "X"), ("area", "Y")]; ValueError if not of that form."""
    items, pos, text = [], 0, mr.strip()
    while pos < len(text):
        match = _MR_ITEM.match(text, pos)
        if match is None or match.end() == pos:
            raise ValueError(f"cannot parse meaning representation {mr!r} at character {pos}")
        items.append((match.group(1), match.group(2)))
        pos = match.end()
    if not items:
        raise ValueError("empty meaning representation")
    return items


def linearize_e2e_mr(mr: str) -> str:
    """E2E MR -> prefix-tuning source: ``name[Alimentum], familyFriendly[no]`` ->
    ``name : Alimentum | family friendly : no``."""
    return " | ".join(f"{_e2e_key(key)} : {_e2e_value(value)}" for key, value in _parse_mr(mr))


def read_e2e_csv(path: Path) -> list[dict[str, Any]]:
    """Group the ``mr,ref`` rows (read through ``datasets``) by MR, in file order of first appearance;
    references kept raw."""
    table = read_table(path, delimiter=",")
    if not table.columns:
        return []
    if [h.lower() for h in table.columns] != ["mr", "ref"]:
        raise MalformedDataError(path, f"expected header 'mr,ref', got {list(table.columns)}", 1)
    mrs, refs = table.columns.values()
    groups: dict[str, dict[str, Any]] = {}
    for i, (mr, ref) in enumerate(zip(mrs, refs)):
        if mr not in groups:
            try:
                groups[mr] = {"source": linearize_e2e_mr(mr), "references": []}
            except ValueError as err:
                raise MalformedDataError(path, str(err), table.line_of(i)) from None
        groups[mr]["references"].append(ref)
    return list(groups.values())


# --------------------------------------------------------------------------- DART


def linearize_dart_triples(triples: Sequence[Sequence[str]]) -> str:
    """``[[s, p, o], ...]`` -> ``s : p : o | ...`` with the predicate lower-cased (Li & Liang)."""
    return " | ".join(f"{s} : {p.lower()} : {o}" for s, p, o in triples)


def _dart_record(triples: list[list[str]], texts: Sequence[str | None]) -> dict[str, Any] | None:
    """Record of one DART entry; references stripped, empty ones dropped; None if no reference."""
    references = [t.strip() for t in texts if t and t.strip()]
    if not references:
        return None
    return {"source": linearize_dart_triples(triples), "references": references}


def read_dart(path: Path) -> list[dict[str, Any]]:
    return _read_dart_xml(path) if path.suffix == ".xml" else _read_dart_json(path)


def _read_dart_json(path: Path) -> list[dict[str, Any]]:
    """DART json (through ``datasets``): a list of {"tripleset": [[s, p, o], ...], "annotations": [{"text": ...}]}."""
    entries = read_json_records(path)
    records = []
    for i, entry in enumerate(entries):
        try:
            triples = [_checked_triple(t) for t in entry["tripleset"]]
            texts = [a["text"] for a in entry["annotations"]]
        except (KeyError, TypeError, ValueError) as err:
            raise MalformedDataError(path, f"entry {i}: bad tripleset/annotations ({err!r})") from None
        record = _dart_record(triples, texts)
        if record is not None:
            records.append(record)
    return records


def _checked_triple(triple: Any) -> list[str]:
    if not (isinstance(triple, (list, tuple)) and len(triple) == 3 and all(isinstance(x, str) for x in triple)):
        raise ValueError(f"triple {triple!r} is not 3 strings")
    return list(triple)


def _read_dart_xml(path: Path) -> list[dict[str, Any]]:
    """DART / WebNLG xml (its text through ``datasets``): <entry><modifiedtripleset><mtriple>s | p | o</mtriple>...<lex>text</lex>."""
    try:
        root = ET.fromstring(read_document(path))
    except ET.ParseError as err:
        raise MalformedDataError(path, f"invalid XML ({err}; truncated?)", err.position[0]) from None
    records = []
    for entry in root.iter("entry"):
        triples = []
        for mtriple in entry.iter("mtriple"):
            parts = (mtriple.text or "").split(" | ")
            if len(parts) != 3:
                problem = f"entry {entry.get('eid')}: mtriple {mtriple.text!r} is not 's | p | o'"
                raise MalformedDataError(path, problem)
            triples.append(parts)
        record = _dart_record(triples, [lex.text for lex in entry.findall("lex")])
        if record is not None:
            records.append(record)
    return records
