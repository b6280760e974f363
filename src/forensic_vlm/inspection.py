"""Inspect one evidence file: read it once, hash it, decode it fully, and say whether it is usable.

Nothing here writes anywhere. A file that cannot be used gets a reason code from ``REASONS`` and a
plain message; a usable file may carry flags (an extension that does not match its content).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import stat
from dataclasses import dataclass, field

import imagehash
from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

import forensic_vlm.images  # noqa: F401  (registers HEIC with Pillow)
from forensic_vlm.tables import sha256_bytes

#: Reason codes of rejects.tsv, with what each means.
REASONS: dict[str, str] = {
    "empty_file": "the file has zero bytes",
    "truncated": "the image data ends before the image is complete",
    "corrupt": "the file claims to be an image but its data cannot be decoded",
    "unsupported_format": "not an image format this tool accepts",
    "decompression_bomb": "the image has more pixels than manifest.max_image_pixels",
    "symlink": "a symbolic link; evidence must be the file itself",
    "outside_root": "a symbolic link that leads outside raw_data",
    "not_regular_file": "a device, socket or pipe, not a file",
    "unreadable": "the file could not be read (permissions or I/O error)",
    "deleted_reallocated": "a deleted name whose metadata now belongs to another file: its content is gone",
    "unlabeled": "the file is not inside a class folder <k>_<name>/",
    "unknown_class": "the folder's numeric prefix is not a configured class",
    "label_conflict": "the same content appears under two different classes",
}

#: Extensions that each detected format is normally saved with.
EXTENSIONS: dict[str, tuple[str, ...]] = {
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "MPO": (".jpg", ".jpeg", ".mpo"),  # phone cameras write multi-picture JPEGs
    "PNG": (".png",),
    "WEBP": (".webp",),
    "GIF": (".gif",),
    "BMP": (".bmp", ".dib"),
    "TIFF": (".tif", ".tiff"),
    "HEIF": (".heic", ".heif", ".hif"),
}

# Leading bytes of image formats: a file that starts like an image but cannot be identified is
# corrupt, not merely of an unsupported type.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")

EXIF_ORIENTATION = 0x0112


@dataclass
class Inspection:
    """Outcome for one file: ``reason`` is empty when the file is usable."""

    path: str
    size_bytes: int | None = None
    sha256: str = ""
    mtime_utc: str = ""
    format: str = ""
    width: int | None = None
    height: int | None = None
    phash: str = ""
    flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reason: str = ""
    message: str = ""
    md5: str = ""
    sha1: str = ""
    # Where the file lies inside an evidence container (evidence.Entry): its inode or MFT entry,
    # times, partition, the locator that reads it again, and whether its name was deleted.
    inode: int | None = None
    created_utc: str = ""
    accessed_utc: str = ""
    changed_utc: str = ""
    partition: str = ""
    locator: str = ""
    deleted: bool = False

    @property
    def usable(self) -> bool:
        return not self.reason

    def reject(self, reason: str, message: str) -> Inspection:
        assert reason in REASONS, reason
        self.reason, self.message = reason, message
        return self


def looks_like_image(data: bytes) -> bool:
    if data.startswith(_MAGIC):
        return True
    riff_webp = data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    iso_heif = data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"heim", b"avif")
    return riff_webp or iso_heif


def inspect_file(root: str, relative: str, max_image_pixels: int, allowed_formats: tuple[str, ...]) -> Inspection:
    """Read ``root/relative`` once (never following a link) and decode it completely."""
    result = Inspection(path=relative)
    full = os.path.join(root, relative)
    try:
        info = os.lstat(full)
    except OSError as error:
        return result.reject("unreadable", f"cannot stat: {error.strerror}")
    if stat.S_ISLNK(info.st_mode):
        return _reject_link(result, root, full)
    if not stat.S_ISREG(info.st_mode):
        return result.reject("not_regular_file", "not a regular file (device, socket or pipe)")
    try:
        # O_NOFOLLOW: a file swapped for a link after lstat is refused, not followed.
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as handle:
            data = handle.read()
            info = os.fstat(handle.fileno())
    except OSError as error:
        return result.reject("unreadable", f"cannot read: {error.strerror}")
    # Only the modification time: a folder is the examiner's copy, whose inode, access and change
    # times are the copy's own (reading it moves them), not the seized file system's.
    result.mtime_utc = utc_text(info.st_mtime)
    return inspect_data(result, data, max_image_pixels, allowed_formats)


def inspect_data(
    result: Inspection, data: bytes, max_image_pixels: int, allowed_formats: tuple[str, ...]
) -> Inspection:
    """Hash a file's bytes (sha256, and MD5 and SHA-1 for hash sets) and decode them completely."""
    result.size_bytes = len(data)
    if not data:
        return result.reject("empty_file", "the file is empty (0 bytes)")
    result.sha256 = sha256_bytes(data)
    result.md5, result.sha1 = hashlib.md5(data).hexdigest(), hashlib.sha1(data).hexdigest()
    return _decode(result, data, max_image_pixels, allowed_formats)


def utc_text(seconds: float) -> str:
    """POSIX seconds as the tables write times: ISO 8601 in UTC, to the second."""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="seconds")


def _reject_link(result: Inspection, root: str, full: str) -> Inspection:
    target = os.path.realpath(full)
    real_root = os.path.realpath(root)
    if os.path.commonpath([target, real_root]) != real_root:
        return result.reject("outside_root", f"symbolic link to {target}, outside raw_data")
    return result.reject("symlink", f"symbolic link to {os.path.relpath(target, real_root)}")


def _decode(result: Inspection, data: bytes, max_pixels: int, allowed: tuple[str, ...]) -> Inspection:
    # Pillow's own guard (a warning past its limit, an error past twice that) is replaced by the
    # configured limit, checked from the header before any pixel is decoded.
    previous_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(io.BytesIO(data)) as image:
            result.format = image.format or ""
            if result.format not in allowed:
                return result.reject("unsupported_format", f"format {result.format} is not in manifest.allowed_formats")
            width, height = image.size
            if width * height > max_pixels:
                return _bomb(result, width, height, max_pixels)
            for frame in ImageSequence.Iterator(image):
                frame.load()  # decode every byte of every frame: truncation shows here
            image.seek(0)
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
            if orientation in (5, 6, 7, 8):  # rotated by 90°: what a viewer shows is transposed
                width, height = height, width
            result.width, result.height = width, height
            upright = ImageOps.exif_transpose(image)
            result.phash = str(imagehash.phash(upright if upright is not None else image))
    except UnidentifiedImageError:
        if looks_like_image(data):
            return result.reject("corrupt", "starts like an image but no decoder could read its header")
        return result.reject("unsupported_format", "not a recognised image format")
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as error:
        text = str(error) or type(error).__name__
        if isinstance(error, EOFError) or "truncat" in text.lower():
            return result.reject("truncated", f"image data is truncated: {text}")
        return result.reject("corrupt", f"image data cannot be decoded: {text}")
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit
    _flag_extension(result)
    return result


def _bomb(result: Inspection, width: int, height: int, limit: int) -> Inspection:
    return result.reject(
        "decompression_bomb", f"{width}x{height} = {width * height} pixels exceeds the limit of {limit}"
    )


def _flag_extension(result: Inspection) -> None:
    extension = os.path.splitext(result.path)[1].lower()
    expected = EXTENSIONS.get(result.format, ())
    if extension not in expected:
        result.flags.append("extension_mismatch")
        result.notes.append(f"extension {extension or '(none)'} but content is {result.format}")
