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
from forensic_vlm.tables import image_location, sha256_bytes

pillow_heif.register_heif_opener()


def load_evidence_image(raw_data: Path, row: dict[str, str]) -> Image.Image:
    """Open a table row's file read-only (under raw_data, or in a reviewed case's evidence), check
    its sha256, and return it upright in RGB."""
    path, locator = image_location(row, raw_data)
    return load_checked_image(path, row["sha256"], read_located_bytes(locator))


def read_located_bytes(locator: str) -> bytes | None:
    """The bytes of a file inside an evidence container (None without a locator: read the path)."""
    if not locator:
        return None
    from forensic_vlm.evidence import read_located  # the [evidence] extra, only for containers

    return read_located(locator)


def load_checked_image(path: Path, sha256: str, data: bytes | None = None) -> Image.Image:
    """Read ``path`` once (or take its bytes as read from an evidence container), stop if its
    content is not ``sha256``, return it upright in RGB."""
    if data is None:
        data = Path(path).read_bytes()
    if sha256_bytes(data) != sha256:
        raise EvidenceChangedError(f"{path}: content changed since it was listed (sha256 differs)")
    with Image.open(io.BytesIO(data)) as image:
        return ImageOps.exif_transpose(image).convert("RGB")
