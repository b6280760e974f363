"""The Snakemake workflow itself: lint, the demo DAG, and real runs on read-only evidence."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import (
    DATA_TARGETS,
    DEMO_JOBS,
    REPO,
    copy_run,
    image_bytes,
    planned_jobs,
    snakemake,
    tree_hashes,
    write,
)
from forensic_vlm.tables import read_tsv, write_tsv


def test_demo_profile_dry_run_lists_the_data_stages(tmp_path: Path) -> None:
    result = snakemake(tmp_path, "-n", demo=True)
    assert result.returncode == 0, result.stderr
    assert planned_jobs(result) == DEMO_JOBS


@pytest.mark.slow
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


@pytest.mark.slow
def test_fail_policy_stops_the_workflow_naming_the_file(tmp_path: Path) -> None:
    raw = tmp_path / "evidence"
    write(raw / "0_irrelevant" / "ok.jpg", image_bytes(1))
    write(raw / "1_chat_history" / "broken.png", b"\x89PNG\r\n\x1a\n")
    result = snakemake(
        tmp_path / "work",
        "--cores",
        "1",
        "--config",
        f"raw_data={raw}",
        "manifest={'on_bad_input': 'fail'}",
        "--",
        "results/manifest/manifest.tsv",
    )
    assert result.returncode != 0
    log = (tmp_path / "work" / "results" / "logs" / "manifest.log").read_text()
    assert "1_chat_history/broken.png" in log and "corrupt" in log


@pytest.mark.slow
def test_demo_workflow_runs_end_to_end_and_the_model_learns(demo_run: dict, measured) -> None:
    results = demo_run["workdir"] / "results"
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
    # The parity gate ran once for the adapter; the demo sets model.quantization: none, so it chose nothing.
    from forensic_vlm.speed.gate import summary

    verdict = json.loads((results / "evaluate" / "parity_gate.json").read_text())
    assert (verdict["candidate"], verdict["chosen"]) == (None, None), verdict
    assert verdict["reason"] == "model.quantization is none (explicit: no gate)"
    custody = json.loads((results / "classify" / "demo" / "custody.json").read_text())
    assert finetuned["parity_gate"] == custody["parity_gate"] == summary(verdict)
    assert zeroshot["parity_gate"] is None  # no adapter, no gate
    measured(
        f"demo workflow: {demo_run['seconds']:.0f} s wall; fine-tuned test accuracy "
        f"{finetuned['accuracy']:.3f}, zero-shot {zeroshot['accuracy']:.3f} (n = {test_size})"
    )


@pytest.mark.slow
def test_only_stale_stages_rerun(demo_run: dict) -> None:
    workdir = demo_run["workdir"]
    assert planned_jobs(snakemake(workdir, "-n", demo=True)) == set()
    changed_lr = snakemake(workdir, "-n", "--config", "train={'learning_rate': 0.003}", demo=True)
    assert planned_jobs(changed_lr) == {
        "train",
        "parity_gate",
        "evaluate_finetuned_shard",
        "evaluate_finetuned",
        "report",
        "classify_shard",
        "classify",
        "all",
    }
    # The triage page has thumbnails too, behind the same switch.
    report_only = snakemake(workdir, "-n", "--config", "report={'show_images': False}", demo=True)
    assert planned_jobs(report_only) == {"report", "classify", "all"}
    title_only = snakemake(workdir, "-n", "--config", "report={'title': 'x'}", demo=True)
    assert planned_jobs(title_only) == {"report", "all"}


def with_one_misclassified(demo_run: dict, workdir: Path) -> Path:
    """A copy of the demo run whose fine-tuned predictions hold one wrong class, so the report's
    gallery of misclassified images has a thumbnail to show (the demo's model may make none)."""
    copy_run(demo_run["workdir"], workdir)
    predictions = workdir / "results" / "evaluate" / "finetuned" / "predictions.tsv"
    rows = read_tsv(predictions)
    rows[0]["predicted"] = str((int(rows[0]["true"]) + 1) % 4)
    write_tsv(predictions, list(rows[0]), rows)
    return workdir


@pytest.mark.slow
def test_report_page_opens_in_chromium_with_every_figure(demo_run: dict, tmp_path: Path) -> None:
    from report_screenshot import inspect_page, require_chromium

    from forensic_vlm.cli import main

    require_chromium()
    results = with_one_misclassified(demo_run, tmp_path / "work") / "results"
    config = ("--config", str(REPO / "profiles" / "demo" / "demo.yaml"))
    assert main([*config, "report", "--results", str(results), "--raw-data", str(results / "demo" / "raw_data")]) == 0
    page = results / "report" / "index.html"
    seen = inspect_page(page, tmp_path / "report.png")
    assert seen["console_errors"] == []
    # Two confusion matrices, the curves, the calibration figure, and the misclassified image.
    assert len(seen["images"]) == 5 and all(i["complete"] and i["width"] > 0 for i in seen["images"])
    for heading in (
        "Headline",
        "McNemar",
        "Per class",
        "Confusion matrices",
        "Learning curves",
        "Calibration",
        "Data",
        "Misclassified",
        "Provenance",
    ):
        assert any(h.startswith(heading) for h in seen["headings"]), heading
    assert (tmp_path / "report.png").stat().st_size > 50_000
    text = page.read_text(encoding="utf-8")
    assert "관련 없음" in text and "McNemar" in text and "data:image/jpeg;base64" in text


@pytest.mark.slow
def test_switch_hides_every_image_of_evidence(demo_run: dict, tmp_path: Path) -> None:
    workdir = with_one_misclassified(demo_run, tmp_path / "work")
    result = snakemake(
        workdir, "--config", "report={'show_images': False}", "--", "results/report/index.html", demo=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = (workdir / "results" / "report" / "index.html").read_text(encoding="utf-8")
    assert "data:image/jpeg" not in text and "Image content hidden" in text
    assert "Misclassified by the fine-tuned model (1 of" in text  # there was one to hide
    assert text.count("data:image/png") == 4  # the figures stay: two matrices, curves, calibration


@pytest.mark.slow
def test_snakemake_report_builds(demo_run: dict, tmp_path: Path) -> None:
    result = snakemake(demo_run["workdir"], "--report", str(tmp_path / "report.html"), demo=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "report.html").stat().st_size > 10_000


@pytest.mark.slow
def test_new_evidence_reuses_augmentations_and_predictions(demo_run: dict, tmp_path: Path) -> None:
    """Real evidence outside results/: added images rerun the chain, but nothing done is redone."""
    from forensic_vlm.config import DEFAULT_CLASSES, DemoConfig
    from forensic_vlm.demo_data import generate_demo_data

    evidence = tmp_path / "evidence"
    generate_demo_data(
        evidence, tmp_path / "first.tsv", list(DEFAULT_CLASSES), DemoConfig(12, seed=11, bad_examples=False)
    )
    workdir = tmp_path / "work"
    shutil.copytree(demo_run["workdir"] / "results" / "demo" / "model", workdir / "results" / "demo" / "model")
    # One epoch and no triage: what is checked here is reuse, not what the model learns.
    args = ("--config", f"raw_data={evidence}", "train={'epochs': 1}", "classify={'input': null}")
    first = snakemake(workdir, *args, demo=True)
    assert first.returncode == 0, first.stderr[-3000:]
    old_children = read_tsv(workdir / "results" / "augment" / "lineage.tsv")
    old_test = {r["sha256"] for r in read_tsv(workdir / "results" / "split" / "test.tsv")}

    generate_demo_data(
        tmp_path / "more", tmp_path / "more.tsv", list(DEFAULT_CLASSES), DemoConfig(6, seed=12, bad_examples=False)
    )
    for image in (tmp_path / "more").rglob("*.*"):  # +50 %, under new names
        shutil.copy(image, evidence / image.parent.name / f"new_{image.name}")
    assert planned_jobs(snakemake(workdir, "-n", *args, demo=True)) == {
        "manifest",
        "split",
        "augment",
        "train",
        "evaluate_zeroshot_shard",
        "evaluate_zeroshot",
        "parity_gate",
        "evaluate_finetuned_shard",
        "evaluate_finetuned",
        "report",
        "all",
    }
    # What reuse is checked on: the children and the zero-shot scores (training again would show
    # nothing more, and its rerun is planned above).
    reused_targets = ("results/augment/lineage.tsv", "results/evaluate/zeroshot/metrics.json")
    second = snakemake(workdir, *args, "--", *reused_targets, demo=True)
    assert second.returncode == 0, second.stderr[-3000:]

    children = read_tsv(workdir / "results" / "augment" / "lineage.tsv")
    reused = {r["child_sha256"] for r in children if r["reused"] == "True"}
    assert reused == {r["child_sha256"] for r in old_children}  # every old child reused, none recomputed
    assert len(children) > len(old_children)
    new_test = {r["sha256"] for r in read_tsv(workdir / "results" / "split" / "test.tsv")}
    assert old_test <= new_test  # the stable split kept every old test image in test
    zeroshot = json.loads((workdir / "results" / "evaluate" / "zeroshot" / "metrics.json").read_text())
    assert zeroshot["images_from_cache"] == len(old_test)
    assert zeroshot["images_scored"] == len(new_test - old_test) > 0
