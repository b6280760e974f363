"""Sharded triage (classify.shards): the folder listed once, scored in shards cut by content hash,
merged into exactly the triage one job writes; the shards' caches merged by one writer. On the
CPU with the tiny model; the Snakemake wiring is checked in test_workflow.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import evidence_unchanged, model_config
from forensic_vlm.classify import (
    assemble_shards,
    classify_folder,
    classify_listing,
    parse_scatter_item,
    read_listing,
    score_shard,
)
from forensic_vlm.config import (
    DEFAULT_CLASSES,
    ClassifyConfig,
    DemoConfig,
    EvaluateConfig,
    ManifestConfig,
    ReportConfig,
)
from forensic_vlm.demo_data import generate_demo_extraction
from forensic_vlm.errors import IntegrityError
from forensic_vlm.prediction_cache import PredictionCache
from forensic_vlm.scoring import shard_of
from forensic_vlm.tables import read_tsv

CLASSES = list(DEFAULT_CLASSES)
EVALUATE = EvaluateConfig(num_workers=0, batch_size=4)
REPORT = ReportConfig(show_images=False)


def test_shards_are_fixed_by_content_and_named_as_snakemake_names_them() -> None:
    digests = [hashlib.sha256(bytes([i])).hexdigest() for i in range(64)]
    assert {shard_of(d, 3) for d in digests} == {0, 1, 2}
    assert [shard_of(d, 1) for d in digests] == [0] * len(digests)
    assert parse_scatter_item("2-of-3") == (1, 3) and parse_scatter_item("1-of-1") == (0, 1)
    for bad in ("0-of-3", "4-of-3", "2of3", "2-of-3.tsv"):
        with pytest.raises(ValueError, match="not a scatter item"):
            parse_scatter_item(bad)


@pytest.fixture(scope="module")
def extraction(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shards") / "extraction"
    generate_demo_extraction(folder, folder.parent / "listing.tsv", CLASSES, DemoConfig(extraction_images=24, seed=7))
    return folder


def sharded(tiny_model: Path, folder: Path, work: Path, shards: int) -> tuple[Path, list[Path]]:
    listing = work / "listing.jsonl"
    classify_listing(folder, listing, ManifestConfig())
    parts = []
    for item in (f"{i}-of-{shards}" for i in range(1, shards + 1)):
        parts.append(work / "shards" / f"{item}.tsv")
        score_shard(
            listing,
            parts[-1],
            scatter_item=item,
            classes=CLASSES,
            model_config=model_config(tiny_model),
            evaluate_config=EVALUATE,
            cache_dir=work / "cache",
            shard_cache_dir=work / "cache" / "shards" / item,
        )
    return listing, parts


def assemble(tiny_model: Path, listing: Path, parts: list[Path], work: Path) -> dict:
    return assemble_shards(
        listing,
        parts,
        work / "out",
        classes=CLASSES,
        model_config=model_config(tiny_model),
        evaluate_config=EVALUATE,
        config=ClassifyConfig(),
        manifest_config=ManifestConfig(),
        report_config=REPORT,
        cache_dir=work / "cache",
        shard_cache_dirs=sorted((work / "cache" / "shards").glob("*")),
    )


def test_three_shards_merge_into_the_triage_one_job_writes(tiny_model: Path, extraction: Path, tmp_path: Path) -> None:
    with evidence_unchanged(extraction):
        one = classify_folder(
            extraction,
            tmp_path / "one" / "out",
            classes=CLASSES,
            model_config=model_config(tiny_model),
            evaluate_config=EVALUATE,
            config=ClassifyConfig(),
            manifest_config=ManifestConfig(),
            report_config=REPORT,
            cache_dir=tmp_path / "one" / "cache",
        )
        work = tmp_path / "three"
        listing, parts = sharded(tiny_model, extraction, work, 3)
        three = assemble(tiny_model, listing, parts, work)
    triage = (tmp_path / "one" / "out" / "triage.tsv").read_bytes()
    assert (work / "out" / "triage.tsv").read_bytes() == triage  # the same rows, in the same order
    assert three["triage_tsv_sha256"] == one["triage_tsv_sha256"]
    assert three["counts"] == one["counts"] and three["input_listing_sha256"] == one["input_listing_sha256"]

    _, inspections = read_listing(listing)
    distinct = {r.sha256 for r in inspections if r.usable}
    assert len(distinct) < sum(r.usable for r in inspections)  # the demo has duplicates: each scored once
    scored = [row["sha256"] for part in parts for row in read_tsv(part)]
    assert sorted(scored) == sorted(distinct)  # every image by exactly one shard
    records = three["shards"]
    assert [r["shard"] for r in records] == ["1-of-3", "2-of-3", "3-of-3"]
    assert all(r["host"] and r["device"] and r["started_utc"] <= r["finished_utc"] for r in records)
    assert sum(r["scoring"]["facts"]["images_scored"] for r in records) == len(distinct)

    # One writer: every shard's rows in the shared cache once, the shards' own caches gone.
    shared = [p for p in (work / "cache").glob("*.tsv")]
    assert len(shared) == 1 and not list((work / "cache" / "shards").rglob("*.tsv"))
    lines = shared[0].read_text().splitlines()[1:]
    assert sorted(line.split("\t")[0] for line in lines) == sorted(distinct)

    # Rerun: nothing is scored again, and the triage is the same.
    again = tmp_path / "again"
    again.mkdir()
    (again / "cache").symlink_to(work / "cache", target_is_directory=True)
    listing, parts = sharded(tiny_model, extraction, again, 3)
    assert all(json.loads(p.with_suffix(".json").read_text())["scoring"]["facts"]["images_scored"] == 0 for p in parts)
    assemble(tiny_model, listing, parts, again)
    assert (again / "out" / "triage.tsv").read_bytes() == triage


def test_a_part_that_was_changed_or_scored_by_the_wrong_shard_stops_the_merge(
    tiny_model: Path, extraction: Path, tmp_path: Path
) -> None:
    listing, parts = sharded(tiny_model, extraction, tmp_path, 2)
    text = parts[0].read_text()
    parts[0].write_text(text.replace("\t0.", "\t1.", 1))
    with pytest.raises(IntegrityError, match=r"1-of-2\.tsv: its content is not the part its job recorded"):
        assemble(tiny_model, listing, parts, tmp_path)
    parts[0].write_text(text)
    with pytest.raises(IntegrityError, match="was scored by another shard too"):
        assemble(tiny_model, listing, [parts[0], parts[0]], tmp_path)
    lines = listing.read_text().splitlines()
    listing.write_text("\n".join(lines[:-1]) + "\n")  # a file dropped from the listing
    with pytest.raises(IntegrityError, match="the listing does not match its header"):
        assemble(tiny_model, listing, parts, tmp_path)


def test_a_shard_reads_the_shared_cache_and_writes_only_its_own(tmp_path: Path) -> None:
    columns = ["sha256", "predicted", "p0", "p1", "answer"]
    row = {"sha256": "a" * 64, "predicted": "1", "p0": "0.25", "p1": "0.75", "answer": ""}
    PredictionCache(tmp_path / "shared", {"k": 1}, columns).add([row])
    before = (tmp_path / "shared").stat().st_mtime_ns, sorted(p.name for p in (tmp_path / "shared").iterdir())
    shard = PredictionCache(tmp_path / "shard", {"k": 1}, columns, shared=tmp_path / "shared")
    assert shard.get("a" * 64) == row
    shard.add([row, {**row, "sha256": "b" * 64}])
    assert (tmp_path / "shared").stat().st_mtime_ns, sorted(p.name for p in (tmp_path / "shared").iterdir()) == before
    assert len((tmp_path / "shard" / f"{shard.key}.tsv").read_text().splitlines()) == 2  # header and b only
    conflicting = PredictionCache(tmp_path / "other", {"k": 1}, columns)
    conflicting.add([{**row, "predicted": "0", "p0": "0.75", "p1": "0.25"}])
    with pytest.raises(IntegrityError, match="differs from the shared cache's"):
        PredictionCache(tmp_path / "other", {"k": 1}, columns, shared=tmp_path / "shared")
