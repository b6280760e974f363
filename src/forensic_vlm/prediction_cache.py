"""Content-addressed store of predictions, so an image is never scored twice by the same model.

The key covers everything a prediction depends on: the base model's files, the adapter's bytes,
the prompt, the decoding and the class tokens. Each key has one append-only TSV under the cache
folder (``results/cache/predictions/`` in the workflow), keyed inside by image sha256. Appending
after every batch also lets an interrupted evaluation go on where it stopped.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

SAMPLE_BYTES = 1 << 20


def model_fingerprint(name_or_path: str) -> str:
    """A local folder: its files' names and sizes, config.json, and the first and last MiB of each
    weight file (hashing many GB at every evaluation would cost minutes). A hub id: the id."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return f"hub:{name_or_path}"
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder)}\0{size}\0".encode())
        with open(path, "rb") as handle:
            if path.suffix == ".safetensors" and size > 2 * SAMPLE_BYTES:
                digest.update(handle.read(SAMPLE_BYTES))
                handle.seek(size - SAMPLE_BYTES)
                digest.update(handle.read())
            elif path.suffix in (".json", ".safetensors", ".jinja", ".model"):
                digest.update(handle.read())
    return digest.hexdigest()


def adapter_fingerprint(adapter: Path | None) -> str:
    if adapter is None:
        return "none"
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        digest.update(name.encode() + (Path(adapter) / name).read_bytes())
    return digest.hexdigest()


class PredictionCache:
    def __init__(self, folder: Path | None, key: dict, columns: Sequence[str]) -> None:
        self.description = key
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        self.columns = list(columns)
        self.path = Path(folder) / f"{self.key}.tsv" if folder else None
        self.rows: dict[str, dict[str, str]] = {}
        if self.path and self.path.exists():
            with open(self.path, encoding="utf-8", newline="") as handle:
                self.rows = {r["sha256"]: r for r in csv.DictReader(handle, delimiter="\t")}

    def get(self, sha256: str) -> dict[str, str] | None:
        return self.rows.get(sha256)

    def add(self, rows: Sequence[dict[str, object]]) -> None:
        fresh = [r for r in rows if r["sha256"] not in self.rows]
        for row in fresh:
            self.rows[str(row["sha256"])] = {c: str(row.get(c, "")) for c in self.columns}
        if not self.path or not fresh:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new_file = not self.path.exists()
        with open(self.path, "a", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns, delimiter="\t", lineterminator="\n")
            if new_file:
                writer.writeheader()
                # What the opaque file name stands for, for whoever opens the folder.
                self.path.with_suffix(".json").write_text(json.dumps(self.description, indent=2) + "\n")
            writer.writerows({c: row.get(c, "") for c in self.columns} for row in fresh)
