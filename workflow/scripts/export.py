"""Shim for rule export: forensic_vlm.models.export.export_merged."""

from pathlib import Path

import _package  # noqa: F401  (this checkout's forensic_vlm, also in conda envs)

from forensic_vlm.config import EvaluateConfig, ModelConfig, build_classes, build_section
from forensic_vlm.logs import setup_logging
from forensic_vlm.modeling import use_threads
from forensic_vlm.models.export import export_merged
from forensic_vlm.tables import examples_from_table, read_tsv

setup_logging(snakemake.log[0])
use_threads(snakemake.threads)
export_merged(
    Path(snakemake.input.adapter),
    Path(snakemake.output.merged),
    examples=examples_from_table(read_tsv(Path(snakemake.input.test)), Path(snakemake.params.raw_data)),
    classes=list(build_classes(snakemake.params.classes)),
    model_config=build_section(ModelConfig, snakemake.params.model, "model"),
    evaluate_config=build_section(EvaluateConfig, snakemake.params.evaluate, "evaluate"),
)
