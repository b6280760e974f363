"""Shim for rule manifest: forensic_vlm.manifest.build_manifest."""

from pathlib import Path

import _package  # noqa: F401  (this checkout's forensic_vlm, also in conda envs)

from forensic_vlm.config import ManifestConfig, build_classes, build_section
from forensic_vlm.logs import setup_logging
from forensic_vlm.manifest import build_manifest

setup_logging(snakemake.log[0])
build_manifest(
    raw_data=Path(snakemake.params.raw_data),
    out_dir=Path(snakemake.output.manifest).parent,
    classes=build_classes(snakemake.params.classes),
    config=build_section(ManifestConfig, snakemake.params.manifest, "manifest"),
    workers=snakemake.threads,
)
