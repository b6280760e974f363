"""Stage ``manifest``: list every file under raw_data, with its hash and whether it can be used.

Writes ``manifest.tsv`` (usable images, with flags and duplicates marked) and ``rejects.tsv``
(everything else, each with a reason code from :data:`forensic_vlm.inspection.REASONS`). The
evidence folder is only ever read.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from forensic_vlm.config import ClassSpec, ManifestConfig
from forensic_vlm.errors import BadInputError, InputNotFoundError
from forensic_vlm.faults import fault_point
from forensic_vlm.inspection import Inspection, inspect_file
from forensic_vlm.parallel import ordered_map
from forensic_vlm.tables import NON_UTF8_FLAG, encode_path, write_tsv

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = (
    "path", "label", "class_folder", "sha256", "size_bytes", "format", "width", "height",
    "phash", "mtime_utc", "flags", "notes", "duplicate_of",
)  # fmt: skip
REJECT_COLUMNS = ("path", "label", "class_folder", "sha256", "size_bytes", "reason", "message")

#: Files at the top of raw_data that document the folder rather than being evidence.
DOCUMENTATION_FILES = ("README.md",)

_CLASS_FOLDER = re.compile(r"^(\d+)_")


@dataclass(frozen=True)
class ManifestSummary:
    accepted: int
    duplicates: int
    rejected: int
    flagged: int


def walk(root: Path, skip_documentation: bool = True) -> Iterator[str]:
    """Relative paths of every entry under ``root`` that is not a directory, sorted.

    Symbolic links to directories are yielded (and later rejected), never followed. The folder's
    own README.md is left out unless ``skip_documentation`` is false (an extraction, where every
    file is evidence).
    """
    for directory, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        base = os.path.relpath(directory, root)
        links = [d for d in dirnames if os.path.islink(os.path.join(directory, d))]
        for name in sorted(filenames + links):
            relative = name if base == "." else os.path.join(base, name)
            if skip_documentation and base == "." and name in DOCUMENTATION_FILES:
                log.info("not evidence, left out: %s (documentation of the folder)", relative)
                continue
            yield relative
        dirnames[:] = [d for d in dirnames if d not in links]


def class_of(relative: str, classes: dict[int, ClassSpec]) -> tuple[int | None, str, str]:
    """(label, class folder, reason) for a path; reason is empty when the class is known."""
    parts = relative.split(os.sep)
    if len(parts) < 2:
        return None, "", "unlabeled"
    folder = parts[0]
    match = _CLASS_FOLDER.match(folder)
    if not match:
        return None, folder, "unlabeled"
    label = int(match.group(1))
    if label not in classes:
        return None, folder, "unknown_class"
    return label, folder, ""


def inspector(root: Path, config: ManifestConfig) -> Callable[[str], Inspection]:
    """The per-file check of everything read from an evidence folder (picklable, for workers)."""
    return partial(
        inspect_file, str(root), max_image_pixels=config.max_image_pixels, allowed_formats=tuple(config.allowed_formats)
    )


def bad_input_error(path: Path, reason: str, message: str, count: int) -> BadInputError:
    """The error of ``on_bad_input: fail``: the first unusable file, and how many there are."""
    return BadInputError(
        f"{path}: {reason}: {message}"
        + (f" (and {count - 1} more unusable file(s))" if count > 1 else "")
        + "; set manifest.on_bad_input: report to list them and go on"
    )


def table_path(result: Inspection) -> tuple[str, str]:
    """How a file is written in a table: its path as text and its flags (non_utf8_name added
    where the name had to be percent-encoded)."""
    text, escaped = encode_path(result.path)
    return text, ",".join(result.flags + ([NON_UTF8_FLAG] if escaped else []))


def build_manifest(
    raw_data: Path,
    out_dir: Path,
    classes: Sequence[ClassSpec],
    config: ManifestConfig,
    *,
    workers: int = 1,
) -> ManifestSummary:
    """Inspect every file under ``raw_data``; write manifest.tsv and rejects.tsv into ``out_dir``."""
    raw_data = Path(raw_data)
    if not raw_data.is_dir():
        raise InputNotFoundError(f"raw_data folder not found: {raw_data}")
    by_id = {c.id: c for c in classes}
    paths = list(walk(raw_data))
    log.info("manifest: %d files under %s, %d worker(s)", len(paths), raw_data, workers)

    labelled: list[tuple[Inspection, int | None, str]] = []
    to_inspect: list[tuple[str, int, str]] = []
    for relative in paths:
        label, folder, reason = class_of(relative, by_id)
        # A link is judged as a link (symlink or outside_root) wherever it sits, even in place
        # of a class folder.
        if reason and not os.path.islink(raw_data / relative):
            message = (
                f"folder {folder!r} is not a configured class ({sorted(by_id)})"
                if reason == "unknown_class"
                else "place the file in a class folder such as 0_irrelevant/"
            )
            labelled.append((Inspection(path=relative).reject(reason, message), None, folder))
        else:
            to_inspect.append((relative, label, folder))

    relatives = [p for p, _, _ in to_inspect]
    inspect = inspector(raw_data, config)
    for (_, label, folder), result in zip(
        to_inspect, ordered_map(inspect, relatives, workers, "manifest"), strict=True
    ):
        labelled.append((result, label, folder))
        fault_point("manifest.file")

    accepted, rejected = _resolve_conflicts(labelled)
    if config.on_bad_input == "fail" and rejected:
        first = rejected[0]
        raise bad_input_error(raw_data / first["path"], first["reason"], first["message"], len(rejected))
    out_dir = Path(out_dir)
    write_tsv(out_dir / "manifest.tsv", MANIFEST_COLUMNS, accepted)
    fault_point("manifest.tables")  # one table written, the other not yet
    write_tsv(out_dir / "rejects.tsv", REJECT_COLUMNS, rejected)
    summary = ManifestSummary(
        accepted=sum(1 for r in accepted if not r["duplicate_of"]),
        duplicates=sum(1 for r in accepted if r["duplicate_of"]),
        rejected=len(rejected),
        flagged=sum(1 for r in accepted if r["flags"]),
    )
    for row in rejected:
        log.warning("rejected %s: %s: %s", row["path"], row["reason"], row["message"])
    log.info("manifest: %s", summary)
    return summary


def _resolve_conflicts(
    labelled: list[tuple[Inspection, int | None, str]],
) -> tuple[list[dict], list[dict]]:
    """Split into manifest rows and reject rows; handle label conflicts and exact duplicates."""
    usable = [(r, label, folder) for r, label, folder in labelled if r.usable]
    labels_of: dict[str, set[int]] = defaultdict(set)
    for result, label, _ in usable:
        labels_of[result.sha256].add(label)
    paths_of: dict[str, list[str]] = defaultdict(list)
    for result, _, _ in usable:
        paths_of[result.sha256].append(result.path)

    for result, _, _ in usable:
        if len(labels_of[result.sha256]) > 1:
            others = [p for p in paths_of[result.sha256] if p != result.path]
            result.reject(
                "label_conflict",
                f"identical content (sha256 {result.sha256[:12]}…) also at {', '.join(others)} "
                f"under classes {sorted(labels_of[result.sha256])}",
            )

    accepted, rejected, canonical = [], [], {}
    for result, label, folder in sorted(labelled, key=lambda item: item[0].path):
        text, flags = table_path(result)
        if not result.usable:
            rejected.append(
                {
                    "path": text,
                    "label": label,
                    "class_folder": folder,
                    "sha256": result.sha256,
                    "size_bytes": result.size_bytes,
                    "reason": result.reason,
                    "message": result.message,
                }
            )
            continue
        duplicate_of = canonical.setdefault(result.sha256, text)
        accepted.append(
            {
                "path": text,
                "label": label,
                "class_folder": folder,
                "sha256": result.sha256,
                "size_bytes": result.size_bytes,
                "format": result.format,
                "width": result.width,
                "height": result.height,
                "phash": result.phash,
                "mtime_utc": result.mtime_utc,
                "flags": flags,
                "notes": "; ".join(result.notes),
                "duplicate_of": "" if duplicate_of == text else duplicate_of,
            }
        )
    return accepted, rejected


def fingerprint(raw_data: Path, skip_documentation: bool = True) -> str:
    """Cheap digest of the folder's listing (names, sizes, modification times), no content read.

    The workflow passes it as a parameter of rule ``manifest`` so added, removed or replaced
    files make Snakemake rerun the manifest.
    """
    digest = hashlib.sha256()
    root = Path(raw_data)
    if not root.is_dir():
        return "absent"
    for relative in walk(root, skip_documentation):
        info = os.lstat(root / relative)
        digest.update(os.fsencode(relative) + f"\0{info.st_size}\0{info.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:16]
