"""Rewrite a bitsandbytes wheel in place with the native libraries of one CUDA version (and the
CPU's) only: 41 MiB becomes 3.4 MiB, so it fits the device tool's 64 MiB carry beside the test
wheels and the processor. The device image's torch is built for CUDA 13.0, hence the default.

Usage: python benchmarks/slim_bitsandbytes_wheel.py .whl/bitsandbytes-*.whl [--cuda 130]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import zipfile
from pathlib import Path


def slim(wheel: Path, cuda: str) -> int:
    """Drop every ``libbitsandbytes_*`` library but CUDA ``cuda``'s and the CPU's; returns how many."""
    dropped = 0
    with tempfile.TemporaryDirectory() as scratch:
        slimmed = Path(scratch) / wheel.name
        with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slimmed, "w", zipfile.ZIP_DEFLATED) as target:
            for entry in source.infolist():
                name = Path(entry.filename).name
                native = name.startswith("libbitsandbytes_") and name.endswith(".so")
                if native and not (f"cuda{cuda}" in name or "cpu" in name):
                    dropped += 1
                    continue
                target.writestr(entry, source.read(entry.filename))
        shutil.move(slimmed, wheel)
    return dropped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("--cuda", default="130", help="the CUDA version whose library is kept, e.g. 130")
    args = parser.parse_args()
    dropped = slim(args.wheel, args.cuda)
    print(f"{args.wheel}: dropped {dropped} native libraries; now {args.wheel.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
