"""Evidence containers built with Debian's own tools, for the tests and the benchmark: a FAT file
system made by mkfs.fat and filled by mtools (with one file deleted after it was written, so its
content is still on the card), that image turned into a multi-segment E01 by ewf-tools'
ewfacquire, an MBR disk with two FAT partitions (sfdisk), an ext4 file system (mke2fs -d), and the
folder as a zip and a tar.gz.

Every container is made read-only once built: nothing the tool does may change a byte of them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

#: Debian packages that provide the tools (apt-get install mtools dosfstools ewf-tools fdisk e2fsprogs).
TOOLS = {
    "mkfs.fat": "dosfstools",
    "mcopy": "mtools",
    "mdel": "mtools",
    "ewfacquire": "ewf-tools",
    "sfdisk": "fdisk",
    "mke2fs": "e2fsprogs",
}
DELETED_NAME = "DELETED.JPG"


def missing_tools() -> list[str]:
    return [f"{tool} ({package})" for tool, package in TOOLS.items() if shutil.which(tool) is None]


def run_tool(*command: str) -> None:
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "MTOOLS_NO_VFAT": "0"}
    subprocess.run(command, check=True, capture_output=True, env=env)


def fat_image(folder: Path, image: Path, deleted: bytes | None = None, *, offset: int = 0, sectors: int = 0) -> Path:
    """A FAT file system holding ``folder``'s tree; ``deleted``: the bytes of one more file that is
    written and then deleted (its directory entry marked free, its clusters left as they were).
    ``offset`` and ``sectors``: inside an existing disk image, as a partition."""
    if not offset:
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        with open(image, "wb") as handle:
            handle.truncate(max(8, 2 * size // 2**20 + 4) << 20)
    placement = ("--offset", str(offset // 512)) if offset else ()
    run_tool("mkfs.fat", "-n", "EVIDENCE", *placement, str(image), *((str(sectors // 2),) if offset else ()))
    target = f"{image}@@{offset}" if offset else str(image)
    for child in sorted(folder.iterdir()):
        run_tool("mcopy", "-s", "-p", "-m", "-i", target, str(child), "::/")
    if deleted is not None:
        extra = image.parent / DELETED_NAME.lower()
        extra.write_bytes(deleted)
        run_tool("mcopy", "-i", target, str(extra), f"::/{DELETED_NAME}")
        run_tool("mdel", "-i", target, f"::/{DELETED_NAME}")
        extra.unlink()
    return image


def ext4_image(folder: Path, image: Path) -> Path:
    """An ext4 file system holding ``folder``'s tree, written by mke2fs -d (no mount)."""
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    run_tool(
        "mke2fs",
        "-q",
        "-t",
        "ext4",
        "-L",
        "evidence",
        "-d",
        str(folder),
        str(image),
        f"{max(16, 2 * size // 2**20 + 8)}M",
    )
    return image


def e01_from(raw: Path, target: Path, segment_bytes: int = 1 << 20) -> Path:
    """``raw`` acquired into an EWF image of ``segment_bytes`` segments, uncompressed (so a test can
    find and damage a segment's image data), with MD5 and SHA-1 stored; returns the .E01."""
    run_tool(
        "ewfacquire", "-u", "-q", "-t", str(target), "-c", "none", "-S", str(segment_bytes), "-d", "sha1",
        "-C", "case-16", "-E", "card-1", "-e", "examiner", "-D", "test evidence", "-N", "built by ewfacquire",
        str(raw),
    )  # fmt: skip
    return target.with_suffix(".E01")


def zip_of(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                handle.write(path, path.relative_to(folder).as_posix())
    return archive


def tar_of(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as handle:
        for path in sorted(folder.rglob("*")):
            handle.add(path, path.relative_to(folder).as_posix(), recursive=False)
    return archive


def partitioned_disk(first: Path, second: Path, disk: Path) -> Path:
    """An MBR disk of two FAT partitions (p1 from ``first``'s tree, p2 from ``second``'s)."""
    with open(disk, "wb") as handle:
        handle.truncate(40 << 20)
    layout = "label: dos\nstart=2048, size=36864, type=c\nstart=38912, size=40960, type=c\n"
    subprocess.run(["sfdisk", "-q", str(disk)], input=layout.encode(), check=True, capture_output=True)
    fat_image(first, disk, offset=2048 * 512, sectors=36864)
    fat_image(second, disk, offset=38912 * 512, sectors=40960)
    return disk


def build_containers(folder: Path, work: Path, deleted: bytes) -> dict[str, Path]:
    """``folder`` as a raw FAT image (with ``deleted`` deleted on it), that image as an E01, a zip
    and a tar.gz; every file made read-only."""
    work.mkdir(parents=True, exist_ok=True)
    raw = fat_image(folder, work / "card.raw", deleted)
    containers = {
        "raw": raw,
        "e01": e01_from(raw, work / "card"),
        "zip": zip_of(folder, work / "extraction.zip"),
        "tar": tar_of(folder, work / "extraction.tar.gz"),
    }
    for path in work.iterdir():
        path.chmod(0o444)
    return containers
