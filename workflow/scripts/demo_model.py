"""Shim for rule demo_model: forensic_vlm.demo_model.build_demo_model."""

from pathlib import Path

import _package  # noqa: F401  (this checkout's forensic_vlm, also in conda envs)

from forensic_vlm.config import DemoModelConfig, build_section
from forensic_vlm.demo_model import build_demo_model
from forensic_vlm.logs import setup_logging

setup_logging(snakemake.log[0])
build_demo_model(
    out_dir=Path(snakemake.output[0]),
    config=build_section(DemoModelConfig, snakemake.params.demo_model, "demo_model"),
)
