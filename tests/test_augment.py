"""Augment: deterministic, exactly N children per configured training image, evidence untouched."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import evidence_unchanged, write
from forensic_vlm.augment import augment_training_set
from forensic_vlm.batches import examples_from_table
from forensic_vlm.config import DEFAULT_CLASSES, AugmentConfig, ManifestConfig, SplitConfig
from forensic_vlm.images import EvidenceChangedError
from forensic_vlm.manifest import build_manifest
from forensic_vlm.split import split_dataset
from forensic_vlm.tables import read_tsv, sha256_file


@pytest.fixture
def split_tree(raw_tree: Path, tmp_path: Path) -> Path:
    build_manifest(raw_tree, tmp_path / "manifest", DEFAULT_CLASSES, ManifestConfig())
    # Large fractions so every split of a 5-image class is likely non-empty; the seed fixes it.
    split_dataset(tmp_path / "manifest" / "manifest.tsv", tmp_path / "split", DEFAULT_CLASSES, SplitConfig())
    return tmp_path / "split"


def test_four_children_per_class2_training_image_and_deterministic(
    raw_tree: Path, split_tree: Path, tmp_path: Path
) -> None:
    train = read_tsv(split_tree / "train.tsv")
    class2 = [r for r in train if r["label"] == "2"]
    assert class2, "the fixture must put class-2 images in train"
    with evidence_unchanged(raw_tree):
        first = augment_training_set(split_tree / "train.tsv", raw_tree, tmp_path / "a", AugmentConfig(), workers=1)
        second = augment_training_set(split_tree / "train.tsv", raw_tree, tmp_path / "b", AugmentConfig(), workers=2)
    assert first == second == 4 * len(class2)
    lineage = read_tsv(tmp_path / "a" / "lineage.tsv")
    assert sorted({r["parent_sha256"] for r in lineage}) == sorted(r["sha256"] for r in class2)
    assert all(r["label"] == "2" and r["transforms"] is not None for r in lineage)
    assert (tmp_path / "a" / "lineage.tsv").read_bytes() == (tmp_path / "b" / "lineage.tsv").read_bytes()
    for row in lineage:
        a, b = tmp_path / "a" / row["child"], tmp_path / "b" / row["child"]
        assert a.read_bytes() == b.read_bytes() and sha256_file(a) == row["child_sha256"]
    held_out = {r["sha256"] for s in ("val", "test") for r in read_tsv(split_tree / f"{s}.tsv")}
    assert not held_out & {r["parent_sha256"] for r in lineage}, "validation/test images are never augmented"


def test_training_table_is_train_plus_children_and_resolves_to_files(
    raw_tree: Path, split_tree: Path, tmp_path: Path
) -> None:
    out = tmp_path / "aug"
    children = augment_training_set(split_tree / "train.tsv", raw_tree, out, AugmentConfig())
    table = read_tsv(out / "train_augmented.tsv")
    train = read_tsv(split_tree / "train.tsv")
    assert len(table) == len(train) + children
    assert {r["source"] for r in table} == {"raw_data", "augment"}
    for example in examples_from_table(table, raw_tree, out):  # the paths train reads
        assert sha256_file(example.path) == example.sha256


def test_a_different_seed_or_count_changes_the_children(raw_tree: Path, split_tree: Path, tmp_path: Path) -> None:
    base = augment_training_set(split_tree / "train.tsv", raw_tree, tmp_path / "a", AugmentConfig())
    augment_training_set(split_tree / "train.tsv", raw_tree, tmp_path / "b", AugmentConfig(seed=7))
    first = [r["child_sha256"] for r in read_tsv(tmp_path / "a" / "lineage.tsv")]
    other = [r["child_sha256"] for r in read_tsv(tmp_path / "b" / "lineage.tsv")]
    assert first != other
    more = augment_training_set(
        split_tree / "train.tsv", raw_tree, tmp_path / "c", AugmentConfig(per_image={0: 1, 2: 2})
    )
    labels = [r["label"] for r in read_tsv(split_tree / "train.tsv")]
    assert more == labels.count("0") + 2 * labels.count("2") and base == 4 * labels.count("2")


def test_reference_crop_size_is_honoured(raw_tree: Path, split_tree: Path, tmp_path: Path) -> None:
    from PIL import Image

    augment_training_set(split_tree / "train.tsv", raw_tree, tmp_path / "a", AugmentConfig(crop_size=(30, 20)))
    lineage = read_tsv(tmp_path / "a" / "lineage.tsv")
    cropped = [r for r in lineage if "RandomResizedCrop" in r["transforms"].split(",")]
    others = [r for r in lineage if r not in cropped]
    assert cropped and others
    assert all(Image.open(tmp_path / "a" / r["child"]).size == (20, 30) for r in cropped)
    assert all(Image.open(tmp_path / "a" / r["child"]).size == (64, 48) for r in others)


def test_changed_evidence_stops_augmentation(raw_tree: Path, split_tree: Path, tmp_path: Path) -> None:
    row = next(r for r in read_tsv(split_tree / "train.tsv") if r["label"] == "2")
    write(raw_tree / row["path"], b"replaced after the manifest was built")
    with pytest.raises(EvidenceChangedError, match=row["path"]):
        augment_training_set(split_tree / "train.tsv", raw_tree, tmp_path / "a", AugmentConfig())


def test_children_of_unchanged_parents_come_from_the_cache(raw_tree: Path, split_tree: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = augment_training_set(split_tree / "train.tsv", raw_tree, tmp_path / "a", AugmentConfig(), cache_dir=cache)
    second = augment_training_set(split_tree / "train.tsv", raw_tree, tmp_path / "b", AugmentConfig(), cache_dir=cache)
    a, b = read_tsv(tmp_path / "a" / "lineage.tsv"), read_tsv(tmp_path / "b" / "lineage.tsv")
    assert first == second and {r["reused"] for r in a} == {"False"} and {r["reused"] for r in b} == {"True"}
    assert [r["child_sha256"] for r in a] == [r["child_sha256"] for r in b]
    assert [(r["seed"], r["transforms"]) for r in a] == [(r["seed"], r["transforms"]) for r in b]
    augment_training_set(split_tree / "train.tsv", raw_tree, tmp_path / "c", AugmentConfig(seed=9), cache_dir=cache)
    assert {r["reused"] for r in read_tsv(tmp_path / "c" / "lineage.tsv")} == {"False"}  # other settings, other key


def test_a_torn_or_changed_cached_child_is_computed_again(raw_tree: Path, split_tree: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    augment_training_set(split_tree / "train.tsv", raw_tree, tmp_path / "a", AugmentConfig(), cache_dir=cache)
    children = sorted(cache.rglob("*.png"))
    children[0].write_bytes(children[0].read_bytes()[:50])  # cut short, as a power cut can leave it
    children[1].write_bytes(children[1].read_bytes() + b"\0")  # changed after it was recorded
    augment_training_set(split_tree / "train.tsv", raw_tree, tmp_path / "b", AugmentConfig(), cache_dir=cache)
    a, b = read_tsv(tmp_path / "a" / "lineage.tsv"), read_tsv(tmp_path / "b" / "lineage.tsv")
    assert [r["child_sha256"] for r in a] == [r["child_sha256"] for r in b]  # the same children, exactly
    recomputed = {r["child"].removeprefix("images/") for r in b if r["reused"] == "False"}
    assert recomputed == {children[0].name, children[1].name}
