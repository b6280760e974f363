"""Model and adapter files: hashed in full, recorded in sha256sum's format, verified before use.

A prediction is only as trustworthy as the files that made it, so the prediction cache is keyed by
the sha256 of every file of the base model and of the adapter, the same hashes the custody record
states. Each folder is hashed once per run (files in parallel: hashlib releases the GIL, so a
7B model's shards are read on every core), and the files are checked again (size and modification
time) after scoring, so one changed while in use is reported, not silently mixed in.

Training writes ``SHA256SUMS`` into the adapter folder, listing every other file of it
(``sha256sum --check SHA256SUMS`` verifies it without this tool); evaluation and triage verify it
before loading. The base model is verified against ``model.files_sha256`` when that names a
``SHA256SUMS``-style listing or an earlier run's ``custody.json``.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from forensic_vlm.errors import InputNotFoundError, IntegrityError
from forensic_vlm.tables import sha256_file

log = logging.getLogger(__name__)

LISTING = "SHA256SUMS"
#: Not part of a model: the listing itself, and the empty marker Snakemake puts into a folder output.
NOT_HASHED = {LISTING, ".snakemake_timestamp"}


def folder_files(folder: Path) -> list[Path]:
    """Every file under ``folder``, in a fixed order (``NOT_HASHED`` left out)."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name not in NOT_HASHED)


def hash_files(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by path relative to it (a full read of each)."""
    folder = Path(folder)
    files = folder_files(folder)
    try:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            digests = list(pool.map(sha256_file, files))
    except OSError as error:
        raise IntegrityError(f"{error.filename}: cannot be read ({error.strerror})") from error
    return {str(p.relative_to(folder)): d for p, d in zip(files, digests, strict=True)}


def write_listing(folder: Path) -> dict[str, str]:
    """Write ``SHA256SUMS`` (sha256sum's format) for every other file of ``folder``; returns the hashes."""
    hashes = hash_files(folder)
    text = "".join(f"{digest}  {name}\n" for name, digest in hashes.items())
    (Path(folder) / LISTING).write_text(text, encoding="utf-8")
    return hashes


def read_listing(path: Path) -> dict[str, str]:
    """Hashes by file name from a ``SHA256SUMS`` listing or from a custody.json's model section."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path}: the list of file hashes does not exist")
    if path.suffix == ".json":
        recorded = json.loads(path.read_text(encoding="utf-8")).get("model", {}).get("files_sha256")
        if not isinstance(recorded, dict):
            raise IntegrityError(f"{path}: has no model.files_sha256 to verify the model against")
        return dict(recorded)
    hashes = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        digest, separator, name = line.partition("  ")
        if not line.strip():
            continue
        if not separator or len(digest) != 64:
            raise IntegrityError(f"{path}, line {number}: not '<sha256>  <file name>'")
        hashes[name.removeprefix("*")] = digest
    return hashes


def verify(folder: Path, expected: dict[str, str], source: str) -> dict[str, str]:
    """Hash ``folder`` and compare with ``expected`` (from ``source``); returns the hashes.

    Every file must be listed and match, and every listed file must be there: an added file could
    be loaded as well (an ``adapter_model.bin`` beside the safetensors), a missing one replaced.
    """
    folder = Path(folder)
    found = hash_files(folder)
    problems = []
    for name in sorted(set(found) | set(expected)):
        path = folder / name
        if name not in found:
            problems.append(f"{path}: listed in {source} but missing")
        elif name not in expected:
            problems.append(f"{path}: not listed in {source}")
        elif found[name] != expected[name]:
            problems.append(f"{path}: sha256 {found[name]}, recorded {expected[name]} in {source}")
    if problems:
        raise IntegrityError("files differ from their record; not used:\n  " + "\n  ".join(problems))
    return found


def verify_adapter(adapter: Path) -> FolderState:
    """The adapter's files checked against the ``SHA256SUMS`` training wrote."""
    listing = Path(adapter) / LISTING
    if not listing.is_file():
        raise IntegrityError(
            f"{listing} does not exist: the adapter's files cannot be verified. forensic-vlm train writes it; "
            f"for an adapter made elsewhere, check it and run `sha256sum * > {LISTING}` in its folder"
        )
    return hashed_folder(adapter, read_listing(listing), str(listing))


@dataclass(frozen=True)
class FolderState:
    """The hashes of a folder's files when a run began, and their sizes and modification times."""

    folder: Path
    hashes: dict[str, str]
    stats: dict[str, tuple[int, int]]

    def check_unchanged(self) -> None:
        """Stop if a file was replaced, rewritten, added or removed since it was hashed."""
        now = {str(p.relative_to(self.folder)): p for p in folder_files(self.folder)}
        for name in sorted(set(now) | set(self.stats)):
            if name not in now or name not in self.stats or _stat(now[name]) != self.stats[name]:
                raise IntegrityError(f"{self.folder / name} changed while this run used it; its results are not kept")


def hashed_folder(folder: Path, expected: dict[str, str] | None = None, source: str = "") -> FolderState:
    """``folder``'s files hashed in full (and verified against ``expected`` from ``source`` if given).

    Sizes and modification times are taken first, so a file rewritten while it is hashed, or
    later while the run uses it, is caught by ``check_unchanged``.
    """
    folder = Path(folder)
    stats = {str(p.relative_to(folder)): _stat(p) for p in folder_files(folder)}
    hashes = verify(folder, expected, source) if expected is not None else hash_files(folder)
    state = FolderState(folder, hashes, stats)
    state.check_unchanged()
    return state


def _stat(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_size, info.st_mtime_ns


def model_folder(name_or_path: str) -> Path:
    """The local folder of ``model.name_or_path``: the folder itself, or a hub id's local copy.

    A hub id is fetched once into the Hugging Face cache (safetensors and configuration only), so
    the files that are loaded are files that can be hashed. A path that does not exist stops here.
    """
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        return folder
    if folder.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") != 1:
        raise InputNotFoundError(f"model.name_or_path: {name_or_path} does not exist")
    from huggingface_hub import snapshot_download

    wanted = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=wanted, local_files_only=True))
    except Exception:  # not in the local cache yet
        pass
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=wanted))
    except Exception as error:
        raise InputNotFoundError(
            f"model.name_or_path: {name_or_path} is neither a local folder nor a hub id that can be fetched ({error})"
        ) from error


def model_files(name_or_path: str, files_sha256: str | None) -> FolderState:
    """The base model's folder, hashed in full, and verified against ``model.files_sha256`` if set."""
    folder = model_folder(name_or_path)
    if files_sha256 is None:
        return hashed_folder(folder)
    return hashed_folder(folder, read_listing(Path(files_sha256)), files_sha256)
