"""The examiner's decisions on a triage: ``<review.dir>/<case>.jsonl``, one JSON object a line.

Decisions are data, never evidence: the file lives apart from ``raw_data`` and ``results``. Each
decision is one line, written with one ``write`` and made durable with ``fsync`` before the call
returns, so a kill loses at most the decision being written. That one leaves a line without its
newline: reading drops it (and says so), and the next append cuts it off first, so a decision
never runs into a fragment. Any other line that cannot be read is a named error (the file and the
line number), never skipped. A later decision on the same image supersedes the earlier one; both
stay in the file, which is only ever appended to.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from forensic_vlm.config import ClassSpec
from forensic_vlm.errors import DecisionFileError
from forensic_vlm.faults import fault_point

log = logging.getLogger(__name__)

UNUSABLE = "unusable"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Decision:
    """One examiner's decision on one image of a triage."""

    sha256: str  # the image's content
    decision: str  # a class id ("0".."3") or "unusable"
    predicted: str  # what the model said, as the triage recorded it
    examiner: str
    decided_utc: str  # ISO 8601, seconds, UTC
    triage_sha256: str  # the triage.tsv the examiner was shown
    path: str  # where the image is in the evidence (the triage's path)
    source: str  # "review page", or "import <file name>"

    @staticmethod
    def now() -> str:
        return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def decisions_path(review_dir: Path, case: str) -> Path:
    return Path(review_dir) / f"{case}.jsonl"


def check_decision(decision: Decision, classes: Iterable[ClassSpec], where: str) -> None:
    """Stop, naming ``where``, on a decision no triage could have produced."""
    allowed = {str(c.id) for c in classes} | {UNUSABLE}
    if not _SHA256.fullmatch(decision.sha256):
        raise DecisionFileError(f"{where}: sha256 {decision.sha256!r} is not a SHA-256 digest")
    if not _SHA256.fullmatch(decision.triage_sha256):
        raise DecisionFileError(f"{where}: triage_sha256 {decision.triage_sha256!r} is not a SHA-256 digest")
    if decision.decision not in allowed:
        raise DecisionFileError(
            f"{where}: decision {decision.decision!r} is not a class ({', '.join(sorted(allowed))})"
        )
    if not decision.examiner.strip():
        raise DecisionFileError(f"{where}: no examiner named")
    try:
        decided = dt.datetime.fromisoformat(decision.decided_utc)
    except ValueError:
        raise DecisionFileError(f"{where}: decided_utc {decision.decided_utc!r} is not an ISO 8601 time") from None
    if decided.utcoffset() != dt.timedelta(0):
        raise DecisionFileError(f"{where}: decided_utc {decision.decided_utc!r} is not in UTC")


class DecisionLog:
    """The decisions file of one case: appended to, read whole, never rewritten."""

    def __init__(self, path: Path, classes: Iterable[ClassSpec]) -> None:
        self.path, self.classes = Path(path), list(classes)

    def append(self, decision: Decision) -> None:
        """Add one decision, durably: on disk when this returns."""
        check_decision(decision, self.classes, f"{self.path}: new decision")
        line = (json.dumps(asdict(decision), ensure_ascii=False, sort_keys=True) + "\n").encode()
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self._cut_torn_tail(descriptor)
            fault_point("review.decision")  # killed here, this decision is the one lost
            if os.write(descriptor, line) != len(line):
                raise OSError(f"{self.path}: a decision was written only in part")
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        if new:  # the file's name, on disk too
            folder = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)

    def _cut_torn_tail(self, descriptor: int) -> None:
        size = os.fstat(descriptor).st_size
        if size == 0:
            return
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            log.warning("%s: the last, unfinished decision (%d bytes) is dropped", self.path, len(data) - complete)
            os.ftruncate(descriptor, complete)

    def read(self) -> list[Decision]:
        """Every decision, in the order made. A torn last line is dropped; any other bad line stops."""
        return [decision for _, decision in self.numbered()]

    def numbered(self) -> list[tuple[int, Decision]]:
        """Every decision with its line number in the file, in the order made."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            log.warning("%s: the last line is unfinished (a write was cut off); it is not read", self.path)
        names = {f.name for f in fields(Decision)}
        decisions = []
        for number, raw in enumerate(data[:complete].splitlines(), start=1):
            where = f"{self.path}, line {number}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as error:
                raise DecisionFileError(f"{where}: not a JSON object ({error})") from None
            if not isinstance(record, dict) or set(record) != names:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DecisionFileError(f"{where}: expected the keys {sorted(names)}, got {keys}")
            if not all(isinstance(value, str) for value in record.values()):
                raise DecisionFileError(f"{where}: every value must be text")
            decision = Decision(**record)
            check_decision(decision, self.classes, where)
            decisions.append((number, decision))
        return decisions

    def current(self) -> dict[str, Decision]:
        """The decision in force for each image (the latest; the earlier ones stay in the file)."""
        return {sha256: decision for sha256, (_, decision) in self.current_numbered().items()}

    def current_numbered(self) -> dict[str, tuple[int, Decision]]:
        """The decision in force for each image, with its line number."""
        return in_force(self.numbered())


def in_force(numbered: Iterable[tuple[int, Decision]]) -> dict[str, tuple[int, Decision]]:
    """Of decisions in file order, the latest on each image (sha256), with its line number."""
    latest: dict[str, tuple[int, Decision]] = {}
    for number, decision in numbered:
        latest[decision.sha256] = (number, decision)
    return latest
