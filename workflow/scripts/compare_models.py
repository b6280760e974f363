"""Shim for rule compare_models: forensic_vlm.models.comparison.compare_models."""

from pathlib import Path

import _package  # noqa: F401  (this checkout's forensic_vlm, also in conda envs)

from forensic_vlm.config import build_classes
from forensic_vlm.logs import setup_logging
from forensic_vlm.models.comparison import compare_models

setup_logging(snakemake.log[0])
compare_models(
    # results/models/<name>/train/adapter -> results/models/<name>
    runs={
        name: Path(adapter).parent.parent
        for name, adapter in zip(snakemake.params.names, snakemake.input.adapters, strict=True)
    },
    classes=list(build_classes(snakemake.params.classes)),
    out_json=Path(snakemake.output.comparison),
    out_table=Path(snakemake.output.table),
)
