"""Shim for rule classify: forensic_vlm.classify.classify_folder."""

from pathlib import Path

import _package  # noqa: F401  (this checkout's forensic_vlm, also in conda envs)

from forensic_vlm.classify import classify_folder
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

# Guarded: the processes that score on further devices start by importing this file
# (multiprocessing's spawn), and must not run the stage again.
if __name__ == "__main__":
    setup_logging(snakemake.log[0])
    classify_folder(
        input_dir=Path(snakemake.params.folder),
        out_dir=Path(snakemake.output.triage).parent,
        classes=list(build_classes(snakemake.params.classes)),
        model_config=build_section(ModelConfig, snakemake.params.model, "model"),
        evaluate_config=build_section(EvaluateConfig, snakemake.params.evaluate, "evaluate"),
        config=build_section(ClassifyConfig, snakemake.params.classify, "classify"),
        manifest_config=build_section(ManifestConfig, snakemake.params.manifest, "manifest"),
        report_config=build_section(ReportConfig, snakemake.params.report, "report"),
        adapter=Path(snakemake.input.adapter) if snakemake.input.adapter else None,
        cache_dir=Path(snakemake.params.cache),
        workers=snakemake.threads,
        threads=snakemake.threads,
    )
