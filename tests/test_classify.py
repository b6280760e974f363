"""Triage of unlabeled folders: review thresholds, the order, the outputs, resuming, read-only input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import warm_processes
import yaml

from conftest import evidence_unchanged, tree_hashes
from forensic_vlm.classify import review_order
from forensic_vlm.config import DEFAULT_CLASSES, ClassifyConfig, ConfigError, DemoConfig
from forensic_vlm.demo_data import generate_demo_extraction
from forensic_vlm.tables import read_tsv
from forensic_vlm.thresholds import choose_thresholds, needs_review, precision_lower_bound

LABELS = [0, 1, 2, 3]


def test_thresholds_reach_the_target_precision_on_validation() -> None:
    # Class 1 predictions at confidence 0.9, 0.8, 0.7, 0.6, 0.5: the one at 0.6 is wrong.
    probabilities = np.array([[0.1, p, 0.0, 0.0] for p in (0.9, 0.8, 0.7, 0.6, 0.5)])
    probabilities[:, 0] = 1 - probabilities[:, 1]
    probabilities[4] = [0.5, 0.5 - 1e-9, 0, 0]  # argmax 0: a class-0 prediction
    targets = [1, 1, 1, 0, 0]
    result = choose_thresholds(probabilities, targets, LABELS, target_precision=0.9)
    one = result["classes"]["1"]
    assert one["threshold"] == 0.7 and one["precision"] == 1.0 and one["support"] == 3
    assert one["precision_lower_95"] == round(precision_lower_bound(3, 3), 4) < 0.5  # three images prove little
    assert result["classes"]["2"]["threshold"] is None and "no threshold" in result["classes"]["2"]["note"]
    lax = choose_thresholds(probabilities, targets, LABELS, target_precision=0.75)
    assert lax["classes"]["1"]["threshold"] == 0.6  # 3 of 4 right above 0.6
    assert needs_review(result, 1, 0.65) and not needs_review(result, 1, 0.7)
    assert needs_review(result, 2, 0.99)  # no threshold: always reviewed
    assert needs_review(None, 1, 1.0)  # zero-shot: nothing validated


def test_review_order_puts_drug_classes_first_then_doubtful_irrelevant_then_rejects() -> None:
    rows = [
        {"status": "rejected", "path": "a.txt"},
        {"status": "scored", "path": "b", "predicted": "0", "confidence": "0.99"},
        {"status": "scored", "path": "c", "predicted": "0", "confidence": "0.40"},
        {"status": "scored", "path": "d", "predicted": "2", "confidence": "0.60"},
        {"status": "scored", "path": "e", "predicted": "3", "confidence": "0.95"},
    ]
    assert [r["path"] for r in sorted(rows, key=lambda r: review_order(r, 0))] == ["e", "d", "c", "b", "a.txt"]


def test_case_names_cannot_leave_the_results_folder() -> None:
    with pytest.raises(ConfigError, match=r"classify\.case"):
        ClassifyConfig(case="../elsewhere")


def demo_paths(demo_run: dict) -> tuple[Path, Path]:
    workdir = demo_run["workdir"]
    return workdir / "results" / "classify" / "demo", workdir / "results" / "demo" / "extraction.tsv"


@pytest.mark.slow
def test_demo_triage_lists_every_file_in_review_order(demo_run: dict) -> None:
    out, listing = demo_paths(demo_run)
    rows = read_tsv(out / "triage.tsv")
    files = read_tsv(listing)
    assert sorted(r["path"] for r in rows) == sorted(f["path"] for f in files)  # every file, once
    rejected = {r["path"]: r["reason"] for r in rows if r["status"] == "rejected"}
    assert rejected == {
        "Download/empty.jpg": "empty_file",
        "Download/chat_export.txt": "unsupported_format",
        "Telegram/Telegram Images/partial_download.jpg": "truncated",
    }
    scored = [r for r in rows if r["status"] == "scored"]
    for row in scored:
        assert abs(sum(float(row[f"p{c}"]) for c in LABELS) - 1) < 1e-4
        assert row["predicted_en"] == DEFAULT_CLASSES[int(row["predicted"])].en
        assert float(row["confidence"]) == max(float(row[f"p{c}"]) for c in LABELS)
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    assert rows == sorted(rows, key=lambda r: review_order(r, 0))
    duplicates = [r for r in scored if r["duplicate_of"]]
    assert len(duplicates) == 1 and duplicates[0]["path"].startswith("DCIM/Camera/copy_of_")
    truth = {f["path"]: f["true_class"] for f in files}
    right = sum(r["predicted"] == truth[r["path"]] for r in scored)
    assert right / len(scored) > 0.7  # the demo adapter learned the synthetic classes


@pytest.mark.slow
def test_demo_review_thresholds_come_from_the_adapter_and_are_stated(demo_run: dict) -> None:
    out, _ = demo_paths(demo_run)
    adapter = demo_run["workdir"] / "results" / "train" / "adapter"
    thresholds = json.loads((adapter / "review_thresholds.json").read_text())
    assert thresholds["target_precision"] == 0.95 and thresholds["validation_images"] > 0
    custody = json.loads((out / "custody.json").read_text())
    assert custody["review_thresholds"] == thresholds
    for row in read_tsv(out / "triage.tsv"):
        if row["status"] == "scored":
            expected = thresholds["classes"][row["predicted"]]["threshold"]
            assert row["threshold"] == ("" if expected is None else str(expected))
            assert row["needs_review"] == (
                "true" if expected is None or float(row["confidence"]) < expected else "false"
            )
        else:
            assert row["needs_review"] == "true"
    page = (out / "triage.html").read_text(encoding="utf-8")
    assert "Review thresholds" in page and "data:image/jpeg;base64" in page and "마약" in page


@pytest.mark.slow
def test_demo_custody_record_names_what_was_used(demo_run: dict) -> None:
    out, listing = demo_paths(demo_run)
    custody = json.loads((out / "custody.json").read_text())
    rows = read_tsv(out / "triage.tsv")
    assert custody["case"] == "demo" and custody["host"] and custody["started_utc"] <= custody["finished_utc"]
    assert custody["counts"]["files"] == len(rows) == len(read_tsv(listing))
    assert custody["counts"]["rejected"] == 3 and custody["counts"]["rejected_by_reason"]["truncated"] == 1
    assert sum(custody["counts"]["predicted"].values()) == custody["counts"]["scored"]
    assert custody["counts"]["needs_review"] == sum(r["needs_review"] == "true" for r in rows)
    assert set(custody["adapter"]["files_sha256"]) >= {"adapter_model.safetensors", "review_thresholds.json"}
    assert "model.safetensors" in custody["model"]["files_sha256"]
    assert (custody["model"]["kernels"], custody["model"]["compiled"]) == ("transformers", False)
    assert len(custody["input_listing_sha256"]) == 64 and len(custody["configuration_sha256"]) == 64
    assert custody["versions"]["torch"] and custody["scoring"]["device"]
    from forensic_vlm.tables import sha256_file

    assert custody["triage_tsv_sha256"] == sha256_file(out / "triage.tsv")


@pytest.mark.slow
def test_demo_case_jsonld_passes_case_validate_and_its_csv_imports(demo_run: dict) -> None:
    """The demo's exchange files: case.jsonld valid CASE/UCO (case-utils' own validator), with the
    adapter among the instruments; triage.csv one row per triage row, in the same order."""
    import pandas as pd

    out, _ = demo_paths(demo_run)
    validator = Path(sys.executable).parent / "case_validate"
    result = subprocess.run([str(validator), str(out / "case.jsonld")], capture_output=True, text=True)
    assert result.returncode == 0 and "Conforms: True" in result.stdout, result.stdout[-3000:]
    graph = json.loads((out / "case.jsonld").read_text(encoding="utf-8"))["@graph"]
    action = next(n for n in graph if "case-investigation:InvestigativeAction" in n.get("@type", []))
    assert len(action["uco-action:instrument"]) == 3  # the tool, the base model and the adapter
    rows = read_tsv(out / "triage.tsv")
    table = pd.read_csv(out / "triage.csv", encoding="utf-8-sig", dtype=str, keep_default_na=False)
    assert list(table["Path"]) == [r["path"] for r in rows] and list(table["SHA-1"]) == [r["sha1"] for r in rows]
    assert len(action["uco-action:result"]) == sum(r["status"] == "scored" for r in rows)


def _classify_command(demo_run: dict, folder: Path, tmp_path: Path, adapter: bool = True) -> list[str]:
    workdir = demo_run["workdir"]
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(workdir / "results" / "demo" / "model"), "quantization": "none"},
                "evaluate": {"batch_size": 2, "num_workers": 0},
            }
        )
    )
    command = [
        "--config",
        str(config),
        "classify",
        str(folder),
        "--case",
        "resume",
        "--out",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    return command + (["--adapter", str(workdir / "results" / "train" / "adapter")] if adapter else [])


@pytest.mark.slow
def test_interrupted_triage_resumes_without_scoring_again_and_never_writes_the_input(
    demo_run: dict, tmp_path: Path
) -> None:
    folder = tmp_path / "extraction"
    generate_demo_extraction(
        folder, tmp_path / "listing.tsv", list(DEFAULT_CLASSES), DemoConfig(extraction_images=90, seed=5)
    )
    before = tree_hashes(folder)
    command = _classify_command(demo_run, folder, tmp_path)
    with evidence_unchanged(folder):
        process = warm_processes.start(command)
        while process.poll() is None and _cached_rows(tmp_path / "cache") < 20:
            time.sleep(0.1)
        assert process.poll() is None, "the triage finished before it could be interrupted"
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
        done_before_kill = _cached_rows(tmp_path / "cache")
        assert 20 <= done_before_kill < 90 and not (tmp_path / "out" / "triage.tsv").exists()

        log = tmp_path / "resume.log"
        assert warm_processes.run(["--log", str(log), *command]).returncode == 0
        custody = json.loads((tmp_path / "out" / "custody.json").read_text())
        distinct = custody["counts"]["distinct_images"]
        assert custody["scoring"]["images_scored"] == distinct - done_before_kill  # only what was left
        assert f"{done_before_kill} already scored" in log.read_text()

        rerun = tmp_path / "rerun.log"
        assert warm_processes.run(["--log", str(rerun), *command]).returncode == 0
        assert json.loads((tmp_path / "out" / "custody.json").read_text())["scoring"]["images_scored"] == 0
    assert tree_hashes(folder) == before
    assert len(read_tsv(tmp_path / "out" / "triage.tsv")) == len(read_tsv(tmp_path / "listing.tsv"))


def _cached_rows(cache: Path) -> int:
    files = list(cache.glob("*.tsv"))
    return sum(max(0, len(f.read_text().splitlines()) - 1) for f in files)


@pytest.mark.slow
def test_zero_shot_triage_marks_every_image_for_review(demo_run: dict, tmp_path: Path) -> None:
    folder = tmp_path / "extraction"
    generate_demo_extraction(
        folder,
        tmp_path / "listing.tsv",
        list(DEFAULT_CLASSES),
        DemoConfig(extraction_images=6, seed=9, bad_examples=False),
    )
    done = warm_processes.run(_classify_command(demo_run, folder, tmp_path, adapter=False))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_tsv(tmp_path / "out" / "triage.tsv")
    assert len(rows) == 6 and all(r["needs_review"] == "true" and r["threshold"] == "" for r in rows)
    custody = json.loads((tmp_path / "out" / "custody.json").read_text())
    assert custody["adapter"] is None and "zero-shot" in custody["review_thresholds"]


@pytest.mark.slow
def test_triage_page_opens_in_chromium_with_its_thumbnails(demo_run: dict, tmp_path: Path) -> None:
    from report_screenshot import inspect_page, require_chromium

    require_chromium()
    out, _ = demo_paths(demo_run)
    seen = inspect_page(out / "triage.html", tmp_path / "triage.png")
    assert seen["console_errors"] == []
    scored = sum(r["status"] == "scored" for r in read_tsv(out / "triage.tsv"))
    assert len(seen["images"]) == scored and all(i["complete"] and i["width"] > 0 for i in seen["images"])
    for heading in ("Order", "Review thresholds", "Counts", "Files in review order"):
        assert any(h.startswith(heading) for h in seen["headings"]), heading
