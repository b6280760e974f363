"""Shim for rule report: forensic_vlm.report.build_report."""

from pathlib import Path

import _package  # noqa: F401  (this checkout's forensic_vlm, also in conda envs)

from forensic_vlm.config import ReportConfig, build_classes, build_section
from forensic_vlm.logs import setup_logging
from forensic_vlm.report import ReportInputs, build_report

setup_logging(snakemake.log[0])
build_report(
    inputs=ReportInputs(
        manifest=Path(snakemake.input.manifest),
        rejects=Path(snakemake.input.rejects),
        split_summary=Path(snakemake.input.split_summary),
        lineage=Path(snakemake.input.lineage),
        curves=Path(snakemake.input.curves),
        training_card=Path(snakemake.input.adapter) / "training.json",
        evaluations={
            "zeroshot": Path(snakemake.input.zeroshot).parent,
            "finetuned": Path(snakemake.input.finetuned).parent,
        },
        raw_data=Path(snakemake.params.raw_data),
        config=dict(snakemake.params.config),
        # A list of one file when base models are compared, else empty.
        comparison=next((Path(path) for path in snakemake.input.comparison), None),
        test_table=Path(snakemake.input.test),
        review_gain=next((Path(path) for path in snakemake.input.review_gain), None),
    ),
    classes=list(build_classes(snakemake.params.classes)),
    config=build_section(ReportConfig, snakemake.params.report, "report"),
    out_dir=Path(snakemake.output.page).parent,
)
