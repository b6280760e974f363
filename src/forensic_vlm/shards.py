"""One scoring run cut into shard jobs (Snakemake's scattergather) and merged exactly.

Used by the triage (``classify_shard`` → ``classify``) and by the evaluations
(``evaluate_*_shard`` → ``evaluate_*``). Every shard job plans the same batches over all the
distinct images of its input and scores only whole batches of its own (``scoring.score_examples``
with ``shard=``), so each image is scored once, in the batch it would have in one job, and its
probabilities are the same to the last digit. A shard reads the shared prediction cache and writes
only a cache of its own: shards running at once never write the same file, and a killed shard
resumes from its own cache. Its part (one row per distinct image) and a record of its job (host,
device, start and end, the part's sha256) are its outputs. The gather step checks the parts
(:func:`read_parts`) and is the one writer that merges the shards' caches into the shared one
(:func:`merge_shard_caches`).
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import platform
import re
from pathlib import Path
from typing import TYPE_CHECKING

from forensic_vlm.config import EvaluateConfig, ModelConfig
from forensic_vlm.errors import IntegrityError
from forensic_vlm.faults import fault_point
from forensic_vlm.prediction_cache import merge_caches
from forensic_vlm.tables import Example, read_tsv, sha256_file, write_atomically, write_tsv

if TYPE_CHECKING:
    from forensic_vlm.scoring import Scores

SCATTER_ITEM = re.compile(r"(\d+)-of-(\d+)")
#: The run facts of a one-job record that the merged record adds up over the shards.
SUMMED_FACTS = ("images_scored", "images_from_cache", "seconds", "devices")


def parse_scatter_item(item: str) -> tuple[int, int]:
    """Snakemake's scatter item ``"2-of-3"`` as (shard index from 0, shard count)."""
    match = SCATTER_ITEM.fullmatch(item)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise ValueError(f"not a scatter item like 2-of-3: {item!r}")
    return int(match[1]) - 1, int(match[2])


def part_columns(labels: list[int]) -> list[str]:
    return ["sha256", "predicted", *[f"p{label}" for label in labels], "answer"]


def scoring_record(scores: Scores) -> dict:
    """What a record keeps of a scoring run: the model and adapter as hashed, the path, the figures."""
    return {
        "path": scores.path,
        "model_files_sha256": scores.model_files_sha256,
        "adapter_files_sha256": scores.adapter_files_sha256,
        "device": scores.device,
        "parity_gate": scores.parity_gate,
        "facts": scores.run_facts(),
    }


def score_part(
    examples: list[Example],
    part: Path,
    *,
    scatter_item: str,
    stage: str,
    labels: list[int],
    model_config: ModelConfig,
    evaluate_config: EvaluateConfig,
    adapter: Path | None,
    cache_dir: Path | None,
    shard_cache_dir: Path | None,
    parity_gate: Path | None = None,
) -> dict:
    """Score this shard's share of ``examples``; write ``part`` (TSV, one row per distinct image)
    and its job's record (``part`` with suffix .json). ``stage`` names the stage in the log and the
    fault point (``<stage>.shard.<item>``). ``parity_gate``: rule parity_gate's verdict for the
    adapter, which ``auto`` follows. Returns the record."""
    from forensic_vlm.scoring import score_examples  # torch: only the jobs that score need it
    from forensic_vlm.speed.gate import read_verdict

    started = dt.datetime.now(dt.UTC)
    kind = f"{stage} shard {scatter_item}" + (" (fine-tuned)" if adapter else " (zero-shot)")
    scores = score_examples(
        examples,
        labels,
        model_config=model_config,
        config=evaluate_config,
        adapter=adapter,
        cache_dir=shard_cache_dir,
        shared_cache_dir=cache_dir,
        kind=kind,
        shard=parse_scatter_item(scatter_item),
        gate=read_verdict(parity_gate) if parity_gate else None,
    )
    # Scored and in this shard's own cache, its part not written yet (a shard cancelled here reruns
    # and scores nothing again).
    fault_point(f"{stage}.shard.{scatter_item}")
    distinct = sorted({row["sha256"]: row for row in scores.rows}.items())
    write_tsv(part, part_columns(labels), [row for _, row in distinct])
    record = {
        "shard": scatter_item,
        "host": platform.node(),
        "user": getpass.getuser(),
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "device": scores.device,
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "files": len(scores.rows),
        "distinct_images": len(distinct),
        "part": part.name,
        "part_sha256": sha256_file(part),
        "scoring": scoring_record(scores),
    }
    write_atomically(part.with_suffix(".json"), (json.dumps(record, indent=2) + "\n").encode("utf-8"))
    return record


def read_parts(parts: list[Path]) -> tuple[dict[str, dict[str, str]], list[dict], dict]:
    """The rows of every part by sha256, the shards' records, and one scoring record for them all,
    after checking that each part is what its job recorded, that the parts are one run's shards,
    that no image was scored twice, and that every shard used the same model files, adapter and
    scoring path. Any failure is an ``IntegrityError`` naming the part. Whether every image was
    scored is for the caller to check against its own input."""
    records = [json.loads(Path(part).with_suffix(".json").read_text(encoding="utf-8")) for part in parts]
    scored: dict[str, dict[str, str]] = {}
    for part, record in zip(parts, records, strict=True):
        if sha256_file(part) != record["part_sha256"]:
            raise IntegrityError(f"{part}: its content is not the part its job recorded (sha256 differs)")
        if parse_scatter_item(record["shard"])[1] != len(parts):
            raise IntegrityError(f"{part}: scored as shard {record['shard']} of a run with {len(parts)} shards")
        for row in read_tsv(part):
            if row["sha256"] in scored:
                raise IntegrityError(f"{part}: image {row['sha256']} was scored by another shard too")
            scored[row["sha256"]] = row
    first = records[0]["scoring"]
    for part, record in zip(parts, records, strict=True):
        for key in ("path", "model_files_sha256", "adapter_files_sha256", "parity_gate"):
            if record["scoring"].get(key) != first.get(key):
                raise IntegrityError(f"{part}: scored with another {key} than {parts[0]}; rerun the shards")
    facts = [record["scoring"]["facts"] for record in records]
    devices = ", ".join(sorted({record["device"] for record in records}))
    summed = {key: sum(f[key] for f in facts) for key in SUMMED_FACTS}
    summed["seconds"] = round(summed["seconds"], 2)  # GPU-job seconds, added up over the shards
    steady = [f for f in facts if f["images_scored"] and f["images_per_second_after_first_batch"]]
    steady_seconds = sum(f["images_scored"] / f["images_per_second_after_first_batch"] for f in steady)
    scoring = {
        **{key: first[key] for key in ("path", "model_files_sha256", "adapter_files_sha256")},
        "parity_gate": first.get("parity_gate"),
        "device": devices,
        "facts": {  # the one-job record's keys; each shard's own figures are in its record
            "device": devices,
            "shards": len(records),
            **summed,
            # Per GPU job: what one job's figures would say, not the cluster's combined rate.
            "images_per_second": round(summed["images_scored"] / summed["seconds"], 2) if summed["seconds"] else None,
            "images_per_second_after_first_batch": (
                round(summed["images_scored"] / steady_seconds, 2) if steady_seconds else None
            ),
            # The slowest shard's start-up (each pays its own loading and compilation).
            "seconds_to_first_batch": max((f.get("seconds_to_first_batch") or 0 for f in steady), default=None),
            **first["path"],
            "parity_gate": first.get("parity_gate"),
        },
    }
    return scored, records, scoring


def merge_shard_caches(cache_dir: Path | None, shard_cache_dirs: list[Path]) -> None:
    """Merge the shards' own prediction caches into the shared one (only the gather step does)."""
    if cache_dir is not None:
        for folder in shard_cache_dirs:
            merge_caches(Path(cache_dir), Path(folder))
