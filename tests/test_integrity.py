"""Integrity under faults: torn cache rows, model and adapter files verified in full before use,
exact resume of a killed training, and configured paths that do not exist.

The first test of each section is one of issue 13's five findings: each failed on the code before
the fix (the failure it gave is quoted in docs/reliability.md).
"""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import warm_processes
import yaml

from conftest import FAST, checkpoint_step, model_config, snakemake, train_command
from forensic_vlm.config import DEFAULT_CLASSES, EvaluateConfig
from forensic_vlm.errors import ForensicVlmError
from forensic_vlm.evaluate import evaluate_split
from forensic_vlm.tables import sha256_file

CONFIG = EvaluateConfig(num_workers=0, bootstrap_samples=20)


def _evaluate(dataset: dict, tmp_path: Path, out: str, *, model: Path, adapter: Path | None = None) -> dict:
    return evaluate_split(
        dataset["val"],
        dataset["raw_data"],
        classes=list(DEFAULT_CLASSES),
        model_config=model_config(model),
        config=CONFIG,
        out_dir=tmp_path / out,
        adapter=adapter,
        cache_dir=tmp_path / "cache",
    )


def _cache_file(tmp_path: Path) -> Path:
    [found] = (tmp_path / "cache").glob("*.tsv")
    return found


# --- 1. the prediction cache ---------------------------------------------------------------------


def test_a_torn_last_cache_row_is_dropped_and_that_image_scored_again(tiny_model, tiny_dataset, tmp_path) -> None:
    first = _evaluate(tiny_dataset, tmp_path, "a", model=tiny_model)
    cache = _cache_file(tmp_path)
    whole = cache.read_bytes()
    cache.write_bytes(whole[:-12])  # cut inside the last row's numbers: what a kill during the append leaves
    again = _evaluate(tiny_dataset, tmp_path, "b", model=tiny_model)
    assert again["images_scored"] == 1 and again["images_from_cache"] == first["images_scored"] - 1
    assert (tmp_path / "b" / "predictions.tsv").read_bytes() == (tmp_path / "a" / "predictions.tsv").read_bytes()
    assert cache.read_bytes() == whole  # the torn row cut off, the image's row written whole again


def test_a_malformed_cache_row_before_the_last_stops_naming_file_and_line(tiny_model, tiny_dataset, tmp_path) -> None:
    _evaluate(tiny_dataset, tmp_path, "a", model=tiny_model)
    cache = _cache_file(tmp_path)
    lines = cache.read_text().splitlines(keepends=True)
    fields = lines[2].split("\t")
    fields[2] = "0.9"  # a probability changed: the row no longer sums to 1
    lines[2] = "\t".join(fields)
    cache.write_text("".join(lines))
    with pytest.raises(ForensicVlmError, match=rf"{cache}, line 3: .*sum to"):
        _evaluate(tiny_dataset, tmp_path, "b", model=tiny_model)


# --- 2. full content hashes key the predictions ---------------------------------------------------


def test_a_change_in_the_middle_of_a_weight_file_is_a_new_model(tiny_model, tiny_dataset, tmp_path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = model / "model.safetensors"
    assert weights.stat().st_size > 4 << 20  # larger than what a sample of its ends would cover
    first = _evaluate(tiny_dataset, tmp_path, "a", model=model)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, far from both ends
    weights.write_bytes(bytes(data))
    again = _evaluate(tiny_dataset, tmp_path, "b", model=model)
    assert again["images_scored"] == first["images_scored"]  # nothing taken from the other model's cache
    keys = [json.loads(p.read_text())["model"] for p in sorted((tmp_path / "cache").glob("*.json"))]
    assert {k["model.safetensors"] for k in keys} == {
        sha256_file(weights),
        first["model_files_sha256"]["model.safetensors"],
    }
    assert again["model_files_sha256"]["model.safetensors"] == sha256_file(weights)  # what custody and metrics state


# --- 3. adapter and model files verified before use ----------------------------------------------


def _copy_adapter(trained: dict, tmp_path: Path) -> Path:
    adapter = tmp_path / "adapter"
    shutil.copytree(trained["adapter"], adapter)
    return adapter


def test_a_truncated_adapter_stops_naming_the_file(trained, tiny_model, tiny_dataset, tmp_path) -> None:
    adapter = _copy_adapter(trained, tmp_path)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ForensicVlmError, match=rf"{weights}.*sha256"):
        _evaluate(tiny_dataset, tmp_path, "a", model=tiny_model, adapter=adapter)


def test_a_modified_adapter_whose_header_still_parses_is_refused(trained, tiny_model, tiny_dataset, tmp_path) -> None:
    adapter = _copy_adapter(trained, tmp_path)
    weights = adapter / "adapter_model.safetensors"
    recorded = sha256_file(weights)
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40  # inside the last tensor: the header parses, a weight changed
    weights.write_bytes(bytes(data))
    with pytest.raises(ForensicVlmError, match=rf"{weights}: sha256 {sha256_file(weights)}, recorded {recorded}"):
        _evaluate(tiny_dataset, tmp_path, "a", model=tiny_model, adapter=adapter)


def test_training_records_every_adapter_file_in_sha256sum_format(trained) -> None:
    adapter = trained["adapter"]
    listed = dict(
        reversed(line.split("  ", 1)) for line in (adapter / "SHA256SUMS").read_text().splitlines() if line.strip()
    )
    files = {str(p.relative_to(adapter)) for p in adapter.rglob("*") if p.is_file()} - {"SHA256SUMS"}
    assert set(listed) == files and all(listed[name] == sha256_file(adapter / name) for name in files)
    assert subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=adapter).returncode == 0


def test_an_adapter_without_its_listing_or_with_an_extra_file_is_refused(
    trained, tiny_model, tiny_dataset, tmp_path
) -> None:
    adapter = _copy_adapter(trained, tmp_path)
    (adapter / "adapter_model.bin").write_bytes(b"not listed")
    with pytest.raises(ForensicVlmError, match=r"adapter_model.bin.*not listed"):
        _evaluate(tiny_dataset, tmp_path, "a", model=tiny_model, adapter=adapter)
    (adapter / "adapter_model.bin").unlink()
    (adapter / "SHA256SUMS").unlink()
    with pytest.raises(ForensicVlmError, match="SHA256SUMS"):
        _evaluate(tiny_dataset, tmp_path, "a", model=tiny_model, adapter=adapter)


def test_the_base_model_is_verified_against_a_custody_record(tiny_model, tiny_dataset, tmp_path) -> None:
    from dataclasses import replace

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    first = _evaluate(tiny_dataset, tmp_path, "a", model=model)
    custody = tmp_path / "custody.json"
    custody.write_text(json.dumps({"model": {"files_sha256": first["model_files_sha256"]}}))
    checked = replace(model_config(model), files_sha256=str(custody))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "note": "changed"}))
    with pytest.raises(ForensicVlmError, match=rf"{model / 'config.json'}: sha256 \w+, recorded \w+"):
        evaluate_split(
            tiny_dataset["val"],
            tiny_dataset["raw_data"],
            classes=list(DEFAULT_CLASSES),
            model_config=checked,
            config=CONFIG,
            out_dir=tmp_path / "b",
        )


# --- 4. exact resume ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_and_resumed_training_ends_with_the_uninterrupted_adapter(tiny_model, tiny_dataset, tmp_path) -> None:
    settings = {
        "model": {"name_or_path": str(tiny_model), "quantization": "none", "device": "cpu"},
        "train": {**FAST, "batch_size": 2, "epochs": 3, "checkpoint_every_n_steps": 2},
    }

    def command(run: str) -> list[str]:
        (tmp_path / run).mkdir()
        config = tmp_path / run / "config.yaml"
        config.write_text(yaml.safe_dump(settings))
        return train_command(config, tiny_dataset, tmp_path / run / "adapter", log=tmp_path / run / "train.log")

    whole = warm_processes.run(command("whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = command("killed")
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    process = warm_processes.start(killed)  # killed from outside, wherever it is (not a fault point)
    while process.poll() is None and not (last.exists() and checkpoint_step(last) >= 14):  # in the second epoch
        time.sleep(0.1)
    assert process.poll() is None, "training finished before it could be killed"
    process.kill()
    assert process.wait() == -signal.SIGKILL
    killed_at = checkpoint_step(last)
    assert 14 <= killed_at < 24 and not (tmp_path / "killed" / "adapter").exists()  # 12 steps an epoch
    resumed_run = warm_processes.run(killed)
    assert resumed_run.returncode == 0, resumed_run.stderr[-3000:]
    assert f"resuming from {last}" in (tmp_path / "killed" / "train.log").read_text()
    resumed = [int(row["step"]) for row in _curves(next((tmp_path / "killed" / "logs").glob("*")))]
    assert min(resumed) == killed_at  # the second run's own curve starts where the checkpoint was
    card = json.loads((tmp_path / "killed" / "adapter" / "training.json").read_text())
    assert card["validation"]["global_step"] == 36
    assert not last.exists()  # finished: a later run starts afresh
    for name in ("adapter_model.safetensors", "review_thresholds.json"):
        assert (tmp_path / "killed" / "adapter" / name).read_bytes() == (
            tmp_path / "whole" / "adapter" / name
        ).read_bytes()
    # The adapter is the best epoch's, which may come before the kill: every step's loss after it
    # shows the resumed run trained the same batches, with the same dropout, from the same weights.
    assert _curves(tmp_path / "killed") == _curves(tmp_path / "whole")


def _curves(run: Path) -> list[dict[str, str]]:
    """Every value of every step in ``run``'s metrics.csv, but the timings."""
    with open(run / "metrics.csv", encoding="utf-8") as handle:
        return [{k: v for k, v in row.items() if k != "train_images_per_s"} for row in csv.DictReader(handle)]


# --- 5. configured paths that do not exist --------------------------------------------------------


@pytest.mark.slow
def test_a_mistyped_evidence_path_after_a_run_stops_naming_the_setting(demo_run: dict) -> None:
    result = snakemake(demo_run["workdir"], "-n", "--config", "raw_data=/nonexistent", demo=True)
    assert result.returncode != 0 and "Nothing to be done" not in result.stdout + result.stderr
    assert "raw_data: /nonexistent does not exist" in result.stdout + result.stderr
