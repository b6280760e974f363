"""Shim for rule parity_gate: forensic_vlm.speed.gate.run_parity_gate."""

from pathlib import Path

import _package  # noqa: F401  (this checkout's forensic_vlm, also in conda envs)

from forensic_vlm.config import EvaluateConfig, ModelConfig, build_classes, build_section
from forensic_vlm.logs import setup_logging
from forensic_vlm.modeling import use_threads
from forensic_vlm.speed.gate import run_parity_gate

# Guarded: the processes that score on further devices start by importing this file
# (multiprocessing's spawn), and must not run the stage again.
if __name__ == "__main__":
    setup_logging(snakemake.log[0])
    use_threads(snakemake.threads)
    run_parity_gate(
        Path(snakemake.input.val),
        Path(snakemake.params.raw_data),
        Path(snakemake.output.verdict),
        classes=list(build_classes(snakemake.params.classes)),
        model_config=build_section(ModelConfig, snakemake.params.model, "model"),
        config=build_section(EvaluateConfig, snakemake.params.evaluate, "evaluate"),
        adapter=Path(snakemake.input.adapter),
        cache_dir=Path(snakemake.params.cache),
    )
