"""Benchmark (not a test): the full-size LLaVA-1.6-Mistral-7B architecture on one GPU.

Random weights (no hub here), the real Mistral tokenizer and the real model's image geometry
(CLIP ViT-L/14 at 336 px, anyres pinpoints). Saves the random model with ``save_pretrained`` and
then runs the project's own code on it through the same ``from_pretrained`` path as a real model:

1. ``evaluate_split`` (one forward pass, class probabilities, token-grouped batches) in bf16 and nf4;
2. the reference way of evaluating: nf4, batch 4, right padding, ``USER: ... ASSISTANT:`` prompt,
   ``generate`` with 8 and with 50 new tokens, for comparison in the same run;
3. ``train_adapter``: a QLoRA epoch at batch 1 with gradient checkpointing (nf4, bf16-mixed).

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
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
    text = MistralConfig(vocab_size=32064, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                         rope_theta=1_000_000.0, rms_norm_eps=1e-5, pad_token_id=32001, tie_word_embeddings=False)  # fmt: skip
    return LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=32000,
                           image_grid_pinpoints=grid_pinpoints(336), vision_feature_layer=-2,
                           vision_feature_select_strategy="default", tie_word_embeddings=False)  # fmt: skip


def write_random_model(folder: Path, processor, tiny: bool) -> int:
    from transformers import LlavaNextForConditionalGeneration

    config = full_size_config(tiny)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaNextForConditionalGeneration(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
    parameters = sum(p.numel() for p in model.parameters())
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
        draw.rectangle((x, y, x + int(rng.integers(5, size[0] // 4)), y + 8), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
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
        rows.append({"sha256": sha, "path": str(path.relative_to(root / "raw_data")), "label": spec.id,
                     "class_folder": spec.folder, "group": sha, "flags": "", "format": "JPEG",
                     "width": size[0], "height": size[1]})  # fmt: skip
    table = root / f"table_{seed}.tsv"
    write_tsv(table, SPLIT_COLUMNS, rows)
    return table


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def project_evaluation(table: Path, root: Path, model_dir: Path, quantization: str, batch: int, workers: int) -> dict:
    from forensic_vlm.evaluate import evaluate_split

    reset_peak()
    model = ModelConfig(name_or_path=str(model_dir), quantization=quantization)
    config = EvaluateConfig(batch_size=batch, num_workers=workers, bootstrap_samples=100)
    out = root / f"eval_{quantization}"
    metrics = evaluate_split(table, root / "raw_data", list(DEFAULT_CLASSES), model, config, out)
    return {"images_per_s": metrics["images_per_second_after_first_batch"],
            "images_per_s_whole_run": metrics["images_per_second"], "seconds": metrics["seconds"],
            "n": metrics["n"], "peak_GiB": round(peak_gb(), 1), "batch": batch}  # fmt: skip


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
                model.generate(**inputs, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                               pad_token_id=processor.tokenizer.pad_token_id)  # fmt: skip
            done += len(images)
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        seconds = time.perf_counter() - start
        results[f"reference_nf4_generate_{max_new}"] = {
            "images_per_s": round(done / seconds, 2), "seconds": round(seconds, 2), "n": done,
            "new_tokens": max_new, "peak_GiB": round(peak_gb(), 1), "batch": 4,
        }  # fmt: skip
    del model
    gc.collect()
    return results


def qlora_training(train_table: Path, val_table: Path, root: Path, model_dir: Path, workers: int) -> dict:
    from forensic_vlm.train import load_training_data, train_adapter

    reset_peak()
    data = load_training_data(train_table, val_table, root / "raw_data", None)
    config = TrainConfig(epochs=1, batch_size=1, accumulate_grad_batches=1, gradient_checkpointing=True,
                         num_workers=workers, checkpoint_every_n_steps=10_000)  # fmt: skip
    start = time.perf_counter()
    metrics = train_adapter(data, list(DEFAULT_CLASSES), ModelConfig(name_or_path=str(model_dir), quantization="nf4"),
                            config, root / "adapter", root / "train")  # fmt: skip
    seconds = time.perf_counter() - start
    return {"seconds_incl_load_and_val": round(seconds, 1), "train_images": len(data.train),
            "val_images": len(data.val), "peak_GiB": metrics["train_peak_memory_GiB"],
            "peak_GiB_incl_loading": round(peak_gb(), 1), "precision": metrics["precision"],
            "images_per_s": _median_logged(root / "train" / "metrics.csv", "train_images_per_s")}  # fmt: skip


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
    parser.add_argument("--eval-images", type=int, default=96)
    parser.add_argument("--reference-images", type=int, default=32)
    parser.add_argument("--train-images", type=int, default=24)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="the demo's tiny geometry, on the CPU")
    parser.add_argument("--skip", nargs="*", default=[], help="steps to leave out, by name")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from forensic_vlm.demo_model import build_processor

    root, sizes = args.work_dir, (TINY_SIZES if args.tiny else FULL_SIZES)
    root.mkdir(parents=True, exist_ok=True)
    from forensic_vlm.modeling import load_processor

    processor = load_processor(args.processor) if args.processor else build_processor(
        DemoModelConfig(image_size=56 if args.tiny else 336)
    )
    model_dir = root / "model"
    start = time.perf_counter()
    parameters = write_random_model(model_dir, processor, args.tiny)
    log.info("random model: %.2f B parameters written in %.0f s", parameters / 1e9, time.perf_counter() - start)
    eval_table = write_images(root, args.eval_images, sizes, seed=1)
    train_table = write_images(root, args.train_images, sizes, seed=2)
    val_table = write_images(root, 4, sizes, seed=3)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    result = {"device": device, "parameters": parameters, "image_sizes": [list(s) for s in sizes], "runs": {}}
    runs = result["runs"]
    steps = {
        "project_bf16_scores": lambda: project_evaluation(eval_table, root, model_dir, "none", 8, args.workers),
        "project_nf4_scores": lambda: project_evaluation(eval_table, root, model_dir, "nf4", 8, args.workers),
        "reference": lambda: reference_evaluation(
            eval_table, root, model_dir, [(8, args.reference_images), (50, args.reference_images // 2)]
        ),
        "qlora_train_batch1_checkpointing": lambda: qlora_training(train_table, val_table, root, model_dir, args.workers),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, step in steps.items():
        if name in args.skip:
            continue
        outcome = step()
        runs.update(outcome if name == "reference" else {name: outcome})
        # Written after every step, so a run cut short by a time limit still reports what it did.
        (args.out_dir / "gpu_full_scale.json").write_text(json.dumps(result, indent=2) + "\n")
    _add_derived(result, processor, sizes)
    (args.out_dir / "gpu_full_scale.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"\n{device}; random-weight LLaVA-1.6-Mistral-7B architecture ({parameters / 1e9:.2f} B parameters)")
    print("| run | images/s | peak GiB |\n|---|---|---|")
    for name, run in runs.items():
        print(f"| {name} | {run.get('images_per_s', '')} | {run['peak_GiB']} |")


def _add_derived(result: dict, processor, sizes) -> None:
    """Tokens/s and model FLOP utilisation (2 x parameters x tokens per forward pass)."""
    from forensic_vlm.prompting import TokenCounter, answer_tokens, build_prompt

    prompt = build_prompt(processor, REFERENCE_QUESTION)
    counter = TokenCounter(processor, prompt, answer_tokens(processor.tokenizer, prompt, [0, 1, 2, 3]))
    mean_tokens = float(np.mean([counter(*s) for s in sizes]))
    result["mean_tokens_per_image"] = round(mean_tokens, 1)
    for name, run in result["runs"].items():
        if name.startswith("project") and "images_per_s" in run:
            tokens = run["images_per_s"] * mean_tokens
            run["tokens_per_s"] = round(tokens)
            run["mfu_vs_989_TFLOPs"] = round(2 * result["parameters"] * tokens / (H100_BF16_DENSE_TFLOPS * 1e12), 3)


if __name__ == "__main__":
    main()
