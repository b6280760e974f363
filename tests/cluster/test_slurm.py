"""The demo workflow submitted to a real one-node SLURM cluster (tests/cluster/start_slurm.sh).

The shared local demo run provides the data stages and the adapter; the evaluations' scoring
rules, which ask for a GPU, the rules that merge them and the report, which do not, are run again
through SLURM from there, and must give what the local run gave. The triage's rules go through
SLURM in the shard test, whose one-job triage must be the local one byte for byte. Training, the
one slow rule, is not run twice: its GPU request is read from the cluster dry run.

Skipped where no cluster answers, except in CI, where .ci/run starts one and a missing cluster
fails the run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import DEMO_CONFIG, REPO, SHARD_VICTIM, assert_same_scores, copy_run
from forensic_vlm.faults import ENVIRONMENT
from forensic_vlm.tables import read_tsv

GPU_RULES = {"evaluate_zeroshot_shard", "evaluate_finetuned_shard"}
# The rules that merge the shards need no GPU.
CLUSTER_RULES = GPU_RULES | {"evaluate_zeroshot", "evaluate_finetuned", "report"}
# The CI node has 2 CPUs and ~21 GB: the profile's real-cluster sizes are scaled down here only.
SMALL_NODE = (
    "--default-resources",
    "slurm_partition=debug",
    "mem_mb=1500",
    "runtime=30",
    "--set-resources",
    "train:mem_mb=3000",
    "evaluate_zeroshot_shard:mem_mb=3000",
    "evaluate_finetuned_shard:mem_mb=3000",
    "classify_shard:mem_mb=3000",
    "classify_listing:mem_mb=2000",
    "manifest:mem_mb=2000",
    "augment:mem_mb=2000",
    "report:mem_mb=2000",
    "--max-threads",
    "2",
    # These jobs take 8-18 s. The plugin checks after this many seconds, then 10 s later each time
    # no job has ended (1, 12, 33 s, ...): with 1, a 14 s job was seen ended 19 s late; with 5
    # (5, 20, 45 s) the jobs here are seen within about 6 s (docs/performance.md).
    "--slurm-init-seconds-before-status-checks",
    "5",
)


def cluster_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    result = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return result.returncode == 0 and bool(result.stdout.strip())


# One cluster: its tests run one after the other, on one pytest-xdist worker when there are several.
pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.xdist_group("slurm")]


@pytest.fixture(scope="module", autouse=True)
def slurm() -> None:
    if not cluster_answers():
        if os.environ.get("CI"):
            pytest.fail("no SLURM cluster answers: .ci/run starts one with tests/cluster/start_slurm.sh")
        pytest.skip("no SLURM cluster (start one with: sudo bash tests/cluster/start_slurm.sh)")


def submit_command(workdir: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(workdir),
        "--profile",
        str(REPO / "profiles" / "slurm"),
        "--configfile",
        *DEMO_CONFIG,
        *SMALL_NODE,
        *args,
    ]


def submit(workdir: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    # A guard against a hang, not a speed requirement: a stuck submission must end the test.
    result = subprocess.run(submit_command(workdir, *args), capture_output=True, text=True, timeout=1500)
    return result, time.monotonic() - start


def slurm_jobs(log: str) -> dict[str, str]:
    """Rule -> SLURM job id, from Snakemake's submission lines (one job a rule)."""
    return {rule: job for rule, _, job in submissions(log)}


def submissions(log: str) -> list[tuple[str, str, str]]:
    """(rule, wildcards as the log folder names them, SLURM job id) of every submitted job."""
    found = re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*/rule_(\w+?)/(?:(\S+)/)?\d+\.log\)", log)
    return [(rule, wildcards, job) for job, rule, wildcards in found]


def accounting(job_ids: list[str]) -> dict[str, dict[str, str]]:
    result = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", "JobID,State,ReqTRES,Partition", "-j", ",".join(job_ids)],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [line.split("|") for line in result.stdout.splitlines() if line]
    return {r[0]: {"state": r[1], "tres": r[2], "partition": r[3]} for r in rows}


def test_demo_goes_through_slurm_and_matches_a_local_run(demo_run: dict, tmp_path: Path, measured) -> None:
    workdir = tmp_path / "work"
    copy_run(demo_run["workdir"], workdir)
    shutil.rmtree(workdir / "results" / "cache" / "predictions")  # the cluster must score, not look up
    # Both evaluations' scoring again, and so their merges and the report downstream of them.
    result, seconds = submit(workdir, "--forcerun", "evaluate_zeroshot_shard", "evaluate_finetuned_shard")
    assert result.returncode == 0, result.stderr[-4000:]
    log = result.stdout + result.stderr
    jobs = slurm_jobs(log)
    assert set(jobs) == CLUSTER_RULES, jobs  # every rule but the local target went through SLURM
    records = accounting(list(jobs.values()))
    for rule, job in jobs.items():
        assert records[job]["state"] == "COMPLETED", (rule, records[job])
        assert ("gres/gpu=1" in records[job]["tres"]) == (rule in GPU_RULES), (rule, records[job]["tres"])
    measured(
        f"SLURM: evaluations and report in {seconds:.0f} s; SLURM job ids "
        + ", ".join(f"{r}={j}" for r, j in sorted(jobs.items()))
    )

    local, cluster = demo_run["workdir"] / "results", workdir / "results"
    for kind in ("zeroshot", "finetuned"):  # scored again on the cluster, not read from the cache
        assert json.loads((cluster / "evaluate" / kind / "metrics.json").read_text())["images_from_cache"] == 0
    for kind in ("zeroshot", "finetuned"):
        a, b = (
            read_tsv(local / "evaluate" / kind / "predictions.tsv"),
            read_tsv(cluster / "evaluate" / kind / "predictions.tsv"),
        )
        assert [r["sha256"] for r in a] == [r["sha256"] for r in b]
        columns = [c for c in a[0] if re.fullmatch(r"p\d+", c)]
        difference = np.abs(
            np.array([[float(r[c]) for c in columns] for r in a])
            - np.array([[float(r[c]) for c in columns] for r in b])
        ).max()
        assert difference < 1e-4, (kind, difference)
    assert (cluster / "report" / "index.html").exists()

    # Training would ask for its GPU the same way (the plugin's gres comes from the gpu resource).
    dry, _ = submit(workdir, "-n", "--forcerun", "train")
    assert dry.returncode == 0, dry.stderr[-2000:]
    train_job = (dry.stdout + dry.stderr).split("rule train:", 1)[1].split("\n\n", 1)[0]
    resources = re.search(r"resources: (.*)", train_job).group(1).split(", ")
    assert "gpu=1" in resources, resources


def test_a_failing_job_fails_the_run_with_its_slurm_state(tmp_path: Path, measured) -> None:
    evidence = tmp_path / "evidence"
    (evidence / "0_irrelevant").mkdir(parents=True)
    (evidence / "0_irrelevant" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    result, seconds = submit(
        tmp_path / "work",
        "--config",
        f"raw_data={evidence}",
        "manifest={on_bad_input: fail}",
        "--",
        "results/manifest/manifest.tsv",
    )
    log = result.stdout + result.stderr
    assert result.returncode != 0
    jobs = slurm_jobs(log)
    assert set(jobs) == {"manifest"}
    assert accounting([jobs["manifest"]])[jobs["manifest"]]["state"] == "FAILED"
    assert "FAILED" in log and "broken.png" in (tmp_path / "work" / "results" / "logs" / "manifest.log").read_text()
    measured(f"failing SLURM job {jobs['manifest']} reported FAILED; the run ended after {seconds:.0f} s")


def test_three_shard_jobs_merge_to_the_local_triage_and_a_cancelled_shard_is_resubmitted_alone(
    demo_run: dict, tmp_path: Path, measured
) -> None:
    workdir = tmp_path / "work"
    copy_run(demo_run["workdir"], workdir)
    shutil.rmtree(workdir / "results" / "cache" / "predictions")  # the shards must score, not look up
    victim = SHARD_VICTIM
    out = workdir / "results" / "classify" / "demo"
    command_log = tmp_path / "submit.log"
    # The victim stops itself once it has scored (its rows in its own cache, its part not written),
    # a hung job, and is cancelled below with scancel as an examiner or the cluster would.
    environment = {**os.environ, ENVIRONMENT: f"classify.shard.{victim}:1:stop"}
    start = time.monotonic()
    with command_log.open("w") as sink:
        # gpu=3: all three are submitted at once and SLURM queues them for the node's one GPU, so
        # the other two run once the victim is cancelled, whichever order they come in.
        # env --default-signal=INT: a run started from a background shell inherits SIGINT ignored,
        # and Snakemake would then never see the Ctrl-C below (the test waited out its guard).
        running = subprocess.Popen(
            [
                "env",
                "--default-signal=INT",
                *submit_command(workdir, "--set-scatter", "classify=3", "--keep-going", "--resources", "gpu=3"),
            ],
            env=environment,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        job = wait_for(lambda: stopped_shard_job(command_log.read_text(), victim), running)
        subprocess.run(["scancel", job], check=True)
        others_done = wait_for(lambda: shards_completed(command_log.read_text(), but=job), running)
        # sacct reports a job ended by scancel as "CANCELLED by <uid>", which
        # snakemake-executor-plugin-slurm 2.6.1 does not take for a failure: it waits for the job
        # for ever. The examiner then stops Snakemake (Ctrl-C), as here; docs/cluster.md says so.
        hung = running.poll() is None
        if hung:
            time.sleep(5)  # one more status check, in case the plugin learns the state meanwhile
            running.send_signal(signal.SIGINT)
        running.wait(timeout=900)  # a guard against a hang, not a speed requirement
    log = command_log.read_text()
    assert running.returncode != 0, log[-3000:]
    first = {wildcards: job for rule, wildcards, job in submissions(log) if rule == "classify_shard"}
    assert set(first) == {f"demo_{i}-of-3" for i in (1, 2, 3)}, log[-3000:]
    records = accounting(list(first.values()))
    for wildcards, job in first.items():
        assert "gres/gpu=1" in records[job]["tres"], (wildcards, records[job])  # each shard its own GPU
        expected = "CANCELLED" if wildcards == f"demo_{victim}" else "COMPLETED"
        assert records[job]["state"].startswith(expected), (wildcards, records[job])
    assert not (out / "shards" / f"{victim}.tsv").exists()

    rerun, _ = submit(workdir, "--set-scatter", "classify=3")
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    again = submissions(rerun.stdout + rerun.stderr)
    assert sorted((rule, wildcards) for rule, wildcards, _ in again) == [
        ("classify", "demo"),
        ("classify_shard", f"demo_{victim}"),
    ]  # only the cancelled shard is submitted again, then the merge
    merge = accounting([job for rule, _, job in again if rule == "classify"])
    for record in merge.values():  # the merge ran as a SLURM job of its own, with no GPU asked for
        assert record["state"] == "COMPLETED" and "gres/gpu" not in record["tres"], record
    # The local one-job triage, row for row (probabilities to PROCESS_ROUNDING: other processes).
    assert_same_scores(out / "triage.tsv", demo_run["workdir"] / "results" / "classify" / "demo" / "triage.tsv")
    resumed = json.loads((out / "shards" / f"{victim}.json").read_text())
    assert resumed["job_id"] == dict((w, j) for r, w, j in again if r == "classify_shard")[f"demo_{victim}"]
    assert resumed["scoring"]["facts"]["images_scored"] == 0  # it went on from its own cache
    assert resumed["scoring"]["facts"]["images_from_cache"] == resumed["files"] > 0  # which held its work
    custody = json.loads((out / "custody.json").read_text())
    assert {s["job_id"] for s in custody["shards"]} == {
        *(job for w, job in first.items() if w != f"demo_{victim}"),
        resumed["job_id"],
    }
    assert others_done
    measured(
        f"SLURM: 3 classify_shard jobs ({', '.join(first.values())}), {victim} cancelled with scancel and "
        f"resubmitted alone; triage identical to the local one ({time.monotonic() - start:.0f} s in all); "
        + ("Snakemake kept waiting for the cancelled job and was stopped with SIGINT" if hung else "")
    )


def stopped_shard_job(log: str, item: str) -> str | None:
    """The SLURM job of shard ``item`` once its scoring process has stopped itself, else None."""
    jobs = [job for rule, wildcards, job in submissions(log) if rule == "classify_shard" and wildcards.endswith(item)]
    return jobs[0] if jobs and any("classify_shard" in command for command in stopped_processes()) else None


def shards_completed(log: str, but: str) -> bool | None:
    """True once every other classify_shard job submitted so far is COMPLETED in sacct, else None."""
    others = [job for rule, _, job in submissions(log) if rule == "classify_shard" and job != but]
    if len(others) < 2:
        return None
    states = accounting(others)
    return True if all(states.get(job, {}).get("state") == "COMPLETED" for job in others) else None


def stopped_processes() -> list[str]:
    """The command lines of this machine's stopped processes (the one-node cluster runs its jobs
    here), read from /proc: ps would cut long command lines to the terminal's width."""
    found = []
    for process in Path("/proc").glob("[0-9]*"):
        try:
            state = (process / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "T":
                found.append((process / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, IndexError):
            continue  # ended meanwhile
    return found


def wait_for(found, running: subprocess.Popen):
    """Poll ``found()`` until it returns something; fail if the submission ends first."""
    deadline = time.monotonic() + 900  # a guard against a hang, not a speed requirement
    while time.monotonic() < deadline:
        if (value := found()) is not None:
            return value
        assert running.poll() is None, "the submission ended before the shard stopped"
        time.sleep(1)
    running.kill()
    pytest.fail("the shard never reached its fault point")
