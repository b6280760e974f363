"""``forensic-vlm review import``: decisions from a spreadsheet or a forensic suite's export.

The file is a CSV with a SHA-256 column and a category column: the triage's own ``triage.csv``
edited in a spreadsheet, or a suite's export (Griffeye, AXIOM and others write the image's hash and
the category the examiner gave it). Each row is matched to the triage by its SHA-256; its category
is a class id, a class's English or Korean name, or "unusable". A row with an empty category was
not reviewed and is no decision. A row whose category is the model's own prediction is a decision
only with ``--all-rows`` (the examiner says every row was looked at): an unedited row of
``triage.csv`` must not become a confirmation nobody made. Every counted row is in the log. A row
that names an image the triage does not hold, or a category that is no class, stops the import
naming the file and the line, before anything is written.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path

from forensic_vlm.config import ClassSpec
from forensic_vlm.errors import DecisionFileError
from forensic_vlm.review.decisions import UNUSABLE, Decision, DecisionLog, check_decision
from forensic_vlm.tables import read_tsv, sha256_file

log = logging.getLogger(__name__)

HASH_COLUMNS = ("sha-256", "sha256", "sha 256", "hash (sha256)")


@dataclass(frozen=True)
class ImportCounts:
    rows: int
    decisions: int
    not_reviewed: int  # empty category
    same_as_model: int  # left out without --all-rows


def _category(value: str, classes: list[ClassSpec]) -> str | None:
    """The decision a category cell names, or None for a name that is no class."""
    text = value.strip()
    if text.lower() == UNUSABLE:
        return UNUSABLE
    for spec in classes:
        if text in (str(spec.id), spec.en, spec.ko, spec.folder) or text.lower() == spec.en.lower():
            return str(spec.id)
    return None


def import_decisions(
    source: Path,
    triage: Path,
    decisions: DecisionLog,
    *,
    examiner: str,
    column: str = "Category",
    all_rows: bool = False,
) -> ImportCounts:
    """Append the decisions ``source`` holds about the images of ``triage`` (its triage.tsv)."""
    triage_rows = {row["sha256"]: row for row in read_tsv(triage) if row["sha256"]}
    triage_sha256 = sha256_file(triage)
    text = Path(source).read_bytes().decode("utf-8-sig")  # spreadsheets write a byte-order mark
    reader = csv.DictReader(io.StringIO(text, newline=""))
    headers = {name.strip().lower(): name for name in reader.fieldnames or ()}
    hash_column = next((headers[h] for h in HASH_COLUMNS if h in headers), None)
    if hash_column is None:
        raise DecisionFileError(f"{source}: no SHA-256 column (looked for {', '.join(HASH_COLUMNS)})")
    if column.strip().lower() not in headers:
        raise DecisionFileError(f"{source}: no column {column!r}; its columns: {', '.join(reader.fieldnames)}")
    category_column = headers[column.strip().lower()]
    classes = decisions.classes
    made, rows, not_reviewed, same = [], 0, 0, 0
    when = Decision.now()
    for number, row in enumerate(reader, start=2):  # line 1 is the header
        rows += 1
        where = f"{source}, line {number}"
        digest = (row.get(hash_column) or "").strip().lower()
        cell = row.get(category_column) or ""
        if not cell.strip():
            not_reviewed += 1
            continue
        if digest not in triage_rows:
            raise DecisionFileError(f"{where}: SHA-256 {digest or '(empty)'} is not an image of the triage {triage}")
        choice = _category(cell, classes)
        if choice is None:
            names = ", ".join(f"{c.id} ({c.en})" for c in classes)
            raise DecisionFileError(f"{where}: category {cell.strip()!r} is no class ({names}) and not {UNUSABLE!r}")
        image = triage_rows[digest]
        if choice == image["predicted"] and not all_rows:
            same += 1
            continue
        decision = Decision(
            sha256=digest,
            decision=choice,
            predicted=image["predicted"],
            examiner=examiner,
            decided_utc=when,
            triage_sha256=triage_sha256,
            path=image["path"],
            source=f"import {Path(source).name}, line {number}",
        )
        check_decision(decision, classes, where)
        made.append(decision)
    for decision in made:  # only once every row was read and checked
        decisions.append(decision)
    counts = ImportCounts(rows=rows, decisions=len(made), not_reviewed=not_reviewed, same_as_model=same)
    log.info(
        "%s: %d rows, %d decisions by %s added to %s; %d not reviewed (empty %s), %d the model's own class "
        "(left out%s)",
        source, rows, len(made), examiner, decisions.path, not_reviewed, category_column, same,
        "" if all_rows else "; --all-rows counts them as confirmed",
    )  # fmt: skip
    return counts
