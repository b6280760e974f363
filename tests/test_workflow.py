"""The Snakemake workflow itself: lint, the demo DAG, and real runs on read-only evidence."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, image_bytes, read_only_command, tree_hashes, write
from forensic_vlm.tables import read_tsv

DEMO_JOBS = {"demo_data", "manifest", "split", "augment", "all"}


def snakemake(workdir: Path, *args: str, read_only: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
               "--configfile", str(REPO / "config.yaml"), *args]  # fmt: skip
    if read_only is not None:
        command = read_only_command(read_only, command)
    return subprocess.run(command, capture_output=True, text=True)


def planned_jobs(result: subprocess.CompletedProcess) -> set[str]:
    """Rule names from the 'Job stats' table of a dry run."""
    lines = result.stdout.splitlines()
    if "Nothing to be done" in result.stdout + result.stderr:
        return set()
    start = next(i for i, line in enumerate(lines) if line.startswith("Job stats"))
    jobs = set()
    for line in lines[start + 3 :]:
        if not line.strip() or line.startswith("total"):
            break
        jobs.add(line.split()[0])
    return jobs


def test_lint_is_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr


def test_demo_profile_dry_run_lists_the_data_stages(tmp_path: Path) -> None:
    result = snakemake(tmp_path, "--profile", str(REPO / "profiles" / "demo"), "-n")
    assert result.returncode == 0, result.stderr
    assert planned_jobs(result) == DEMO_JOBS


def test_run_on_read_only_evidence_leaves_it_unchanged_and_reruns_only_on_new_data(tmp_path: Path) -> None:
    raw = tmp_path / "evidence"
    for label, folder in enumerate(["0_irrelevant", "1_chat_history", "2_transaction_place", "3_drug_raw"]):
        for index in range(8):
            write(raw / folder / f"{index}.jpg", image_bytes(10 * label + index))
    write(raw / "3_drug_raw" / "empty.jpg", b"")
    before = tree_hashes(raw)
    workdir = tmp_path / "work"
    args = ("--cores", "2", "--config", f"raw_data={raw}")
    result = snakemake(workdir, *args, read_only=raw)
    assert result.returncode == 0, result.stderr[-3000:]
    assert tree_hashes(raw) == before
    assert [r["reason"] for r in read_tsv(workdir / "results" / "manifest" / "rejects.tsv")] == ["empty_file"]
    assert len(read_tsv(workdir / "results" / "manifest" / "manifest.tsv")) == 32
    assert not list(raw.rglob("*aug*")) and not (raw / "results").exists()
    for log in ("manifest", "split", "augment"):
        assert (workdir / "results" / "logs" / f"{log}.log").stat().st_size > 0

    assert planned_jobs(snakemake(workdir, *args, "-n")) == set()
    write(raw / "0_irrelevant" / "new.jpg", image_bytes(999))
    assert planned_jobs(snakemake(workdir, *args, "-n")) == {"manifest", "split", "augment", "all"}


def test_fail_policy_stops_the_workflow_naming_the_file(tmp_path: Path) -> None:
    raw = tmp_path / "evidence"
    write(raw / "0_irrelevant" / "ok.jpg", image_bytes(1))
    write(raw / "1_chat_history" / "broken.png", b"\x89PNG\r\n\x1a\n")
    result = snakemake(tmp_path / "work", "--cores", "1", "--config", f"raw_data={raw}",
                       "manifest={'on_bad_input': 'fail'}")  # fmt: skip
    assert result.returncode != 0
    log = (tmp_path / "work" / "results" / "logs" / "manifest.log").read_text()
    assert "1_chat_history/broken.png" in log and "corrupt" in log


@pytest.mark.slow
def test_demo_workflow_runs_end_to_end(tmp_path: Path) -> None:
    profile = ("--profile", str(REPO / "profiles" / "demo"))
    result = snakemake(tmp_path, *profile)
    assert result.returncode == 0, result.stderr[-3000:]
    results = tmp_path / "results"
    summary = read_tsv(results / "split" / "summary.tsv")
    assert sum(int(r["n"]) for r in summary) == len(read_tsv(results / "manifest" / "manifest.tsv")) - 1
    lineage = read_tsv(results / "augment" / "lineage.tsv")
    class2_train = [r for r in read_tsv(results / "split" / "train.tsv") if r["label"] == "2"]
    assert len(lineage) == 4 * len(class2_train) > 0
    assert planned_jobs(snakemake(tmp_path, *profile, "-n")) == set()


def test_snakefmt_is_clean() -> None:
    files = [str(REPO / "Snakefile"), str(REPO / "workflow")]
    result = subprocess.run([sys.executable, "-m", "snakefmt", "--check", *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
