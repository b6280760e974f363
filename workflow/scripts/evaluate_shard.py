"""Shim for rules evaluate_zeroshot_shard and evaluate_finetuned_shard: forensic_vlm.evaluate.score_split_shard."""

from pathlib import Path

import _package  # noqa: F401  (this checkout's forensic_vlm, also in conda envs)

from forensic_vlm.config import EvaluateConfig, ModelConfig, build_classes, build_section
from forensic_vlm.evaluate import score_split_shard
from forensic_vlm.logs import setup_logging

# Guarded: the processes that score on further devices start by importing this file
# (multiprocessing's spawn), and must not run the stage again.
if __name__ == "__main__":
    setup_logging(snakemake.log[0])
    score_split_shard(
        table=Path(snakemake.input.test),
        raw_data=Path(snakemake.params.raw_data),
        part=Path(snakemake.output.part),
        scatter_item=snakemake.wildcards.scatteritem,
        classes=list(build_classes(snakemake.params.classes)),
        model_config=build_section(ModelConfig, snakemake.params.model, "model"),
        config=build_section(EvaluateConfig, snakemake.params.evaluate, "evaluate"),
        # .keys(): `in` on Snakemake's input list looks among the file paths, not the names.
        adapter=Path(snakemake.input.adapter) if "adapter" in snakemake.input.keys() else None,  # noqa: SIM118
        parity_gate=Path(snakemake.input.parity_gate) if "parity_gate" in snakemake.input.keys() else None,  # noqa: SIM118
        cache_dir=Path(snakemake.params.cache),
        shard_cache_dir=Path(snakemake.params.shard_cache),
        threads=snakemake.threads,
    )
