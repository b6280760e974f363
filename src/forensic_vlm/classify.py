"""Stage ``classify``: triage of an unlabeled folder (a phone extraction) for an examiner.

Every file under the folder is read once, read-only, with the manifest's checks (the same reject
reasons as training data). Usable images are scored with the fine-tuned adapter (or zero-shot)
through the prediction cache, so an interrupted run goes on where it stopped and a rerun scores
nothing. Writes into ``results/classify/<case>/``:

- ``triage.tsv``: one row per file, accepted or rejected, in review order (:func:`review_order`);
- ``triage.html``: the same order as one self-contained page, thumbnails behind ``report.show_images``;
- ``custody.json``: when, where, with what (input listing, model, adapter and configuration
  hashes, package versions) and the counts, for the case file.

The review threshold of each class comes from the adapter (``review_thresholds.json``, chosen on the
validation set at training time); without one, every image needs review.
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import json
import logging
import os
import platform
from collections import Counter
from pathlib import Path

import torch

from forensic_vlm.batches import Example
from forensic_vlm.config import (
    ClassifyConfig,
    ClassSpec,
    EvaluateConfig,
    ManifestConfig,
    ModelConfig,
    ReportConfig,
    to_dict,
)
from forensic_vlm.errors import InputNotFoundError
from forensic_vlm.faults import fault_point
from forensic_vlm.inspection import Inspection
from forensic_vlm.manifest import bad_input_error, inspector, table_path, walk
from forensic_vlm.parallel import ordered_map
from forensic_vlm.provenance import config_sha256, git_commit, package_versions
from forensic_vlm.scoring import Scores, score_examples
from forensic_vlm.tables import encode_path, sha256_file, write_tsv
from forensic_vlm.thresholds import needs_review, read_thresholds, threshold_of
from forensic_vlm.triage_page import write_triage_page

log = logging.getLogger(__name__)

#: Not an image that could be scored: the examiner looks at these files by hand.
REJECTED = "rejected"
SCORED = "scored"


def triage_columns(labels: list[int]) -> list[str]:
    return [
        "rank",
        "status",
        "path",
        "flags",
        "sha256",
        "size_bytes",
        "mtime_utc",
        "predicted",
        "predicted_ko",
        "predicted_en",
        "confidence",
        *[f"p{label}" for label in labels],
        "needs_review",
        "threshold",
        "duplicate_of",
        "reason",
        "message",
    ]


def inspect_folder(root: Path, manifest: ManifestConfig, workers: int) -> list[Inspection]:
    """Every file under ``root`` (none left out), each read once and fully decoded."""
    paths = list(walk(root, skip_documentation=False))
    log.info("classify: %d files under %s, %d worker(s)", len(paths), root, workers)
    return list(ordered_map(inspector(root, manifest), paths, workers, "classify: inspect"))


def review_order(row: dict, irrelevant: int) -> tuple:
    """Drug classes first, most confident first; then the irrelevant class, least confident first
    (where something may hide); then files that could not be scored. Ties by path."""
    if row["status"] != SCORED:
        return (2, 0.0, row["path"])
    confidence = float(row["confidence"])
    if int(row["predicted"]) != irrelevant:
        return (0, -confidence, row["path"])
    return (1, confidence, row["path"])


def classify_folder(
    input_dir: Path,
    out_dir: Path,
    *,
    classes: list[ClassSpec],
    model_config: ModelConfig,
    evaluate_config: EvaluateConfig,
    config: ClassifyConfig,
    manifest_config: ManifestConfig,
    report_config: ReportConfig,
    adapter: Path | None = None,
    cache_dir: Path | None = None,
    workers: int = 1,
    threads: int | None = None,
) -> dict:
    """Triage ``input_dir``; write triage.tsv, triage.html and custody.json; returns the custody record."""
    started = dt.datetime.now(dt.UTC)
    if threads:
        torch.set_num_threads(threads)
    root, out_dir = Path(input_dir), Path(out_dir)
    if not root.is_dir():
        raise InputNotFoundError(f"classify.input_dir not found or not a folder: {root}")
    inspections = inspect_folder(root, manifest_config, workers)
    rejected = [r for r in inspections if not r.usable]
    if manifest_config.on_bad_input == "fail" and rejected:
        first = rejected[0]
        raise bad_input_error(root / first.path, first.reason, first.message, len(rejected))
    usable = [r for r in inspections if r.usable]
    # label -1: unknown. The examples only carry images to the model; no label is ever written.
    examples = [
        Example(root / r.path, r.sha256, -1, int(r.width), int(r.height), encode_path(r.path)[0]) for r in usable
    ]
    labels = [c.id for c in classes]
    kind = "classify (fine-tuned)" if adapter else "classify (zero-shot)"
    scores = score_examples(
        examples,
        labels,
        model_config=model_config,
        config=evaluate_config,
        adapter=adapter,
        cache_dir=cache_dir,
        kind=kind,
    )
    thresholds = read_thresholds(adapter)
    rows = triage_rows(usable, rejected, scores.rows, classes=classes, thresholds=thresholds)
    rows.sort(key=lambda row: review_order(row, config.irrelevant_class))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tsv(out_dir / "triage.tsv", triage_columns(labels), rows)
    fault_point("classify.triage_written")  # the table written, the page and custody record not yet

    custody = custody_record(
        root=root,
        inspections=inspections,
        rows=rows,
        classes=classes,
        model_config=model_config,
        adapter=adapter,
        thresholds=thresholds,
        scores=scores,
        settings={"model": model_config, "evaluate": evaluate_config, "classify": config, "manifest": manifest_config},
        started=started,
        triage=out_dir / "triage.tsv",
    )
    write_triage_page(
        out_dir / "triage.html", rows, root=root, classes=classes, config=config, report=report_config, custody=custody
    )
    (out_dir / "custody.json").write_text(json.dumps(custody, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    counts = custody["counts"]
    log.info(
        "classify: %d files: %s; %d need review; %s", len(rows), counts["predicted"], counts["needs_review"], out_dir
    )
    return custody


def triage_rows(
    usable: list[Inspection],
    rejected: list[Inspection],
    scores: list[dict[str, str]],
    *,
    classes: list[ClassSpec],
    thresholds: dict | None,
) -> list[dict]:
    """One row per file (unranked): the scored ones with their class and review flag, then the rest."""
    by_id = {c.id: c for c in classes}
    first_path: dict[str, str] = {}
    rows = []
    for inspection, score in zip(usable, scores, strict=True):
        predicted = int(score["predicted"])
        probabilities = {c.id: float(score[f"p{c.id}"]) for c in classes}
        confidence = probabilities[predicted]
        threshold = threshold_of(thresholds, predicted)
        columns = _file_columns(inspection)
        original = first_path.setdefault(inspection.sha256, columns["path"])
        rows.append(
            {
                **columns,
                "status": SCORED,
                "predicted": predicted,
                "predicted_ko": by_id[predicted].ko,
                "predicted_en": by_id[predicted].en,
                "confidence": f"{confidence:.6f}",
                **{f"p{k}": f"{v:.6f}" for k, v in probabilities.items()},
                "needs_review": _yes_no(needs_review(thresholds, predicted, confidence)),
                "threshold": "" if threshold is None else threshold,
                "duplicate_of": "" if original == columns["path"] else original,
            }
        )
    for inspection in rejected:
        rows.append(
            {
                **_file_columns(inspection),
                "status": REJECTED,
                "needs_review": _yes_no(True),
                "reason": inspection.reason,
                "message": inspection.message,
            }
        )
    return rows


def _yes_no(value: bool) -> str:
    return "true" if value else "false"


def _file_columns(inspection: Inspection) -> dict:
    path, flags = table_path(inspection)
    return {
        "path": path,
        "flags": flags,
        "sha256": inspection.sha256,
        "size_bytes": inspection.size_bytes if inspection.size_bytes is not None else "",
        "mtime_utc": inspection.mtime_utc,
    }


def listing_sha256(inspections: list[Inspection]) -> str:
    """Digest of what was read: every file's path, size, modification time and content sha256."""
    digest = hashlib.sha256()
    for r in sorted(inspections, key=lambda r: r.path):
        digest.update(os.fsencode(r.path) + f"\0{r.size_bytes}\0{r.mtime_utc}\0{r.sha256}\0{r.reason}\n".encode())
    return digest.hexdigest()


def custody_record(
    *,
    root: Path,
    inspections: list[Inspection],
    rows: list[dict],
    classes: list[ClassSpec],
    model_config: ModelConfig,
    adapter: Path | None,
    thresholds: dict | None,
    scores: Scores,
    settings: dict,
    started: dt.datetime,
    triage: Path,
) -> dict:
    """The chain-of-custody record: when, where, with what, and what came out."""
    configuration = {name: to_dict(section) for name, section in settings.items()}
    scored = [r for r in rows if r["status"] == SCORED]
    return {
        "case": settings["classify"].case,
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "user": getpass.getuser(),
        "input_dir": str(root.resolve()),
        "input_listing_sha256": listing_sha256(inspections),
        "triage_tsv_sha256": sha256_file(triage),
        "model": {
            "name_or_path": model_config.name_or_path,
            **scores.path,  # the quantization resolved, which kernels ran, whether the decoder was compiled
            # The hashes the run verified and keyed its predictions by, taken before loading.
            "files_sha256": scores.model_files_sha256,
        },
        "adapter": {"path": str(adapter), "files_sha256": scores.adapter_files_sha256} if adapter else None,
        "review_thresholds": thresholds or "none: zero-shot has no validated thresholds; every image needs review",
        "configuration_sha256": config_sha256(configuration),
        "configuration": configuration,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "device": scores.device,
        "counts": {
            "files": len(rows),
            "scored": len(scored),
            "distinct_images": len({r["sha256"] for r in scored}),
            "rejected": len(rows) - len(scored),
            "rejected_by_reason": dict(Counter(r["reason"] for r in rows if r["status"] != SCORED)),
            "predicted": {f"{c.id} {c.en}": sum(1 for r in scored if int(r["predicted"]) == c.id) for c in classes},
            "needs_review": sum(1 for r in rows if r["needs_review"] == "true"),
        },
        "scoring": scores.run_facts(),
    }
