"""Demo data: deterministic, at least 40 images per class, phone-like sizes, bad examples listed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from forensic_vlm.config import DEFAULT_CLASSES, DemoConfig, ManifestConfig
from forensic_vlm.demo_data import generate_demo_data
from forensic_vlm.manifest import build_manifest
from forensic_vlm.tables import read_tsv


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    generate_demo_data(root / "raw_data", root / "raw_data.tsv", list(DEFAULT_CLASSES), DemoConfig())
    build_manifest(root / "raw_data", root / "manifest", DEFAULT_CLASSES, ManifestConfig(), workers=2)
    return root


def test_every_class_has_its_configured_usable_images_with_varied_sizes(demo: Path) -> None:
    rows = [r for r in read_tsv(demo / "manifest" / "manifest.tsv") if not r["duplicate_of"]]
    for spec in DEFAULT_CLASSES:
        members = [r for r in rows if r["label"] == str(spec.id)]
        assert len(members) >= DemoConfig().images_per_class >= 40, spec.folder
    shapes = {(int(r["width"]), int(r["height"])) for r in rows}
    assert any(h >= 2 * w for w, h in shapes), "a phone portrait screenshot ratio"
    assert any(w > h for w, h in shapes) and any(w == h for w, h in shapes)
    assert {r["format"] for r in rows} >= {"JPEG", "PNG", "HEIF"}


def test_bad_examples_show_up_as_rejects_and_flags(demo: Path) -> None:
    reasons = {r["reason"] for r in read_tsv(demo / "manifest" / "rejects.tsv")}
    assert reasons == {
        "empty_file",
        "truncated",
        "corrupt",
        "unsupported_format",
        "decompression_bomb",
        "label_conflict",
        "unlabeled",
    }
    manifest = read_tsv(demo / "manifest" / "manifest.tsv")
    assert any("extension_mismatch" in r["flags"] for r in manifest)
    assert any(r["duplicate_of"] for r in manifest)


def test_same_seed_same_bytes_other_seed_other_bytes(demo: Path, tmp_path: Path) -> None:
    small = DemoConfig(images_per_class=3, bad_examples=False)
    generate_demo_data(tmp_path / "a", tmp_path / "a.tsv", list(DEFAULT_CLASSES), small)
    generate_demo_data(tmp_path / "b", tmp_path / "b.tsv", list(DEFAULT_CLASSES), small)
    generate_demo_data(
        tmp_path / "c", tmp_path / "c.tsv", list(DEFAULT_CLASSES), DemoConfig(3, seed=1, bad_examples=False)
    )
    assert (tmp_path / "a.tsv").read_bytes() == (tmp_path / "b.tsv").read_bytes()
    assert (tmp_path / "a.tsv").read_bytes() != (tmp_path / "c.tsv").read_bytes()
    assert len(read_tsv(tmp_path / "a.tsv")) == 12


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "evidence").mkdir()
    (tmp_path / "evidence" / "photo.jpg").write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        generate_demo_data(tmp_path / "evidence", tmp_path / "e.tsv", list(DEFAULT_CLASSES), DemoConfig(1))
    assert (tmp_path / "evidence" / "photo.jpg").read_bytes() == b"precious"


def test_a_review_case_holds_every_class_in_a_new_look_with_its_examiner_export(tmp_path: Path) -> None:
    import csv

    from forensic_vlm.demo_data import DRAWERS, generate_demo_review_case, new_phone_look

    config = DemoConfig(review_case_images=8)
    listings = {}
    for case in ("phone2", "phone3"):
        written = generate_demo_review_case(
            tmp_path / case, tmp_path / f"{case}.tsv", list(DEFAULT_CLASSES), config,
            case=case, export=tmp_path / f"{case}.csv",
        )  # fmt: skip
        listings[case] = read_tsv(tmp_path / f"{case}.tsv")
        assert written == len(listings[case]) == 8
        assert sorted(int(r["true_class"]) for r in listings[case]) == [0, 0, 1, 1, 2, 2, 3, 3]
        names = {str(spec.id): spec.en for spec in DEFAULT_CLASSES}
        with open(tmp_path / f"{case}.csv", newline="") as handle:
            export = {row["SHA-256"]: row["Category"] for row in csv.DictReader(handle)}
        assert export == {r["sha256"]: names[r["true_class"]] for r in listings[case]}
    # Two phones never share an image; the same case and seed give the same bytes.
    assert not {r["sha256"] for r in listings["phone2"]} & {r["sha256"] for r in listings["phone3"]}
    generate_demo_review_case(
        tmp_path / "again",
        tmp_path / "again.tsv",
        list(DEFAULT_CLASSES),
        config,
        case="phone2",
        export=tmp_path / "a.csv",
    )
    assert [r["sha256"] for r in read_tsv(tmp_path / "again.tsv")] == [r["sha256"] for r in listings["phone2"]]
    # The look: raw_data's scene with its colour channels rotated.
    scene = DRAWERS[1](np.random.default_rng(0), (64, 48))
    red, green, blue = scene.split()
    assert list(new_phone_look(scene).getdata()) == list(Image.merge("RGB", (blue, red, green)).getdata())
