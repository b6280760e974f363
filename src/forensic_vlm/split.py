"""Stage ``split``: assign each usable image to train, val or test.

``stable`` (default): an image's split is a pure function of its content hash and the seed. A keyed
hash (HMAC-SHA256) of the sha256 is mapped to [0, 1) and compared with the class's thresholds, so
adding or removing other images never moves it. Near-duplicates (perceptual hashes within a
Hamming distance) form a group that follows its canonical member (the smallest sha256), so the
same scene never sits on both sides of the train/test line.

``sklearn``: the reference's two stratified ``train_test_split`` calls with ``random_state``,
on the images ordered by class then path; kept to reproduce published numbers.
"""

from __future__ import annotations

import hmac
import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sklearn.model_selection import train_test_split

from forensic_vlm.config import ClassSpec, SplitConfig
from forensic_vlm.tables import read_tsv, write_tsv

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# case, root, locator: empty for raw_data; for an image that joined from an examiner's review, its
# case, the evidence folder or container it was triaged from, and its locator inside a container.
SPLIT_COLUMNS = (
    "sha256", "path", "label", "class_folder", "group", "flags", "format", "width", "height",
    "case", "root", "locator",
)  # fmt: skip
SUMMARY_COLUMNS = ("label", "class_en", "class_ko", "split", "n", "share", "target_share", "note")


@dataclass(frozen=True)
class Thresholds:
    test: float
    val: float  # upper bound of the val interval: [test, val)

    @classmethod
    def from_config(cls, config: SplitConfig) -> Thresholds:
        return cls(config.test_fraction, config.test_fraction + (1 - config.test_fraction) * config.val_fraction)

    def targets(self) -> dict[str, float]:
        return {"test": self.test, "val": self.val - self.test, "train": 1 - self.val}

    def assign(self, unit: float) -> str:
        return "test" if unit < self.test else "val" if unit < self.val else "train"


def keyed_unit(sha256: str, seed: int) -> float:
    """Map a content hash to [0, 1) with a key, so the split is secret-free yet seed-dependent."""
    digest = hmac.new(f"forensic-vlm-split:{seed}".encode(), bytes.fromhex(sha256), "sha256").digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def near_duplicate_groups(phashes: Sequence[str], max_distance: int | None) -> list[int]:
    """For each image, the index of its group's first member (union-find over pHash distance).

    Pigeonhole: two 64-bit hashes within distance d agree exactly on at least one of d + 1
    blocks, so only images sharing a block value are compared (near-linear, not quadratic).
    """
    parent = list(range(len(phashes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if max_distance is None or len(phashes) < 2:
        return parent
    values = [int(h, 16) for h in phashes]
    blocks = max_distance + 1
    edges = [64 * b // blocks for b in range(blocks + 1)]
    for b in range(blocks):
        width = edges[b + 1] - edges[b]
        buckets: dict[int, list[int]] = defaultdict(list)
        for i, value in enumerate(values):
            buckets[(value >> edges[b]) & ((1 << width) - 1)].append(i)
        for members in buckets.values():
            for x, i in enumerate(members):
                for j in members[x + 1 :]:
                    if (values[i] ^ values[j]).bit_count() <= max_distance:
                        a, c = find(i), find(j)
                        if a != c:
                            parent[max(a, c)] = min(a, c)
    return [find(i) for i in range(len(phashes))]


def assign_stable(rows: Sequence[dict[str, str]], config: SplitConfig) -> dict[str, tuple[str, str]]:
    """sha256 -> (split, group canonical sha256)."""
    thresholds = Thresholds.from_config(config)
    groups = near_duplicate_groups([r["phash"] for r in rows], config.near_duplicate_distance)
    members: dict[int, list[str]] = defaultdict(list)
    for row, root in zip(rows, groups, strict=True):
        members[root].append(row["sha256"])
    assignment = {}
    for shas in members.values():
        canonical = min(shas)
        split = thresholds.assign(keyed_unit(canonical, config.seed))
        for sha in shas:
            assignment[sha] = (split, canonical)
    return assignment


def assign_sklearn(rows: Sequence[dict[str, str]], config: SplitConfig) -> dict[str, tuple[str, str]]:
    """The reference's split: stratified test split, then stratified val split of the rest.

    Like the reference, a split that cannot be stratified (a class with too few images) falls
    back to an unstratified one, with a warning.
    """
    ordered = sorted(rows, key=lambda r: (int(r["label"]), r["path"]))
    shas = [r["sha256"] for r in ordered]
    labels = [r["label"] for r in ordered]
    rest, test = _reference_split(shas, labels, config.test_fraction, config.seed)
    label_of = dict(zip(shas, labels, strict=True))
    rest_labels = [label_of[s] for s in rest]
    train, val = _reference_split(rest, rest_labels, config.val_fraction, config.seed)
    assignment = {s: ("train", s) for s in train}
    assignment.update({s: ("val", s) for s in val})
    assignment.update({s: ("test", s) for s in test})
    return assignment


def _reference_split(items: list[str], labels: list[str], size: float, seed: int) -> tuple[list, list]:
    try:
        return train_test_split(items, test_size=size, random_state=seed, stratify=labels)
    except ValueError as error:
        log.warning("stratified split impossible (%s); splitting without stratification", error)
        return train_test_split(items, test_size=size, random_state=seed)


def assign_raw_data(rows: Sequence[dict[str, str]], config: SplitConfig) -> dict[str, tuple[str, str]]:
    """sha256 -> (split, group) for raw_data's rows, by the configured method."""
    assign = assign_stable if config.method == "stable" else assign_sklearn
    return assign(rows, config) if rows else {}


def split_dataset(
    manifest: Path,
    out_dir: Path,
    classes: Sequence[ClassSpec],
    config: SplitConfig,
    *,
    reviewed: Path | None = None,
) -> dict[str, int]:
    """Write train/val/test.tsv and summary.tsv for the usable, de-duplicated manifest rows.

    ``reviewed``: results/review/labels.tsv, the examiners' labels, each on the side its case was
    given (forensic_vlm.review.labels); raw_data's rows are assigned exactly as without them.
    """
    rows = [r for r in read_tsv(Path(manifest)) if not r["duplicate_of"]]
    assignment = assign_raw_data(rows, config)
    out_dir = Path(out_dir)
    by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for row in rows:
        split, group = assignment[row["sha256"]]
        by_split[split].append({**row, "group": group})
    for row in read_tsv(Path(reviewed)) if reviewed else []:
        by_split[row["split"]].append(row)
    counts = {}
    for split, members in by_split.items():
        counts[split] = write_tsv(out_dir / f"{split}.tsv", SPLIT_COLUMNS, members)
    write_tsv(out_dir / "summary.tsv", SUMMARY_COLUMNS, summarize(by_split, classes, config))
    log.info("split (%s, seed %d): %s", config.method, config.seed, counts)
    return counts


def summarize(
    by_split: dict[str, list[dict]], classes: Sequence[ClassSpec], config: SplitConfig
) -> list[dict[str, object]]:
    """Achieved counts per class and split, against the targets; warns about starved splits."""
    targets = Thresholds.from_config(config).targets()
    per_class = {s: Counter(int(r["label"]) for r in rows) for s, rows in by_split.items()}
    summary = []
    for spec in classes:
        total = sum(per_class[s][spec.id] for s in SPLITS)
        for split in SPLITS:
            n = per_class[split][spec.id]
            note = ""
            if n == 0:
                note = f"class {spec.id} ({spec.en}) has no image in {split}"
                if total:
                    note += f"; {total} image(s) are too few for a {targets[split]:.1%} share"
                log.warning("split: %s", note)
            summary.append(
                {
                    "label": spec.id,
                    "class_en": spec.en,
                    "class_ko": spec.ko,
                    "split": split,
                    "n": n,
                    "share": f"{n / total:.4f}" if total else "",
                    "target_share": f"{targets[split]:.4f}",
                    "note": note,
                }
            )
    return summary
