"""Fault injection: every stage killed with SIGKILL at named points, rerun, and compared with an
uninterrupted run of the same command.

``FORENSIC_VLM_KILL_AT`` (forensic_vlm.faults) makes the stage kill itself at a fault point, so
each kill lands exactly where the table says. Each stage runs as ``forensic-vlm`` in a process of
its own, forked from a server that has imported torch and the package once
(tests/warm_processes.py). The rerun must give the uninterrupted run's outputs: tables and
predictions byte for byte, metrics apart from timings, the adapter byte for byte on the CPU. docs/reliability.md lists these faults and their outcome on the 2-core CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import warm_processes
import yaml

from conftest import (
    FAST,
    SCORING_TIMES,
    assert_same_scores,
    copy_run,
    same_figures,
    snakemake,
    snakemake_command,
    tree_hashes,
)
from forensic_vlm.faults import ENVIRONMENT
from forensic_vlm.tables import read_tsv

pytestmark = pytest.mark.slow  # every test here starts processes


@dataclass(frozen=True)
class Fault:
    stage: str
    point: str  # FORENSIC_VLM_KILL_AT
    how: str
    compared: str

    @property
    def id(self) -> str:
        return f"{self.stage}@{self.point}"


FAULTS = [
    Fault("manifest", "manifest.file:5", "killed after 5 files were inspected", "manifest.tsv, rejects.tsv"),
    Fault(
        "manifest",
        "manifest.tables:1",
        "killed with manifest.tsv written, rejects.tsv not",
        "manifest.tsv, rejects.tsv",
    ),
    Fault(
        "augment", "augment.child:3", "killed after 3 children were written", "train_augmented.tsv, lineage.tsv, images"
    ),
    Fault(
        "train",
        "train.batch_end:12",
        "killed after epoch 0's last batch, before its validation (last checkpoint: step 10)",
        "adapter files, every step's logged values",
    ),
    Fault(
        "train",
        "train.validation_end:1",
        "killed after epoch 0's validation and best checkpoint",
        "adapter files, every step's logged values",
    ),
    Fault(
        "train",
        "train.batch_end:17",
        "killed one step after the step-16 checkpoint (that step's work lost)",
        "adapter files, every step's logged values",
    ),
    Fault(
        "train",
        "train.finish:1",
        "killed with the adapter written, SHA256SUMS not, the checkpoint kept",
        "adapter files, every step's logged values",
    ),
    Fault(
        "evaluate",
        "scoring.batch:2",
        "killed after 2 of 4 batches reached the prediction cache",
        "predictions.tsv, metrics.json without timings",
    ),
    Fault(
        "classify",
        "scoring.batch:3",
        "killed after 3 of 6 batches reached the prediction cache",
        "triage.tsv, custody.json without times",
    ),
    Fault(
        "classify",
        "classify.triage_written:1",
        "killed with triage.tsv written, triage.html and custody.json not",
        "triage.tsv, custody.json without times",
    ),
]


def _command(config: Path, *args: str) -> list[str]:
    """The arguments of ``forensic-vlm``."""
    return ["--config", str(config), *args]


def _run(command: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != ENVIRONMENT}
    if fault:
        environment[ENVIRONMENT] = fault
    return warm_processes.run(command, env=environment)


def _stage_command(stage: str, work: Path, inputs: dict) -> list[str]:
    """The stage's CLI command, writing under ``work``."""
    config, data = inputs["config"], inputs["data"]
    if stage == "manifest":
        return _command(config, "manifest", str(data["raw_data"]), "--out", str(work / "out"))
    if stage == "augment":
        return _command(
            config, "augment", str(data["train"]), "--raw-data", str(data["raw_data"]), "--out", str(work / "out")
        )
    if stage == "train":
        return _command(
            config, "train", str(data["train"]), str(data["val"]), "--raw-data", str(data["raw_data"]),
            "--adapter", str(work / "adapter"),
        )  # fmt: skip
    if stage == "evaluate":
        return _command(
            config, "evaluate", str(data["val"]), "--raw-data", str(data["raw_data"]), "--out", str(work / "out"),
            "--adapter", str(inputs["adapter"]), "--cache-dir", str(work / "cache"),
        )  # fmt: skip
    return _command(
        config, "classify", str(data["raw_data"]), "--case", "faults", "--out", str(work / "out"),
        "--adapter", str(inputs["adapter"]), "--cache-dir", str(work / "cache"),
    )  # fmt: skip


def _outputs(stage: str, work: Path) -> dict:
    """What an interrupted and resumed run must reproduce."""
    out = work / "out"
    if stage == "manifest":
        return {name: (out / name).read_bytes() for name in ("manifest.tsv", "rejects.tsv")}
    if stage == "augment":
        lineage = [{k: v for k, v in row.items() if k != "reused"} for row in read_tsv(out / "lineage.tsv")]
        return {
            "table": (out / "train_augmented.tsv").read_bytes(),
            "lineage": lineage,
            "images": tree_hashes(out / "images"),
        }
    if stage == "train":
        adapter = work / "adapter"
        files = {p.name: p.read_bytes() for p in adapter.iterdir() if p.name not in ("training.json", "README.md")}
        card = json.loads((adapter / "training.json").read_text())
        card["validation"].pop("train_peak_memory_GiB", None)
        curves = [{k: v for k, v in r.items() if k != "train_images_per_s"} for r in _csv(work / "metrics.csv")]
        return {"files": files, "validation": card["validation"], "curves": curves}
    if stage == "evaluate":
        metrics = json.loads((out / "metrics.json").read_text())
        timing = SCORING_TIMES | {"images_scored", "images_from_cache"}  # how the run went, not what it found
        return {
            "predictions": (out / "predictions.tsv").read_bytes(),
            "metrics": {k: v for k, v in metrics.items() if k not in timing},
        }
    custody = json.loads((out / "custody.json").read_text())
    for key in ("started_utc", "finished_utc", "scoring"):
        custody.pop(key)
    return {"triage": (out / "triage.tsv").read_bytes(), "custody": custody}


def _csv(path: Path) -> list[dict]:
    import csv

    with open(path, encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def inputs(tiny_model: Path, tiny_dataset: dict, trained: dict, tmp_path_factory) -> dict:
    config = tmp_path_factory.mktemp("faults") / "config.yaml"
    settings = {
        "model": {"name_or_path": str(tiny_model), "quantization": "none", "device": "cpu"},
        "train": {**FAST, "batch_size": 2, "epochs": 2, "checkpoint_every_n_steps": 2},
        "evaluate": {"batch_size": 2, "num_workers": 0, "bootstrap_samples": 20},
        "augment": {"per_image": {0: 1, 2: 1}},
    }
    config.write_text(yaml.safe_dump(settings))
    return {"config": config, "data": tiny_dataset, "adapter": trained["adapter"]}


_UNINTERRUPTED: dict[str, dict] = {}


@pytest.mark.parametrize("fault", FAULTS, ids=[f.id for f in FAULTS])
def test_a_killed_stage_reruns_to_the_uninterrupted_outputs(
    fault: Fault, inputs: dict, tmp_path: Path, measured
) -> None:
    if fault.stage not in _UNINTERRUPTED:  # once per stage
        whole = tmp_path / "whole"
        result = _run(_stage_command(fault.stage, whole, inputs))
        assert result.returncode == 0, result.stderr[-3000:]
        _UNINTERRUPTED[fault.stage] = _outputs(fault.stage, whole)
    work = tmp_path / "killed"
    command = _stage_command(fault.stage, work, inputs)
    start = time.monotonic()
    killed = _run(command, fault.point)
    assert killed.returncode == -signal.SIGKILL, f"{fault.id} was not reached:\n{killed.stderr[-3000:]}"
    rerun = _run(command)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    outputs, expected = _outputs(fault.stage, work), dict(_UNINTERRUPTED[fault.stage])
    # The images scored again after the kill were scored in another process (PROCESS_ROUNDING).
    for table in ("predictions", "triage"):
        if table in expected:
            assert_same_scores(outputs.pop(table), expected.pop(table), f"{fault.id} {table}")
    if "metrics" in expected:
        assert same_figures(outputs.pop("metrics"), expected.pop("metrics")), fault.id
    assert outputs == expected
    measured(f"fault {fault.id}: killed, rerun, outputs identical ({time.monotonic() - start:.0f} s both runs)")


def test_a_workflow_killed_whole_mid_evaluation_reruns_to_the_same_results(
    demo_run: dict, tmp_path: Path, measured
) -> None:
    """Snakemake and its running job killed together (a power cut), then --unlock and run again."""
    workdir = tmp_path / "work"
    copy_run(demo_run["workdir"], workdir)
    shutil.rmtree(workdir / "results" / "cache" / "predictions")  # so the evaluation scores again
    # As in a first evaluation: none of its outputs yet. (Were the merged outputs of an earlier run
    # kept, Snakemake would keep them, complete and consistent, and not redo the shard.)
    shutil.rmtree(workdir / "results" / "evaluate" / "finetuned")
    target = "results/evaluate/finetuned/metrics.json"
    environment = {**os.environ, ENVIRONMENT: "scoring.batch:2:group"}
    command = snakemake_command(workdir, "--", target, demo=True)
    start = time.monotonic()
    killed = subprocess.run(command, env=environment, capture_output=True, text=True, start_new_session=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert snakemake(workdir, "--unlock", demo=True).returncode == 0  # whatever lock the killed run left
    rerun = snakemake(workdir, demo=True)  # the whole workflow, as a user would run it again
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    local, again = (
        demo_run["workdir"] / "results" / "evaluate" / "finetuned",
        workdir / "results" / "evaluate" / "finetuned",
    )
    assert_same_scores(again / "predictions.tsv", local / "predictions.tsv")  # rescored in other processes
    ignore = SCORING_TIMES | {"images_scored", "images_from_cache", "shard_jobs"}  # shard_jobs: hosts, times, digests
    metrics = [
        {k: v for k, v in json.loads((d / "metrics.json").read_text()).items() if k not in ignore}
        for d in (local, again)
    ]
    assert same_figures(metrics[1], metrics[0]), metrics
    assert json.loads((again / "metrics.json").read_text())["images_from_cache"] >= 16  # the 2 batches before the kill
    measured(
        f"fault workflow scoring.batch:2:group: killed, unlocked, rerun, identical ({time.monotonic() - start:.0f} s)"
    )


def test_a_stop_fault_freezes_the_process_until_something_ends_it() -> None:
    """``<point>:1:stop``, the hung job the cluster test cancels with scancel."""
    code = "from forensic_vlm.faults import fault_point; fault_point('x'); fault_point('here'); print('went on')"
    environment = {**os.environ, ENVIRONMENT: "here:1:stop"}
    process = subprocess.Popen([sys.executable, "-c", code], env=environment, stdout=subprocess.PIPE, text=True)
    try:
        state = ""
        for _ in range(600):  # a guard against a hang, not a speed requirement
            state = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "T" or process.poll() is not None:
                break
            time.sleep(0.1)
        assert state == "T" and process.poll() is None  # stopped at the point, not ended
    finally:
        process.kill()
    assert process.wait() == -signal.SIGKILL and process.stdout.read() == ""
