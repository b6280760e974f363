"""Shim for rule review_gain: forensic_vlm.review.gain.review_gain."""

from pathlib import Path

import _package  # noqa: F401  (this checkout's forensic_vlm, also in conda envs)

from forensic_vlm.config import EvaluateConfig, build_classes, build_section
from forensic_vlm.logs import setup_logging
from forensic_vlm.review.gain import review_gain

setup_logging(snakemake.log[0])
review_gain(
    summary=Path(snakemake.input.summary),
    test_table=Path(snakemake.input.test),
    before_dir=Path(snakemake.input.before).parent,
    after_dir=Path(snakemake.input.after).parent,
    classes=list(build_classes(snakemake.params.classes)),
    config=build_section(EvaluateConfig, snakemake.params.evaluate, "evaluate"),
    out=Path(snakemake.output.gain),
)
