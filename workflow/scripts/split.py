"""Shim for rule split: forensic_vlm.split.split_dataset."""

from pathlib import Path

import _package  # noqa: F401  (this checkout's forensic_vlm, also in conda envs)

from forensic_vlm.config import SplitConfig, build_classes, build_section
from forensic_vlm.logs import setup_logging
from forensic_vlm.split import split_dataset

setup_logging(snakemake.log[0])
split_dataset(
    manifest=Path(snakemake.input.manifest),
    out_dir=Path(snakemake.output.summary).parent,
    classes=build_classes(snakemake.params.classes),
    config=build_section(SplitConfig, snakemake.params.split, "split"),
    # results/review/labels.tsv with review.use_for_training, else nothing.
    reviewed=Path(snakemake.input.reviewed) if snakemake.input.reviewed else None,
)
