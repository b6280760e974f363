"""Tab-separated tables shared by every stage, and the reversible form of file names.

File names from seized phones may contain tabs, newlines or bytes that are not UTF-8. Tables are
written with :mod:`csv` (which quotes such fields) and names that are not valid UTF-8 are stored
percent-encoded, flagged ``non_utf8_name``, so ``decode_path`` gives back the exact bytes.
The images a split or training table lists are read as :class:`Example` records here, without
torch, so the stages that only merge or report on them start quickly.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import quote, unquote_to_bytes

NON_UTF8_FLAG = "non_utf8_name"


def write_tsv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, object]]) -> int:
    """Write ``rows`` (dicts) with a header, whole or not at all; returns the number of rows written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with _replacing(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), delimiter="\t", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})
            count += 1
    return count


def write_atomically(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``path`` whole or not at all, as :func:`write_tsv` does (``durable``: fsync too)."""
    with _replacing(path, binary=True, durable=durable) as handle:
        handle.write(data)


@contextmanager
def _replacing(path: Path, binary: bool = False, durable: bool = True) -> Iterator[IO]:
    """A temporary file beside ``path``, renamed over it when the block ends.

    A kill leaves the old file or the new one, never a part: the rename is atomic. ``durable``
    also flushes the data and then the rename to disk, so a power cut cannot leave a renamed
    file whose data never reached the disk. An exception leaves the old file.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.partial")
    try:
        with open(
            temporary, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})
        ) as handle:
            yield handle
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    if not durable:
        return
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself, on disk
    finally:
        os.close(directory)


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


@dataclass(frozen=True)
class Example:
    path: Path
    sha256: str
    label: int
    width: int
    height: int
    name: str  # the path as written in the table, for messages and outputs
    flags: str = ""  # the table's flags (non_utf8_name tells how to decode ``name``)
    locator: str = ""  # inside an evidence container: its dfVFS locator (``path`` then only names it)


def image_location(row: Mapping[str, str], raw_data: Path) -> tuple[Path, str]:
    """Where a table row's image is: its file, and its locator when it lies inside a container.

    Rows from raw_data name a path under it; rows that joined from an examiner's review carry the
    root of their case's evidence (``root``) and, inside a container, the dfVFS locator.
    """
    root = Path(row["root"]) if row.get("root") else Path(raw_data)
    return root / decode_path(row["path"], row.get("flags", "")), row.get("locator", "") or ""


def examples_from_table(
    rows: Sequence[dict[str, str]], raw_data: Path, augment_dir: Path | None = None
) -> list[Example]:
    """Examples of a split table or of ``train_augmented.tsv`` (whose children live in augment_dir)."""
    examples = []
    for row in rows:
        if row.get("source") == "augment":
            if augment_dir is None:
                raise ValueError(f"{row['path']}: an augmented image but no augment folder was given")
            path = Path(augment_dir) / row["path"]
            locator = ""
        else:
            path, locator = image_location(row, raw_data)
        examples.append(
            Example(
                path,
                row["sha256"],
                int(row["label"]),
                int(row["width"]),
                int(row["height"]),
                row["path"],
                row.get("flags", ""),
                locator,
            )
        )
    return examples
