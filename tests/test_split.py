"""Split: stable under added data, on target per class, leak-free, and the reference reproduced."""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

import pytest
from sklearn.model_selection import train_test_split

from forensic_vlm.config import DEFAULT_CLASSES, SplitConfig
from forensic_vlm.manifest import MANIFEST_COLUMNS
from forensic_vlm.split import (
    SPLITS,
    Thresholds,
    assign_sklearn,
    assign_stable,
    near_duplicate_groups,
    split_dataset,
)
from forensic_vlm.tables import read_tsv, write_tsv


def binomial_tolerance(n: int, share: float, sigmas: float = 3.0) -> float:
    """Half-width of the band within which a hash-based split's share should fall."""
    return sigmas * math.sqrt(share * (1 - share) / n) if n else 1.0


def fake_rows(n: int, seed: int, weights=(0.4, 0.3, 0.1, 0.2)) -> list[dict[str, str]]:
    """Manifest-like rows with random content hashes and far-apart perceptual hashes."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        sha = hashlib.sha256(f"{seed}-{i}".encode()).hexdigest()
        label = rng.choices(range(4), weights)[0]
        rows.append(
            {
                "sha256": sha,
                "path": f"{label}_x/{seed}_{i}.jpg",
                "label": str(label),
                "phash": f"{rng.getrandbits(64):016x}",
                "duplicate_of": "",
            }
        )
    return rows


def flip_bits(phash: str, bits: list[int]) -> str:
    value = int(phash, 16)
    for bit in bits:
        value ^= 1 << bit
    return f"{value:016x}"


def test_adding_images_moves_no_existing_image() -> None:
    config = SplitConfig(near_duplicate_distance=None)
    old = fake_rows(1000, seed=1)
    new = fake_rows(200, seed=2)  # +20 %, none a near-duplicate (grouping is off for this check)
    before = assign_stable(old, config)
    after = assign_stable(old + new, config)
    assert all(after[r["sha256"]] == before[r["sha256"]] for r in old)


def test_adding_images_with_grouping_on_moves_nothing_when_none_is_a_near_duplicate() -> None:
    config = SplitConfig()  # default distance 4
    old, new = fake_rows(1000, seed=3), fake_rows(200, seed=4)
    assert len(set(near_duplicate_groups([r["phash"] for r in old + new], 4))) == 1200
    before, after = assign_stable(old, config), assign_stable(old + new, config)
    assert all(after[r["sha256"]][0] == before[r["sha256"]][0] for r in old)


def test_each_class_share_is_within_three_standard_errors_of_target() -> None:
    config = SplitConfig()
    rows = fake_rows(4000, seed=5)
    assignment = assign_stable(rows, config)
    targets = Thresholds.from_config(config).targets()
    assert targets == pytest.approx({"test": 0.15, "val": 0.1275, "train": 0.7225})
    for label in "0123":
        members = [assignment[r["sha256"]][0] for r in rows if r["label"] == label]
        for split in SPLITS:
            share = members.count(split) / len(members)
            assert abs(share - targets[split]) <= binomial_tolerance(len(members), targets[split]), (label, split)


def test_near_duplicates_stay_together_and_nothing_is_in_two_splits(tmp_path: Path) -> None:
    rows = fake_rows(300, seed=6)
    for k, source in enumerate(rows[:40]):  # 40 near-copies (1 to 4 bits away) of existing images
        rows.append(
            {
                **source,
                "sha256": hashlib.sha256(f"near-{k}".encode()).hexdigest(),
                "path": f"near/{k}.jpg",
                "phash": flip_bits(source["phash"], list(range(k % 4 + 1))),
            }
        )
    manifest = tmp_path / "manifest.tsv"
    write_tsv(manifest, MANIFEST_COLUMNS, rows)
    split_dataset(manifest, tmp_path / "split", DEFAULT_CLASSES, SplitConfig())
    tables = {s: read_tsv(tmp_path / "split" / f"{s}.tsv") for s in SPLITS}
    shas = [r["sha256"] for rows_ in tables.values() for r in rows_]
    assert len(shas) == len(set(shas)) == 340
    split_of_group: dict[str, set[str]] = {}
    for split, members in tables.items():
        for r in members:
            split_of_group.setdefault(r["group"], set()).add(split)
    assert all(len(s) == 1 for s in split_of_group.values())
    grouped = [r for members in tables.values() for r in members if r["group"] != r["sha256"]]
    assert len(grouped) >= 40  # each near-copy joined its source's group


def test_pigeonhole_grouping_equals_brute_force() -> None:
    rng = random.Random(7)
    base = [rng.getrandbits(64) for _ in range(60)]
    hashes = [f"{b:016x}" for b in base]
    hashes += [flip_bits(h, rng.sample(range(64), rng.randint(1, 7))) for h in hashes[:60]]
    for distance in (0, 2, 4, 6):
        fast = near_duplicate_groups(hashes, distance)
        parent = list(range(len(hashes)))

        def find(i: int, parent: list[int] = parent) -> int:
            while parent[i] != i:
                i = parent[i]
            return i

        for i in range(len(hashes)):
            for j in range(i):
                if (int(hashes[i], 16) ^ int(hashes[j], 16)).bit_count() <= distance:
                    a, b = find(i), find(j)
                    parent[max(a, b)] = min(a, b)
        assert fast == [find(i) for i in range(len(hashes))], distance


def test_sklearn_method_matches_the_reference_calls_on_a_fixed_list() -> None:
    rows = fake_rows(137, seed=8)
    assignment = assign_sklearn(rows, SplitConfig(method="sklearn"))
    # The reference (preprocess.py): records in class order, two stratified calls, random_state=42.
    ordered = sorted(rows, key=lambda r: (int(r["label"]), r["path"]))
    records, labels = [r["sha256"] for r in ordered], [r["label"] for r in ordered]
    rest, test = train_test_split(records, test_size=0.15, random_state=42, stratify=labels)
    rest_labels = [labels[records.index(s)] for s in rest]
    train, val = train_test_split(rest, test_size=0.15, random_state=42, stratify=rest_labels)
    expected = {**{s: "train" for s in train}, **{s: "val" for s in val}, **{s: "test" for s in test}}
    assert {s: v[0] for s, v in assignment.items()} == expected
    assert (len(train), len(val), len(test)) == (98, 18, 21)


def test_a_class_too_small_for_every_split_is_warned_about(tmp_path: Path, caplog) -> None:
    rows = fake_rows(200, seed=9, weights=(0.5, 0.5, 0.0, 0.0))
    rows.append({**rows[0], "sha256": "ab" * 32, "label": "3", "phash": "0" * 16})  # one class-3 image
    manifest = tmp_path / "manifest.tsv"
    write_tsv(manifest, MANIFEST_COLUMNS, rows)
    split_dataset(manifest, tmp_path / "split", DEFAULT_CLASSES, SplitConfig())
    summary = read_tsv(tmp_path / "split" / "summary.tsv")
    notes = {(r["label"], r["split"]): r["note"] for r in summary}
    assert "has no image in" in notes[("2", "train")]
    starved = [notes[("3", s)] for s in SPLITS if notes[("3", s)]]
    assert len(starved) == 2 and "too few" in starved[0]
    assert "class 3 (drug itself) has no image" in caplog.text


def test_duplicates_are_used_once(tmp_path: Path) -> None:
    rows = fake_rows(20, seed=10)
    rows.append({**rows[0], "path": "copy.jpg", "duplicate_of": rows[0]["path"]})
    manifest = tmp_path / "manifest.tsv"
    write_tsv(manifest, MANIFEST_COLUMNS, rows)
    counts = split_dataset(manifest, tmp_path / "split", DEFAULT_CLASSES, SplitConfig())
    assert sum(counts.values()) == 20
