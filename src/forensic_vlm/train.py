"""Stage ``train``: QLoRA fine-tuning with Lightning.

The reference's settings are the defaults (AdamW 1e-5, 5 epochs, batch 1 x 16 accumulation,
bf16-mixed on a GPU, clip 1.0, LoRA r=16 alpha=32 dropout 0.05 on the language model's
projections). Unlike the reference, the loss covers only the answer tokens, batches are grouped by
token count, and the best epoch is chosen by validation macro-F1. A run that stops part way
resumes from ``last.ckpt`` when started again with the same settings and data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader

from forensic_vlm.batches import (
    Collator,
    Example,
    ImageDataset,
    LabelledCollator,
    TokenGroupedBatches,
    examples_from_table,
)
from forensic_vlm.config import ClassSpec, ModelConfig, TrainConfig, to_dict
from forensic_vlm.errors import ResumeError
from forensic_vlm.faults import fault_point
from forensic_vlm.integrity import FolderState, model_files, write_listing
from forensic_vlm.kernels import apply_fused_kernels, fused_kernels_wanted
from forensic_vlm.lightning_module import (
    ClassifierModule,
    ResumableLoader,
    StepCheckpoint,
    TrainingPosition,
    review_thresholds,
)
from forensic_vlm.modeling import (
    add_lora,
    compile_decoder_layers,
    compute_dtype,
    device_name,
    load_base_model,
    load_processor,
    require_gpus,
    resolve_device,
    use_threads,
)
from forensic_vlm.models.architectures import architecture_of
from forensic_vlm.prompting import TokenCounter, answer_tokens, build_prompt, preflight
from forensic_vlm.provenance import package_versions
from forensic_vlm.tables import read_tsv, write_atomically
from forensic_vlm.thresholds import write_thresholds
from forensic_vlm.training_plan import ModelShape, TrainingPlan, choose_plan, memory_budget

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingData:
    train: list[Example]
    val: list[Example]
    manifest_sha256: str  # digest of the tables trained on, recorded in the model card
    reviews: list[dict] | None = None  # the decisions files whose labels were trained on (name, sha256)


def load_training_data(
    train_table: Path,
    val_table: Path,
    raw_data: Path,
    augment_dir: Path | None,
    *,
    reviews: Path | None = None,
    without_review: bool = False,
) -> TrainingData:
    """Examples of ``train_augmented.tsv`` (or a split's train.tsv) and ``val.tsv``.

    ``reviews``: results/review/reviews.json, the decisions files behind the table's reviewed rows,
    recorded in the model card. ``without_review``: leave out every row that came from a review
    (and its augmented children): the model before the reviewed labels, for the report.
    """
    train_bytes = Path(train_table).read_bytes()
    rows = read_tsv(Path(train_table))
    if without_review:
        rows = [r for r in rows if not r.get("case")]
        train_bytes += b"\nwithout the reviewed rows\n"
    digest = hashlib.sha256(train_bytes + Path(val_table).read_bytes()).hexdigest()
    trained_cases = {r["case"] for r in rows if r.get("case")}
    record = None
    if trained_cases:
        if reviews is None:
            raise ValueError(f"{train_table}: rows from reviewed cases, but no reviews.json names their decisions")
        summary = json.loads(Path(reviews).read_text(encoding="utf-8"))
        record = [
            {key: case[key] for key in ("case", "file", "sha256", "labels")}
            for case in summary["cases"]
            if case["case"] in trained_cases
        ]
    return TrainingData(
        train=examples_from_table(rows, raw_data, augment_dir),
        val=examples_from_table(read_tsv(Path(val_table)), raw_data),
        manifest_sha256=digest,
        reviews=record,
    )


def _loader(examples: list[Example], collator: Collator, *, sampler: TokenGroupedBatches, workers: int) -> DataLoader:
    return ResumableLoader(
        ImageDataset(examples),
        batch_sampler=sampler,
        collate_fn=LabelledCollator(collator, examples),
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        # Worker seeds from a generator of its own: the global one is part of the checkpoint.
        generator=torch.Generator().manual_seed(sampler.seed),
    )


def run_fingerprint(
    model: ModelConfig, train: TrainConfig, data: TrainingData, base: dict[str, str], *, resolved: dict
) -> str:
    """What a checkpoint may be resumed under: same settings (``resolved``: as the plan resolved
    them), data, model files and training code."""
    code = hashlib.sha256()
    for module in ("train", "lightning_module", "modeling", "batches", "prompting", "decoding", "kernels"):
        code.update((Path(__file__).parent / f"{module}.py").read_bytes())
    payload = json.dumps(
        {
            "model": to_dict(model),
            "train": to_dict(train),
            "resolved": resolved,
            "data": data.manifest_sha256,
            "base_model_files": base,
            "code": code.hexdigest(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class TrainingRun:
    """One training, set up: what ``fit`` runs and what ``finish`` needs afterwards."""

    module: ClassifierModule
    trainer: pl.Trainer
    train_loader: DataLoader
    val_loader: DataLoader
    best: ModelCheckpoint
    checkpoints: Path
    resume: bool
    work_dir: Path
    curves: Path  # Lightning's CSV of this run
    earlier_curves: list[dict[str, str]]  # the interrupted run's rows, when resuming
    device: torch.device
    precision: str
    scoring_collator: Collator
    val_tokens: list[int]
    base: FolderState  # the base model's files, hashed before loading
    plan: TrainingPlan  # base weights and recomputed layers, as resolved for this card
    fused_kernels: bool


def train_adapter(
    data: TrainingData,
    classes: list[ClassSpec],
    *,
    model_config: ModelConfig,
    config: TrainConfig,
    adapter_dir: Path,
    work_dir: Path,
    threads: int | None = None,
) -> dict:
    """Fine-tune, keep the best epoch by validation macro-F1, save the adapter; returns its metrics."""
    use_threads(threads)
    # Hashed in full (and verified against model.files_sha256 if set) before it is loaded.
    base = model_files(model_config.name_or_path, model_config.files_sha256)
    run = set_up(data, classes, model_config=model_config, config=config, work_dir=Path(work_dir), base=base)
    fit(run)
    base.check_unchanged()
    if run.trainer.global_rank != 0:
        return {"rank": run.trainer.global_rank}
    return finish(run, data, classes, model_config=model_config, config=config, adapter_dir=Path(adapter_dir))


def set_up(
    data: TrainingData,
    classes: list[ClassSpec],
    *,
    model_config: ModelConfig,
    config: TrainConfig,
    work_dir: Path,
    base: FolderState,
) -> TrainingRun:
    """Seed, decide whether to resume, load the model with LoRA, and build the loaders and trainer."""
    pl.seed_everything(config.seed, workers=True)
    checkpoints = work_dir / "checkpoints"
    model_config = replace(model_config, name_or_path=str(base.folder))  # load the files that were hashed
    # Under DDP, Lightning starts ranks 1..N-1 by running this same command again with LOCAL_RANK
    # set; they load the model on their own device and leave files to rank 0.
    rank = int(os.environ.get("LOCAL_RANK", "0")) if config.devices > 1 else 0
    device = _training_device(model_config, config, rank)

    processor = load_processor(model_config.name_or_path, model_config)
    prompt = build_prompt(processor, model_config.question)
    labels = [c.id for c in classes]
    answer = answer_tokens(processor, model_config.question, labels)
    counter = TokenCounter(processor, prompt, answer)
    limit = model_config.max_sequence_tokens
    train_tokens = preflight(counter, [(e.name, e.width, e.height) for e in data.train], limit)
    val_tokens = preflight(counter, [(e.name, e.width, e.height) for e in data.val], limit)
    log.info(
        "train: %d images (%d-%d tokens), val: %d images",
        len(data.train),
        min(train_tokens),
        max(train_tokens),
        len(data.val),
    )

    plan = _shared_plan(
        work_dir,
        rank,
        lambda: choose_plan(
            ModelShape.from_folder(base.folder, config),
            model=model_config,
            train=config,
            batch_tokens=max(train_tokens) * config.batch_size,
            budget_bytes=memory_budget(config, device),
        ),
    )
    fused = fused_kernels_wanted(model_config, device)
    log.info("train: plan: %s; kernels: %s", plan.reason, "Liger" if fused else "transformers")
    # The plan's quantization (which layers are 4-bit) and the kernels change the numbers, so a
    # checkpoint resumes only under the same ones; how many layers recompute does not.
    resolved = {"quantization": plan.quantization, "fused_kernels": fused}
    if plan.bf16_layers:  # absent otherwise: the fingerprints of earlier runs stay as they were
        resolved["bf16_layers"] = plan.bf16_layers
    fingerprint = run_fingerprint(model_config, config, data, base.hashes, resolved=resolved)
    resume = _resumable(checkpoints, fingerprint) if rank == 0 else (checkpoints / "last.ckpt").exists()
    model = load_base_model(replace(model_config, quantization=plan.quantization), device, bf16_layers=plan.bf16_layers)
    if fused:
        apply_fused_kernels(model)
    model = add_lora(model, config, quantized=plan.quantization == "nf4", checkpointed_layers=plan.checkpointed_layers)
    if config.compile:
        # After LoRA and checkpointing: the layers as they will run.
        compile_decoder_layers(model, training=True)
    module = ClassifierModule(model, answer, config, compute_dtype(device))
    shard = {"seed": config.seed, "rank": rank, "replicas": config.devices}
    scoring = Collator(processor, prompt, answer, labels=labels, mode="score")
    train_loader = _loader(
        data.train,
        Collator(processor, prompt, answer, labels=labels, mode="train"),
        sampler=TokenGroupedBatches(train_tokens, config.batch_size, shuffle=True, **shard),
        workers=config.num_workers,
    )
    val_loader = _loader(
        data.val,
        scoring,
        sampler=TokenGroupedBatches(val_tokens, config.batch_size, shuffle=False, **shard),
        workers=config.num_workers,
    )
    best = ModelCheckpoint(dirpath=checkpoints, filename="best", monitor="val_macro_f1", mode="max", save_top_k=1)
    precision = (
        config.precision if config.precision != "auto" else ("bf16-mixed" if device.type == "cuda" else "32-true")
    )
    trainer = _trainer(
        config,
        device=device,
        precision=precision,
        checkpoints=checkpoints,
        best=best,
        logs=CSVLogger(work_dir, name="logs", version=fingerprint, flush_logs_every_n_steps=1),
        steps_per_epoch=len(train_loader),
    )
    curves = work_dir / "logs" / fingerprint / "metrics.csv"
    if rank == 0:
        checkpoints.mkdir(parents=True, exist_ok=True)
        (checkpoints / "run.json").write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
    return TrainingRun(
        module=module,
        trainer=trainer,
        train_loader=train_loader,
        val_loader=val_loader,
        best=best,
        checkpoints=checkpoints,
        resume=resume,
        work_dir=work_dir,
        curves=curves,
        earlier_curves=_read_rows(curves) if resume else [],  # Lightning's CSV logger starts its file afresh
        device=device,
        precision=precision,
        scoring_collator=scoring,
        val_tokens=val_tokens,
        base=base,
        plan=plan,
        fused_kernels=fused,
    )


def fit(run: TrainingRun) -> None:
    """Train, from the interrupted run's last.ckpt when resuming."""
    last = str(run.checkpoints / "last.ckpt") if run.resume else None
    run.trainer.fit(run.module, run.train_loader, run.val_loader, ckpt_path=last)


def finish(
    run: TrainingRun,
    data: TrainingData,
    classes: list[ClassSpec],
    *,
    model_config: ModelConfig,
    config: TrainConfig,
    adapter_dir: Path,
) -> dict:
    """Keep the best epoch's weights; save the adapter, its review thresholds, the curves and the card."""
    joined = _join_curves(run.earlier_curves, _read_rows(run.curves))
    best_path = Path(run.best.best_model_path) if run.best.best_model_path else run.checkpoints / "best.ckpt"
    state = torch.load(best_path, map_location="cpu", weights_only=False)
    run.module.load_state_dict(state["state_dict"], strict=False)
    metrics = {
        "best_epoch": int(state["epoch"]),
        "global_step": int(run.trainer.global_step),
        "val_macro_f1": float(run.best.best_model_score) if run.best.best_model_score is not None else None,
        "val_accuracy": _logged(joined, "val_accuracy", int(state["epoch"])),
        "precision": run.precision,
        "devices": config.devices,
        "device": device_name(run.device),
        "train_peak_memory_GiB": run.module.peak_memory_gib,
        "first_step_seconds": run.module.first_step_seconds,
        "plan": run.plan.as_dict(),
        "kernels": "liger" if run.fused_kernels else "transformers",
        "compiled": config.compile,
    }
    # The base model's processor, uncapped: model.max_tiles is applied again wherever it is loaded.
    _save_adapter(run.module.model, load_processor(run.base.folder), adapter_dir)
    # On the whole validation set (under DDP this rank saw only its share) with the best weights.
    full_val = _loader(
        data.val,
        run.scoring_collator,
        sampler=TokenGroupedBatches(run.val_tokens, config.batch_size, shuffle=False, seed=config.seed),
        workers=0,
    )
    thresholds = review_thresholds(
        run.module,
        full_val,
        [c.id for c in classes],
        precision=config.review_precision,
        device=run.device,
        bf16=run.precision == "bf16-mixed",
    )
    write_thresholds(adapter_dir, thresholds)
    metrics["review_thresholds"] = {label: c["threshold"] for label, c in thresholds["classes"].items()}
    _write_curves(joined, run.work_dir / "metrics.csv")
    write_model_card(
        adapter_dir,
        model_config=model_config,
        config=config,
        classes=classes,
        data=data,
        metrics=metrics,
        base_files=run.base.hashes,
    )
    fault_point("train.finish")  # the adapter written, its listing not yet
    # Every other file of the adapter, for evaluate and classify to verify before use.
    write_listing(adapter_dir)
    # Finished: a later run (new settings, or forced) trains afresh. Until here a killed run
    # resumes from the final checkpoint and writes the adapter again.
    for finished in (run.checkpoints / "last.ckpt", run.checkpoints / "run.json"):
        finished.unlink(missing_ok=True)
    log.info(
        "train: best epoch %d, validation macro-F1 %.4f; adapter in %s",
        metrics["best_epoch"],
        metrics["val_macro_f1"] or 0,
        adapter_dir,
    )
    if metrics["first_step_seconds"] is not None:
        log.info(
            "train: the first step took %.1f s%s",
            metrics["first_step_seconds"],
            " (train.compile: the decoder layers' compilation is in it)" if config.compile else "",
        )
    return metrics


def _shared_plan(work_dir: Path, rank: int, choose) -> TrainingPlan:
    """Rank 0 chooses the plan and writes it down; the other DDP ranks, which Lightning starts
    later (after rank 0 has loaded its model), take the same one instead of measuring a card
    that may differ. Every rank must train the same model."""
    record = work_dir / "plan.json"
    if rank == 0:
        plan = choose()
        work_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(record, (json.dumps(plan.as_dict(), indent=2) + "\n").encode())
        return plan
    if not record.exists():
        raise ResumeError(f"train: rank {rank} found no plan from rank 0 at {record}")
    return TrainingPlan(**json.loads(record.read_text()))


def _training_device(model_config: ModelConfig, config: TrainConfig, rank: int) -> torch.device:
    """This rank's device; under DDP on the CPU the cores are shared between the ranks."""
    device = resolve_device(model_config)
    if device.type == "cpu" and config.devices > 1:
        torch.set_num_threads(max(1, torch.get_num_threads() // config.devices))
    if device.type == "cuda" and config.devices > 1:
        require_gpus(config.devices, "train.devices")
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    return device


def _trainer(
    config: TrainConfig,
    *,
    device: torch.device,
    precision: str,
    checkpoints: Path,
    best: ModelCheckpoint,
    logs: CSVLogger,
    steps_per_epoch: int,
) -> pl.Trainer:
    last = StepCheckpoint(
        dirpath=checkpoints, save_last=True, save_top_k=0, every_n_train_steps=config.checkpoint_every_n_steps
    )
    return pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=_trainer_devices(device, config.devices),
        strategy=_strategy(config.devices),
        max_epochs=config.epochs,
        accumulate_grad_batches=config.accumulate_grad_batches,
        gradient_clip_val=config.gradient_clip_val,
        precision=precision,
        callbacks=[best, last, TrainingPosition(), TQDMProgressBar(refresh_rate=max(1, steps_per_epoch // 20))],
        # Flushed every step, so the curves of a run that crashes survive to be joined on resume.
        logger=logs,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        enable_model_summary=False,
    )


def _trainer_devices(device: torch.device, count: int):
    if count > 1:
        return count  # GPUs 0..count-1, or count CPU processes
    return [device.index] if device.type == "cuda" else 1


def _strategy(count: int):
    """One process: Lightning's default. Several: DDP on this machine, whatever the scheduler.

    LightningEnvironment makes Lightning start the other ranks itself even inside a SLURM job of
    one task (SLURM's environment would expect srun to have started one task per device).
    """
    if count == 1:
        return "auto"
    from pytorch_lightning.plugins.environments import LightningEnvironment
    from pytorch_lightning.strategies import DDPStrategy

    return DDPStrategy(cluster_environment=LightningEnvironment(), find_unused_parameters=False)


def _resumable(checkpoints: Path, fingerprint: str) -> bool:
    """Resume only a run of the same settings and data; anything else starts afresh."""
    last, run = checkpoints / "last.ckpt", checkpoints / "run.json"
    if last.exists() and run.exists() and json.loads(run.read_text()).get("fingerprint") == fingerprint:
        log.info("train: resuming from %s", last)
        return True
    if checkpoints.exists():
        log.info("train: checkpoints in %s are from other settings or data; starting afresh", checkpoints)
        shutil.rmtree(checkpoints)
    return False


def _read_rows(csv_path: Path) -> list[dict[str, str]]:
    import csv

    if not Path(csv_path).exists():
        return []
    with open(csv_path, encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _join_curves(earlier: list[dict], later: list[dict]) -> list[dict]:
    """The curves of a resumed run: rows before the resume point, then the new rows."""
    resumed_at = min((int(r["step"]) for r in later), default=None)
    return [r for r in earlier if resumed_at is None or int(r["step"]) < resumed_at] + later


def _write_curves(rows: list[dict], out: Path) -> None:
    import csv

    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(out, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _logged(rows: list[dict[str, str]], column: str, epoch: int) -> float | None:
    values = [row[column] for row in rows if row.get(column) and int(row["epoch"]) == epoch]
    return float(values[-1]) if values else None


def _save_adapter(model, processor, adapter_dir: Path) -> None:
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    model.save_pretrained(adapter_dir, safe_serialization=True)
    processor.save_pretrained(adapter_dir)


def write_model_card(
    adapter_dir: Path,
    *,
    model_config: ModelConfig,
    config: TrainConfig,
    classes: list[ClassSpec],
    data: TrainingData,
    metrics: dict,
    base_files: dict[str, str],
) -> None:
    """``training.json`` (every setting, the data's and base model's hashes, the validation metrics)
    and a README."""
    versions = package_versions()
    card = {
        "base_model": model_config.name_or_path,
        "architecture": architecture_of(model_config.name_or_path).name,
        "base_model_files_sha256": base_files,
        "classes": [to_dict(c) for c in classes],
        "model": to_dict(model_config),
        "train": to_dict(config),
        "training_images": len(data.train),
        "validation_images": len(data.val),
        "data_sha256": data.manifest_sha256,
        # The examiners' decisions files this adapter learned from (none: raw_data only).
        "reviews": data.reviews or [],
        # A time is how this run went, not what the adapter is: the card stays the same on a rerun.
        "validation": {k: v for k, v in metrics.items() if k != "first_step_seconds"},
        "versions": versions,
    }
    (adapter_dir / "training.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    lines = [
        "# forensic-vlm adapter",
        "",
        f"LoRA adapter for `{model_config.name_or_path}` (trained on a {metrics['plan']['quantization']} base) "
        "that answers the fixed question",
        "with one class digit: " + ", ".join(f"{c.id} {c.ko} ({c.en})" for c in classes) + ".",
        "",
        f"- Validation macro-F1 {metrics['val_macro_f1']}, accuracy {metrics['val_accuracy']} "
        f"(best epoch {metrics['best_epoch']}, {len(data.val)} images, on {metrics['device']}).",
        f"- Trained on {len(data.train)} images; tables' sha256 {data.manifest_sha256}.",
        f"- LoRA r={config.lora_r}, alpha={config.lora_alpha}, dropout={config.lora_dropout} on "
        f"{', '.join(config.lora_target_modules)} of the language model; also trained: {', '.join(config.trainable) or 'nothing'}.",
        f"- AdamW lr {config.learning_rate}, {config.epochs} epochs, batch {config.batch_size} x {config.accumulate_grad_batches}, "
        f"{metrics['precision']}.",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "",
        "Load with `PeftModel.from_pretrained(base_model, this_folder)`; every setting is in `training.json`.",
    ]
    (adapter_dir / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
