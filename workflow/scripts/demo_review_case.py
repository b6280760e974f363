"""Shim for rule demo_review_case: forensic_vlm.demo_data.generate_demo_review_case."""

from pathlib import Path

import _package  # noqa: F401  (this checkout's forensic_vlm, also in conda envs)

from forensic_vlm.config import DemoConfig, build_classes, build_section
from forensic_vlm.demo_data import generate_demo_review_case
from forensic_vlm.logs import setup_logging

setup_logging(snakemake.log[0])
generate_demo_review_case(
    out_dir=Path(snakemake.params.folder),
    listing=Path(snakemake.output.listing),
    classes=list(build_classes(snakemake.params.classes)),
    config=build_section(DemoConfig, snakemake.params.demo, "demo"),
    case=snakemake.wildcards.case,
    export=Path(snakemake.output.export),
    replace=True,  # the folder is this rule's own output under results/demo/review_cases
)
