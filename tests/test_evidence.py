"""Triage straight from evidence containers (classify.input): the demo extraction as a folder, as
a raw FAT image, as an E01 made by ewfacquire, as a zip and as a tar.gz gives the same classes and
probabilities by content hash; a deleted file on the card is found, scored and flagged; a damaged
E01 segment stops the run naming the container; the containers are never changed; case.jsonld
is valid CASE/UCO and triage.csv reads in pandas. On the CPU with the tiny model."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from evidence_images import DELETED_NAME, build_containers, ext4_image, missing_tools, partitioned_disk, zip_of

from conftest import image_bytes, model_config, planned_jobs, snakemake, write
from forensic_vlm.classify import classify_folder, classify_listing, read_listing
from forensic_vlm.config import (
    DEFAULT_CLASSES,
    ClassifyConfig,
    DemoConfig,
    EvaluateConfig,
    ManifestConfig,
    ReportConfig,
)
from forensic_vlm.demo_data import generate_demo_extraction
from forensic_vlm.errors import ConfigError, ContainerError, ContainerIntegrityError, EvidenceChangedError
from forensic_vlm.exchange import CSV_COLUMNS
from forensic_vlm.tables import read_tsv, sha256_file

CLASSES = list(DEFAULT_CLASSES)
EVALUATE = EvaluateConfig(num_workers=0, batch_size=4)
MANIFEST = ManifestConfig(on_bad_input="report")
#: The columns the issue names for triage.csv, as the forensic suites spell them.
IMPORT_COLUMNS = ["Path", "MD5", "SHA-1", "SHA-256", "Size", "Category", "Confidence", "Needs Review"]


@pytest.fixture(scope="module")
def evidence(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The demo extraction, and the same files in every container kind (read-only)."""
    missing = missing_tools()
    if missing:
        message = "Debian tools to build evidence are missing: " + ", ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message + " (.ci/run installs them)")
        pytest.skip(message)
    root = tmp_path_factory.mktemp("evidence")
    folder = root / "extraction"
    generate_demo_extraction(folder, root / "truth.tsv", CLASSES, DemoConfig(extraction_images=16, seed=11))
    deleted = image_bytes(4242, (96, 72))
    containers = build_containers(folder, root / "containers", deleted)
    before = {name: _hashes(path) for name, path in containers.items()}
    yield {"folder": folder, "deleted": deleted, "root": root, **containers}
    assert {name: _hashes(path) for name, path in containers.items()} == before, "a container changed"


def _hashes(container: Path) -> dict[str, str]:
    """Every file a container is made of (all E01 segments), by content."""
    return {p.name: sha256_file(p) for p in sorted(container.parent.glob(container.name.split(".")[0] + ".*"))}


def triage(tiny_model: Path, source: Path, out: Path, **classify) -> tuple[dict, list[dict]]:
    custody = classify_folder(
        source,
        out,
        classes=CLASSES,
        model_config=model_config(tiny_model),
        evaluate_config=EVALUATE,
        config=ClassifyConfig(**classify),
        manifest_config=MANIFEST,
        report_config=ReportConfig(show_images=True),  # thumbnails read back through the container too
        cache_dir=None,
    )
    return custody, read_tsv(out / "triage.tsv"), out


@pytest.fixture(scope="module")
def triages(tiny_model: Path, evidence: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("triages")
    return {kind: triage(tiny_model, evidence[kind], out / kind) for kind in ("folder", "raw", "e01", "zip", "tar")}


def scores(rows: list[dict]) -> dict[str, tuple]:
    return {r["sha256"]: (r["predicted"], *(r[f"p{c.id}"] for c in CLASSES)) for r in rows if r["status"] == "scored"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["raw", "e01", "zip", "tar"])
def test_a_container_gives_the_folders_classes_and_probabilities(triages: dict, evidence: dict, kind: str) -> None:
    folder_custody, folder_rows, _ = triages["folder"]
    custody, rows, out = triages[kind]
    from_folder, from_container = scores(folder_rows), scores(rows)
    deleted = hashlib.sha256(evidence["deleted"]).hexdigest()
    assert {k: v for k, v in from_container.items() if k != deleted} == from_folder  # row for row, to the digit
    # The same files by path inside the container (FAT keeps the long names), each with its own hashes.
    on_disk = {
        p.relative_to(evidence["folder"]).as_posix(): p.read_bytes()
        for p in evidence["folder"].rglob("*")
        if p.is_file()
    }
    by_path = {r["path"]: r for r in rows}
    for path, data in on_disk.items():
        row = by_path[path]
        if data:
            assert (row["md5"], row["sha1"], row["sha256"]) == (
                hashlib.md5(data).hexdigest(),
                hashlib.sha1(data).hexdigest(),
                hashlib.sha256(data).hexdigest(),
            )
        assert row["size_bytes"] == str(len(data))
    assert custody["input_kind"] == "container" and folder_custody["input_kind"] == "folder"
    assert custody["container"]["path"] == str(evidence[kind].resolve())
    if kind == "e01":
        record = custody["container"]
        assert len(record["segments"]) > 1 and record["verified"] == "verified: md5 matches, sha1 matches"
        assert (
            record["computed_hashes"] == record["stored_hashes"] and record["acquisition"]["case_number"] == "case-16"
        )
    if kind in ("raw", "e01"):  # a file system: inode (FAT directory-entry address) and times
        assert all(r["inode"] and r["mtime_utc"] and r["created_utc"] for r in rows if r["path"] in on_disk)
    page = (out / "triage.html").read_text()
    scored = sum(r["status"] == "scored" for r in rows)
    assert page.count("data:image/jpeg;base64,") == scored  # every thumbnail read back from the container


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["raw", "e01"])
def test_a_deleted_file_on_the_card_is_found_scored_and_flagged(triages: dict, evidence: dict, kind: str) -> None:
    custody, rows, _ = triages[kind]
    deleted = [r for r in rows if r["deleted"] == "true"]
    assert len(deleted) == 1
    row = deleted[0]
    # FAT keeps the deleted name but its first character (The Sleuth Kit shows it as "_").
    assert row["path"] == "_" + DELETED_NAME[1:] and "deleted" in row["flags"].split(",")
    assert row["status"] == "scored" and row["sha256"] == hashlib.sha256(evidence["deleted"]).hexdigest()
    assert custody["counts"]["deleted_scored"] == 1
    assert all(r["deleted"] == "false" for r in triages["folder"][1])


def test_a_damaged_e01_segment_stops_the_run_naming_the_container(evidence: dict, tmp_path: Path) -> None:
    copy = tmp_path / "damaged"
    copy.mkdir()
    for segment in sorted(evidence["e01"].parent.glob("card.E*")):
        shutil.copy(segment, copy / segment.name)
    target = next(
        copy / s.name
        for s in sorted(evidence["e01"].parent.glob("card.E*"))
        if b"\xff\xd8\xff" in s.read_bytes()[4096:]
    )
    data = bytearray(target.read_bytes())
    at = data.index(b"\xff\xd8\xff", 4096) + 600  # inside a JPEG's data: a byte of the evidence itself
    data[at] ^= 0x5A
    target.write_bytes(bytes(data))
    image = copy / "card.E01"
    with pytest.raises(ContainerIntegrityError, match=f"{image}: the media data does not match the hash stored"):
        classify_listing(image, tmp_path / "listing.jsonl", MANIFEST)
    assert not (tmp_path / "listing.jsonl").exists()
    # The examiner may go on; custody.json and the listing then say so.
    classify_listing(image, tmp_path / "listing.jsonl", MANIFEST, config=ClassifyConfig(accept_hash_mismatch=True))
    verdict = read_listing(tmp_path / "listing.jsonl").container["verified"]
    assert verdict.startswith("MISMATCH accepted by the examiner") and "md5 stored" in verdict
    # Not verifying is recorded too.
    classify_listing(image, tmp_path / "unverified.jsonl", MANIFEST, config=ClassifyConfig(verify_container=False))
    assert read_listing(tmp_path / "unverified.jsonl").container["verified"].startswith("not verified")


def test_a_missing_e01_segment_is_named(evidence: dict, tmp_path: Path) -> None:
    segments = sorted(evidence["e01"].parent.glob("card.E*"))
    for segment in segments[:1] + segments[2:]:  # E02 left out
        shutil.copy(segment, tmp_path / segment.name)
    with pytest.raises(ContainerIntegrityError, match=str(tmp_path / "card.E01")):
        classify_listing(tmp_path / "card.E01", tmp_path / "listing.jsonl", MANIFEST)
    # Unverified, the listing stops too: never a short list of what could be read.
    with pytest.raises(ContainerError, match=str(tmp_path / "card.E01")):
        classify_listing(
            tmp_path / "card.E01", tmp_path / "listing.jsonl", MANIFEST, config=ClassifyConfig(verify_container=False)
        )
    # A segment cut short (a copy that stopped early) is named as well.
    cut = tmp_path / "cut"
    cut.mkdir()
    for segment in segments:
        shutil.copy(segment, cut / segment.name)
    with open(cut / segments[-2].name, "r+b") as handle:
        handle.truncate(handle.seek(0, 2) // 2)
    with pytest.raises(ContainerIntegrityError, match=str(cut / "card.E01")):
        classify_listing(cut / "card.E01", tmp_path / "listing.jsonl", MANIFEST)
    assert not (tmp_path / "listing.jsonl").exists()


@pytest.mark.slow  # starts worker processes
def test_worker_processes_read_the_container_as_one_process_does(evidence: dict, tmp_path: Path) -> None:
    """The same bytes whether one process reads the container or two forked workers do (each opens
    its own handles; the inherited ones were never seen to interleave here, but could)."""
    listings = {}
    for workers in (1, 2):
        config = ClassifyConfig(verify_container=False)
        classify_listing(evidence["e01"], tmp_path / f"{workers}.jsonl", MANIFEST, workers, config=config)
        listings[workers] = [
            (r.path, r.sha256, r.md5, r.reason) for r in read_listing(tmp_path / f"{workers}.jsonl").inspections
        ]
    assert listings[1] == listings[2] and len(listings[1]) > 16


@pytest.mark.slow
def test_a_container_scored_in_shards_gives_the_one_job_triage(
    tiny_model: Path, triages: dict, evidence: dict, tmp_path: Path
) -> None:
    """The shard jobs read the container through the listing's locators, in DataLoader workers."""
    from forensic_vlm.classify import assemble_shards, score_shard

    listing = tmp_path / "listing.jsonl"
    classify_listing(evidence["e01"], listing, MANIFEST, 2)
    parts = []
    for item in ("1-of-2", "2-of-2"):
        parts.append(tmp_path / "shards" / f"{item}.tsv")
        score_shard(
            listing,
            parts[-1],
            scatter_item=item,
            classes=CLASSES,
            model_config=model_config(tiny_model),
            evaluate_config=EvaluateConfig(num_workers=2, batch_size=4),
            cache_dir=tmp_path / "cache",
            shard_cache_dir=tmp_path / "cache" / "shards" / item,
        )
    custody = assemble_shards(
        listing,
        parts,
        tmp_path / "out",
        classes=CLASSES,
        model_config=model_config(tiny_model),
        evaluate_config=EVALUATE,
        config=ClassifyConfig(),
        manifest_config=MANIFEST,
        report_config=ReportConfig(show_images=True),
        cache_dir=tmp_path / "cache",
        shard_cache_dirs=sorted((tmp_path / "cache" / "shards").glob("*")),
    )
    one_custody, _, one = triages["e01"]
    assert (tmp_path / "out" / "triage.tsv").read_bytes() == (one / "triage.tsv").read_bytes()
    assert custody["container"]["verified"] == one_custody["container"]["verified"]
    assert (tmp_path / "out" / "triage.csv").read_bytes() == (one / "triage.csv").read_bytes()


def test_an_ext4_file_system_lists_the_folders_files_with_inodes_and_times(evidence: dict, tmp_path: Path) -> None:
    image = ext4_image(evidence["folder"], tmp_path / "ext4.img")
    image.chmod(0o444)
    classify_listing(image, tmp_path / "listing.jsonl", MANIFEST, config=ClassifyConfig(verify_container=False))
    listed = {r.path: r for r in read_listing(tmp_path / "listing.jsonl").inspections}
    on_disk = {p.relative_to(evidence["folder"]).as_posix(): p for p in evidence["folder"].rglob("*") if p.is_file()}
    assert set(listed) == set(on_disk)  # lost+found is empty, and no file system metadata is listed
    for path, file in on_disk.items():
        row = listed[path]
        assert row.sha256 == (sha256_file(file) if file.stat().st_size else "")
        assert row.inode and row.changed_utc and row.created_utc and not row.deleted  # ext keeps all four times
        assert row.mtime_utc == dt.datetime.fromtimestamp(int(file.stat().st_mtime), dt.UTC).isoformat()


def test_the_e01_chunk_cache_reads_the_bytes_the_raw_image_holds(evidence: dict) -> None:
    """ChunkCache (an LRU over pyewf's chunks, evicting here after 3) against the raw image."""
    import random

    import pyewf

    from forensic_vlm.evidence import ChunkCache

    handle = pyewf.handle()
    handle.open([str(p) for p in sorted(evidence["e01"].parent.glob("card.E*"))])
    cached, raw = ChunkCache(handle, chunks=3), evidence["raw"].read_bytes()
    assert cached.get_media_size() == len(raw)
    rng = random.Random(16)
    for _ in range(300):
        offset, size = rng.randrange(len(raw) + 10), rng.choice([1, 511, 4096, 32768, 100_000])
        cached.seek(offset)
        assert cached.read(size) == raw[offset : offset + size] and cached.get_offset() == min(
            offset + size, max(offset, len(raw))
        )
    cached.seek(-10, os.SEEK_END)
    assert cached.read() == raw[-10:]
    with pytest.raises(OSError, match="negative"):
        cached.seek(-1)
    cached.close()


def test_a_container_changed_after_its_listing_stops_the_triage(tiny_model: Path, tmp_path: Path) -> None:
    """Replaced after the listing: the shard job refuses to score it, and the one-job triage,
    which may still hold its old bytes in memory, refuses to write a triage of it."""
    from forensic_vlm.classify import score_shard

    folder = tmp_path / "phone"
    for seed in range(3):
        write(folder / "DCIM" / f"{seed}.jpg", image_bytes(seed))
    archive = zip_of(folder, tmp_path / "phone.zip")
    classify_listing(archive, tmp_path / "listing.jsonl", MANIFEST)
    write(folder / "DCIM" / "1.jpg", image_bytes(99))  # the same name, other content
    time.sleep(0.01)
    zip_of(folder, archive)
    with pytest.raises(EvidenceChangedError, match=r"phone\.zip: the container changed since it was listed"):
        score_shard(
            tmp_path / "listing.jsonl",
            tmp_path / "part.tsv",
            scatter_item="1-of-1",
            classes=CLASSES,
            model_config=model_config(tiny_model),
            evaluate_config=EVALUATE,
        )
    assert not (tmp_path / "part.tsv").exists()
    # Read in a fresh process, a changed file is caught by its sha256 as it is read.
    listing = read_listing(tmp_path / "listing.jsonl")
    script = (
        "import sys, json\n"
        "from pathlib import Path\n"
        "from forensic_vlm.batches import Example\n"
        "from forensic_vlm.images import load_checked_image, read_located_bytes\n"
        "row = json.loads(sys.argv[1])\n"
        "example = Example(Path(row['path']), row['sha256'], -1, 1, 1, row['path'], locator=row['locator'])\n"
        "load_checked_image(example.path, example.sha256, read_located_bytes(example.locator))\n"
    )
    changed = next(r for r in listing.inspections if r.path == "DCIM/1.jpg")
    row = json.dumps({"path": f"{archive}/{changed.path}", "sha256": changed.sha256, "locator": changed.locator})
    result = subprocess.run([sys.executable, "-c", script, row], capture_output=True, text=True)
    assert result.returncode != 0 and "EvidenceChangedError" in result.stderr
    assert "phone.zip/DCIM/1.jpg: content changed since it was listed" in result.stderr


def test_a_file_that_is_no_container_is_named(evidence: dict, tmp_path: Path) -> None:
    picture = write(tmp_path / "photo.jpg", image_bytes(5))
    with pytest.raises(ContainerError, match=f"{picture}: no file system found"):
        classify_listing(picture, tmp_path / "listing.jsonl", MANIFEST)


def test_one_partition_and_one_folder_of_a_disk_can_be_named(evidence: dict, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    write(first / "DCIM" / "a.jpg", image_bytes(1))
    write(first / "notes" / "b.jpg", image_bytes(2))
    write(second / "DCIM" / "c.jpg", image_bytes(3))
    disk = partitioned_disk(first, second, tmp_path / "disk.raw")
    disk.chmod(0o444)
    before = sha256_file(disk)

    def listed(**classify) -> list[str]:
        classify_listing(
            disk, tmp_path / "listing.jsonl", MANIFEST, config=ClassifyConfig(verify_container=False, **classify)
        )
        return sorted(r.path for r in read_listing(tmp_path / "listing.jsonl").inspections if r.usable)

    assert listed() == ["p1/DCIM/a.jpg", "p1/notes/b.jpg", "p2/DCIM/c.jpg"]
    assert listed(partition="p2") == ["p2/DCIM/c.jpg"]
    assert listed(inside_path="/DCIM") == ["p1/DCIM/a.jpg", "p2/DCIM/c.jpg"]
    with pytest.raises(ContainerError, match=r"disk\.raw: no file system"):
        listed(partition="p7")
    with pytest.raises(ContainerError, match="'/nowhere' not found in partition p1"):
        listed(inside_path="/nowhere")
    with pytest.raises(ConfigError, match="apply to a container"):
        classify_listing(first, tmp_path / "listing.jsonl", MANIFEST, config=ClassifyConfig(partition="p1"))
    assert sha256_file(disk) == before


@pytest.mark.slow  # starts worker processes
def test_a_folder_needs_no_evidence_extra_and_a_container_names_it(evidence: dict, tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "for name in ('dfvfs', 'pyewf', 'pytsk3'): sys.modules[name] = None  # as if not installed\n"
        "from pathlib import Path\n"
        "from forensic_vlm.classify import classify_listing\n"
        "from forensic_vlm.config import ManifestConfig\n"
        "from forensic_vlm.errors import ContainerError\n"
        f"print(classify_listing(Path({str(evidence['folder'])!r}), Path({str(tmp_path / 'l.jsonl')!r}), ManifestConfig(on_bad_input='report')))\n"
        "try:\n"
        f"    classify_listing(Path({str(evidence['zip'])!r}), Path({str(tmp_path / 'z.jsonl')!r}), ManifestConfig())\n"
        "except ContainerError as error:\n"
        "    print('ContainerError', error)\n"
    )  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    files, error = result.stdout.strip().splitlines()
    assert int(files) == sum(1 for p in evidence["folder"].rglob("*") if p.is_file())
    assert "needs the [evidence] extra" in error


@pytest.mark.slow
def test_case_jsonld_is_valid_case_uco_and_triage_csv_imports(triages: dict) -> None:
    _, rows, folder = triages["e01"]
    result = subprocess.run(
        [str(Path(sys.executable).parent / "case_validate"), str(folder / "case.jsonld")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and "Conforms: True" in result.stdout, result.stdout[-3000:]
    graph = json.loads((folder / "case.jsonld").read_text())["@graph"]
    results = [n for n in graph if "uco-analysis:AnalyticResult" in n.get("@type", [])]
    scored = [r for r in rows if r["status"] == "scored"]
    assert len(results) == len(scored)
    facets = [n["uco-core:hasFacet"][0]["uco-analysis:classification"][0] for n in results]
    assert sorted(float(f["uco-analysis:classificationConfidence"]["@value"]) for f in facets) == sorted(
        float(r["confidence"]) for r in scored
    )
    action = next(n for n in graph if "case-investigation:InvestigativeAction" in n.get("@type", []))
    assert len(action["uco-action:instrument"]) == 2  # the tool and the base model (zero-shot: no adapter)
    assert sum(1 for n in graph if n.get("uco-core:kindOfRelationship") == "Contained_Within") == len(rows)

    table = pd.read_csv(folder / "triage.csv", encoding="utf-8-sig", dtype=str, keep_default_na=False)
    assert list(table.columns[: len(IMPORT_COLUMNS)]) == IMPORT_COLUMNS and list(table.columns) == list(CSV_COLUMNS)
    assert len(table) == len(rows) and list(table["SHA-256"]) == [r["sha256"] for r in rows]
    assert list(table["MD5"]) == [r["md5"] for r in rows] and list(table["Category"]) == [r["predicted"] for r in rows]


@pytest.mark.slow
def test_the_workflow_takes_a_container_as_classify_input(evidence: dict, tmp_path: Path) -> None:
    """A dry run: every segment of the E01 is an input of classify_listing, and the exchange files are targets."""
    e01 = evidence["e01"]
    result = snakemake(
        tmp_path,
        "-n",
        "--forceall",
        "--config",
        f"classify={{'input': '{e01}', 'case': 'card'}}",
        "raw_data=results/demo/raw_data",
        "model={'name_or_path': 'results/demo/model'}",
        "-p",
        "results/classify/card/case.jsonld",
        "results/classify/card/triage.csv",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"classify_listing", "classify_shard", "classify"} <= planned_jobs(result)
    segments = sorted(p.name for p in e01.parent.glob("card.E*"))
    assert len(segments) > 1 and all(name in result.stdout for name in segments)
