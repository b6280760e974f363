"""Shim for rule augment: forensic_vlm.augment.augment_training_set."""

from pathlib import Path

import _package  # noqa: F401  (this checkout's forensic_vlm, also in conda envs)

from forensic_vlm.augment import augment_training_set
from forensic_vlm.config import AugmentConfig, build_section
from forensic_vlm.logs import setup_logging

setup_logging(snakemake.log[0])
augment_training_set(
    train_tsv=Path(snakemake.input.train),
    raw_data=Path(snakemake.params.raw_data),
    out_dir=Path(snakemake.output.lineage).parent,
    config=build_section(AugmentConfig, snakemake.params.augment, "augment"),
    workers=snakemake.threads,
    cache_dir=Path(snakemake.params.cache),
)
