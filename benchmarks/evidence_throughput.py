"""Benchmark (not a test): the same images triaged from a folder and from an E01, on this machine's CPU.

Writes N small phone-like images (default 5,000; ``classify_streaming.write_images``), puts them on a
FAT file system with mkfs.fat and mtools, acquires that into an E01 with ewfacquire (deflate, fast;
16 MiB segments, as a lab would split an acquisition), builds the demo's tiny model, then for the
folder and for the E01 in turn: lists and inspects the input (``classify_listing``, 2 worker
processes), and runs the whole triage (``forensic-vlm classify``: listing, scoring, page, custody,
triage.csv, case.jsonld) with a fresh prediction cache. Records the E01's hash verification on its
own, each phase's wall time and images/s, and checks that both triages give the same scores.

    python benchmarks/evidence_throughput.py --images 5000 --out benchmarks/results/evidence_throughput_cpu.json
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

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from classify_streaming import machine, write_cpu_config, write_images
from evidence_images import fat_image, run_tool

from forensic_vlm.classify import classify_listing
from forensic_vlm.config import ClassifyConfig, DemoModelConfig, ManifestConfig
from forensic_vlm.demo_model import build_demo_model
from forensic_vlm.evidence import describe_container
from forensic_vlm.tables import read_tsv


def timed(function, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


def triage(work: Path, model: Path, source: Path, name: str, *, workers: int) -> dict:
    config = write_cpu_config(work / "config.yaml", model)
    cache = work / f"cache_{name}"
    shutil.rmtree(cache, ignore_errors=True)
    command = [sys.executable, "-m", "forensic_vlm", "--config", str(config), "--log", str(work / f"{name}.log")]
    command += ["classify", str(source), "--case", name, "--out", str(work / name), "--cache-dir", str(cache)]
    command += ["--workers", str(workers)]
    seconds, result = timed(subprocess.run, command, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"classify {name} failed: {result.stderr[-2000:]}")
    custody = json.loads((work / name / "custody.json").read_text())
    return {"seconds": round(seconds, 1), "custody": custody}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5_000)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=2, help="processes that read and check the files")
    parser.add_argument("--reuse", action="store_true", help="keep the images, FAT image and E01 of --work-dir")
    args = parser.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="evidence_bench_"))
    folder, raw, e01 = work / "extraction", work / "card.raw", work / "card.E01"
    if not (args.reuse and e01.exists()):
        shutil.rmtree(folder, ignore_errors=True)
        for old in work.glob("card.*"):
            old.unlink()
        write_images(folder, args.images)
        raw_seconds, _ = timed(fat_image, folder, raw)
        ewf = ["ewfacquire", "-u", "-q", "-t", str(work / "card"), "-c", "deflate:fast", "-S", str(16 << 20), str(raw)]
        acquire_seconds, _ = timed(run_tool, *ewf)
        print(
            f"FAT image {raw.stat().st_size >> 20} MiB in {raw_seconds:.0f} s; E01 in {acquire_seconds:.0f} s",
            flush=True,
        )
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    segments = sorted(work.glob("card.E*"))
    print(f"{args.images} images ({size / 2**20:.0f} MB), E01 of {len(segments)} segment(s)", flush=True)
    model = build_demo_model(work / "model", DemoModelConfig())

    verify_seconds, record = timed(describe_container, e01, verify=True)
    print(f"E01 verified in {verify_seconds:.1f} s: {record['verified']}", flush=True)
    listing = {}
    for name, source, config in (
        ("folder", folder, ClassifyConfig()),
        ("e01", e01, ClassifyConfig(verify_container=False)),  # listing alone; verification timed above
    ):
        seconds, files = timed(
            classify_listing, source, work / f"{name}.jsonl", ManifestConfig(), args.workers, config=config
        )
        listing[name] = {"seconds": round(seconds, 2), "files": files, "files_per_second": round(files / seconds, 1)}
        print(f"listing {name}: {files} files in {seconds:.1f} s", flush=True)
    runs = {
        name: triage(work, model, source, name, workers=args.workers)
        for name, source in (("folder", folder), ("e01", e01))
    }
    scores = {
        name: {
            r["sha256"]: (r["predicted"], r["p0"], r["p1"], r["p2"], r["p3"])
            for r in read_tsv(work / name / "triage.tsv")
            if r["status"] == "scored"
        }
        for name in runs
    }
    result = {
        "machine": machine(),
        "images": args.images,
        "image_megabytes": round(size / 2**20, 1),
        "fat_image_MiB": round(raw.stat().st_size / 2**20),
        "e01": {
            "segments": len(segments),
            "bytes": sum(s.stat().st_size for s in segments),
            "verify_seconds": round(verify_seconds, 2),
            "verify_MiB_per_second": round(record["media_size_bytes"] / 2**20 / verify_seconds, 1),
            "verified": record["verified"],
        },
        "listing": listing,
        "triage": {
            name: {
                "seconds": run["seconds"],
                "images_per_second": round(args.images / run["seconds"], 1),
                "scoring_images_per_second": run["custody"]["scoring"]["images_per_second"],
                "container_verified": (run["custody"]["container"] or {}).get("verified", "(folder)"),
            }
            for name, run in runs.items()
        },
        "same_scores": scores["folder"] == scores["e01"],
        "e01_vs_folder_whole_triage": round(runs["folder"]["seconds"] / runs["e01"]["seconds"], 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
