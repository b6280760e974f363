"""Opening evidence images: HEIC support, content check against the manifest, upright RGB.

Importing this module registers the HEIF plugin with Pillow, so every stage that opens images
reads phone HEIC files the same way.
"""

from __future__ import annotations

import io
from pathlib import Path

import pillow_heif
from PIL import Image, ImageOps

from forensic_vlm.errors import EvidenceChangedError
from forensic_vlm.tables import decode_path, sha256_bytes

pillow_heif.register_heif_opener()


def load_evidence_image(raw_data: Path, row: dict[str, str]) -> Image.Image:
    """Open a manifest row's file read-only, check its sha256, and return it upright in RGB."""
    return load_checked_image(Path(raw_data) / decode_path(row["path"], row.get("flags", "")), row["sha256"])


def load_checked_image(path: Path, sha256: str, data: bytes | None = None) -> Image.Image:
    """Read ``path`` once (or take its bytes as read from an evidence container), stop if its
    content is not ``sha256``, return it upright in RGB."""
    if data is None:
        data = Path(path).read_bytes()
    if sha256_bytes(data) != sha256:
        raise EvidenceChangedError(f"{path}: content changed since it was listed (sha256 differs)")
    with Image.open(io.BytesIO(data)) as image:
        return ImageOps.exif_transpose(image).convert("RGB")
