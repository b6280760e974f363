"""Shim for rule review_labels: forensic_vlm.review.labels.build_review_labels."""

from pathlib import Path

import _package  # noqa: F401  (this checkout's forensic_vlm, also in conda envs)

from forensic_vlm.config import SplitConfig, build_classes, build_section
from forensic_vlm.logs import setup_logging
from forensic_vlm.review.labels import build_review_labels

setup_logging(snakemake.log[0])
build_review_labels(
    [Path(path) for path in snakemake.input.decisions],
    classify_dir=Path(snakemake.params.classify_dir),
    manifest=Path(snakemake.input.manifest),
    classes=list(build_classes(snakemake.params.classes)),
    split_config=build_section(SplitConfig, snakemake.params.split, "split"),
    test_cases=list(snakemake.params.test_cases),
    out_dir=Path(snakemake.output.labels).parent,
)
