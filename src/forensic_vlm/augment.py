"""Stage ``augment``: the reference's Albumentations pipeline, applied to training images only.

Children are written under ``results/augment/images/`` (never beside the evidence) and named by
their parent's sha256, so no file name in raw_data can be mistaken for one. Each child's seed is
derived from the base seed and its parent's sha256: a child is the same bytes whatever other
images exist, which lets later runs reuse it. ``lineage.tsv`` records child, parent, seed and the
transforms that fired; ``train_augmented.tsv`` is the training table for later stages.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
from PIL import Image

from forensic_vlm.config import AugmentConfig
from forensic_vlm.faults import fault_point
from forensic_vlm.images import load_evidence_image
from forensic_vlm.parallel import ordered_map
from forensic_vlm.tables import read_tsv, sha256_bytes, write_atomically, write_tsv

log = logging.getLogger(__name__)

LINEAGE_COLUMNS = (
    "child",
    "child_sha256",
    "parent_sha256",
    "parent_path",
    "label",
    "width",
    "height",
    "seed",
    "transforms",
    "reused",
)
PIPELINE_VERSION = "reference-2"  # bump when reference_pipeline changes, so cached children are redone
# case: the reviewed case a row (or its parent) came from, empty for raw_data; root and locator
# find a reviewed image in its case's evidence.
TRAINING_COLUMNS = (
    "sha256", "path", "flags", "label", "width", "height", "source", "parent_sha256", "case", "root", "locator",
)  # fmt: skip


def reference_pipeline(height: int, width: int, seed: int, crop_size: tuple[int, int] | None) -> A.Compose:
    """The reference system's augmentation (Albumentations 2 argument names).

    The reference cropped to 300x300; LLaVA-NeXT re-tiles any size, so by default the crop keeps
    the image's own size. GaussNoise variance 10-50 (on 0-255) is a standard deviation of
    sqrt(10)..sqrt(50) grey levels, which Albumentations 2 takes as a fraction of 255.
    """
    crop = tuple(crop_size) if crop_size else (height, width)
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.Rotate(limit=15, border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.7),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.8),
            A.GaussNoise(std_range=(np.sqrt(10) / 255, np.sqrt(50) / 255), p=0.3),
            A.OneOf([A.MotionBlur(blur_limit=5, p=0.5), A.GaussianBlur(blur_limit=(3, 5), p=0.5)], p=0.4),
            A.RandomGamma(gamma_limit=(80, 120), p=0.3),
            A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=15, val_shift_limit=10, p=0.3),
            A.RandomResizedCrop(size=crop, scale=(0.8, 1.0), ratio=(0.75, 1.33), p=0.3),
        ],
        seed=seed,
        save_applied_params=True,
    )


def child_seed(base_seed: int, parent_sha256: str, index: int) -> int:
    digest = hashlib.sha256(f"{base_seed}:{parent_sha256}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big")  # numpy seeds must fit in 32 bits


@dataclass(frozen=True)
class _Job:
    row: dict[str, str]
    count: int


def cache_key(config: AugmentConfig) -> str:
    """Children depend on the parent's bytes (its sha256, in the file name) and on these settings."""
    settings = f"{PIPELINE_VERSION}:{config.seed}:{config.crop_size}:{A.__version__}"
    return hashlib.sha256(settings.encode()).hexdigest()[:16]


def _augment_one(
    job: _Job, *, raw_data: Path, images_dir: Path, config: AugmentConfig, cache: Path | None
) -> list[dict]:
    pixels = None
    lineage = []
    for index in range(1, job.count + 1):
        name = f"{job.row['sha256']}_{index}.png"
        cached = _cached_child(cache / name) if cache else None
        if cached:
            # A child of an unchanged parent under unchanged settings: reuse it, do not recompute.
            data, record = cached
        else:
            if pixels is None:
                pixels = np.asarray(load_evidence_image(raw_data, job.row))
            seed = child_seed(config.seed, job.row["sha256"], index)
            result = reference_pipeline(*pixels.shape[:2], seed, config.crop_size)(image=pixels)
            buffer = io.BytesIO()
            # Lossless, the same bytes each run; zlib level 1 writes 5x faster than Pillow's default 6
            # for files about 10 % larger (measured on the demo's children).
            Image.fromarray(result["image"]).save(buffer, format="PNG", compress_level=1)
            data = buffer.getvalue()
            record = {
                "seed": seed,
                "width": result["image"].shape[1],
                "height": result["image"].shape[0],
                "transforms": ",".join(t for t, _ in result["applied_transforms"]),
                "reused": False,
            }
            if cache:
                cache.mkdir(parents=True, exist_ok=True)
                # Each file whole (renamed into place), and the record carries the image's sha256,
                # checked on reuse: no fsync needed, a torn or stale pair is simply computed again.
                write_atomically(cache / name, data, durable=False)
                cached_record = {**record, "reused": True, "sha256": sha256_bytes(data)}
                write_atomically((cache / name).with_suffix(".json"), json.dumps(cached_record).encode(), durable=False)
        (images_dir / name).write_bytes(data)  # a stage output: Snakemake reruns a stage it saw cut short
        fault_point("augment.child")
        lineage.append(
            {
                "child": f"images/{name}",
                "child_sha256": sha256_bytes(data),
                "parent_sha256": job.row["sha256"],
                "parent_path": job.row["path"],
                "label": job.row["label"],
                **record,
            }
        )
    return lineage


def _cached_child(path: Path) -> tuple[bytes, dict] | None:
    """A cached child and its record, or None when either is missing or they do not match (a
    cache written by an older version, or damaged: the child is then computed again, exactly)."""
    try:
        record = json.loads(path.with_suffix(".json").read_text())
        data = path.read_bytes()
    except (OSError, ValueError):
        return None
    if record.pop("sha256", None) != sha256_bytes(data):
        log.warning("augment cache: %s does not match its record; computed again", path)
        return None
    return data, record


def augment_training_set(
    train_tsv: Path,
    raw_data: Path,
    out_dir: Path,
    config: AugmentConfig,
    *,
    workers: int = 1,
    cache_dir: Path | None = None,
) -> int:
    """Write augmented children of the configured classes' training images; returns their count.

    With ``cache_dir``, children already made for the same parent and settings are copied from
    there instead of being computed again (the workflow keeps it under results/cache/augment).
    """
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    train = read_tsv(Path(train_tsv))
    jobs = [_Job(r, config.per_image.get(int(r["label"]), 0)) for r in train]
    jobs = [j for j in jobs if j.count > 0]
    log.info("augment: %d training image(s) to augment, %s children per class", len(jobs), config.per_image)
    cache = Path(cache_dir) / cache_key(config) if cache_dir else None
    work = partial(_augment_one, raw_data=Path(raw_data), images_dir=images_dir, config=config, cache=cache)
    lineage = [row for rows in ordered_map(work, jobs, workers, "augment") for row in rows]
    write_tsv(out_dir / "lineage.tsv", LINEAGE_COLUMNS, lineage)
    case_of = {r["sha256"]: r.get("case", "") for r in train}
    training = [
        {
            "sha256": r["sha256"],
            "path": r["path"],
            "flags": r["flags"],
            "label": r["label"],
            "width": r["width"],
            "height": r["height"],
            "source": "review" if r.get("case") else "raw_data",
            "parent_sha256": "",
            "case": r.get("case", ""),
            "root": r.get("root", ""),
            "locator": r.get("locator", ""),
        }
        for r in train
    ] + [
        {
            "sha256": c["child_sha256"],
            "path": c["child"],
            "label": c["label"],
            "width": c["width"],
            "height": c["height"],
            "source": "augment",
            "parent_sha256": c["parent_sha256"],
            "case": case_of[c["parent_sha256"]],
        }
        for c in lineage
    ]
    write_tsv(out_dir / "train_augmented.tsv", TRAINING_COLUMNS, training)
    reused = sum(1 for c in lineage if c["reused"])
    log.info(
        "augment: %d children written (%d reused from the cache, %d computed); training table has %d rows",
        len(lineage),
        reused,
        len(lineage) - reused,
        len(training),
    )
    return len(lineage)
