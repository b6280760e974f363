"""Shim for rules evaluate_zeroshot and evaluate_finetuned: forensic_vlm.evaluate.assemble_evaluation."""

from pathlib import Path

import _package  # noqa: F401  (this checkout's forensic_vlm, also in conda envs)

from forensic_vlm.config import EvaluateConfig, ModelConfig, build_classes, build_section
from forensic_vlm.evaluate import assemble_evaluation
from forensic_vlm.logs import setup_logging

setup_logging(snakemake.log[0])
assemble_evaluation(
    table=Path(snakemake.input.test),
    raw_data=Path(snakemake.params.raw_data),
    parts=[Path(part) for part in snakemake.input.parts],
    classes=list(build_classes(snakemake.params.classes)),
    model_config=build_section(ModelConfig, snakemake.params.model, "model"),
    config=build_section(EvaluateConfig, snakemake.params.evaluate, "evaluate"),
    out_dir=Path(snakemake.output.metrics).parent,
    # .keys(): `in` on Snakemake's input list looks among the file paths, not the names.
    adapter=Path(snakemake.input.adapter) if "adapter" in snakemake.input.keys() else None,  # noqa: SIM118
    cache_dir=Path(snakemake.params.cache),
    shard_cache_dirs=[Path(folder) for folder in snakemake.params.shard_caches],
)
