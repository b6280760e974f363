"""Benchmark (not a test): manifest throughput in MB/s and images/s on this machine.

Makes phone-like JPEGs (portrait 1080x1920 screenshots and 4000x3000 / 1920x1080 / 1280x960 camera
photos, quality 90) in a temporary folder, then times ``build_manifest`` (sha256, full decode,
EXIF orientation, perceptual hash) with 1 and N worker processes. Writes JSON and prints a table.

    python benchmarks/manifest_throughput.py --images 120 --out benchmarks/results/manifest.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from forensic_vlm.config import DEFAULT_CLASSES, ManifestConfig
from forensic_vlm.manifest import build_manifest

SIZES = ((1080, 1920), (4000, 3000), (1920, 1080), (1280, 960))


def phone_like_jpeg(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (size[1] // 40, size[0] // 40, 3), dtype=np.uint8))
    image = small.resize(size, Image.Resampling.BICUBIC)  # smooth regions, like photos
    draw = ImageDraw.Draw(image)
    for _ in range(40):  # edges and text-like detail, which make JPEGs realistically large
        x, y = int(rng.integers(0, size[0] - 200)), int(rng.integers(0, size[1] - 40))
        draw.rectangle(
            (x, y, x + int(rng.integers(20, 200)), y + 30), fill=tuple(int(v) for v in rng.integers(0, 256, 3))
        )
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw_data"
        total_bytes = 0
        for i in range(args.images):
            folder = raw / DEFAULT_CLASSES[i % 4].folder
            folder.mkdir(parents=True, exist_ok=True)
            data = phone_like_jpeg(i, SIZES[i % len(SIZES)])
            (folder / f"{i:05d}.jpg").write_bytes(data)
            total_bytes += len(data)
        pixels = sum(w * h for w, h in (SIZES[i % len(SIZES)] for i in range(args.images)))
        runs = []
        for workers in args.workers:
            start = time.perf_counter()
            build_manifest(raw, Path(tmp) / f"out{workers}", DEFAULT_CLASSES, ManifestConfig(), workers=workers)
            seconds = time.perf_counter() - start
            runs.append(
                {
                    "workers": workers,
                    "seconds": round(seconds, 2),
                    "MB_per_s": round(total_bytes / 1e6 / seconds, 1),
                    "images_per_s": round(args.images / seconds, 1),
                    "megapixels_per_s": round(pixels / 1e6 / seconds, 1),
                }
            )
    result = {
        "machine": f"{cpu_name()}, {os.cpu_count()} logical cores, {platform.system()}",
        "images": args.images,
        "mean_image_MB": round(total_bytes / args.images / 1e6, 2),
        "mean_megapixels": round(pixels / args.images / 1e6, 2),
        "runs": runs,
    }
    print(json.dumps(result, indent=2))
    print("\n| workers | seconds | MB/s | images/s | Mpixel/s |\n|---|---|---|---|---|")
    for run in runs:
        print(
            f"| {run['workers']} | {run['seconds']} | {run['MB_per_s']} | {run['images_per_s']} | {run['megapixels_per_s']} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
