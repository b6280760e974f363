"""Stage ``classify``: triage of unlabeled evidence (a phone extraction) for an examiner.

The input is a folder or an evidence container (E01, a raw disk or partition image, a zip or a
tar), read in place through dfVFS (:mod:`forensic_vlm.evidence`): nothing is mounted or unpacked.
Every file is read once, read-only, with the manifest's checks (the same reject reasons as
training data), and hashed with sha256, MD5 and SHA-1. Usable images are scored with the fine-tuned adapter (or zero-shot)
through the prediction cache, so an interrupted run goes on where it stopped and a rerun scores
nothing. Writes into ``results/classify/<case>/``:

- ``triage.tsv``: one row per file, accepted or rejected, in review order (:func:`review_order`);
- ``triage.html``: the same order as one self-contained page, thumbnails behind ``report.show_images``;
- ``custody.json``: when, where, with what (input listing, model, adapter and configuration
  hashes, package versions, the container's verified hashes) and the counts, for the case file;
- ``triage.csv`` and ``case.jsonld``: the triage for other forensic tools (:mod:`forensic_vlm.exchange`).

A large case is scored in shards (``classify.shards``, Snakemake's scattergather): rule
``classify_listing`` inspects the input once (:func:`list_input`, ``listing.jsonl``); each rule
``classify_shard`` job scores its share of the batches (:func:`score_shard`), reading the shared
prediction cache and writing only a cache of its own; rule ``classify`` merges the parts
(:func:`assemble_shards`) into the same triage one job writes, and the shards' caches into the
shared one. Every shard plans the same batches over the folder's distinct images and takes whole
batches, by their first image's content hash: each image is scored once, in the batch it would
have had in one job, so the probabilities are the same to the last digit. A file added later can
move an old file to another batch and shard; it is read from the shared cache there, not scored
again.

The review threshold of each class comes from the adapter (``review_thresholds.json``, chosen on the
validation set at training time); without one, every image needs review.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import getpass
import hashlib
import json
import logging
import os
import platform
from collections import Counter
from functools import partial
from pathlib import Path

from forensic_vlm.config import (
    ClassifyConfig,
    ClassSpec,
    EvaluateConfig,
    ManifestConfig,
    ModelConfig,
    ReportConfig,
    to_dict,
)
from forensic_vlm.errors import ConfigError, InputNotFoundError, IntegrityError
from forensic_vlm.exchange import write_case_jsonld, write_triage_csv
from forensic_vlm.faults import fault_point
from forensic_vlm.inspection import Inspection
from forensic_vlm.manifest import bad_input_error, inspector, table_path, walk
from forensic_vlm.parallel import ordered_map
from forensic_vlm.provenance import config_sha256, git_commit, package_versions
from forensic_vlm.shards import merge_shard_caches, read_parts, score_part, scoring_record
from forensic_vlm.tables import Example, encode_path, sha256_file, write_atomically, write_tsv
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
        "md5",
        "sha1",
        "partition",
        "inode",
        "created_utc",
        "accessed_utc",
        "changed_utc",
        "deleted",
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


@dataclasses.dataclass
class Listing:
    """What the triage read: the input (a folder or a container file), every file's inspection,
    and for a container what custody.json records of it (:func:`evidence.describe_container`)."""

    root: Path
    inspections: list[Inspection]
    container: dict | None = None


def list_input(source: Path, manifest_config: ManifestConfig, config: ClassifyConfig, workers: int) -> Listing:
    """Every file of ``source`` (a folder, or a container read through dfVFS), inspected; a
    container's stored hashes are verified first (``classify.verify_container``). Stops on the
    first bad file if the manifest says so."""
    root = Path(source)
    if root.is_dir():
        if config.partition or config.inside_path:
            raise ConfigError(f"classify.partition and classify.inside_path apply to a container; {root} is a folder")
        listing = Listing(root, inspect_folder(root, manifest_config, workers))
    elif root.is_file():
        listing = _list_container(root, manifest_config, config, workers)
    else:
        raise InputNotFoundError(f"classify.input not found (neither a folder nor a container file): {root}")
    rejected = [r for r in listing.inspections if not r.usable]
    if manifest_config.on_bad_input == "fail" and rejected:
        first = rejected[0]
        raise bad_input_error(root / first.path, first.reason, first.message, len(rejected))
    return listing


def _list_container(root: Path, manifest_config: ManifestConfig, config: ClassifyConfig, workers: int) -> Listing:
    from forensic_vlm.evidence import describe_container, inspect_entry, walk_container

    # Before anything is read from it: a damaged image stops here (unless the examiner accepts it).
    container = describe_container(root, verify=config.verify_container, accept_mismatch=config.accept_hash_mismatch)
    container.update(partition=config.partition, inside_path=config.inside_path)
    entries = list(walk_container(root, config.partition, config.inside_path))
    log.info("classify: %d files in %s, %d worker(s)", len(entries), root, workers)
    check = partial(
        inspect_entry,
        max_image_pixels=manifest_config.max_image_pixels,
        allowed_formats=tuple(manifest_config.allowed_formats),
    )
    return Listing(root, list(ordered_map(check, entries, workers, "classify: inspect")), container)


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
    """Triage ``input_dir`` in one job; write triage.tsv, triage.html and custody.json; returns the custody record."""
    started = dt.datetime.now(dt.UTC)
    from forensic_vlm.modeling import use_threads  # torch: only where images are scored
    from forensic_vlm.scoring import score_examples

    use_threads(threads)
    listing = list_input(Path(input_dir), manifest_config, config, workers)
    root, inspections = listing.root, listing.inspections
    usable = [r for r in inspections if r.usable]
    kind = "classify (fine-tuned)" if adapter else "classify (zero-shot)"
    scores = score_examples(
        _examples(root, usable),
        [c.id for c in classes],
        model_config=model_config,
        config=evaluate_config,
        adapter=adapter,
        cache_dir=cache_dir,
        kind=kind,
    )
    return write_triage(
        root,
        inspections,
        {row["sha256"]: row for row in scores.rows},
        Path(out_dir),
        scoring=scoring_record(scores),
        classes=classes,
        model_config=model_config,
        config=config,
        report_config=report_config,
        adapter=adapter,
        settings={"model": model_config, "evaluate": evaluate_config, "classify": config, "manifest": manifest_config},
        started=started,
        container=listing.container,
    )


def _examples(root: Path, usable: list[Inspection]) -> list[Example]:
    # label -1: unknown. The examples only carry images to the model; no label is ever written.
    return [
        Example(root / r.path, r.sha256, -1, int(r.width), int(r.height), encode_path(r.path)[0], locator=r.locator)
        for r in usable
    ]


def _reviews_trained_on(adapter: Path | None) -> list[dict]:
    card = Path(adapter) / "training.json" if adapter else None
    if card is None or not card.is_file():
        return []
    return json.loads(card.read_text(encoding="utf-8")).get("reviews", [])


def write_triage(
    root: Path,
    inspections: list[Inspection],
    scored: dict[str, dict[str, str]],
    out_dir: Path,
    *,
    scoring: dict,
    classes: list[ClassSpec],
    model_config: ModelConfig,
    config: ClassifyConfig,
    report_config: ReportConfig,
    adapter: Path | None,
    settings: dict,
    started: dt.datetime,
    shards: list[dict] | None = None,
    container: dict | None = None,
) -> dict:
    """triage.tsv, triage.html, custody.json, triage.csv and case.jsonld from the listing and every
    usable file's scores (``scored``, by sha256); returns the custody record."""
    if container:
        from forensic_vlm.evidence import check_unchanged

        check_unchanged(container)
    usable = [r for r in inspections if r.usable]
    rejected = [r for r in inspections if not r.usable]
    missing = [r.path for r in usable if r.sha256 not in scored]
    if missing:
        raise IntegrityError(f"no score for {len(missing)} usable file(s), the first {missing[0]!r}")
    thresholds = read_thresholds(adapter)
    labels = [c.id for c in classes]
    rows = triage_rows(usable, rejected, [scored[r.sha256] for r in usable], classes=classes, thresholds=thresholds)
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
        scoring=scoring,
        settings=settings,
        started=started,
        triage=out_dir / "triage.tsv",
        container=container,
    )
    if shards is not None:
        custody["shards"] = shards
    write_triage_page(
        out_dir / "triage.html", rows, root=root, classes=classes, config=config, report=report_config, custody=custody
    )
    write_triage_csv(out_dir / "triage.csv", rows)
    write_case_jsonld(out_dir / "case.jsonld", rows, custody=custody, classes=classes)
    (out_dir / "custody.json").write_text(json.dumps(custody, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    counts = custody["counts"]
    log.info(
        "classify: %d files: %s; %d need review; %s", len(rows), counts["predicted"], counts["needs_review"], out_dir
    )
    return custody


# Sharded triage: listing, shards, merge -------------------------------------------------------------


def write_listing(path: Path, listing: Listing) -> None:
    """The input's inspection as JSON lines: a header with the input, its container record and the
    listing's digest (so a changed or damaged listing is caught when read), then one file per line."""
    inspections = listing.inspections
    header = {"input_dir": str(Path(listing.root).resolve()), "files": len(inspections), "container": listing.container}
    header["input_listing_sha256"] = listing_sha256(inspections)
    lines = [json.dumps(header)] + [json.dumps(dataclasses.asdict(r)) for r in inspections]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, ("\n".join(lines) + "\n").encode("utf-8"))


def classify_listing(
    input_dir: Path,
    listing: Path,
    manifest_config: ManifestConfig,
    workers: int = 1,
    *,
    config: ClassifyConfig | None = None,
) -> int:
    """Stage ``classify_listing``: inspect ``input_dir`` (a folder or a container) once and write
    ``listing``; returns the files."""
    result = list_input(Path(input_dir), manifest_config, config or ClassifyConfig(), workers)
    write_listing(Path(listing), result)
    usable = sum(r.usable for r in result.inspections)
    log.info("classify: listing of %d files (%d usable) written to %s", len(result.inspections), usable, listing)
    return len(result.inspections)


def read_listing(path: Path) -> Listing:
    """The input, its inspections and its container record, as :func:`write_listing` wrote them."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0]) if lines else {}
    inspections = [Inspection(**json.loads(line)) for line in lines[1:]]
    if header.get("files") != len(inspections) or header.get("input_listing_sha256") != listing_sha256(inspections):
        raise IntegrityError(f"{path}: the listing does not match its header (changed or cut short); rerun it")
    return Listing(Path(header["input_dir"]), inspections, header.get("container"))


def score_shard(
    listing: Path,
    part: Path,
    *,
    scatter_item: str,
    classes: list[ClassSpec],
    model_config: ModelConfig,
    evaluate_config: EvaluateConfig,
    adapter: Path | None = None,
    cache_dir: Path | None = None,
    shard_cache_dir: Path | None = None,
    parity_gate: Path | None = None,
    threads: int | None = None,
) -> dict:
    """Score the usable files of one shard of the listing (``shards.score_part``): ``part`` (TSV)
    gets one row per distinct image, by sha256; ``part`` with suffix .json the job's record. Reads
    the shared ``cache_dir`` and writes only ``shard_cache_dir``. Returns the record."""
    from forensic_vlm.modeling import use_threads  # torch: only where images are scored

    use_threads(threads)
    read = read_listing(listing)
    if read.container:
        from forensic_vlm.evidence import check_unchanged

        check_unchanged(read.container)  # before scoring: a changed container is not scored
    return score_part(
        _examples(read.root, [r for r in read.inspections if r.usable]),
        part,
        scatter_item=scatter_item,
        stage="classify",
        labels=[c.id for c in classes],
        model_config=model_config,
        evaluate_config=evaluate_config,
        adapter=adapter,
        cache_dir=cache_dir,
        shard_cache_dir=shard_cache_dir,
        parity_gate=parity_gate,
    )


def assemble_shards(
    listing: Path,
    parts: list[Path],
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
    shard_cache_dirs: list[Path] = (),
) -> dict:
    """Merge the shards' parts into the triage one job writes, after checking that every usable
    file was scored by exactly one shard, with the same model, adapter and scoring path; then merge
    the shards' prediction caches into the shared one (its one writer). Returns the custody record,
    which lists every shard's job."""
    started = dt.datetime.now(dt.UTC)
    read = read_listing(listing)
    scored, records, scoring = read_parts(parts)
    custody = write_triage(
        read.root,
        read.inspections,
        scored,
        Path(out_dir),
        scoring=scoring,
        classes=classes,
        model_config=model_config,
        config=config,
        report_config=report_config,
        adapter=adapter,
        settings={"model": model_config, "evaluate": evaluate_config, "classify": config, "manifest": manifest_config},
        started=started,
        shards=records,
        container=read.container,
    )
    merge_shard_caches(cache_dir, list(shard_cache_dirs))
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
        "md5": inspection.md5,
        "sha1": inspection.sha1,
        "partition": inspection.partition,
        "inode": "" if inspection.inode is None else inspection.inode,
        "created_utc": inspection.created_utc,
        "accessed_utc": inspection.accessed_utc,
        "changed_utc": inspection.changed_utc,
        "deleted": _yes_no(inspection.deleted),
        "locator": inspection.locator,  # not a column: the page reads thumbnails through it
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
    scoring: dict,
    settings: dict,
    started: dt.datetime,
    triage: Path,
    container: dict | None = None,
) -> dict:
    """The chain-of-custody record: when, where, with what, and what came out. ``scoring``: a
    :func:`scoring_record`."""
    configuration = {name: to_dict(section) for name, section in settings.items()}
    scored = [r for r in rows if r["status"] == SCORED]
    return {
        "case": settings["classify"].case,
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "user": getpass.getuser(),
        "input_dir": str(root.resolve()),
        "input_kind": "container" if container else "folder",
        # The container as it was read: path, size, segments, stored and computed hashes, verdict.
        "container": container,
        "input_listing_sha256": listing_sha256(inspections),
        "triage_tsv_sha256": sha256_file(triage),
        "model": {
            "name_or_path": model_config.name_or_path,
            **scoring["path"],  # the quantization resolved, which kernels ran, whether the decoder was compiled
            # The hashes the run verified and keyed its predictions by, taken before loading.
            "files_sha256": scoring["model_files_sha256"],
        },
        "adapter": {"path": str(adapter), "files_sha256": scoring["adapter_files_sha256"]} if adapter else None,
        # How auto chose the scoring path for this adapter (rule parity_gate), with its figures.
        "parity_gate": scoring.get("parity_gate"),
        # The examiners' decisions files the adapter learned from (their sha256 as trained on).
        "reviews_trained_on": _reviews_trained_on(adapter),
        "review_thresholds": thresholds or "none: zero-shot has no validated thresholds; every image needs review",
        "configuration_sha256": config_sha256(configuration),
        "configuration": configuration,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "device": scoring["device"],
        "counts": {
            "files": len(rows),
            "scored": len(scored),
            "distinct_images": len({r["sha256"] for r in scored}),
            "rejected": len(rows) - len(scored),
            "rejected_by_reason": dict(Counter(r["reason"] for r in rows if r["status"] != SCORED)),
            "deleted_scored": sum(1 for r in scored if r["deleted"] == "true"),
            "predicted": {f"{c.id} {c.en}": sum(1 for r in scored if int(r["predicted"]) == c.id) for c in classes},
            "needs_review": sum(1 for r in rows if r["needs_review"] == "true"),
        },
        "scoring": scoring["facts"],
    }
