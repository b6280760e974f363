"""Stage ``review_labels``: the examiners' decisions as training labels (``review.use_for_training``).

Every decisions file ``<review.dir>/<case>.jsonl`` is read whole (a bad line stops, naming it); the
decision in force for each image is found in the case's triage listing by its sha256 and read
again from the evidence, by its path or locator, its content checked. What can join the labeled
set beside ``raw_data`` is written to ``results/review/labels.tsv`` with the side of the split its
case goes to: a case named in ``review.test_cases`` is held out whole for testing, every other case
goes whole to training, so no case is on both sides. What cannot join is listed, with the reason,
in ``withheld.tsv``, never guessed:

- ``unusable``: the examiner said so;
- ``conflicts_with_raw_data``: raw_data holds the same content under another class folder;
- ``already_in_raw_data``: the same content with the same class (raw_data's row stays);
- ``conflicts_between_cases``: two cases decided the same content differently;
- ``duplicate_of_case``: the same content and class in an earlier case (that one joins);
- ``near_duplicate_across_sides``: a near-duplicate (pHash) of an image on the other side of the
  split, which would leak the scene from training into testing.

``reviews.json`` names each decisions file with its sha256 and what it gave, and how often model
and examiner agreed: the adapter trained on these labels carries it into every custody record.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from forensic_vlm.config import ClassSpec, SplitConfig
from forensic_vlm.errors import DecisionFileError, EvidenceChangedError, InputNotFoundError
from forensic_vlm.review.decisions import UNUSABLE, Decision, DecisionLog, in_force
from forensic_vlm.review.evidence import CaseEvidence
from forensic_vlm.split import SPLIT_COLUMNS, assign_raw_data, near_duplicate_groups
from forensic_vlm.tables import read_tsv, sha256_file, write_atomically, write_tsv

log = logging.getLogger(__name__)

LABEL_COLUMNS = (*SPLIT_COLUMNS, "split", "examiner", "decided_utc", "decisions_line")
WITHHELD_COLUMNS = ("case", "sha256", "path", "decision", "reason", "detail", "decisions_line")


@dataclass
class _Candidate:
    case: str
    line: int
    decision: Decision
    row: dict[str, str]


def decision_files(review_dir: Path) -> list[Path]:
    """The decisions files of every case, by case name."""
    folder = Path(review_dir)
    return sorted(folder.glob("*.jsonl")) if folder.is_dir() else []


def listing_of(classify_dir: Path, case: str) -> Path:
    return Path(classify_dir) / case / "listing.jsonl"


def build_review_labels(
    files: Sequence[Path],
    *,
    classify_dir: Path,
    manifest: Path,
    classes: Sequence[ClassSpec],
    split_config: SplitConfig,
    test_cases: Sequence[str],
    out_dir: Path,
) -> dict:
    """Write labels.tsv, withheld.tsv and reviews.json under ``out_dir``; returns the summary."""
    classes = list(classes)
    unknown = sorted(set(test_cases) - {Path(f).stem for f in files})
    if unknown:
        raise DecisionFileError(f"review.test_cases names {', '.join(unknown)}, which have no decisions file")
    raw_rows = [r for r in read_tsv(Path(manifest)) if not r["duplicate_of"]]
    raw_by_sha = {r["sha256"]: r for r in raw_rows}
    withheld: list[dict] = []
    cases: list[dict] = []
    candidates: list[_Candidate] = []
    for file in files:
        case = Path(file).stem
        log_file = DecisionLog(Path(file), classes)
        numbered = log_file.numbered()  # every line checked, a bad one named
        current = in_force(numbered)
        try:
            evidence = CaseEvidence(listing_of(classify_dir, case))
        except InputNotFoundError as error:
            raise InputNotFoundError(f"{file}: decisions on case {case!r}, but {error}") from None
        side = "test" if case in test_cases else "train"
        record = {
            "case": case,
            "file": str(file),
            "sha256": sha256_file(Path(file)),
            "decisions": len(numbered),
            "in_force": len(current),
            "side": side,
            "evidence": str(evidence.root),
        }
        cases.append(record)
        for sha256, (line, decision) in current.items():
            where = f"{file}, line {line}"
            if sha256 not in evidence:
                raise DecisionFileError(
                    f"{where}: image {sha256} is not among the usable images of case {case!r} ({evidence.listing})"
                )
            try:
                evidence.read(sha256)
            except EvidenceChangedError as error:
                raise DecisionFileError(f"{where}: image {sha256} is no longer in the evidence: {error}") from None
            image = evidence.images[sha256]
            if decision.decision == UNUSABLE:
                withheld.append(
                    _withheld(case, line, decision, reason="unusable", detail="the examiner marked it unusable")
                )
                continue
            spec = next(c for c in classes if str(c.id) == decision.decision)
            row = {
                "sha256": sha256,
                **evidence.location(sha256),
                "label": decision.decision,
                "class_folder": spec.folder,
                "format": image.format,
                "width": image.width,
                "height": image.height,
                "phash": image.phash,
                "case": case,
                "split": side,
                "examiner": decision.examiner,
                "decided_utc": decision.decided_utc,
                "decisions_line": line,
            }
            candidates.append(_Candidate(case, line, decision, row))
    joined = _deduplicated(candidates, raw_by_sha, withheld)
    joined = _apart_from_near_duplicates(joined, raw_rows, split_config, withheld)
    out_dir = Path(out_dir)
    write_tsv(out_dir / "labels.tsv", LABEL_COLUMNS, [c.row for c in joined])
    write_tsv(out_dir / "withheld.tsv", WITHHELD_COLUMNS, withheld)
    summary = _summary(cases, candidates=candidates, joined=joined, withheld=withheld, test_cases=test_cases)
    write_atomically(out_dir / "reviews.json", (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode())
    log.info(
        "review labels: %d image(s) from %d case(s) join the labeled set (%s); %d withheld (%s)",
        len(joined), len(cases), dict(Counter(c.row["split"] for c in joined)), len(withheld),
        dict(Counter(w["reason"] for w in withheld)),
    )  # fmt: skip
    return summary


def _withheld(case: str, line: int, decision: Decision, *, reason: str, detail: str) -> dict:
    return {
        "case": case,
        "sha256": decision.sha256,
        "path": decision.path,
        "decision": decision.decision,
        "reason": reason,
        "detail": detail,
        "decisions_line": line,
    }


def _deduplicated(candidates: list[_Candidate], raw_by_sha: dict[str, dict], withheld: list[dict]) -> list[_Candidate]:
    """Content-deduplicated against raw_data and across cases; conflicts withheld, never resolved."""
    by_sha: dict[str, list[_Candidate]] = defaultdict(list)
    for candidate in candidates:
        by_sha[candidate.decision.sha256].append(candidate)
    joined = []
    for sha256, group in by_sha.items():
        raw = raw_by_sha.get(sha256)
        if raw is not None:
            for c in group:
                same = raw["label"] == c.decision.decision
                reason = "already_in_raw_data" if same else "conflicts_with_raw_data"
                detail = f"raw_data/{raw['path']} is in class folder {raw['class_folder']}"
                withheld.append(_withheld(c.case, c.line, c.decision, reason=reason, detail=detail))
            continue
        if len({c.decision.decision for c in group}) > 1:
            detail = "; ".join(f"case {c.case} line {c.line}: {c.decision.decision}" for c in group)
            for c in group:
                withheld.append(_withheld(c.case, c.line, c.decision, reason="conflicts_between_cases", detail=detail))
            continue
        first, *others = sorted(group, key=lambda c: c.case)
        joined.append(first)
        for c in others:
            detail = f"the same image and class in case {first.case} (line {first.line}), which joins"
            withheld.append(_withheld(c.case, c.line, c.decision, reason="duplicate_of_case", detail=detail))
    return sorted(joined, key=lambda c: (c.case, c.line))


def _apart_from_near_duplicates(
    joined: list[_Candidate], raw_rows: list[dict], config: SplitConfig, withheld: list[dict]
) -> list[_Candidate]:
    """Withhold a reviewed image whose near-duplicate sits on another side of the split."""
    raw_side = {sha: split for sha, (split, _) in assign_raw_data(raw_rows, config).items()}
    rows = [*raw_rows, *(c.row for c in joined)]
    sides = [raw_side.get(r["sha256"]) or r["split"] for r in rows]
    groups = near_duplicate_groups([r["phash"] for r in rows], config.near_duplicate_distance)
    members: dict[int, list[int]] = defaultdict(list)
    for index, root in enumerate(groups):
        members[root].append(index)
    kept = []
    for offset, candidate in enumerate(joined):
        index = len(raw_rows) + offset
        others = [i for i in members[groups[index]] if sides[i] != candidate.row["split"]]
        if others:
            other = rows[others[0]]
            where = f"case {other['case']}" if other.get("case") else f"raw_data/{other['path']}"
            detail = f"near-duplicate of {other['sha256']} ({where}) in {sides[others[0]]}"
            withheld.append(
                _withheld(
                    candidate.case,
                    candidate.line,
                    candidate.decision,
                    reason="near_duplicate_across_sides",
                    detail=detail,
                )
            )
            continue
        candidate.row["group"] = min(rows[i]["sha256"] for i in members[groups[index]])
        kept.append(candidate)
    return kept


def _summary(
    cases: list[dict],
    *,
    candidates: list[_Candidate],
    joined: list[_Candidate],
    withheld: list[dict],
    test_cases: Sequence[str],
) -> dict:
    """Per case: its file and sha256, decisions, what joined, and model-examiner agreement."""
    for record in cases:
        case = record["case"]
        classed = [c for c in candidates if c.case == case]
        record["labels"] = sum(1 for c in joined if c.case == case)
        record["withheld"] = dict(Counter(w["reason"] for w in withheld if w["case"] == case))
        record["agreement"] = {
            "images": len(classed),  # decided as a class (not unusable)
            "model_agreed": sum(1 for c in classed if c.decision.predicted == c.decision.decision),
        }
    return {
        "cases": cases,
        "test_cases": list(test_cases),
        "labels": {
            "train": sum(c.row["split"] == "train" for c in joined),
            "test": sum(c.row["split"] == "test" for c in joined),
        },
        "decisions": [
            {
                "case": c.case,
                "sha256": c.decision.sha256,
                "predicted": c.decision.predicted,
                "decision": c.decision.decision,
            }
            for c in candidates
        ],
    }
