"""Shim for rule classify_listing: forensic_vlm.classify.classify_listing (a folder or a container)."""

from pathlib import Path

import _package  # noqa: F401  (this checkout's forensic_vlm, also in conda envs)

from forensic_vlm.classify import classify_listing
from forensic_vlm.config import ClassifyConfig, ManifestConfig, build_section
from forensic_vlm.logs import setup_logging

setup_logging(snakemake.log[0])
classify_listing(
    input_dir=Path(snakemake.params.source),
    listing=Path(snakemake.output.listing),
    manifest_config=build_section(ManifestConfig, snakemake.params.manifest, "manifest"),
    workers=snakemake.threads,
    config=build_section(ClassifyConfig, snakemake.params.classify, "classify"),
)
