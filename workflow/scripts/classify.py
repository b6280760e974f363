"""Shim for rule classify: forensic_vlm.classify.assemble_shards."""

from pathlib import Path

import _package  # noqa: F401  (this checkout's forensic_vlm, also in conda envs)

from forensic_vlm.classify import assemble_shards
from forensic_vlm.config import (
    ClassifyConfig,
    EvaluateConfig,
    ManifestConfig,
    ModelConfig,
    ReportConfig,
    build_classes,
    build_section,
)
from forensic_vlm.logs import setup_logging

setup_logging(snakemake.log[0])
assemble_shards(
    listing=Path(snakemake.input.listing),
    parts=[Path(part) for part in snakemake.input.parts],
    out_dir=Path(snakemake.output.triage).parent,
    classes=list(build_classes(snakemake.params.classes)),
    model_config=build_section(ModelConfig, snakemake.params.model, "model"),
    evaluate_config=build_section(EvaluateConfig, snakemake.params.evaluate, "evaluate"),
    config=build_section(ClassifyConfig, snakemake.params.classify, "classify"),
    manifest_config=build_section(ManifestConfig, snakemake.params.manifest, "manifest"),
    report_config=build_section(ReportConfig, snakemake.params.report, "report"),
    adapter=Path(snakemake.input.adapter) if snakemake.input.adapter else None,
    cache_dir=Path(snakemake.params.cache),
    shard_cache_dirs=[Path(folder) for folder in snakemake.params.shard_caches],
)
