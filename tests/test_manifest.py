"""Manifest: every kind of bad input gets its own reason code; usable oddities are flagged."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from conftest import evidence_unchanged, image_bytes, write
from forensic_vlm.config import DEFAULT_CLASSES, ManifestConfig
from forensic_vlm.demo_data import bomb_png
from forensic_vlm.inspection import REASONS
from forensic_vlm.manifest import BadInputError, build_manifest, fingerprint
from forensic_vlm.tables import decode_path, read_tsv


def run(root: Path, out: Path, **config) -> tuple[dict[str, dict], dict[str, dict]]:
    build_manifest(root, out, DEFAULT_CLASSES, ManifestConfig(**config), workers=1)
    manifest = {r["path"]: r for r in read_tsv(out / "manifest.tsv")}
    rejects = {r["path"]: r for r in read_tsv(out / "rejects.tsv")}
    return manifest, rejects


def png(width: int, height: int, idat: bytes, crc_ok: bool = True) -> bytes:
    """A greyscale PNG built by hand, with a chosen (possibly invalid) IDAT or IHDR checksum."""

    def chunk(kind: bytes, data: bytes, ok: bool = True) -> bytes:
        crc = zlib.crc32(kind + data) ^ (0 if ok else 1)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header, crc_ok) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bad_tree(root: Path, outside: Path) -> dict[str, str]:
    """One file of each unusable kind; returns path -> expected reason code."""
    jpeg = image_bytes(1)
    write(outside, image_bytes(2))
    write(root / "0_irrelevant" / "ok.jpg", image_bytes(3))
    expected = {
        "0_irrelevant/empty.jpg": ("empty_file", b""),
        "0_irrelevant/cut.jpg": ("truncated", jpeg[: len(jpeg) // 2]),
        "0_irrelevant/bad_checksum.png": ("corrupt", png(8, 8, zlib.compress(b"\0" * 72), crc_ok=False)),
        "0_irrelevant/bad_deflate.png": ("corrupt", png(8, 8, b"\x78\x9c" + b"\xff\x00" * 40)),
        "0_irrelevant/notes.txt": ("unsupported_format", b"plain text, not an image\n"),
        "0_irrelevant/drawing.ico": ("unsupported_format", image_bytes(4, (32, 32), "ICO")),
        "0_irrelevant/bomb.png": ("decompression_bomb", bomb_png(20_000, 20_000)),
        "1_chat_history/same.jpg": ("label_conflict", image_bytes(5)),
        "3_drug_raw/same.jpg": ("label_conflict", image_bytes(5)),
        "loose.jpg": ("unlabeled", image_bytes(6)),
        "misc/photo.jpg": ("unlabeled", image_bytes(7)),
        "7_other/photo.jpg": ("unknown_class", image_bytes(8)),
    }
    for relative, (_, data) in expected.items():
        write(root / relative, data)
    os.symlink(root / "0_irrelevant" / "ok.jpg", root / "0_irrelevant" / "link_inside.jpg")
    os.symlink(outside, root / "0_irrelevant" / "link_outside.jpg")
    (root / "2_transaction_place").mkdir()
    os.symlink(outside.parent, root / "2_transaction_place" / "linked_folder")
    os.mkfifo(root / "0_irrelevant" / "pipe.jpg")
    os.symlink(outside.parent, root / "3_drug_raw_linked")  # a whole class folder that is a link
    codes = {k: v[0] for k, v in expected.items()}
    codes.update(
        {
            "0_irrelevant/link_inside.jpg": "symlink",
            "0_irrelevant/link_outside.jpg": "outside_root",
            "2_transaction_place/linked_folder": "outside_root",
            "0_irrelevant/pipe.jpg": "not_regular_file",
            "3_drug_raw_linked": "outside_root",
        }
    )
    return codes


def test_every_bad_input_kind_has_its_own_reason_and_the_run_goes_on(tmp_path: Path) -> None:
    root = tmp_path / "raw_data"
    expected = bad_tree(root, tmp_path / "elsewhere" / "target.jpg")
    with evidence_unchanged(root):
        manifest, rejects = run(root, tmp_path / "out")
    assert {p: r["reason"] for p, r in rejects.items()} == expected
    assert set(manifest) == {"0_irrelevant/ok.jpg"}
    assert set(expected.values()) - {"unreadable"} <= set(REASONS)
    assert all(r["message"] for r in rejects.values())
    assert "3_drug_raw/same.jpg" in rejects["1_chat_history/same.jpg"]["message"]
    # Nothing was given a made-up label: rejects outside class folders carry none.
    assert rejects["loose.jpg"]["label"] == "" and rejects["7_other/photo.jpg"]["label"] == ""
    assert (
        "20000x20000 = 400000000 pixels exceeds the limit of 100000000" in rejects["0_irrelevant/bomb.png"]["message"]
    )


def test_fail_policy_stops_naming_the_file(tmp_path: Path) -> None:
    root = tmp_path / "raw_data"
    write(root / "0_irrelevant" / "ok.jpg", image_bytes(1))
    write(root / "2_transaction_place" / "empty.jpg", b"")
    with pytest.raises(BadInputError, match=r"2_transaction_place/empty\.jpg: empty_file"):
        run(root, tmp_path / "out", on_bad_input="fail")
    assert not (tmp_path / "out" / "manifest.tsv").exists()


def test_unreadable_file_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "raw_data"
    write(root / "0_irrelevant" / "locked.jpg", image_bytes(1))
    real_open = os.open

    def deny(path, flags, *args):
        if str(path).endswith("locked.jpg"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", deny)
    _, rejects = run(root, tmp_path / "out")
    assert rejects["0_irrelevant/locked.jpg"]["reason"] == "unreadable"


def test_usable_files_are_described_and_oddities_flagged(tmp_path: Path) -> None:
    root = tmp_path / "raw_data"
    write(root / "0_irrelevant" / "a.jpg", image_bytes(1, (64, 48)))
    write(root / "0_irrelevant" / "nested" / "copy.jpg", image_bytes(1, (64, 48)))  # exact duplicate
    write(root / "1_chat_history" / "carved.jpg", image_bytes(2, (40, 30), "PNG"))  # PNG behind .jpg
    write(root / "3_drug_raw" / "photo.heic", image_bytes(3, (80, 60), "HEIF"))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    write(root / "3_drug_raw" / "rotated.jpg", image_bytes(4, (64, 48), exif=exif))
    odd_name = os.fsdecode(b"chat_\xff\xfe.jpg")
    write(root / "1_chat_history" / odd_name, image_bytes(5))
    with evidence_unchanged(root):
        manifest, rejects = run(root, tmp_path / "out")
    assert rejects == {}
    a = manifest["0_irrelevant/a.jpg"]
    assert (a["format"], a["width"], a["height"], a["label"], a["duplicate_of"]) == ("JPEG", "64", "48", "0", "")
    assert len(a["sha256"]) == 64 and len(a["phash"]) == 16 and a["size_bytes"] == str(len(image_bytes(1)))
    assert manifest["0_irrelevant/nested/copy.jpg"]["duplicate_of"] == "0_irrelevant/a.jpg"
    carved = manifest["1_chat_history/carved.jpg"]
    assert carved["format"] == "PNG" and carved["flags"] == "extension_mismatch"
    heic = manifest["3_drug_raw/photo.heic"]
    assert (heic["format"], heic["width"], heic["height"], heic["flags"]) == ("HEIF", "80", "60", "")
    rotated = manifest["3_drug_raw/rotated.jpg"]
    assert (rotated["width"], rotated["height"]) == ("48", "64")
    (escaped,) = [r for p, r in manifest.items() if "non_utf8_name" in r["flags"]]
    assert decode_path(escaped["path"], escaped["flags"]) == os.path.join("1_chat_history", odd_name)
    assert (root / decode_path(escaped["path"], escaped["flags"])).exists()


def test_readme_at_the_top_is_documentation_not_evidence(tmp_path: Path) -> None:
    root = tmp_path / "raw_data"
    write(root / "README.md", b"# layout\n")
    write(root / "0_irrelevant" / "README.md", b"# inside a class folder this is evidence\n")
    manifest, rejects = run(root, tmp_path / "out")
    assert list(rejects) == ["0_irrelevant/README.md"] and manifest == {}


def test_fingerprint_changes_when_evidence_is_added_or_replaced(raw_tree: Path) -> None:
    first = fingerprint(raw_tree)
    assert fingerprint(raw_tree) == first
    write(raw_tree / "0_irrelevant" / "new.jpg", image_bytes(999))
    second = fingerprint(raw_tree)
    assert second != first
    write(raw_tree / "0_irrelevant" / "new.jpg", image_bytes(998, (10, 10)))
    assert fingerprint(raw_tree) != second


def test_parallel_workers_give_the_same_manifest(raw_tree: Path, tmp_path: Path) -> None:
    build_manifest(raw_tree, tmp_path / "one", DEFAULT_CLASSES, ManifestConfig(), workers=1)
    build_manifest(raw_tree, tmp_path / "two", DEFAULT_CLASSES, ManifestConfig(), workers=2)
    assert (tmp_path / "one" / "manifest.tsv").read_bytes() == (tmp_path / "two" / "manifest.tsv").read_bytes()


def test_read_only_guard_really_detects_a_write(raw_tree: Path) -> None:
    """The evidence check must be able to fail: a write (as root, past the permissions) is caught."""
    with pytest.raises(AssertionError, match="evidence folder changed"), evidence_unchanged(raw_tree):
        target = raw_tree / "0_irrelevant" / "img_0.jpg"
        target.chmod(0o644)
        target.write_bytes(b"tampered")
        target.chmod(0o444)
