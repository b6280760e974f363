"""Tab-separated tables shared by every stage, and the reversible form of file names.

File names from seized phones may contain tabs, newlines or bytes that are not UTF-8. Tables are
written with :mod:`csv` (which quotes such fields) and names that are not valid UTF-8 are stored
percent-encoded, flagged ``non_utf8_name``, so ``decode_path`` gives back the exact bytes.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

NON_UTF8_FLAG = "non_utf8_name"


def write_tsv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, object]]) -> int:
    """Write ``rows`` (dicts) with a header; returns the number of rows written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), delimiter="\t", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})
            count += 1
    return count


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def encode_path(relative: str) -> tuple[str, bool]:
    """Text form of a path for tables; returns (text, was_escaped).

    ``relative`` comes from ``os`` functions, where undecodable bytes are surrogate escapes.
    """
    try:
        relative.encode("utf-8")
        return relative, False
    except UnicodeEncodeError:
        return quote(os.fsencode(relative), safe="/"), True


def decode_path(text: str, flags: str = "") -> str:
    """Inverse of :func:`encode_path`: the ``os`` string that opens the file."""
    if NON_UTF8_FLAG in flags.split(","):
        return os.fsdecode(unquote_to_bytes(text))
    return text


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
