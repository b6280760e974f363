"""Benchmark (not a test): the full-size LLaVA-1.6-Mistral-7B architecture on one GPU.

Random weights (no hub here), the real Mistral tokenizer and the real model's image geometry
(CLIP ViT-L/14 at 336 px, anyres pinpoints). Saves the random model with ``save_pretrained`` and
then runs the project's own code on it through the same ``from_pretrained`` path as a real model:

1. ``evaluate_split`` (one forward pass, class probabilities, token-grouped batches) in bf16 and nf4,
   and its speed options: batch 16, ``evaluate.compile``, ``model.max_tiles: 2``, and
   ``evaluate.devices: 2`` where two GPUs are visible; a profile of where the bf16 run's GPU time goes;
2. the reference way of evaluating: nf4, batch 4, right padding, ``USER: ... ASSISTANT:`` prompt,
   ``generate`` with 8 and with 50 new tokens, for comparison in the same run;
3. ``train_adapter``: a QLoRA epoch at batch 1 with gradient checkpointing (nf4, bf16-mixed), and
   the same through ``forensic-vlm train`` with ``train.devices`` 1 and 2 (DDP) where two GPUs are
   visible;
4. the card's own ceiling: an 8192^3 bf16 matrix product, the yardstick for model FLOP utilisation.

Steps can be chosen with ``--steps`` (a device command may run 10 minutes at most); the random
model is written once per work folder and reused.

Images are phone-like: 1080x1920 portrait screenshots, 1920x1080 and 1280x960 photos, 800x800
squares, JPEG. Prints a table and writes JSON. ``--tiny`` runs the same steps with the demo's
tiny geometry on the CPU, to check the script without a GPU.

    python benchmarks/gpu_full_scale.py --out-dir "$OUT" --processor .bench/processor
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from forensic_vlm.config import (
    DEFAULT_CLASSES,
    REFERENCE_QUESTION,
    DemoModelConfig,
    EvaluateConfig,
    ModelConfig,
    TrainConfig,
)
from forensic_vlm.demo_model import grid_pinpoints
from forensic_vlm.split import SPLIT_COLUMNS
from forensic_vlm.tables import sha256_file, write_tsv

log = logging.getLogger("benchmark")
FULL_SIZES = ((1080, 1920), (1920, 1080), (1280, 960), (800, 800))
TINY_SIZES = ((108, 192), (192, 108), (128, 96), (80, 80))
H100_BF16_DENSE_TFLOPS = 989.0  # vendor datasheet, SXM, dense


def full_size_config(tiny: bool):
    from transformers import CLIPVisionConfig, LlavaNextConfig, MistralConfig

    if tiny:
        from forensic_vlm.demo_model import build_model

        return build_model(DemoModelConfig(), vocab_size=32064).config
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    text = MistralConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-5,
        pad_token_id=32001,
        tie_word_embeddings=False,
    )
    return LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=32000,
        image_grid_pinpoints=grid_pinpoints(336),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def write_random_model(folder: Path, processor, tiny: bool) -> int:
    from transformers import LlavaNextForConditionalGeneration

    config = full_size_config(tiny)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaNextForConditionalGeneration(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
    parameters = sum(p.numel() for p in model.parameters())
    (folder.parent / "parameters.json").write_text(json.dumps(parameters))
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    del model
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return parameters


def phone_like(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (max(2, size[1] // 40), max(2, size[0] // 40), 3), dtype=np.uint8))
    image = small.resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(30):
        x, y = int(rng.integers(0, size[0] - 10)), int(rng.integers(0, size[1] - 10))
        draw.rectangle(
            (x, y, x + int(rng.integers(5, size[0] // 4)), y + 8), fill=tuple(int(v) for v in rng.integers(0, 256, 3))
        )
    return image


def write_images(root: Path, count: int, sizes, seed: int) -> Path:
    """Phone-like JPEGs in class folders and a split-style table of them; returns the table."""
    rows = []
    for i in range(count):
        spec = DEFAULT_CLASSES[i % 4]
        size = sizes[i % len(sizes)]
        path = root / "raw_data" / spec.folder / f"{seed}_{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        phone_like(seed * 100_000 + i, size).save(path, quality=90)
        sha = sha256_file(path)
        rows.append(
            {
                "sha256": sha,
                "path": str(path.relative_to(root / "raw_data")),
                "label": spec.id,
                "class_folder": spec.folder,
                "group": sha,
                "flags": "",
                "format": "JPEG",
                "width": size[0],
                "height": size[1],
            }
        )
    table = root / f"table_{seed}.tsv"
    write_tsv(table, SPLIT_COLUMNS, rows)
    return table


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def reset_peak() -> None:
    gc.collect()  # the last step's model, or its peak would be counted again
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def project_evaluation(
    table: Path,
    root: Path,
    model_dir: Path,
    name: str,
    *,
    quantization: str = "none",
    batch: int = 8,
    workers: int = 8,
    devices: int = 1,
    compile: bool = False,
    max_tiles: int | None = None,
) -> dict:
    from forensic_vlm.evaluate import evaluate_split

    reset_peak()
    model = ModelConfig(name_or_path=str(model_dir), quantization=quantization, max_tiles=max_tiles)
    config = EvaluateConfig(
        batch_size=batch, num_workers=workers, bootstrap_samples=100, devices=devices, compile=compile
    )
    metrics = evaluate_split(
        table,
        root / "raw_data",
        classes=list(DEFAULT_CLASSES),
        model_config=model,
        config=config,
        out_dir=root / f"eval_{name}",
    )
    return {
        "images_per_s": metrics["images_per_second_after_first_batch"],
        "images_per_s_whole_run": metrics["images_per_second"],
        "seconds": metrics["seconds"],
        # Several devices: the scoring processes' memory is not visible from here.
        "n": metrics["n"],
        "peak_GiB": round(peak_gb(), 1) if devices == 1 else None,
        "batch": batch,
        "quantization": quantization,
        "devices": devices,
        "compile": compile,
        "max_tiles": max_tiles,
    }


KERNEL_KINDS = (  # first match wins: cuDNN's attention kernels also carry "sm90" in their names
    ("attention", re.compile(r"flash|fmha|attention|sdpa|efficient_attention", re.I)),
    ("matrix products", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|matmul|sm90_", re.I)),
    ("nf4 dequantize", re.compile(r"dequant|kDequant|bnb", re.I)),
    ("copies", re.compile(r"memcpy|memset|copy", re.I)),
)


def profile_evaluation(table: Path, root: Path, model_dir: Path, workers: int) -> dict:
    """Where the bf16 scoring's GPU time goes: kernel time by kind, and how busy the GPU was."""
    from torch.profiler import ProfilerActivity, profile

    from forensic_vlm.evaluate import evaluate_split

    config = EvaluateConfig(batch_size=8, num_workers=workers, bootstrap_samples=10)
    model = ModelConfig(name_or_path=str(model_dir), quantization="none")
    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as trace:
        metrics = evaluate_split(
            table,
            root / "raw_data",
            classes=list(DEFAULT_CLASSES),
            model_config=model,
            config=config,
            out_dir=root / "eval_profile",
        )
    kernels: dict[str, float] = {}
    for event in trace.key_averages():
        microseconds = (event.self_device_time_total if cuda else event.self_cpu_time_total) or 0
        if microseconds > 0:
            kernels[event.key] = kernels.get(event.key, 0.0) + microseconds / 1e6
    by_kind: dict[str, float] = {}
    for name, seconds in kernels.items():
        kind = next((k for k, pattern in KERNEL_KINDS if pattern.search(name)), "element-wise and other")
        by_kind[kind] = by_kind.get(kind, 0.0) + seconds
    busy = sum(kernels.values())
    top = sorted(kernels.items(), key=lambda item: -item[1])[:12]
    return {
        "images": metrics["n"],
        "scoring_seconds": metrics["seconds"],
        "gpu_kernel_seconds": round(busy, 2),
        "gpu_busy_share_of_scoring": round(busy / metrics["seconds"], 3),
        "kernel_seconds_by_kind": {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda i: -i[1])},
        "top_kernels": [[name[:90], round(seconds, 3)] for name, seconds in top],
        "peak_GiB": round(peak_gb(), 1),
        "note": "profiled run (tracing slows it); images/s is from the unprofiled runs",
    }


def matmul_ceiling() -> dict:
    """bf16 8192^3 matrix products on random data: the rate MFU is also measured against."""
    if not torch.cuda.is_available():
        return {"TFLOP_per_s": None, "peak_GiB": 0.0}
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return {"TFLOP_per_s": round(2 * 8192**3 / float(np.median(times)) / 1e12, 1), "peak_GiB": round(peak_gb(), 1)}


def reference_evaluation(table: Path, root: Path, model_dir: Path, plan: list[tuple[int, int]]) -> dict:
    """The reference's evaluation loop, re-created: nf4, batch 4, right padding, generate.

    ``plan``: (new tokens, images) pairs, run on one loaded model.
    """
    from forensic_vlm.modeling import load_base_model, load_processor, resolve_device
    from forensic_vlm.tables import read_tsv

    reset_peak()
    config = ModelConfig(name_or_path=str(model_dir), quantization="nf4")
    device = resolve_device(config)
    model = load_base_model(config, device).eval()
    processor = load_processor(model_dir)
    processor.tokenizer.padding_side = "right"  # the reference's choice (wrong for generation)
    prompt = f"USER: <image>\n{REFERENCE_QUESTION}\nASSISTANT:"
    results = {}
    for max_new, limit in plan:
        rows = read_tsv(table)[:limit]
        start, done = time.perf_counter(), 0
        for i in range(0, len(rows), 4):
            images = [Image.open(root / "raw_data" / r["path"]).convert("RGB") for r in rows[i : i + 4]]
            inputs = processor(text=[prompt] * len(images), images=images, padding=True, return_tensors="pt").to(device)
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            with torch.no_grad():
                model.generate(
                    **inputs,
                    max_new_tokens=max_new,
                    min_new_tokens=max_new,
                    do_sample=False,
                    pad_token_id=processor.tokenizer.pad_token_id,
                )
            done += len(images)
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        seconds = time.perf_counter() - start
        results[f"reference_nf4_generate_{max_new}"] = {
            "images_per_s": round(done / seconds, 2),
            "seconds": round(seconds, 2),
            "n": done,
            "new_tokens": max_new,
            "peak_GiB": round(peak_gb(), 1),
            "batch": 4,
        }
    del model
    gc.collect()
    return results


def qlora_training(train_table: Path, val_table: Path, root: Path, model_dir: Path, *, workers: int) -> dict:
    from forensic_vlm.train import load_training_data, train_adapter

    reset_peak()
    data = load_training_data(train_table, val_table, root / "raw_data", None)
    config = TrainConfig(
        epochs=1,
        batch_size=1,
        accumulate_grad_batches=1,
        gradient_checkpointing=True,
        num_workers=workers,
        checkpoint_every_n_steps=10_000,
    )
    start = time.perf_counter()
    metrics = train_adapter(
        data,
        list(DEFAULT_CLASSES),
        model_config=ModelConfig(name_or_path=str(model_dir), quantization="nf4"),
        config=config,
        adapter_dir=root / "adapter",
        work_dir=root / "train",
    )
    seconds = time.perf_counter() - start
    return {
        "seconds_incl_load_and_val": round(seconds, 1),
        "train_images": len(data.train),
        "val_images": len(data.val),
        "peak_GiB": metrics["train_peak_memory_GiB"],
        "peak_GiB_incl_loading": round(peak_gb(), 1),
        "precision": metrics["precision"],
        "images_per_s": _median_logged(root / "train" / "metrics.csv", "train_images_per_s"),
    }


def cli_training(
    train_table: Path, val_table: Path, root: Path, model_dir: Path, *, workers: int, devices: int
) -> dict:
    """``forensic-vlm train`` with ``train.devices`` (DDP when > 1): Lightning reruns the command per rank."""
    import yaml

    folder = root / f"train_cli_{devices}"
    config = folder / "config.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(model_dir), "quantization": "nf4"},
                "train": {
                    "epochs": 1,
                    "batch_size": 1,
                    "accumulate_grad_batches": 1,
                    "gradient_checkpointing": True,
                    "num_workers": workers,
                    "devices": devices,
                    "checkpoint_every_n_steps": 10_000,
                },
            }
        )
    )
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "forensic_vlm",
            "--config",
            str(config),
            "--log",
            str(folder / "train.log"),
            "train",
            str(train_table),
            str(val_table),
            "--raw-data",
            str(root / "raw_data"),
            "--adapter",
            str(folder / "adapter"),
        ],
        check=True,
    )
    seconds = time.perf_counter() - start
    card = json.loads((folder / "adapter" / "training.json").read_text())
    return {
        "devices": devices,
        "seconds_incl_load_and_val": round(seconds, 1),
        "train_images": card["training_images"],
        "optimizer_steps": card["validation"]["global_step"],
        "peak_GiB": card["validation"]["train_peak_memory_GiB"],
        "images_per_s": _median_logged(folder / "metrics.csv", "train_images_per_s"),
    }


def _median_logged(csv_path: Path, column: str) -> float | None:
    """Median of a per-step value in the training log, leaving out the first two (warm-up) steps."""
    import csv

    with open(csv_path) as handle:
        values = [float(r[column]) for r in csv.DictReader(handle) if r.get(column)]
    return round(float(np.median(values[2:] or values)), 3) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/forensic_vlm_bench"))
    parser.add_argument("--processor", type=Path, default=None, help="prebuilt full-size processor folder")
    parser.add_argument("--eval-images", type=int, default=256)
    parser.add_argument("--reference-images", type=int, default=24)
    parser.add_argument("--train-images", type=int, default=32)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--tiny", action="store_true", help="the demo's tiny geometry, on the CPU")
    parser.add_argument("--steps", nargs="*", default=None, help=f"steps to run (default: all): {' '.join(STEPS)}")
    parser.add_argument("--json-name", default="gpu_full_scale.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from forensic_vlm.demo_model import build_processor
    from forensic_vlm.modeling import load_processor

    root, sizes = args.work_dir, (TINY_SIZES if args.tiny else FULL_SIZES)
    root.mkdir(parents=True, exist_ok=True)
    processor = (
        load_processor(args.processor)
        if args.processor
        else build_processor(DemoModelConfig(image_size=56 if args.tiny else 336))
    )
    model_dir = root / "model"
    if not (model_dir / "config.json").exists():
        start = time.perf_counter()
        write_random_model(model_dir, processor, args.tiny)
        log.info("random model written in %.0f s", time.perf_counter() - start)
    parameters = (
        int(json.loads((root / "parameters.json").read_text())) if (root / "parameters.json").exists() else None
    )
    eval_table = write_images(root, args.eval_images, sizes, seed=1)
    train_table = write_images(root, args.train_images, sizes, seed=2)
    val_table = write_images(root, 8, sizes, seed=3)

    gpus = torch.cuda.device_count()
    device = torch.cuda.get_device_name() if gpus else "CPU"
    result = {
        "device": device,
        "gpus_visible": gpus,
        "parameters": parameters,
        "image_sizes": [list(s) for s in sizes],
        "runs": {},
    }
    runs, w = result["runs"], args.workers

    def evaluation(name: str, **options):
        return lambda: project_evaluation(eval_table, root, model_dir, name, workers=w, **options)

    steps = {
        "matmul_ceiling": matmul_ceiling,
        "project_bf16_scores": evaluation("bf16"),
        "project_bf16_scores_batch16": evaluation("bf16_b16", batch=16),
        "project_bf16_scores_compile": evaluation("bf16_compile", compile=True),
        "project_bf16_scores_max_tiles2": evaluation("bf16_tiles2", max_tiles=2),
        "project_nf4_scores": evaluation("nf4", quantization="nf4"),
        "profile_bf16_scores": lambda: profile_evaluation(write_images(root, 64, sizes, seed=4), root, model_dir, w),
        "project_bf16_scores_2gpus": evaluation("bf16_2gpus", devices=2) if gpus >= 2 else None,
        "reference": lambda: reference_evaluation(
            eval_table, root, model_dir, [(8, args.reference_images), (50, args.reference_images // 2)]
        ),
        "qlora_train_batch1_checkpointing": lambda: qlora_training(train_table, val_table, root, model_dir, workers=w),
        "qlora_train_cli_1gpu": lambda: cli_training(train_table, val_table, root, model_dir, workers=w, devices=1),
        "qlora_train_cli_ddp_2gpus": (
            lambda: cli_training(train_table, val_table, root, model_dir, workers=w, devices=2)
        )
        if gpus >= 2
        else None,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / args.json_name
    for name, step in steps.items():
        if step is None or (args.steps is not None and name not in args.steps):
            continue
        log.info("step %s", name)
        try:
            outcome = step()
        except Exception as error:  # one failing option must not cost the other figures of the run
            log.exception("step %s failed", name)
            outcome = {"error": f"{type(error).__name__}: {error}"[:500]}
        runs.update(outcome if name == "reference" and "error" not in outcome else {name: outcome})
        # Written after every step, so a run cut short by a time limit still reports what it did.
        out.write_text(json.dumps(result, indent=2) + "\n")
    processor_folder = args.processor or root / "processor"
    processor.save_pretrained(processor_folder) if not args.processor else None
    _add_derived(result, sizes, processor_folder)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"\n{device} x{gpus}; random-weight LLaVA-1.6-Mistral-7B architecture")
    print("| run | images/s | tokens/s | MFU (datasheet / measured) | peak GiB |\n|---|---|---|---|---|")
    for name, run in runs.items():
        if "images_per_s" in run:
            mfu = f"{run.get('mfu_vs_989_TFLOPs', '')} / {run.get('mfu_vs_measured', '')}"
            print(
                f"| {name} | {run['images_per_s']} | {run.get('tokens_per_s', '')} | {mfu} | {run.get('peak_GiB', '')} |"
            )


STEPS = (
    "matmul_ceiling",
    "project_bf16_scores",
    "project_bf16_scores_batch16",
    "project_bf16_scores_compile",
    "project_bf16_scores_max_tiles2",
    "project_nf4_scores",
    "profile_bf16_scores",
    "project_bf16_scores_2gpus",
    "reference",
    "qlora_train_batch1_checkpointing",
    "qlora_train_cli_1gpu",
    "qlora_train_cli_ddp_2gpus",
)


def _add_derived(result: dict, sizes, processor_source) -> None:
    """Tokens/s and model FLOP utilisation: 2 x parameters x tokens per forward pass, against the
    datasheet's dense bf16 rate and against the matrix product measured in this run."""
    from forensic_vlm.modeling import load_processor
    from forensic_vlm.prompting import TokenCounter, answer_tokens, build_prompt

    measured = result["runs"].get("matmul_ceiling", {}).get("TFLOP_per_s")
    means = {}
    for cap in (None, 2):
        processor = load_processor(processor_source, cap)
        prompt = build_prompt(processor, REFERENCE_QUESTION)
        counter = TokenCounter(processor, prompt, answer_tokens(processor.tokenizer, prompt, [0, 1, 2, 3]))
        means[cap] = float(np.mean([counter(*s) for s in sizes]))
    result["mean_tokens_per_image"] = {"all tiles": round(means[None], 1), "max_tiles 2": round(means[2], 1)}
    parameters = result["parameters"]
    for name, run in result["runs"].items():
        if name.startswith("project") and "images_per_s" in run and parameters:
            tokens = run["images_per_s"] * means[run.get("max_tiles")]
            run["tokens_per_s"] = round(tokens)
            run["mfu_vs_989_TFLOPs"] = round(2 * parameters * tokens / (H100_BF16_DENSE_TFLOPS * 1e12), 3)
            if measured:
                run["mfu_vs_measured"] = round(2 * parameters * tokens / (measured * 1e12 * run.get("devices", 1)), 3)
            if run.get("devices", 1) > 1:
                run["mfu_vs_989_TFLOPs"] = round(run["mfu_vs_989_TFLOPs"] / run["devices"], 3)


if __name__ == "__main__":
    main()
