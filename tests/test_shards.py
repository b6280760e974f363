"""Sharded triage (classify.shards): the folder listed once, scored in shards cut by content hash,
merged into exactly the triage one job writes; the shards' caches merged by one writer. On the
CPU with the tiny model; the Snakemake wiring is checked in test_workflow.py."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import (
    SCORING_TIMES,
    SHARD_VICTIM,
    assert_same_scores,
    copy_run,
    evidence_unchanged,
    model_config,
    planned_jobs,
    same_figures,
    snakemake,
)
from forensic_vlm.classify import (
    assemble_shards,
    classify_folder,
    classify_listing,
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
from forensic_vlm.evaluate import assemble_evaluation, evaluate_split, score_split_shard
from forensic_vlm.faults import ENVIRONMENT
from forensic_vlm.prediction_cache import PredictionCache
from forensic_vlm.scoring import shard_of
from forensic_vlm.shards import parse_scatter_item
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


def settings(tiny_model: Path) -> dict:
    """The settings a one-job triage and a merge of shards take alike."""
    return {
        "classes": CLASSES,
        "model_config": model_config(tiny_model),
        "evaluate_config": EVALUATE,
        "config": ClassifyConfig(),
        "manifest_config": ManifestConfig(),
        "report_config": REPORT,
    }


def assemble(tiny_model: Path, listing: Path, parts: list[Path], work: Path) -> dict:
    return assemble_shards(
        listing,
        parts,
        work / "out",
        **settings(tiny_model),
        cache_dir=work / "cache",
        shard_cache_dirs=sorted((work / "cache" / "shards").glob("*")),
    )


def test_three_shards_merge_into_the_triage_one_job_writes(tiny_model: Path, extraction: Path, tmp_path: Path) -> None:
    with evidence_unchanged(extraction):
        one = classify_folder(
            extraction, tmp_path / "one" / "out", **settings(tiny_model), cache_dir=tmp_path / "one" / "cache"
        )
        work = tmp_path / "three"
        listing, parts = sharded(tiny_model, extraction, work, 3)
        three = assemble(tiny_model, listing, parts, work)
    triage = (tmp_path / "one" / "out" / "triage.tsv").read_bytes()
    assert (work / "out" / "triage.tsv").read_bytes() == triage  # the same rows, in the same order
    assert three["triage_tsv_sha256"] == one["triage_tsv_sha256"]
    assert three["counts"] == one["counts"] and three["input_listing_sha256"] == one["input_listing_sha256"]

    inspections = read_listing(listing).inspections
    distinct = {r.sha256 for r in inspections if r.usable}
    assert len(distinct) < sum(r.usable for r in inspections)  # the demo has duplicates: each scored once
    scored = [row["sha256"] for part in parts for row in read_tsv(part)]
    assert sorted(scored) == sorted(distinct)  # every image by exactly one shard
    records = three["shards"]
    assert [r["shard"] for r in records] == ["1-of-3", "2-of-3", "3-of-3"]
    assert all(r["host"] and r["device"] and r["started_utc"] <= r["finished_utc"] for r in records)
    assert sum(r["scoring"]["facts"]["images_scored"] for r in records) == len(distinct)
    assert three["scoring"]["device"] == one["scoring"]["device"] and three["scoring"]["devices"] == 3

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


@pytest.mark.slow
def test_files_added_later_are_scored_and_the_old_ones_are_not_scored_again(
    tiny_model: Path, extraction: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "extraction"
    shutil.copytree(extraction, folder)
    one_cache, work = tmp_path / "one" / "cache", tmp_path / "sharded"
    classify_folder(folder, tmp_path / "one" / "before", **settings(tiny_model), cache_dir=one_cache)
    listing, parts = sharded(tiny_model, folder, work, 3)
    assemble(tiny_model, listing, parts, work)
    before = read_listing(listing).inspections

    more = tmp_path / "more"
    generate_demo_extraction(more, tmp_path / "more.tsv", CLASSES, DemoConfig(extraction_images=8, seed=21))
    for image in sorted(p for p in more.rglob("*") if p.is_file()):
        shutil.copy(image, folder / f"added_{image.name}")
    classify_folder(folder, tmp_path / "one" / "after", **settings(tiny_model), cache_dir=one_cache)
    for part in parts:  # the same three shards, run again on the grown folder
        part.unlink()
    listing, parts = sharded(tiny_model, folder, work, 3)
    assemble(tiny_model, listing, parts, work)

    after = read_listing(listing).inspections
    new = {r.sha256 for r in after if r.usable} - {r.sha256 for r in before if r.usable}
    assert new  # the added files brought new content
    records = [json.loads(p.with_suffix(".json").read_text())["scoring"]["facts"] for p in parts]
    assert sum(r["images_scored"] for r in records) == len(new)  # only the new images were scored
    assert (work / "out" / "triage.tsv").read_bytes() == (tmp_path / "one" / "after" / "triage.tsv").read_bytes()


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


@pytest.mark.slow
def test_three_evaluation_shards_merge_into_the_predictions_and_metrics_one_job_writes(
    tiny_model: Path, tiny_dataset: dict, tmp_path: Path
) -> None:
    table, raw = tiny_dataset["train"], tiny_dataset["raw_data"]
    common = {"classes": CLASSES, "model_config": model_config(tiny_model), "config": EVALUATE}
    one = evaluate_split(table, raw, **common, out_dir=tmp_path / "one", cache_dir=tmp_path / "one_cache")
    work = tmp_path / "three"
    parts = [work / "shards" / f"{i}-of-3.tsv" for i in (1, 2, 3)]
    for part in parts:
        score_split_shard(
            table,
            raw,
            part,
            scatter_item=part.stem,
            **common,
            cache_dir=work / "cache",
            shard_cache_dir=work / "cache" / "shards" / part.stem,
        )
    scored = [row["sha256"] for part in parts for row in read_tsv(part)]
    assert len(scored) == len(set(scored)) == len({r["sha256"] for r in read_tsv(table)})
    assert all(read_tsv(part) for part in parts)  # every shard had work: the cut is not trivial

    def merge(out: Path, merged: list[Path]) -> dict:
        return assemble_evaluation(
            table,
            raw,
            merged,
            **common,
            out_dir=out,
            cache_dir=work / "cache",
            shard_cache_dirs=sorted((work / "cache" / "shards").glob("*")),
        )

    with pytest.raises(IntegrityError, match="of a run with 2 shards"):
        merge(work / "two", parts[:2])  # a shard left out
    three = merge(work / "out", parts)
    for name in ("predictions.tsv", "classification_report.txt"):
        assert (work / "out" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    timing = SCORING_TIMES | {"shards", "shard_jobs"}
    assert {k: v for k, v in three.items() if k not in timing} == {
        k: v for k, v in one.items() if k not in timing | {"devices"}
    } | {"devices": 3}
    assert [job["shard"] for job in three["shard_jobs"]] == ["1-of-3", "2-of-3", "3-of-3"]
    assert not list((work / "cache" / "shards").rglob("*.tsv"))  # merged into the shared cache

    first = parts[0].read_text().splitlines()
    parts[0].write_text("\n".join([first[0], *first[2:], first[1]]) + "\n")  # same rows, another order
    with pytest.raises(IntegrityError, match=r"1-of-3\.tsv: its content is not the part its job recorded"):
        merge(work / "tampered", parts)


@pytest.mark.slow
def test_set_scatter_gives_the_same_triage_and_a_killed_shard_reruns_alone(
    demo_run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both evaluations in three shard jobs each and the triage in three, one of which is killed
    after scoring (before its part is written): the rerun schedules that shard alone, it goes on
    from its own cache, and every merged output is byte for byte what one job wrote."""
    workdir = tmp_path / "work"
    copy_run(demo_run["workdir"], workdir)
    shutil.rmtree(workdir / "results" / "cache" / "predictions")  # the shards must score, not look up
    out = workdir / "results" / "classify" / "demo"
    victim = SHARD_VICTIM
    monkeypatch.setenv(ENVIRONMENT, f"classify.shard.{victim}")  # killed after scoring, before its part
    killed = snakemake(workdir, "--set-scatter", "classify=3", "evaluate=3", "--keep-going", demo=True)
    assert killed.returncode != 0
    assert {p.stem for p in (out / "shards").glob("*-of-3.tsv")} == {"1-of-3", "2-of-3", "3-of-3"} - {victim}
    monkeypatch.delenv(ENVIRONMENT)

    plan = snakemake(workdir, "-n", "--set-scatter", "classify=3", "evaluate=3", demo=True)
    assert re.search(r"^classify_shard\s+1$", plan.stdout, re.M), plan.stdout  # that shard alone
    assert planned_jobs(plan) == {"classify_shard", "classify", "all"}  # the evaluations were done
    rerun = snakemake(workdir, "--set-scatter", "classify=3", "evaluate=3", demo=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]

    # The one-job triage, row for row (probabilities to PROCESS_ROUNDING: scored in other processes).
    assert_same_scores(out / "triage.tsv", demo_run["workdir"] / "results" / "classify" / "demo" / "triage.tsv")
    custody = json.loads((out / "custody.json").read_text())
    assert [s["shard"] for s in custody["shards"]] == ["1-of-3", "2-of-3", "3-of-3"]
    resumed = json.loads((out / "shards" / f"{victim}.json").read_text())
    assert resumed["scoring"]["facts"]["images_scored"] == 0  # its own cache held what it scored
    assert resumed["scoring"]["facts"]["images_from_cache"] == resumed["files"] > 0
    leftover = [p for p in (workdir / "results" / "cache" / "predictions" / "shards").rglob("*") if p.is_file()]
    assert not leftover  # every shard's cache merged into the shared one

    timing = SCORING_TIMES | {"shards", "shard_jobs"}
    for kind in ("zeroshot", "finetuned"):  # and the evaluations, scored in three jobs each
        local, sharded = (root / "results" / "evaluate" / kind for root in (demo_run["workdir"], workdir))
        assert_same_scores(sharded / "predictions.tsv", local / "predictions.tsv")
        metrics = [json.loads((folder / "metrics.json").read_text()) for folder in (local, sharded)]
        assert metrics[1]["shards"] == 3 and len(metrics[1]["shard_jobs"]) == 3
        with_images = sum(job["distinct_images"] > 0 for job in metrics[1]["shard_jobs"])
        assert with_images >= 2  # the cut is not trivial (19 test images: a shard may get no batch)
        assert metrics[1]["devices"] == with_images * metrics[0]["devices"]  # each scored on its own
        # The calibration figures come from the probabilities (PROCESS_ROUNDING): equal to 1e-5.
        local_figures, sharded_figures = (
            {k: v for k, v in m.items() if k not in timing | {"devices"}} for m in metrics
        )
        assert same_figures(sharded_figures, local_figures), (sharded_figures, local_figures)


def test_a_big_case_page_lists_the_first_rows_and_says_the_rest_are_in_the_table(tmp_path: Path) -> None:
    from forensic_vlm.triage_page import write_triage_page

    rows = [
        {
            "rank": i,
            "status": "rejected",
            "path": f"f{i}.txt",
            "flags": "",
            "sha256": f"{i:064x}",
            "needs_review": "true",
        }
        | {"reason": "unsupported_format", "message": "not an image"}
        for i in range(1, 2001)
    ]
    counts = {"files": 2000, "scored": 0, "rejected": 2000, "needs_review": 2000, "predicted": {}}
    custody = {
        "counts": counts | {"rejected_by_reason": {"unsupported_format": 2000}},
        "review_thresholds": "none",
        "input_dir": "/evidence",
        "model": {"name_or_path": "m"},
        "adapter": None,
        "device": "CPU",
        "finished_utc": "now",
        "host": "h",
        "input_listing_sha256": "0" * 64,
    }
    pages = {}
    for cap in (100, 5000):
        page = write_triage_page(
            tmp_path / f"{cap}.html",
            rows,
            root=tmp_path,
            classes=CLASSES,
            config=ClassifyConfig(page_rows=cap),
            report=REPORT,
            custody=custody,
        )
        pages[cap] = page.read_text()
    assert pages[100].count("<tr>") == 100 + 1 + 1 + 1 + 1  # file rows, and the headers of four tables
    assert "the first 100 of 2000 rows" in pages[100] and "f100.txt" in pages[100] and "f101.txt" not in pages[100]
    assert "the first" not in pages[5000] and "f2000.txt" in pages[5000]
