"""Benchmark (not a test): one case triaged in shards, as rules classify_listing, classify_shard and
classify run it, on this machine's CPU.

Writes N small phone-like images (default 100,000; ``classify_streaming.write_images``), builds the
demo's tiny model, lists the folder once, scores it in S shards (default 4), each in a process of
its own as a cluster job would be, one after another (this machine has 2 cores), and merges them.
Records each shard's wall time, images/s and peak resident memory (sampled twice a second), the
merge's time, and the size of the page and the table.

    python benchmarks/sharded_triage.py --images 100000 --shards 4 --out benchmarks/results/sharded_triage_cpu.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from classify_streaming import SIZES, machine, tree_rss, write_images

SHARD = """
import sys
from pathlib import Path
from forensic_vlm.classify import score_shard
from forensic_vlm.config import DEFAULT_CLASSES, EvaluateConfig, ModelConfig
from forensic_vlm.logs import setup_logging
work, item = Path(sys.argv[1]), sys.argv[2]
setup_logging(work / f"shard_{item}.log")
score_shard(work / "listing.jsonl", work / "shards" / f"{item}.tsv", scatter_item=item,
    classes=list(DEFAULT_CLASSES), model_config=ModelConfig(name_or_path=str(work / "model"), quantization="none", device="cpu"),
    evaluate_config=EvaluateConfig(batch_size=8, num_workers=1), cache_dir=work / "cache",
    shard_cache_dir=work / "cache" / "shards" / item, threads=2)
"""


def run_watched(command: list[str]) -> tuple[float, float]:
    """(seconds, peak MB of the process tree's resident memory)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watched, peak = psutil.Process(process.pid), 0.0
    while process.poll() is None:
        peak = max(peak, tree_rss(watched)[1])
        time.sleep(0.5)
    if process.returncode:
        raise SystemExit(f"{command[-1]} failed: {process.stderr.read().decode()[-2000:]}")
    return time.perf_counter() - start, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()
    from forensic_vlm.classify import assemble_shards, classify_listing
    from forensic_vlm.config import (
        DEFAULT_CLASSES,
        ClassifyConfig,
        DemoModelConfig,
        EvaluateConfig,
        ManifestConfig,
        ModelConfig,
        ReportConfig,
    )
    from forensic_vlm.demo_model import build_demo_model

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="sharded_bench_"))
    folder = work / "extraction"
    for stale in (folder, work / "cache", work / "shards", work / "out"):
        shutil.rmtree(stale, ignore_errors=True)
    start = time.perf_counter()
    size = write_images(folder, args.images)
    print(f"wrote {args.images} images ({size / 2**20:.0f} MB) in {time.perf_counter() - start:.0f} s", flush=True)
    build_demo_model(work / "model", DemoModelConfig())

    start = time.perf_counter()
    classify_listing(folder, work / "listing.jsonl", ManifestConfig(), workers=2)
    listing_seconds = time.perf_counter() - start
    print(f"listing: {listing_seconds:.0f} s", flush=True)
    shards = []
    for index in range(1, args.shards + 1):
        item = f"{index}-of-{args.shards}"
        seconds, peak = run_watched([sys.executable, "-c", SHARD, str(work), item])
        record = json.loads((work / "shards" / f"{item}.json").read_text())
        scored = record["scoring"]["facts"]["images_scored"]
        shards.append(
            {
                "shard": item,
                "files": record["files"],
                "images_scored": scored,
                "seconds_wall": round(seconds, 1),
                "images_per_second_wall": round(record["files"] / seconds, 1),
                "peak_rss_tree_MB": round(peak, 1),
            }
        )
        print(json.dumps(shards[-1]), flush=True)
    start = time.perf_counter()
    custody = assemble_shards(
        work / "listing.jsonl",
        [work / "shards" / f"{i}-of-{args.shards}.tsv" for i in range(1, args.shards + 1)],
        work / "out",
        classes=list(DEFAULT_CLASSES),
        model_config=ModelConfig(name_or_path=str(work / "model"), quantization="none", device="cpu"),
        evaluate_config=EvaluateConfig(batch_size=8, num_workers=1),
        config=ClassifyConfig(case="bench"),
        manifest_config=ManifestConfig(),
        report_config=ReportConfig(show_images=True),
        cache_dir=work / "cache",
        shard_cache_dirs=sorted((work / "cache" / "shards").glob("*")),
    )
    merge_seconds = time.perf_counter() - start
    total = listing_seconds + sum(s["seconds_wall"] for s in shards) + merge_seconds
    result = {
        "machine": machine(),
        "images": args.images,
        "image_sizes": [list(s) for s in SIZES],
        "folder_MB": round(size / 2**20, 1),
        "model": "the demo's tiny random LLaVA-NeXT (zero-shot), CPU, batch 8, 2 threads",
        "shards": args.shards,
        "listing_seconds": round(listing_seconds, 1),
        "shard_jobs": shards,
        "merge_seconds": round(merge_seconds, 1),
        "seconds_total_one_after_another": round(total, 1),
        "images_per_second_total": round(args.images / total, 1),
        "triage_rows": custody["counts"]["files"],
        "triage_tsv_bytes": (work / "out" / "triage.tsv").stat().st_size,
        "triage_html_bytes": (work / "out" / "triage.html").stat().st_size,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
