"""Shim for rule classify_shard: forensic_vlm.classify.score_shard."""

from pathlib import Path

import _package  # noqa: F401  (this checkout's forensic_vlm, also in conda envs)

from forensic_vlm.classify import score_shard
from forensic_vlm.config import EvaluateConfig, ModelConfig, build_classes, build_section
from forensic_vlm.logs import setup_logging

# Guarded: the processes that score on further devices start by importing this file
# (multiprocessing's spawn), and must not run the stage again.
if __name__ == "__main__":
    setup_logging(snakemake.log[0])
    score_shard(
        listing=Path(snakemake.input.listing),
        part=Path(snakemake.output.part),
        scatter_item=snakemake.wildcards.scatteritem,
        classes=list(build_classes(snakemake.params.classes)),
        model_config=build_section(ModelConfig, snakemake.params.model, "model"),
        evaluate_config=build_section(EvaluateConfig, snakemake.params.evaluate, "evaluate"),
        adapter=Path(snakemake.input.adapter) if snakemake.input.adapter else None,
        parity_gate=Path(snakemake.input.parity_gate) if snakemake.input.parity_gate else None,
        cache_dir=Path(snakemake.params.cache),
        shard_cache_dir=Path(snakemake.params.shard_cache),
        threads=snakemake.threads,
    )
