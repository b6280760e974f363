"""Evidence containers read in place through dfVFS: E01/EWF (one or many segments), raw disk or
partition images, zip and tar (gzip, bzip2 or xz compressed too).

Nothing is mounted and nothing is extracted to disk: dfVFS (with libewf and The Sleuth Kit) opens
the container read-only, finds its partitions and file systems, and each file's bytes are read into
memory when they are inspected or scored. Every file is addressed by its dfVFS path specification
(a *locator*, serialised as JSON), so a worker process or a shard job on another node reads the same
bytes again without walking the container.

The Sleuth Kit is the back end for FAT, NTFS, ext and HFS+: it lists directory entries whose name
was deleted (dfVFS's own walk leaves them out), and its FAT timestamps are right where libfsfat's
were a month off (seen with libfsfat-python 20260826). A deleted entry whose metadata is still its
own is read and flagged ``deleted``; one whose metadata now belongs to another file is listed as
unreadable, never read as if it were the deleted file.

dfVFS, libewf and pytsk3 are the optional extra ``[evidence]``: this module imports them only when a
container is opened, so a folder input works without them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath

from forensic_vlm.errors import ContainerError, ContainerIntegrityError, EvidenceChangedError
from forensic_vlm.inspection import Inspection, inspect_data, utc_text

log = logging.getLogger(__name__)

#: Compressed-stream layers dfVFS unwraps before it looks for an archive (a .tar.gz, .tar.xz, .tbz2).
_STREAM_TYPES = ("GZIP", "BZIP2", "XZ")
_ARCHIVE_TYPES = ("ZIP", "TAR")
#: Bytes read at a time when a container's media data is hashed.
_HASH_CHUNK = 8 << 20


def _dfvfs():
    """dfVFS's modules, with The Sleuth Kit preferred for the file systems it reads (see above)."""
    try:
        from dfvfs.analyzer import analyzer
        from dfvfs.helpers import volume_scanner
        from dfvfs.lib import definitions
        from dfvfs.lib import errors as dfvfs_errors
        from dfvfs.path import factory
        from dfvfs.resolver import resolver
        from dfvfs.serializer.json_serializer import JsonPathSpecSerializer
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ContainerError(
            f"reading evidence containers needs the [evidence] extra (pip install 'forensic-vlm[evidence]'): {error}"
        ) from error
    for name in ("FAT", "NTFS", "EXT", "HFS"):
        setattr(definitions, f"PREFERRED_{name}_BACK_END", definitions.TYPE_INDICATOR_TSK)
    _cache_ewf_chunks()
    return {
        "analyzer": analyzer.Analyzer,
        "volume_scanner": volume_scanner,
        "definitions": definitions,
        "errors": dfvfs_errors,
        "factory": factory.Factory,
        "resolver": resolver.Resolver,
        "serializer": JsonPathSpecSerializer,
    }


@cache
def _cache_ewf_chunks() -> None:
    """Read E01s through :class:`ChunkCache`: dfVFS opens them with pyewf, whose handle decodes a
    whole chunk (32 KiB) for every read. The Sleuth Kit reads a file system in small pieces, and a
    chunk holds a dozen phone pictures, so without a cache the same chunk was inflated again and
    again (about 1.7 ms each on the 2-core CPU here)."""
    from dfvfs.file_io import ewf_file_io

    open_handle = ewf_file_io.EWFFile._OpenFileObject

    def cached(self, path_spec):
        return ChunkCache(open_handle(self, path_spec))

    ewf_file_io.EWFFile._OpenFileObject = cached


class ChunkCache:
    """A pyewf handle read through a least-recently-used cache of whole chunks (``chunks`` of
    them: 1,024 of 32 KiB, 32 MiB per process). Same bytes, same interface as far as dfVFS uses it
    (read, seek, get_offset, get_media_size, close)."""

    def __init__(self, handle, chunks: int = 1024) -> None:
        self._handle = handle
        self._chunk = handle.get_chunk_size()
        self._size = handle.get_media_size()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._limit = chunks
        self._offset = 0

    def _chunk_at(self, index: int) -> bytes:
        data = self._cache.get(index)
        if data is None:
            self._handle.seek(index * self._chunk)
            data = self._handle.read(self._chunk)
            self._cache[index] = data
            if len(self._cache) > self._limit:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(index)
        return data

    def read(self, size: int | None = None) -> bytes:
        end = self._size if size is None or size < 0 else min(self._size, self._offset + size)
        parts = []
        while self._offset < end:
            index, within = divmod(self._offset, self._chunk)
            piece = self._chunk_at(index)[within : within + end - self._offset]
            if not piece:
                break
            parts.append(piece)
            self._offset += len(piece)
        return b"".join(parts)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> None:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._offset, os.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise OSError(f"seek to a negative offset ({base + offset})")
        self._offset = base + offset

    def get_offset(self) -> int:
        return self._offset

    tell = get_offset

    def get_media_size(self) -> int:
        return self._size

    def close(self) -> None:
        self._cache.clear()
        self._handle.close()

    def __getattr__(self, name: str):  # anything else dfVFS asks the handle for
        return getattr(self._handle, name)


@dataclass(frozen=True)
class Entry:
    """One entry of a container's file systems, as the triage lists it."""

    path: str  # shown in the triage: the partition, then the path inside its file system ("p1/DCIM/a.jpg")
    locator: str  # dfVFS path specification (JSON), to read the bytes again
    kind: str  # "file", "link", "directory" or "other" (a device, pipe or socket)
    partition: str = ""  # "p1", "p2", ... ("" for a partition image or an archive)
    inode: int | None = None  # inode, MFT entry or FAT directory-entry address, where the file system has one
    created_utc: str = ""
    modified_utc: str = ""
    accessed_utc: str = ""
    changed_utc: str = ""
    deleted: bool = False  # the name was deleted; its content is read where its metadata is still its own
    reallocated: bool = False  # deleted, and its metadata now belongs to another file: not readable as itself


def is_container(path: Path | str) -> bool:
    """A file (an image or an archive) rather than a folder."""
    return Path(path).is_file()


def segments(container: Path) -> list[Path]:
    """The files a container is made of: every segment of an EWF image (E01, E02, ...), else itself."""
    container = Path(container)
    if container.suffix.lower() in (".e01", ".ex01", ".s01", ".l01", ".lx01"):
        import pyewf

        try:
            return [Path(name) for name in pyewf.glob(str(container))]
        except OSError as error:
            raise ContainerError(f"{container}: its EWF segments cannot be found: {error}") from error
    return [container]


def container_fingerprint(container: Path) -> str:
    """Cheap digest of a container's files (names, sizes, modification times), no content read:
    the workflow reruns the triage when a segment is replaced, added or removed."""
    return _fingerprint(segments(Path(container)))


def _fingerprint(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        info = path.stat()
        digest.update(f"{path.name}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def base_path_specs(container: Path, partition: str | None = None) -> list:
    """The root of each file system in ``container`` (one archive counts as one), or of the named
    ``partition`` only (dfVFS's names: p1, p2 for MBR and GPT partitions, apfs1 for APFS volumes)."""
    d = _dfvfs()
    container = Path(container).resolve()
    if not container.is_file():
        raise ContainerError(f"{container}: not a container file (no such file, or a folder)")
    os_spec = d["factory"].NewPathSpec(d["definitions"].TYPE_INDICATOR_OS, location=str(container))
    spec = os_spec
    for _ in range(2):  # a .tar.gz is a stream inside a stream at most once
        stream = d["analyzer"].GetCompressedStreamTypeIndicators(spec)
        if len(stream) != 1 or stream[0] not in _STREAM_TYPES:
            break
        spec = d["factory"].NewPathSpec(stream[0], parent=spec)
    archive = [t for t in d["analyzer"].GetArchiveTypeIndicators(spec) if t in _ARCHIVE_TYPES]
    if archive:
        if partition:
            raise ContainerError(
                f"{container}: classify.partition {partition!r} given, but this is a {archive[0]} archive"
            )
        return [d["factory"].NewPathSpec(archive[0], location="/", parent=spec)]
    if spec is not os_spec:
        raise ContainerError(f"{container}: a compressed stream that holds no zip or tar archive")
    options = d["volume_scanner"].VolumeScannerOptions()
    options.partitions = [partition] if partition else ["all"]
    options.volumes = ["all"]
    options.snapshots = ["none"]  # Volume Shadow Snapshots are a later copy, not the evidence as seized
    try:
        bases = d["volume_scanner"].VolumeScanner().GetBasePathSpecs(str(container), options=options)
    except (d["errors"].Error, OSError, RuntimeError) as error:  # pyewf and pytsk3 raise RuntimeError
        raise ContainerError(f"{container}: no file system could be opened ({error})") from error
    if not bases or all(base.type_indicator == d["definitions"].TYPE_INDICATOR_OS for base in bases):
        raise ContainerError(
            f"{container}: no file system found"
            + (f" in partition {partition!r}" if partition else "")
            + " (an encrypted volume, an unsupported file system, or not a disk image)"
        )
    return bases


def partition_of(base) -> str:
    """The partition name of a file system root ("" when the image holds one file system only)."""
    spec = base
    while spec is not None:
        location = getattr(spec, "location", None)
        volume_systems = ("TSK_PARTITION", "GPT", "APM", "LVM", "APFS_CONTAINER", "CS")
        if spec.type_indicator in volume_systems and location and location != "/":
            return location.strip("/")
        spec = spec.parent
    return ""


def walk_container(container: Path, partition: str | None = None, inside: str | None = None) -> Iterator[Entry]:
    """Every entry under ``inside`` (a path inside each file system; None: from its root) of every
    file system of ``container``, deleted ones included, in a stable order. Directories are walked,
    not yielded."""
    d = _dfvfs()
    for base in base_path_specs(container, partition):
        name = partition_of(base)
        try:
            start = _entry_at(d, base, inside)
            if start is None:
                raise ContainerError(f"{container}: {inside!r} not found" + (f" in partition {name}" if name else ""))
            yield from _walk(d, base, start, name)
        except (d["errors"].Error, OSError, RuntimeError) as error:
            # A damaged or missing segment, or a broken file system: named, never a short listing.
            raise ContainerError(f"{container}: its file system cannot be read whole: {error}") from error


def _entry_at(d, base, inside: str | None):
    if not inside or inside.strip("/") == "":
        return d["resolver"].OpenFileEntry(base)
    location = str(PurePosixPath("/") / inside.strip("/"))
    kwargs = {"location": location, "parent": base.parent}
    return d["resolver"].OpenFileEntry(d["factory"].NewPathSpec(base.type_indicator, **kwargs))


def _walk(d, base, directory, partition: str) -> Iterator[Entry]:
    children = sorted(directory.sub_file_entries, key=lambda entry: entry.name)
    for entry in children:
        if entry.IsDirectory():
            yield from _walk(d, base, entry, partition)
        elif entry.entry_type is None:
            # The Sleuth Kit's virtual files ($MBR, $FAT1, $OrphanFiles): file system metadata, not files.
            log.debug("not a file of the file system, left out: %s", entry.path_spec.location)
        else:
            yield _entry(d, entry, partition)
    if base.type_indicator == d["definitions"].TYPE_INDICATOR_TSK:
        yield from _deleted_entries(d, base, directory, partition)


def _entry(d, entry, partition: str, *, deleted: bool = False, reallocated: bool = False) -> Entry:
    types = d["definitions"]
    kind = {
        types.FILE_ENTRY_TYPE_FILE: "file",
        types.FILE_ENTRY_TYPE_LINK: "link",
        types.FILE_ENTRY_TYPE_DIRECTORY: "directory",
    }.get(entry.entry_type, "other")
    stat = entry.GetStatAttribute()
    return Entry(
        path=_shown_path(partition, entry.path_spec.location),
        locator=d["serializer"].WriteSerialized(entry.path_spec),
        kind=kind,
        partition=partition,
        inode=getattr(stat, "inode_number", None),
        created_utc=_utc(entry.creation_time),
        modified_utc=_utc(entry.modification_time),
        accessed_utc=_utc(entry.access_time),
        changed_utc=_utc(entry.change_time),
        deleted=deleted,
        reallocated=reallocated,
    )


def _deleted_entries(d, base, directory, partition: str) -> Iterator[Entry]:
    """The directory's deleted names (The Sleuth Kit keeps them; dfVFS's walk does not)."""
    import pytsk3

    fs_info = directory.GetFileSystem().GetFsInfo()
    inode = getattr(directory.path_spec, "inode", None)
    try:
        tsk_directory = (
            fs_info.open_dir(inode=inode) if inode is not None else fs_info.open_dir(path=directory.path_spec.location)
        )
    except OSError:
        return
    found = []
    for tsk_entry in tsk_directory:
        info = getattr(tsk_entry, "info", None)
        name = getattr(info, "name", None)
        meta = getattr(info, "meta", None)
        if name is None or meta is None or not int(name.flags) & pytsk3.TSK_FS_NAME_FLAG_UNALLOC:
            continue
        if meta.type != pytsk3.TSK_FS_META_TYPE_REG or meta.addr == 0:
            continue  # a deleted directory, link or an entry without metadata: nothing to read as a file
        text = name.name.decode("utf-8", "surrogateescape")
        location = str(PurePosixPath(directory.path_spec.location or "/") / text)
        found.append((location, meta.addr, bool(int(meta.flags) & pytsk3.TSK_FS_META_FLAG_ALLOC)))
    for location, address, meta_allocated in sorted(found):
        spec = d["factory"].NewPathSpec(base.type_indicator, inode=address, location=location, parent=base.parent)
        entry = d["resolver"].OpenFileEntry(spec)
        yield _entry(d, entry, partition, deleted=True, reallocated=meta_allocated)


def _shown_path(partition: str, location: str) -> str:
    inner = (location or "").replace("\\", "/").lstrip("/")
    inner = inner.removeprefix("./")  # a tar made with "tar -C folder ." names its members ./...
    return f"{partition}/{inner}" if partition else inner


def _utc(value) -> str:
    """A dfdatetime value as ISO 8601 UTC to the second ("" where the file system has none)."""
    if value is None:
        return ""
    seconds = value.CopyToPosixTimestamp()
    return "" if seconds is None else utc_text(seconds)


def read_located(locator: str) -> bytes:
    """The whole content of the file a locator names, read through dfVFS (never from a copy)."""
    d = _dfvfs()
    spec = _path_spec(locator)
    try:
        return _file_system(d, spec).GetFileObjectByPathSpec(spec).read()
    except (d["errors"].Error, OSError, RuntimeError) as error:  # pyewf and pytsk3 raise RuntimeError too
        raise OSError(f"cannot read from the container: {error}") from error


def inspect_entry(entry: Entry, max_image_pixels: int, allowed_formats: tuple[str, ...]) -> Inspection:
    """Read one file of an evidence container (an ``evidence.Entry``) into memory and decode it completely."""
    result = Inspection(
        path=entry.path,
        mtime_utc=entry.modified_utc,
        inode=entry.inode,
        created_utc=entry.created_utc,
        accessed_utc=entry.accessed_utc,
        changed_utc=entry.changed_utc,
        partition=entry.partition,
        locator=entry.locator,
        deleted=entry.deleted,
    )
    if entry.deleted:
        result.flags.append("deleted")
    if entry.kind == "link":
        return result.reject("symlink", "a symbolic link inside the container; evidence must be the file itself")
    if entry.kind != "file":
        return result.reject("not_regular_file", "not a regular file (device, socket or pipe)")
    if entry.reallocated:
        return result.reject(
            "deleted_reallocated", "deleted; its metadata now describes another file, so its content cannot be read"
        )
    try:
        data = read_located(entry.locator)
    except OSError as error:
        return result.reject("unreadable", str(error))
    return inspect_data(result, data, max_image_pixels, allowed_formats)


_OPEN = {"pid": os.getpid(), "file_systems": {}}


def _file_system(d, spec):
    """The file system a locator's file lies in, opened once per process and kept open: dfVFS
    closes a file system with its last file, and parsing it again for every file (FAT tables,
    MFT, EWF chunk tables) made reading from an E01 about 30 times slower than from a folder.
    A forked worker (the inspection's process pool, a DataLoader worker) opens its own rather
    than use the parent's: inherited handles share file offsets, so reads could interleave."""
    if _OPEN["pid"] != os.getpid():
        d["resolver"]._resolver_context = type(d["resolver"]._resolver_context)()
        _OPEN.update(pid=os.getpid(), file_systems={})
    key = getattr(spec.parent, "comparable", "") + spec.type_indicator
    if key not in _OPEN["file_systems"]:
        _OPEN["file_systems"][key] = d["resolver"].OpenFileSystem(spec)
    return _OPEN["file_systems"][key]


@cache
def _path_spec(locator: str):
    return _dfvfs()["serializer"].ReadSerialized(locator)


# The container's own integrity ----------------------------------------------------------------------


def describe_container(container: Path, *, verify: bool, accept_mismatch: bool = False) -> dict:
    """What custody.json records of a container: its path and size, its segments, its format, the
    hashes and acquisition notes an EWF image stores, and, with ``verify``, the MD5 and SHA-1 of its
    media data as read now (the whole image is read). A computed hash that differs
    from the stored one raises ``ContainerIntegrityError`` naming the container, unless
    ``accept_mismatch`` (recorded)."""
    container = Path(container).resolve()
    files = segments(container)
    record: dict = {
        "path": str(container),
        "size_bytes": sum(f.stat().st_size for f in files),
        "segments": [{"name": f.name, "size_bytes": f.stat().st_size} for f in files],
        # Sizes and modification times of its files: checked again before the triage is written.
        "files_fingerprint": _fingerprint(files),
    }
    if files[0].suffix.lower() in (".e01", ".ex01", ".s01", ".l01", ".lx01"):
        record.update(_ewf_record(files, verify=verify))
    else:
        record["format"] = "file (raw image or archive): no stored hashes"
        record["stored_hashes"] = {}
        if verify:
            with open(container, "rb") as handle:
                record["computed_hashes"] = _hash_stream(handle.read, container)
    record["verified"] = _verdict(record, verify, accept_mismatch, container)
    return record


def check_unchanged(record: dict) -> None:
    """Stop if a container's files changed (size, time, a segment added or gone) since it was
    listed: the triage would describe evidence that is no longer what lies on disk. (A process
    that read it before may still hold its old bytes in memory: every file scored is checked
    against the sha256 it was listed with, and this check catches the rest.)"""
    container = Path(record["path"])
    now = container_fingerprint(container) if container.is_file() else "gone"
    if now != record["files_fingerprint"]:
        raise EvidenceChangedError(
            f"{container}: the container changed since it was listed (its files' sizes or times differ); "
            "list it again (rerun classify_listing) and find out why evidence changed"
        )


def _ewf_record(files: list[Path], *, verify: bool) -> dict:
    import pyewf

    handle = pyewf.handle()
    try:
        handle.open([str(f) for f in files])
    except OSError as error:
        raise ContainerIntegrityError(f"{files[0]}: the EWF image cannot be opened: {error}") from error
    try:
        stored = {k.lower().replace("-", ""): v for k, v in handle.get_hash_values().items() if v}
        record = {
            "format": "EWF",
            "media_size_bytes": handle.get_media_size(),
            "acquisition": dict(handle.get_header_values()),
            "stored_hashes": {k: stored[k] for k in ("md5", "sha1") if k in stored},
        }
        if verify:
            record["computed_hashes"] = _hash_stream(lambda size: handle.read(size), files[0], handle.get_media_size())
    finally:
        handle.close()
    return record


def _hash_stream(read, name: Path, total: int | None = None) -> dict:
    md5, sha1 = hashlib.md5(), hashlib.sha1()
    done, start, last = 0, time.monotonic(), time.monotonic()
    while True:
        try:
            chunk = read(_HASH_CHUNK)
        except (OSError, RuntimeError) as error:
            raise ContainerIntegrityError(
                f"{name}: read error in the {_HASH_CHUNK >> 20} MiB from byte {done} while verifying: {error}"
            ) from error
        if not chunk:
            break
        md5.update(chunk)
        sha1.update(chunk)
        done += len(chunk)
        if time.monotonic() - last > 10:
            last = time.monotonic()
            share = f" of {total / 2**30:.1f} GiB" if total else ""
            log.info("verify %s: %.1f GiB%s, %.0f MiB/s", name.name, done / 2**30, share, done / 2**20 / (last - start))
    if total is not None and done != total:
        raise ContainerIntegrityError(f"{name}: {done} bytes of media data read, the image says {total}")
    return {"md5": md5.hexdigest(), "sha1": sha1.hexdigest()}


def _verdict(record: dict, verify: bool, accept_mismatch: bool, container: Path) -> str:
    if not verify:
        return "not verified (classify.verify_container: false)"
    stored, computed = record["stored_hashes"], record["computed_hashes"]
    if not stored:
        return "computed only: the container stores no hashes"
    differ = [k for k in stored if computed.get(k) != stored[k]]
    if not differ:
        return "verified: " + ", ".join(f"{k} matches" for k in stored)
    text = ", ".join(f"{k} stored {stored[k]} computed {computed[k]}" for k in differ)
    if accept_mismatch:
        log.warning("%s: hash mismatch accepted by classify.accept_hash_mismatch: %s", container, text)
        return f"MISMATCH accepted by the examiner (classify.accept_hash_mismatch: true): {text}"
    raise ContainerIntegrityError(
        f"{container}: the media data does not match the hash stored in the image ({text}): a segment is "
        "damaged or changed. Set classify.accept_hash_mismatch: true to triage it anyway (recorded in custody.json)"
    )
