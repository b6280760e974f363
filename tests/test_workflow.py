"""The Snakemake workflow itself: lint, the demo DAG, and real runs on read-only evidence."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, image_bytes, read_only_command, tree_hashes, write
from forensic_vlm.tables import read_tsv

DEMO_JOBS = {"demo_data", "demo_model", "manifest", "split", "augment", "train", "evaluate_zeroshot",
             "evaluate_finetuned", "all"}  # fmt: skip
DATA_TARGETS = ("results/split/summary.tsv", "results/augment/train_augmented.tsv")
PROFILE = ("--profile", str(REPO / "profiles" / "demo"))
DEMO_CONFIG = (str(REPO / "config.yaml"), str(REPO / "profiles" / "demo" / "demo.yaml"))


def snakemake(workdir: Path, *args: str, read_only: Path | None = None, demo: bool = False) -> subprocess.CompletedProcess:
    """Run the repository's workflow in ``workdir`` (the demo profile's config files are named
    explicitly, since a profile's relative paths are read from the working directory)."""
    configs = DEMO_CONFIG if demo else DEMO_CONFIG[:1]
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
               *(PROFILE if demo else ()), "--configfile", *configs, *args]  # fmt: skip
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
    result = snakemake(tmp_path, "-n", demo=True)
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
    args = ("--cores", "2", "--config", f"raw_data={raw}", "--", *DATA_TARGETS)
    result = snakemake(workdir, *args, read_only=raw)
    assert result.returncode == 0, result.stderr[-3000:]
    assert tree_hashes(raw) == before
    assert [r["reason"] for r in read_tsv(workdir / "results" / "manifest" / "rejects.tsv")] == ["empty_file"]
    assert len(read_tsv(workdir / "results" / "manifest" / "manifest.tsv")) == 32
    assert not list(raw.rglob("*aug*")) and not (raw / "results").exists()
    for log in ("manifest", "split", "augment"):
        assert (workdir / "results" / "logs" / f"{log}.log").stat().st_size > 0

    assert planned_jobs(snakemake(workdir, "-n", *args)) == set()
    write(raw / "0_irrelevant" / "new.jpg", image_bytes(999))
    assert planned_jobs(snakemake(workdir, "-n", *args)) == {"manifest", "split", "augment"}


def test_fail_policy_stops_the_workflow_naming_the_file(tmp_path: Path) -> None:
    raw = tmp_path / "evidence"
    write(raw / "0_irrelevant" / "ok.jpg", image_bytes(1))
    write(raw / "1_chat_history" / "broken.png", b"\x89PNG\r\n\x1a\n")
    result = snakemake(tmp_path / "work", "--cores", "1", "--config", f"raw_data={raw}",
                       "manifest={'on_bad_input': 'fail'}", "--", "results/manifest/manifest.tsv")  # fmt: skip
    assert result.returncode != 0
    log = (tmp_path / "work" / "results" / "logs" / "manifest.log").read_text()
    assert "1_chat_history/broken.png" in log and "corrupt" in log


@pytest.mark.slow
def test_demo_workflow_runs_end_to_end_and_the_model_learns(tmp_path: Path) -> None:
    start = time.monotonic()
    result = snakemake(tmp_path, demo=True)
    seconds = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-3000:]
    results = tmp_path / "results"
    summary = read_tsv(results / "split" / "summary.tsv")
    manifest = read_tsv(results / "manifest" / "manifest.tsv")
    assert sum(int(r["n"]) for r in summary) == sum(1 for r in manifest if not r["duplicate_of"])
    lineage = read_tsv(results / "augment" / "lineage.tsv")
    class2_train = [r for r in read_tsv(results / "split" / "train.tsv") if r["label"] == "2"]
    assert len(lineage) == 4 * len(class2_train) > 0
    finetuned = json.loads((results / "evaluate" / "finetuned" / "metrics.json").read_text())
    zeroshot = json.loads((results / "evaluate" / "zeroshot" / "metrics.json").read_text())
    test_size = len(read_tsv(results / "split" / "test.tsv"))
    assert finetuned["n"] == zeroshot["n"] == test_size
    assert finetuned["accuracy"] >= 0.90, finetuned["accuracy"]
    assert finetuned["accuracy"] > zeroshot["accuracy"]
    print(f"demo workflow: {seconds:.0f} s wall on this machine; fine-tuned accuracy {finetuned['accuracy']:.3f}, "
          f"zero-shot {zeroshot['accuracy']:.3f} (n = {test_size})")  # fmt: skip
    assert planned_jobs(snakemake(tmp_path, "-n", demo=True)) == set()


def test_snakefmt_is_clean() -> None:
    files = [str(REPO / "Snakefile"), str(REPO / "workflow")]
    result = subprocess.run([sys.executable, "-m", "snakefmt", "--check", *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
