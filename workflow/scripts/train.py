"""Shim for rule train: forensic_vlm.train.train_adapter."""

from pathlib import Path

import _package  # noqa: F401  (this checkout's forensic_vlm, also in conda envs)

from forensic_vlm.config import ModelConfig, TrainConfig, build_classes, build_section
from forensic_vlm.logs import setup_logging
from forensic_vlm.train import load_training_data, train_adapter

# Guarded like every script that starts processes: under DDP Lightning runs this file again
# for each further rank (as __main__), and spawn-started helpers import it (not as __main__).
if __name__ == "__main__":
    setup_logging(snakemake.log[0])
    adapter = Path(snakemake.output.adapter)
    train_adapter(
        data=load_training_data(
            train_table=Path(snakemake.input.train),
            val_table=Path(snakemake.input.val),
            raw_data=Path(snakemake.params.raw_data),
            augment_dir=Path(snakemake.input.augmented).parent,
            # With review.use_for_training: results/review/reviews.json, recorded in training.json.
            reviews=Path(snakemake.input.reviews) if snakemake.input.get("reviews") else None,
            without_review=bool(snakemake.params.get("without_review", False)),
        ),
        classes=list(build_classes(snakemake.params.classes)),
        model_config=build_section(ModelConfig, snakemake.params.model, "model"),
        config=build_section(TrainConfig, snakemake.params.train, "train"),
        adapter_dir=adapter,
        work_dir=adapter.parent,
        threads=snakemake.threads,
    )
