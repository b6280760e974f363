"""Content-addressed store of predictions, so an image is never scored twice by the same model.

The key covers everything a prediction depends on: the sha256 of every file of the base model and
of the adapter, the prompt, the decoding and the class tokens. Each key has one append-only TSV
under the cache folder (``results/cache/predictions/`` in the workflow), keyed inside by image
sha256; appending after every batch lets an interrupted run go on where it stopped.

A kill or a power cut can leave the last row cut short, so every row is checked when the file is
read. Rows are appended whole (one ``write`` of complete lines) and flushed to disk (``fsync``)
after each batch, so only the last line can ever be torn: a last line without its newline is
dropped (cut off the file) and that image is scored again. Any other row that does not parse, or
whose probabilities do not sum to 1, stops the run naming the file and line: it was not written
by this tool, and nothing read from that file can be trusted.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

from forensic_vlm.errors import IntegrityError
from forensic_vlm.tables import write_atomically

log = logging.getLogger(__name__)

#: Probabilities are written with 6 decimals: their sum is 1 within this.
SUM_TOLERANCE = 1e-4
SHA256 = re.compile(r"[0-9a-f]{64}")


class PredictionCache:
    """``folder``'s file for ``key``; with ``shared``, that folder's file for the key is read too,
    never written (a shard of a sharded triage reads the shared cache and writes its own)."""

    def __init__(self, folder: Path | None, key: dict, columns: Sequence[str], shared: Path | None = None) -> None:
        self.description = key
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        self.columns = list(columns)
        self.path = Path(folder) / f"{self.key}.tsv" if folder else None
        self.rows: dict[str, dict[str, str]] = {}
        shared_path = Path(shared) / f"{self.key}.tsv" if shared else None
        if shared_path and shared_path.exists():
            self.rows = self._read(shared_path, repair=False)
        if self.path and self.path.exists():
            for row in self._read(self.path).values():
                self._keep(row, self.path, "its own")

    def get(self, sha256: str) -> dict[str, str] | None:
        return self.rows.get(sha256)

    def _keep(self, row: dict[str, str], path: Path, where: str) -> None:
        earlier = self.rows.setdefault(row["sha256"], row)
        if earlier != row:
            raise IntegrityError(f"{path}: {where} row for image {row['sha256']} differs from the shared cache's")

    def _read(self, path: Path, repair: bool = True) -> dict[str, dict[str, str]]:
        """Every row of ``path``, checked. A torn last line is cut off the file (``repair``) or,
        in a file this cache only reads, left there and ignored."""
        data = path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):  # the tail of an append that never finished
            line = data[:complete].count(b"\n") + 1
            log.warning(
                "%s, line %d: cut short (an interrupted write); dropped, that image is scored again", path, line
            )
            if repair:
                with open(path, "r+b") as handle:
                    handle.truncate(complete)
                    os.fsync(handle.fileno())
            data = data[:complete]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise IntegrityError(f"{path}: not UTF-8 text at byte {error.start}; move it away") from error
        # csv, not lines: a generated answer may hold a (quoted) newline.
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t")
        header = next(reader, None)
        if header != self.columns:
            raise IntegrityError(f"{path}, line 1: header is not {' '.join(self.columns)}")
        rows: dict[str, dict[str, str]] = {}
        for fields in reader:
            row = dict(zip(self.columns, fields, strict=False)) if len(fields) == len(self.columns) else None
            problem = f"{len(fields)} fields, not {len(self.columns)}" if row is None else self._problem(row)
            if problem or row is None:
                raise IntegrityError(
                    f"{path}, line {reader.line_num}: {problem}; the cache cannot be trusted, move it away"
                )
            earlier = rows.setdefault(row["sha256"], row)
            if earlier != row:
                raise IntegrityError(
                    f"{path}, line {reader.line_num}: a second, different row for image {row['sha256']}"
                )
        return rows

    def _problem(self, row: dict[str, str]) -> str | None:
        """What is wrong with a row, or None."""
        if not SHA256.fullmatch(row["sha256"]):
            return f"sha256 {row['sha256']!r} is not a hex digest"
        if not re.fullmatch(r"-?\d+", row["predicted"]):
            return f"predicted {row['predicted']!r} is not a class"
        texts = [row[c] for c in self.columns if c.startswith("p") and c != "predicted"]
        if not any(texts):  # generate decoding: an answer, no probabilities
            return None
        try:
            values = [float(t) for t in texts]
        except ValueError:
            return f"probabilities {texts} do not all parse"
        if not all(math.isfinite(v) and 0 <= v <= 1 for v in values) or abs(sum(values) - 1) > SUM_TOLERANCE:
            return f"probabilities {texts} do not sum to 1"
        return None

    def add(self, rows: Sequence[dict[str, object]]) -> None:
        """Keep ``rows`` and append the new ones to the file, whole and flushed to disk."""
        fresh = []
        for row in rows:
            if row["sha256"] not in self.rows:
                text = {c: str(row.get(c, "")) for c in self.columns}
                self.rows[text["sha256"]] = text
                fresh.append(text)
        if not self.path or not fresh:
            return
        if not self.path.exists():
            self._create()
        buffer = io.StringIO()
        csv.DictWriter(buffer, fieldnames=self.columns, delimiter="\t", lineterminator="\n").writerows(fresh)
        _append(self.path, buffer.getvalue().encode("utf-8"))

    def _create(self) -> None:
        """The header and the key's description, written in full before the file appears."""
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # What the opaque file name stands for, for whoever opens the folder.
        description = json.dumps(self.description, indent=2) + "\n"
        write_atomically(self.path.with_suffix(".json"), description.encode("utf-8"))
        write_atomically(self.path, ("\t".join(self.columns) + "\n").encode("utf-8"))


def _append(path: Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        written = os.write(descriptor, data)
        if written != len(data):  # a full disk: the short tail is dropped by the next read
            raise IntegrityError(f"{path}: only {written} of {len(data)} bytes could be appended")
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def merge_caches(shared: Path, shard: Path) -> int:
    """Move every row of the cache files in ``shard`` into ``shared``'s file of the same key (the one
    writer of the shared cache), then delete the shard's files; returns the rows added. A row that
    differs from the shared cache's row for the same image stops the merge."""
    added = 0
    for path in sorted(Path(shard).glob("*.tsv")):
        description = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        with open(path, encoding="utf-8") as handle:  # the header only: the rows are read, checked, below
            columns = handle.readline().rstrip("\n").split("\t")
        source = PredictionCache(shard, description, columns)
        if source.path != path:
            raise IntegrityError(f"{path}: its description {path.with_suffix('.json').name} names another key")
        target = PredictionCache(shared, description, columns)
        for row in source.rows.values():
            if (earlier := target.get(row["sha256"])) is not None and earlier != row:
                raise IntegrityError(f"{path}: row for image {row['sha256']} differs from {target.path}'s")
        before = len(target.rows)
        target.add(list(source.rows.values()))
        added += len(target.rows) - before
        path.unlink()
        path.with_suffix(".json").unlink()
    if Path(shard).is_dir() and not any(Path(shard).iterdir()):
        Path(shard).rmdir()
    log.info("prediction cache: %d row(s) from %s merged into %s", added, shard, shared)
    return added
