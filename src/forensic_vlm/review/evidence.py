"""Where a reviewed case's images are: the triage's listing (``results/classify/<case>/listing.jsonl``).

The listing names the folder or container the case was triaged from and, for each usable file, its
path, size, sha256 and (inside a container) the dfVFS locator that reads it again. The review page
and the labels that join training both find an image here by its sha256 and read it from the
evidence itself, checking its content each time; nothing is ever copied or written.
"""

from __future__ import annotations

from pathlib import Path

from forensic_vlm.errors import EvidenceChangedError, InputNotFoundError
from forensic_vlm.inspection import Inspection
from forensic_vlm.tables import sha256_bytes


class CaseEvidence:
    """The usable images of one triaged case, by sha256 (an exact duplicate: its first path)."""

    def __init__(self, listing: Path) -> None:
        from forensic_vlm.classify import read_listing  # checks the listing against its header

        listing = Path(listing)
        if not listing.is_file():
            raise InputNotFoundError(f"{listing} does not exist: triage the case first")
        read = read_listing(listing)
        self.listing, self.root = listing, Path(read.root)
        self.images: dict[str, Inspection] = {}
        for inspection in read.inspections:
            if inspection.usable:
                self.images.setdefault(inspection.sha256, inspection)

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self.images

    def location(self, sha256: str) -> dict[str, str]:
        """Table columns that locate the image: its path (as tables write it), flags, root, locator."""
        from forensic_vlm.manifest import table_path

        inspection = self.images[sha256]
        path, flags = table_path(inspection)
        return {"path": path, "flags": flags, "root": str(self.root), "locator": inspection.locator}

    def file(self, sha256: str) -> Path:
        return self.root / self.images[sha256].path

    def read(self, sha256: str) -> bytes:
        """The image's bytes, from the folder or the container; stops if they are gone or changed."""
        from forensic_vlm.images import read_located_bytes

        inspection = self.images[sha256]
        where = inspection.path if inspection.locator else str(self.file(sha256))
        try:
            data = read_located_bytes(inspection.locator)
            if data is None:
                data = self.file(sha256).read_bytes()
        except OSError as error:
            raise EvidenceChangedError(f"{where}: no longer readable in the evidence ({error})") from None
        if sha256_bytes(data) != sha256:
            raise EvidenceChangedError(f"{where}: content changed since the triage listed it (sha256 differs)")
        return data
