"""Benchmark (not a test): classify over a large folder of small images, on this machine's CPU.

Writes N small phone-like images (default 20,000, in folders of 1,000), builds the demo's tiny
model, and runs ``forensic-vlm classify`` on the folder as a user would (zero-shot, so no training
is needed). Samples the resident memory (RSS) of the whole process tree twice a second and reads
progress from the prediction cache, to show that memory stays flat as images stream through.

    python benchmarks/classify_streaming.py --images 20000 --out benchmarks/results/classify_streaming.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import yaml
from PIL import Image

SIZES = ((96, 160), (160, 96), (128, 128), (120, 90))


def write_images(root: Path, count: int) -> int:
    total = 0
    for index in range(count):
        rng = np.random.default_rng(index)
        width, height = SIZES[index % len(SIZES)]
        blocks = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(blocks).resize((width, height), Image.Resampling.BILINEAR)
        path = root / f"DCIM_{index // 1000:03d}" / f"IMG_{index:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=85)
        total += path.stat().st_size
    return total


def write_cpu_config(path: Path, model: Path) -> Path:
    """The configuration the CPU benchmarks triage with: the tiny model, batch 8, one DataLoader worker."""
    settings = {
        "model": {"name_or_path": str(model), "quantization": "none", "device": "cpu"},
        "evaluate": {"batch_size": 8, "num_workers": 1},
        "report": {"show_images": True},
    }
    path.write_text(yaml.safe_dump(settings))
    return path


def tree_rss(process: psutil.Process) -> tuple[float, float]:
    """(MB of the main process, MB of it and all its children)."""
    try:
        main = process.memory_info().rss
        children = sum(c.memory_info().rss for c in process.children(recursive=True) if c.is_running())
    except psutil.Error:
        return float("nan"), float("nan")
    return main / 2**20, (main + children) / 2**20


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} logical cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB"
    )


def cached(cache: Path) -> int:
    return sum(max(0, len(f.read_text().splitlines()) - 1) for f in cache.glob("*.tsv"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=2, help="processes that read and check the files")
    args = parser.parse_args()
    from forensic_vlm.config import DemoModelConfig
    from forensic_vlm.demo_model import build_demo_model

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="classify_bench_"))
    folder = work / "extraction"
    if folder.exists():
        shutil.rmtree(folder)
    start = time.perf_counter()
    size = write_images(folder, args.images)
    print(f"wrote {args.images} images ({size / 2**20:.0f} MB) in {time.perf_counter() - start:.0f} s", flush=True)
    model = build_demo_model(work / "model", DemoModelConfig())
    config = write_cpu_config(work / "config.yaml", model)
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "forensic_vlm",
        "--config",
        str(config),
        "--log",
        str(work / "classify.log"),
        "classify",
        str(folder),
        "--case",
        "bench",
        "--out",
        str(work / "out"),
        "--cache-dir",
        str(cache),
        "--workers",
        str(args.workers),
    ]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watched = psutil.Process(process.pid)
    samples = []
    while process.poll() is None:
        main_mb, tree_mb = tree_rss(watched)
        samples.append(
            {
                "seconds": round(time.perf_counter() - start, 1),
                "scored": cached(cache),
                "rss_main_MB": round(main_mb, 1),
                "rss_tree_MB": round(tree_mb, 1),
            }
        )
        time.sleep(0.5)
    seconds = time.perf_counter() - start
    if process.returncode:
        raise SystemExit(f"classify failed ({process.returncode}); see {work / 'classify.log'}")
    custody = json.loads((work / "out" / "custody.json").read_text())
    scoring = [s for s in samples if 0 < s["scored"] < args.images]

    def peak_between(low: float, high: float) -> float:
        window = [s["rss_main_MB"] for s in scoring if low * args.images <= s["scored"] < high * args.images]
        return max(window) if window else float("nan")

    result = {
        "machine": machine(),
        "images": args.images,
        "image_sizes": [list(s) for s in SIZES],
        "folder_MB": round(size / 2**20, 1),
        "model": "the demo's tiny random LLaVA-NeXT (zero-shot), CPU, batch 8",
        "seconds_total": round(seconds, 1),
        "images_per_second_total": round(args.images / seconds, 1),
        "scoring": custody["scoring"],
        "peak_rss_main_MB_by_share_of_images_scored": {
            "0-25 %": peak_between(0.0, 0.25),
            "25-50 %": peak_between(0.25, 0.5),
            "50-75 %": peak_between(0.5, 0.75),
            "75-100 %": peak_between(0.75, 1.01),
        },
        "peak_rss_main_MB_whole_run": max(s["rss_main_MB"] for s in samples),
        "peak_rss_tree_MB_whole_run": max(s["rss_tree_MB"] for s in samples),
        "triage_rows": custody["counts"]["files"],
        "samples": samples[:: max(1, len(samples) // 200)],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))


if __name__ == "__main__":
    main()
