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
import contextlib
import functools
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


def full_size_config(tiny: bool, architecture: str = "llava_next", processor=None):
    from transformers import CLIPVisionConfig, LlavaNextConfig, MistralConfig

    if architecture == "qwen2_5_vl":
        return qwen2_5_vl_7b_config(tiny, processor)
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


def qwen2_5_vl_7b_config(tiny: bool, processor):
    """Qwen/Qwen2.5-VL-7B-Instruct's configuration (8.29 B parameters), its token ids those of the
    tokenizer made here; ``tiny``: the demo's tiny Qwen2.5-VL."""
    from forensic_vlm.models.tiny import build_qwen2_5_vl, qwen2_5_vl_config

    if tiny:
        return build_qwen2_5_vl(DemoModelConfig(architecture="qwen2_5_vl"))[0].config
    text = {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
        "tie_word_embeddings": False,
        "pad_token_id": processor.tokenizer.pad_token_id,
        "eos_token_id": processor.tokenizer.eos_token_id,
    }
    vision = {
        "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
        "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu",
    }  # fmt: skip
    return qwen2_5_vl_config(processor.tokenizer, text, vision)


def write_random_model(folder: Path, processor, tiny: bool, architecture: str = "llava_next") -> int:
    from transformers import AutoModelForImageTextToText

    config = full_size_config(tiny, architecture, processor)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config).to(
            torch.bfloat16 if device == "cuda" else torch.float32
        )
    parameters = sum(p.numel() for p in model.parameters())
    (folder.parent / "parameters.json").write_text(json.dumps(parameters))
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    del model
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return parameters


#: The colour cast that makes an image's class visible in its content (``--check-model labelled``).
CLASS_TINTS = ((200, 40, 40), (40, 170, 60), (50, 80, 220), (200, 200, 200))


def phone_like(seed: int, size: tuple[int, int], tint: tuple[int, int, int] | None = None) -> Image.Image:
    """A noisy, bar-strewn picture of ``size``; with ``tint``, cast towards that colour, so that a
    classifier can tell the classes apart from the content as a trained model does."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (max(2, size[1] // 40), max(2, size[0] // 40), 3), dtype=np.uint8))
    image = small.resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(30):
        x, y = int(rng.integers(0, size[0] - 10)), int(rng.integers(0, size[1] - 10))
        draw.rectangle(
            (x, y, x + int(rng.integers(5, size[0] // 4)), y + 8), fill=tuple(int(v) for v in rng.integers(0, 256, 3))
        )
    return Image.blend(image, Image.new("RGB", size, tint), 0.4) if tint else image


def write_images(root: Path, count: int, sizes, seed: int, *, labelled: bool = False) -> Path:
    """Phone-like JPEGs in class folders and a split-style table of them; returns the table.
    ``labelled``: each image carries its class's colour cast (``CLASS_TINTS``).

    The images are the same for the same seed and count, so an existing table is reused (each step
    runs in a process of its own)."""
    kind = "_labelled" if labelled else ""
    table = root / f"table_{seed}_{count}{kind}.tsv"
    if table.exists():
        return table
    rows = []
    for i in range(count):
        spec = DEFAULT_CLASSES[i % 4]
        size = sizes[i % len(sizes)]
        path = root / "raw_data" / spec.folder / f"{seed}_{i:04d}{kind}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        phone_like(seed * 100_000 + i, size, CLASS_TINTS[spec.id] if labelled else None).save(path, quality=90)
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
    max_pixels: int | None = None,
    kernels: str = "none",
    fp8_scope: str = "decoder",
) -> dict:
    from forensic_vlm.evaluate import evaluate_split

    reset_peak()
    model = ModelConfig(
        name_or_path=str(model_dir),
        quantization=quantization,
        max_tiles=max_tiles,
        max_pixels=max_pixels,
        kernels=kernels,
        fp8_scope=fp8_scope,
    )
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
        "max_pixels": max_pixels,
        "kernels": metrics.get("kernels"),
        "compiled": metrics.get("compiled"),
        "fp8_scope": metrics.get("fp8_scope"),
        "eval_dir": f"eval_{name}",
    }


KERNEL_KINDS = (  # first match wins: cuDNN's attention kernels also carry "sm90" in their names
    ("attention", re.compile(r"flash|fmha|attention|sdpa|efficient_attention", re.I)),
    # cuBLAS's FP8 kernels: "qq" (two FP8 inputs) and "ovscale" (scaled output) in nvjet's names
    ("fp8 matrix products", re.compile(r"qqtst|e4m3|f8f8|ovscale", re.I)),
    ("nf4 dequantize", re.compile(r"dequant|kDequant|bnb", re.I)),
    # Inductor's kernels that end in an FP8 cast feed a _scaled_mm: the norm or activation before
    # the product with its quantization fused in (and, dynamic, the amax reduction)
    ("norms and activations with FP8 quantization fused", re.compile(r"scaled_mm|amax", re.I)),
    ("matrix products", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|matmul|sm90_", re.I)),
    ("copies", re.compile(r"memcpy|memset|copy", re.I)),
)


@contextlib.contextmanager
def vision_tower_time():
    """Inside: CUDA events around every forward pass of the vision tower and the projector (the
    outermost modules whose class names say so); yields a dict that gets ``vision_gpu_seconds``,
    the GPU time between those events, summed (None where no forward pass ran in this process)."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    marks = ("VisionModel", "VisionTransformer", "MultiModalProjector")
    pairs: list = []
    open_: list = []

    def vision(module) -> bool:
        return torch.cuda.is_available() and any(mark in type(module).__name__ for mark in marks)

    def before(module, args) -> None:
        if vision(module):
            if not open_:
                start = torch.cuda.Event(enable_timing=True)
                start.record()
                pairs.append([start, None])
            open_.append(module)

    def after(module, args, output) -> None:
        if vision(module) and open_:
            open_.pop()
            if not open_:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                pairs[-1][1] = end

    timing: dict = {}
    hooks = [register_module_forward_pre_hook(before), register_module_forward_hook(after)]
    try:
        yield timing
    finally:
        for hook in hooks:
            hook.remove()
        if pairs and torch.cuda.is_available():
            torch.cuda.synchronize()
            timing["vision_gpu_seconds"] = round(sum(a.elapsed_time(b) for a, b in pairs if b) / 1000, 3)
            timing["vision_forward_passes"] = len(pairs)
        else:
            timing["vision_gpu_seconds"] = None


@contextlib.contextmanager
def static_fp8_scales(calibration: Path, root: Path, model_dir: Path, images: int = 32):
    """Inside: scoring's FP8 conversion takes static activation scales, calibrated on the first
    ``images`` of ``calibration`` (images that are not evaluated) with the merged bf16 model just
    before it is converted. The scales are those rule parity_gate would calibrate on the
    validation split; this measures their speed and agreement before the rule ships them."""
    import forensic_vlm.scoring as scoring
    from forensic_vlm.batches import Collator, examples_from_table, model_inputs
    from forensic_vlm.decoding import class_probabilities, to_device
    from forensic_vlm.images import load_checked_image
    from forensic_vlm.kernels import fp8_activation_scales, to_fp8
    from forensic_vlm.modeling import load_processor
    from forensic_vlm.prompting import answer_tokens, build_prompt
    from forensic_vlm.tables import read_tsv

    examples = examples_from_table(read_tsv(calibration), root / "raw_data")[:images]
    processor = load_processor(model_dir)
    prompt = build_prompt(processor, REFERENCE_QUESTION)
    answer = answer_tokens(processor, REFERENCE_QUESTION, [0, 1, 2, 3])
    collate = Collator(processor, prompt, answer, labels=[0, 1, 2, 3], mode="score")
    timing = {}

    def calibrated(model, scope: str = "decoder") -> int:
        device = next(model.parameters()).device

        def run() -> None:
            for i in range(0, len(examples), 8):
                batch = collate([(j, load_checked_image(e.path, e.sha256)) for j, e in enumerate(examples[i : i + 8])])
                class_probabilities(model, to_device(model_inputs(batch), device, torch.bfloat16), answer.class_ids)

        # Kept for the later steps of the work dir (the profile), so that their traces hold the
        # FP8 scoring only, not the calibration's bf16 passes.
        saved = root / f"fp8_static_scales_{scope}_{images}.pt"
        if saved.exists():
            scales = {name: value.to(device) for name, value in torch.load(saved, weights_only=True).items()}
            timing["scales_from"] = saved.name
        else:
            started = time.perf_counter()
            scales = fp8_activation_scales(model, scope, run)
            timing["calibration_seconds"] = round(time.perf_counter() - started, 1)
            torch.save({name: value.cpu() for name, value in scales.items()}, saved)
        values = torch.stack([v.flatten() for v in scales.values()])
        timing["scales"] = {"layers": len(scales), "min": float(values.min()), "max": float(values.max())}
        return to_fp8(model, scope, scales)

    original = scoring.to_fp8
    scoring.to_fp8 = calibrated
    try:
        yield timing
    finally:
        scoring.to_fp8 = original


def static_fp8_evaluation(
    table: Path, calibration: Path, root: Path, model_dir: Path, *, workers: int, tuned: bool = False
) -> dict:
    """``tuned``: Inductor's coordinate-descent tuning of its own kernels' launch settings (the norms and
    casts, 7-10 ms an image in run 7's profile, several times their bytes' time at the card's bandwidth)."""
    if tuned:  # this step's own process: the setting reaches no other step
        import torch._inductor.config as inductor

        inductor.coordinate_descent_tuning = True
    with static_fp8_scales(calibration, root, model_dir) as timing:
        name = "fp8_static_tuned" if tuned else "fp8_static"
        result = project_evaluation(table, root, model_dir, name, quantization="fp8", workers=workers)
    return {
        **result,
        **timing,
        "fp8_activation": "static, per tensor, calibrated on 32 other images",
        "coordinate_descent_tuning": tuned,
    }


def profile_static_fp8(table: Path, calibration: Path, root: Path, model_dir: Path, *, workers: int) -> dict:
    """The static-FP8 scoring's profile, after an untraced warm-up scoring of the same images (which
    also calibrates the scales where ``project_fp8_static_scores`` did not keep them): the trace
    holds the FP8 scoring alone, neither the calibration's bf16 passes nor the compilation."""
    with static_fp8_scales(calibration, root, model_dir) as timing:
        result = profile_evaluation(table, root, model_dir, workers, quantization="fp8", kernels="none", warm_up=True)
    return {**result, **timing}


def profile_evaluation(
    table: Path,
    root: Path,
    model_dir: Path,
    workers: int,
    *,
    quantization: str = "none",
    kernels: str = "none",
    warm_up: bool = False,
) -> dict:
    """Where the scoring's GPU time goes: kernel time by kind, and how busy the GPU was.
    ``warm_up``: score the same images once untraced first, in this process, so that the trace holds
    no compilation: Inductor's autotuning runs its candidate kernels many times on their first call,
    and those runs would otherwise be counted as the scoring's own (the second scoring finds the
    compiled code and the tuning in the caches)."""
    from torch.profiler import ProfilerActivity, profile

    from forensic_vlm.evaluate import evaluate_split

    config = EvaluateConfig(batch_size=8, num_workers=workers, bootstrap_samples=10)
    model = ModelConfig(name_or_path=str(model_dir), quantization=quantization, kernels=kernels)
    out_dir = root / f"eval_profile_{quantization}_{kernels}"
    score = functools.partial(
        evaluate_split, table, root / "raw_data", classes=list(DEFAULT_CLASSES), model_config=model, config=config
    )
    warm = score(out_dir=out_dir.with_name(out_dir.name + "_warm_up")) if warm_up else None
    reset_peak()
    cuda = torch.cuda.is_available()
    with (
        profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as trace,
        vision_tower_time() as vision,
    ):
        metrics = score(out_dir=out_dir)
    busy, breakdown = kernel_breakdown(trace, cuda)
    images = metrics["n"]
    loading = sum(seconds for name, seconds in breakdown["top_kernels"] if "Pageable -> Device" in name)
    return {
        "images": images,
        "scoring_seconds": metrics["seconds"],
        "gpu_kernel_seconds": round(busy, 2),
        "gpu_busy_share_of_scoring": round(busy / metrics["seconds"], 3),
        **breakdown,
        **vision,
        # Per image, leaving out the weights' copy onto the card at loading (pageable host memory)
        "gpu_ms_per_image_after_loading": round((busy - loading) / images * 1000, 1),
        "gpu_ms_per_image_by_kind": {
            kind: round(seconds / images * 1000, 1) for kind, seconds in breakdown["kernel_seconds_by_kind"].items()
        },
        "vision_ms_per_image": None
        if vision["vision_gpu_seconds"] is None
        else round(vision["vision_gpu_seconds"] / images * 1000, 1),
        "peak_GiB": round(peak_gb(), 1),
        "warmed_up": warm is not None,
        "warm_up_images_per_s": None if warm is None else warm["images_per_second_after_first_batch"],
        "note": "profiled run (tracing slows it); images/s is from the unprofiled runs. The vision tower's "
        "and projector's GPU time is measured with CUDA events and its kernels are also in the kinds.",
    }


def kernel_breakdown(trace, cuda: bool) -> tuple[float, dict]:
    """A profiler trace's device time: the busy seconds, and the seconds by kernel kind and by kernel."""
    kernels: dict[str, float] = {}
    for event in trace.key_averages():
        microseconds = (event.self_device_time_total if cuda else event.self_cpu_time_total) or 0
        if microseconds > 0:
            kernels[event.key] = kernels.get(event.key, 0.0) + microseconds / 1e6
    by_kind: dict[str, float] = {}
    for name, seconds in kernels.items():
        kind = next((k for k, pattern in KERNEL_KINDS if pattern.search(name)), "element-wise and other")
        by_kind[kind] = by_kind.get(kind, 0.0) + seconds
    top = sorted(kernels.items(), key=lambda item: -item[1])[:15]
    return sum(kernels.values()), {
        "kernel_seconds_by_kind": {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda i: -i[1])},
        "top_kernels": [[name[:90], round(seconds, 3)] for name, seconds in top],
    }


def matmul_ceiling() -> dict:
    """8192^3 matrix products on random data, median of 20 timed with CUDA events: bf16 (the rate
    MFU is measured against) and FP8 e4m3 with per-tensor scales through ``torch._scaled_mm`` (the
    product FP8 scoring's decoder layers run), so that a scoring profile can be held against both."""
    if not torch.cuda.is_available():
        return {"TFLOP_per_s": None, "fp8_TFLOP_per_s": None, "peak_GiB": 0.0}
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    fp8 = torch.float8_e4m3fn
    # _scaled_mm wants the second operand column-major: the transpose of a row-major tensor.
    a8, b8 = a.to(fp8), b.to(fp8).t().contiguous().t()
    one = torch.ones((), device="cuda")
    rates = {}
    for key, product in (
        ("TFLOP_per_s", lambda: a @ b),
        ("fp8_TFLOP_per_s", lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)),
    ):
        for _ in range(3):
            product()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(20):
            start.record()
            product()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        rates[key] = round(2 * 8192**3 / float(np.median(times)) / 1e12, 1)
    return {**rates, "peak_GiB": round(peak_gb(), 1)}


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


def adapter_training(
    train_table: Path,
    val_table: Path,
    root: Path,
    model_dir: Path,
    *,
    name: str,
    workers: int,
    profiled: bool = False,
    **train,
) -> dict:
    """``train_adapter`` for one epoch (batch 1 unless ``train`` says otherwise) under the given
    ``train`` settings (the plan is ``auto`` unless they fix it); images/s per step, the peak beside
    the plan's estimate, every step's loss. ``profiled``: under the profiler, with the device time by kernel kind beside the
    wall time (where the step's time goes; its images/s is slowed by the tracing)."""
    from torch.profiler import ProfilerActivity, profile

    from forensic_vlm.train import load_training_data, train_adapter

    reset_peak()
    kernels = train.pop("kernels", "none")  # the shipped default; Liger has rows of its own
    data = load_training_data(train_table, val_table, root / "raw_data", None)
    config = TrainConfig(
        **{
            "epochs": 1,
            "batch_size": 1,
            "accumulate_grad_batches": 1,
            "num_workers": workers,
            "checkpoint_every_n_steps": 10_000,
            **train,
        }
    )
    cuda = torch.cuda.is_available()
    tracing = profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) if profiled else None
    start = time.perf_counter()
    with tracing or contextlib.nullcontext():
        metrics = train_adapter(
            data,
            list(DEFAULT_CLASSES),
            model_config=ModelConfig(name_or_path=str(model_dir), kernels=kernels),
            config=config,
            adapter_dir=root / f"adapter_{name}",
            work_dir=root / f"train_{name}",
        )
    seconds = time.perf_counter() - start
    curve = root / f"train_{name}" / "metrics.csv"
    profiled_time = {}
    if tracing is not None:
        busy, breakdown = kernel_breakdown(tracing, cuda)
        profiled_time = {"gpu_kernel_seconds_incl_load_and_val": round(busy, 2), **breakdown}
    return {
        "seconds_incl_load_and_val": round(seconds, 1),
        "train_images": len(data.train),
        "val_images": len(data.val),
        "peak_GiB": metrics["train_peak_memory_GiB"],
        "first_step_seconds": metrics["first_step_seconds"],  # holds the compilation under train.compile
        "peak_GiB_incl_loading": round(peak_gb(), 1),
        "plan": metrics["plan"],
        "kernels": metrics["kernels"],
        "precision": metrics["precision"],
        "images_per_s": _median_logged(curve, "train_images_per_s"),
        "step_losses": _logged_values(curve, "train_loss"),
        "step_images_per_s": _logged_values(curve, "train_images_per_s"),
        **profiled_time,
    }


def loss_curve_agreement(runs: dict, fast: str, reference: str) -> dict:
    """How far the fast plan's per-step losses are from the reference plan's, on the same images."""
    a, b = runs.get(fast, {}).get("step_losses"), runs.get(reference, {}).get("step_losses")
    if not a or not b or len(a) != len(b):
        return {"error": f"no comparable loss curves for {fast} and {reference}"}
    relative = [abs(x - y) / abs(y) for x, y in zip(a, b, strict=True)]
    return {
        "steps": len(a),
        "max_relative_difference": round(max(relative), 5),
        "mean_relative_difference": round(float(np.mean(relative)), 5),
        "first_loss": [round(a[0], 4), round(b[0], 4)],
        "last_loss": [round(a[-1], 4), round(b[-1], 4)],
    }


def prediction_agreement(root: Path, fast: str, reference: str) -> dict:
    """The parity gate's figures: same predicted class on >= 99 % of images, and the largest
    difference in any class probability <= 0.02, against bf16 eager on the same images."""
    from forensic_vlm.tables import read_tsv

    paths = [root / f"eval_{name}" / "predictions.tsv" for name in (fast, reference)]
    if not all(path.exists() for path in paths):
        return {"error": f"predictions missing for {fast} or {reference}"}
    ours, theirs = ({r["sha256"]: r for r in read_tsv(path)} for path in paths)
    columns = [c for c in next(iter(ours.values())) if re.fullmatch(r"p\d+", c)]
    same = [ours[k]["predicted"] == theirs[k]["predicted"] for k in theirs]
    differences = [abs(float(ours[k][c]) - float(theirs[k][c])) for k in theirs for c in columns]
    top = [max(float(theirs[k][c]) for c in columns) for k in theirs]
    agreement, largest = float(np.mean(same)), max(differences)
    return {
        "images": len(same),
        "same_class_share": round(agreement, 4),
        "largest_probability_difference": round(largest, 4),
        "mean_probability_difference": round(float(np.mean(differences)), 5),
        "reference_mean_top_probability": round(float(np.mean(top)), 3),
        "reference_classes_predicted": sorted({r["predicted"] for r in theirs.values()}),
        "passes_gate": agreement >= 0.99 and largest <= 0.02,
    }


def answer_position(model_dir: Path, examples: list, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image, the state lm_head reads at the answer position and the class probabilities,
    with the model loaded in ``dtype`` (float32 with TF32 products: the more precise yardstick)."""
    from transformers import AutoModelForImageTextToText

    from forensic_vlm.batches import Collator, model_inputs
    from forensic_vlm.decoding import class_probabilities, to_device
    from forensic_vlm.images import load_checked_image
    from forensic_vlm.modeling import load_processor
    from forensic_vlm.prompting import answer_tokens, build_prompt

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=dtype, device_map={"": device})
    model.eval()
    processor = load_processor(model_dir)
    prompt = build_prompt(processor, REFERENCE_QUESTION)
    answer = answer_tokens(processor, REFERENCE_QUESTION, [0, 1, 2, 3])
    collate = Collator(processor, prompt, answer, labels=[0, 1, 2, 3], mode="score")
    states: list[torch.Tensor] = []
    probabilities: list[torch.Tensor] = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: states.append(args[0][:, -1].double().cpu()))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == torch.float32
    try:
        with torch.no_grad():
            for i in range(0, len(examples), 4):
                batch = collate([(j, load_checked_image(e.path, e.sha256)) for j, e in enumerate(examples[i : i + 4])])
                inputs = to_device(model_inputs(batch), device, dtype)
                probabilities.append(class_probabilities(model, inputs, answer.class_ids).cpu())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        hook.remove()
    del model
    reset_peak()
    return torch.cat(states), torch.cat(probabilities)


def float32_reference(model_dir: Path, table: Path, root: Path) -> dict:
    """The evaluation's class probabilities computed in float32 (TF32 products), written as
    ``eval_fp32/predictions.tsv``: the yardstick that says whether an option is less accurate than
    bf16 eager or only different from it."""
    from forensic_vlm.batches import examples_from_table
    from forensic_vlm.tables import read_tsv

    reset_peak()
    examples = examples_from_table(read_tsv(table), root / "raw_data")
    start = time.perf_counter()
    _, probabilities = answer_position(model_dir, examples, torch.float32)
    seconds = time.perf_counter() - start
    rows = [
        {"sha256": e.sha256, "predicted": int(row.argmax()), **{f"p{k}": f"{v:.6f}" for k, v in enumerate(row)}}
        for e, row in zip(examples, probabilities.numpy(), strict=True)
    ]
    (root / "eval_fp32").mkdir(exist_ok=True)
    write_tsv(root / "eval_fp32" / "predictions.tsv", ["sha256", "predicted", "p0", "p1", "p2", "p3"], rows)
    return {"n": len(rows), "seconds_incl_load": round(seconds, 1), "reference_dir": "eval_fp32"}


def sharpen_class_logits(
    model_dir: Path, calibration: Path, root: Path, *, spread: float = 2.0, subspace: int = 32
) -> dict:
    """Give the random model answers that depend on the image and are far from uniform.

    A random model's answer-position state varies little between images, so its class
    probabilities are near-uniform and agree under any numerics. The four class rows of lm_head are
    set to directions in which that state differs between images, scaled so that each class logit
    varies with a standard deviation of ``spread``: the parity check then sees confident answers
    that differ between images, as a trained model's do.

    The directions are chosen on calibration images that are not evaluated, as those along which
    the images differ most *relative to how far bf16 rounding moves the state* (states computed in
    bf16 and in float32 with TF32 products). A trained model's answer does not hinge on rounding
    noise; directions picked by variance alone did (the first run of issue 14: bf16 with Liger
    agreed with bf16 on only 96 % of the images, which measured the noise, not the kernels).
    """
    from forensic_vlm.batches import examples_from_table
    from forensic_vlm.tables import read_tsv

    marker = model_dir.parent / "sharpened.json"
    if marker.exists():
        return json.loads(marker.read_text())
    examples = examples_from_table(read_tsv(calibration), root / "raw_data")
    rounded, _ = answer_position(model_dir, examples, torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    exact, _ = answer_position(model_dir, examples, torch.float32)
    mean = exact.mean(0)
    centred, noise = exact - mean, rounded - exact
    _, singular, basis = torch.linalg.svd(centred, full_matrices=False)
    basis = basis[:subspace]  # where the images differ at all (n - 1 directions at most)
    signal_cov = torch.diag(singular[:subspace] ** 2) / len(examples)
    projected_noise = noise @ basis.T
    noise_cov = projected_noise.T @ projected_noise / len(examples)
    noise_cov += torch.eye(subspace, dtype=noise_cov.dtype) * (1e-6 * noise_cov.trace() / subspace + 1e-30)
    # Largest signal-to-noise: the generalised eigenproblem S w = l N w, through N^-1/2.
    values, vectors = torch.linalg.eigh(noise_cov)
    whiten = vectors @ torch.diag(values.clamp_min(values.max() * 1e-12) ** -0.5) @ vectors.T
    ratios, chosen = torch.linalg.eigh(whiten @ signal_cov @ whiten)
    directions = (whiten @ chosen[:, -4:]).T @ basis  # the four best, back in the state's space
    unit_mean = mean / mean.norm()
    rows = directions - (directions @ unit_mean)[:, None] * unit_mean[None, :]
    rows = rows * (spread / (centred @ rows.T).std(0))[:, None]
    write_class_rows(model_dir, rows)
    logits = (exact @ rows.T).float()
    top = torch.softmax(logits, dim=-1).max(dim=-1).values
    facts = {
        "calibration_images": exact.shape[0],
        "class_logit_std": [round(v, 3) for v in logits.std(0).tolist()],
        # How far bf16 rounding moves each class logit, against the spread between images.
        "bf16_noise_std_of_class_logits": [round(v, 4) for v in (noise @ rows.T).std(0).tolist()],
        "signal_to_noise_variance_ratios": [round(v, 1) for v in ratios[-4:].tolist()],
        "mean_top_probability": round(float(top.mean()), 3),
        "classes_predicted": sorted(set(logits.argmax(-1).tolist())),
    }
    marker.write_text(json.dumps(facts))
    return facts


def write_class_rows(model_dir: Path, rows: torch.Tensor) -> None:
    """Overwrite the four class tokens' rows of lm_head in the model's safetensors with ``rows``."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from forensic_vlm.modeling import load_processor
    from forensic_vlm.prompting import answer_tokens

    def output_rows(path: Path) -> str | None:
        """The name of lm_head's weight in this file (the input embeddings' where they are tied)."""
        with safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys())
        # transformers may save it under its older name, language_model.lm_head.weight.
        heads = [n for n in names if n.split(".")[-2:] == ["lm_head", "weight"]]
        tied = [n for n in names if n.endswith("embed_tokens.weight") and "language_model" in n]
        return heads[0] if heads else (tied[0] if tied else None)

    found = [(path, output_rows(path)) for path in sorted(model_dir.glob("*.safetensors"))]
    lm_head = [(path, name) for path, name in found if name and name.endswith("lm_head.weight")]
    shard, name = (lm_head or [(p, n) for p, n in found if n])[0]
    tensors = load_file(str(shard))
    weight = tensors[name]
    processor = load_processor(model_dir)
    class_ids = answer_tokens(processor, REFERENCE_QUESTION, [0, 1, 2, 3]).class_ids
    weight[list(class_ids)] = rows.to(weight.dtype)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    # The model as scoring loads it must answer with these rows. Matching lm_head by its exact
    # name once wrote them into the input embeddings instead, unnoticed (transformers saved it as
    # language_model.lm_head.weight).
    from transformers import LlavaNextForConditionalGeneration

    loaded = LlavaNextForConditionalGeneration.from_pretrained(
        str(model_dir), dtype=weight.dtype, device_map={"": "cpu"}
    )
    if not torch.equal(loaded.lm_head.weight[list(class_ids)], rows.to(weight.dtype)):
        raise RuntimeError(f"{shard.name}:{name} was written, but the loaded model's lm_head does not hold the rows")
    del loaded
    gc.collect()


def fit_class_logits(model_dir: Path, calibration: Path, root: Path, *, confidence: float = 0.9) -> dict:
    """A check model that classifies by content, as a fine-tuned one does (``--check-model labelled``).

    The sharpened check model's class logits are projections of the state with no class structure,
    so its decision boundaries run through the middle of the images and many images sit on one:
    there, bf16 eager itself agreed with float32 on only 94.5 % of the images (issue 14, run 5).
    Here the calibration images carry their class's colour cast, and lm_head's class rows are the
    nearest-centroid rule on their answer-position states (float32, TF32 products); one factor
    scales the rows so that the calibration images' mean top probability is ``confidence``. The
    boundaries then fall between the classes, as a trained classifier's do. bf16 eager's accuracy
    on the evaluated images (drawn separately) says how well this check model classifies.
    """
    from forensic_vlm.batches import examples_from_table
    from forensic_vlm.tables import read_tsv

    marker = model_dir.parent / "check_model.json"
    if marker.exists():
        return json.loads(marker.read_text())
    examples = examples_from_table(read_tsv(calibration), root / "raw_data")
    labels = torch.tensor([e.label for e in examples])
    rounded, _ = answer_position(model_dir, examples, torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    exact, _ = answer_position(model_dir, examples, torch.float32)
    # Nearest class centroid, in the state with its shared direction (the mean over all images)
    # taken out. lm_head has no bias: the centroid rule's -|c_k|^2 / 2 rides on that shared
    # direction, whose projection is nearly the same for every image.
    shared = exact.mean(0) / exact.mean(0).norm()
    along = float((exact @ shared).mean())
    centroids = torch.stack([exact[labels == k].mean(0) for k in range(4)])
    centroids = centroids - (centroids @ shared)[:, None] * shared[None, :]
    bias = -0.5 * (centroids.pow(2).sum(1) - centroids.pow(2).sum(1).mean())
    rows = centroids - centroids.mean(0) + (bias / along)[:, None] * shared[None, :]
    scale_low, scale_high = 0.0, 1.0
    while torch.softmax(exact @ rows.T * scale_high, -1).max(-1).values.mean() < confidence:
        scale_high *= 2
        if scale_high > 1e12:
            raise RuntimeError("the calibration images' classes do not separate in the answer state")
    for _ in range(60):  # bisection: the mean top probability grows with the scale
        middle = (scale_low + scale_high) / 2
        low = torch.softmax(exact @ rows.T * middle, -1).max(-1).values.mean() < confidence
        scale_low, scale_high = (middle, scale_high) if low else (scale_low, middle)
    rows = rows * scale_high
    write_class_rows(model_dir, rows)
    logits = (exact @ rows.T).float()
    margins = logits.topk(2, dim=-1).values
    facts = {
        "check_model": "labelled",
        "calibration_images": exact.shape[0],
        "calibration_accuracy": round(float((logits.argmax(-1) == labels).float().mean()), 4),
        "mean_top_probability": round(float(torch.softmax(logits, -1).max(-1).values.mean()), 3),
        "median_top_two_logit_margin": round(float((margins[:, 0] - margins[:, 1]).median()), 3),
        # How far bf16 rounding moves each class logit, against the margins above.
        "bf16_noise_std_of_class_logits": [round(v, 4) for v in ((rounded - exact) @ rows.T).std(0).tolist()],
        "classes_predicted": sorted(set(logits.argmax(-1).tolist())),
    }
    marker.write_text(json.dumps(facts))
    return facts


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
                "model": {"name_or_path": str(model_dir), "quantization": "nf4", "kernels": "none"},
                "train": {
                    "quantization": "nf4",
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


def _logged_values(csv_path: Path, column: str) -> list[float]:
    import csv

    with open(csv_path) as handle:
        return [float(r[column]) for r in csv.DictReader(handle) if r.get(column)]


def _median_logged(csv_path: Path, column: str) -> float | None:
    """Median of a per-step value in the training log, leaving out the first two (warm-up) steps."""
    values = _logged_values(csv_path, column)
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
    parser.add_argument(
        "--architecture",
        choices=("llava_next", "qwen2_5_vl"),
        default="llava_next",
        help="the random model: LLaVA-1.6-Mistral-7B or Qwen2.5-VL-7B-Instruct (its own work folder's model)",
    )
    parser.add_argument(
        "--check-model",
        choices=("labelled", "sharpened"),
        default="labelled",
        help="how the check_model step gives the random model answers that matter: labelled (images carry "
        "their class's colour cast, lm_head's class rows classify them) or sharpened (class logits along the "
        "directions in which unlabelled images differ most; runs 1-5 of issue 14)",
    )
    parser.add_argument(
        "--same-process",
        action="store_true",
        help="run every step in this process (default: each step in a process of its own, so that no "
        "step's global settings, such as a library's patches or Inductor's configuration, reach the next)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from forensic_vlm.demo_model import build_processor
    from forensic_vlm.modeling import load_processor

    root, sizes = args.work_dir, (TINY_SIZES if args.tiny else FULL_SIZES)
    root.mkdir(parents=True, exist_ok=True)
    if args.processor:
        processor = load_processor(args.processor)
    elif args.architecture == "qwen2_5_vl":
        from forensic_vlm.models.tiny import qwen2_5_vl_processor

        # The checkpoint's own pixel budget (4 to 16,384 tokens an image); the tiny one's with --tiny.
        processor = qwen2_5_vl_processor(*((56 * 56, 224 * 224) if args.tiny else ()))
    else:
        processor = build_processor(DemoModelConfig(image_size=56 if args.tiny else 336))
    model_dir = root / "model"
    if not (model_dir / "config.json").exists():
        start = time.perf_counter()
        write_random_model(model_dir, processor, args.tiny, args.architecture)
        log.info("random model written in %.0f s", time.perf_counter() - start)
    parameters = (
        int(json.loads((root / "parameters.json").read_text())) if (root / "parameters.json").exists() else None
    )
    labelled = args.check_model == "labelled"
    other = root / ("sharpened.json" if labelled else "check_model.json")
    if other.exists():
        parser.error(f"{root} holds a model given the other check model ({other.name}); choose another --work-dir")
    eval_table = write_images(root, args.eval_images, sizes, seed=1, labelled=labelled)
    train_table = write_images(root, args.train_images, sizes, seed=2, labelled=labelled)
    val_table = write_images(root, 8, sizes, seed=3, labelled=labelled)
    calibration = lambda: write_images(root, 96, sizes, seed=5, labelled=labelled)  # noqa: E731

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

    def training(name: str, **train):
        return lambda: adapter_training(train_table, val_table, root, model_dir, name=name, workers=w, **train)

    steps = {
        "matmul_ceiling": matmul_ceiling,
        # First: every evaluation below, and the parity gate, use the check model's class rows.
        "check_model": lambda: (fit_class_logits if labelled else sharpen_class_logits)(model_dir, calibration(), root),
        "project_bf16_scores": evaluation("bf16"),  # eager, transformers' kernels: the parity reference
        "float32_reference": lambda: float32_reference(model_dir, eval_table, root),
        "reference": lambda: reference_evaluation(
            eval_table, root, model_dir, [(8, args.reference_images), (50, args.reference_images // 2)]
        ),
        "project_fp8_static_scores": lambda: static_fp8_evaluation(
            eval_table, calibration(), root, model_dir, workers=w
        ),
        "project_fp8_static_scores_tuned": lambda: static_fp8_evaluation(
            eval_table, calibration(), root, model_dir, workers=w, tuned=True
        ),
        "profile_fp8_static_scores": lambda: profile_static_fp8(
            write_images(root, 64, sizes, seed=4), calibration(), root, model_dir, workers=w
        ),
        "project_fp8_compiled_scores": evaluation("fp8", quantization="fp8"),
        "project_fp8_mlp_scores": evaluation("fp8_mlp", quantization="fp8", fp8_scope="mlp"),
        "project_fp8_inner_scores": evaluation("fp8_inner", quantization="fp8", fp8_scope="inner"),
        "project_bf16_liger_scores": evaluation("bf16_liger", kernels="liger"),
        "project_bf16_scores_batch16": evaluation("bf16_b16", batch=16),
        "project_bf16_scores_compile": evaluation("bf16_compile", compile=True),
        "project_bf16_scores_max_tiles2": evaluation("bf16_tiles2", max_tiles=2),
        # Qwen2.5-VL: at most 1,024 image tokens (802,816 pixels), the budget Qwen's card suggests for speed.
        "project_bf16_scores_max_pixels": evaluation("bf16_max_pixels", max_pixels=QWEN_FAST_PIXELS),
        "project_nf4_scores": evaluation("nf4", quantization="nf4"),
        "project_nf4_liger_scores": evaluation("nf4_liger", quantization="nf4", kernels="liger"),
        "profile_bf16_scores": lambda: profile_evaluation(write_images(root, 64, sizes, seed=4), root, model_dir, w),
        "profile_fp8_scores": lambda: profile_evaluation(
            write_images(root, 64, sizes, seed=4), root, model_dir, w, quantization="fp8", warm_up=True
        ),
        "project_bf16_scores_2gpus": evaluation("bf16_2gpus", devices=2) if gpus >= 2 else None,
        "train_auto": training("auto"),
        # The same steps on a bf16 base with every layer recomputing and transformers' kernels: the
        # loss curve the fast plan must follow.
        "train_reference_plan": training("reference", quantization="none", gradient_checkpointing=True),
        "train_16GiB_budget": training("budget16", memory_budget_gib=16.0),
        "train_auto_liger": training("auto_liger", kernels="liger"),
        "train_16GiB_budget_liger": training("budget16_liger", memory_budget_gib=16.0, kernels="liger"),
        # PEFT's prepare_model_for_kbit_training: the frozen bf16 weights in float32 (before run 6).
        "train_16GiB_budget_liger_upcast": training(
            "budget16_liger_upcast", memory_budget_gib=16.0, kernels="liger", upcast_frozen_weights=True
        ),
        # Issue 27: where the whole card's compiled step goes (GPU busy share, kernel kinds)
        "profile_train_auto_compiled": training("auto_compiled_profiled", compile=True, profiled=True),
        # Today's 16 GiB plan (every layer 4-bit) beside the planner's: bf16 layers as the budget allows
        "train_16GiB_nf4_compiled": training(
            "budget16_nf4_compiled", memory_budget_gib=16.0, quantization="nf4", compile=True
        ),
        "profile_train_16GiB_budget_liger": training(
            "budget16_liger_profiled", memory_budget_gib=16.0, kernels="liger", profiled=True
        ),
        "qlora_train_batch1_checkpointing": training("qlora", quantization="nf4", gradient_checkpointing=True),
        # Issue 27: the same plans with every decoder layer compiled for training (train.compile).
        "train_16GiB_budget_compiled": training("budget16_compiled", memory_budget_gib=16.0, compile=True),
        "qlora_train_batch1_checkpointing_compiled": training(
            "qlora_compiled", quantization="nf4", gradient_checkpointing=True, compile=True
        ),
        "train_auto_compiled": training("auto_compiled", compile=True),
        # Issue 27: the whole card at 4 images a step (token-grouped batches: no padding), the
        # per-step host work (optimizer, logging, the next batch) shared by 4 images; eager beside
        # it for the loss curve.
        "train_auto_batch4": training("auto_batch4", batch_size=4),
        "train_auto_batch4_compiled": training("auto_batch4_compiled", batch_size=4, compile=True),
        # Without LoRA dropout: whether a compiled run's random numbers are what separates it from eager.
        "train_16GiB_budget_no_dropout": training("budget16_no_dropout", memory_budget_gib=16.0, lora_dropout=0.0),
        "train_16GiB_budget_no_dropout_compiled": training(
            "budget16_no_dropout_compiled", memory_budget_gib=16.0, lora_dropout=0.0, compile=True
        ),
        "train_reference_plan_compiled": training(
            "reference_compiled", quantization="none", gradient_checkpointing=True, compile=True
        ),
        "qlora_train_cli_1gpu": lambda: cli_training(train_table, val_table, root, model_dir, workers=w, devices=1),
        "qlora_train_cli_ddp_2gpus": (
            lambda: cli_training(train_table, val_table, root, model_dir, workers=w, devices=2)
        )
        if gpus >= 2
        else None,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / args.json_name
    unknown = sorted(set(args.steps or ()) - set(steps))
    if unknown:
        parser.error(f"unknown steps: {' '.join(unknown)}")
    # In the order asked for: a device call cut short by its time limit has run the first ones.
    for name in args.steps if args.steps is not None else list(steps):
        step = steps[name]
        if step is None:
            continue
        log.info("step %s", name)
        try:
            outcome = step() if args.same_process or len(args.steps or ()) == 1 else _step_in_process(name, args)
        except Exception as error:  # one failing option must not cost the other figures of the run
            log.exception("step %s failed", name)
            outcome = {"error": f"{type(error).__name__}: {error}"[:500]}
        except KeyboardInterrupt:
            # `timeout -s INT` before the device call's own limit: the steps done so far are still
            # compared below (run 7 lost its parity figures to a call cut at its limit).
            log.warning("interrupted in step %s: comparing the steps done", name)
            result["interrupted_in_step"] = name
            break
        runs.update(outcome if name == "reference" and "error" not in outcome else {name: outcome})
        # Written after every step, so a run cut short by a time limit still reports what it did.
        out.write_text(json.dumps(result, indent=2) + "\n")
    processor_folder = args.processor or root / "processor"
    processor.save_pretrained(processor_folder) if not args.processor else None
    result["architecture"] = args.architecture
    _add_derived(result, sizes, processor_folder, args.architecture)
    _add_agreement(result, root)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    title = {"llava_next": "LLaVA-1.6-Mistral-7B", "qwen2_5_vl": "Qwen2.5-VL-7B-Instruct"}[args.architecture]
    print(f"\n{device} x{gpus}; random-weight {title} architecture")
    print("| run | images/s | tokens/s | MFU (datasheet / measured) | peak GiB | same class / max dp |")
    print("|---|---|---|---|---|---|")
    for name, run in runs.items():
        if "images_per_s" in run:
            mfu = f"{run.get('mfu_vs_989_TFLOPs', '')} / {run.get('mfu_vs_measured', '')}"
            gate = run.get("agreement_with_bf16_eager", {})
            parity = f"{gate.get('same_class_share', '')} / {gate.get('largest_probability_difference', '')}"
            print(
                f"| {name} | {run['images_per_s']} | {run.get('tokens_per_s', '')} | {mfu} | "
                f"{run.get('peak_GiB', '')} | {parity} |"
            )
    print("loss curves against the reference plan:", result.get("loss_curve_agreement"))
    print("compiled plans against the same plan eager:", result.get("compiled_against_eager"))


def _step_in_process(name: str, args: argparse.Namespace) -> dict:
    """Run one step by running this script again for it alone; its outcome from that run's JSON."""
    forwarded = [
        *("--out-dir", str(args.work_dir / "steps"), "--work-dir", str(args.work_dir)),
        *("--eval-images", str(args.eval_images), "--reference-images", str(args.reference_images)),
        *("--train-images", str(args.train_images), "--workers", str(args.workers)),
        *(("--processor", str(args.processor)) if args.processor else ()),
        *(("--tiny",) if args.tiny else ()),
        *("--check-model", args.check_model),
        *("--architecture", args.architecture),
        *("--steps", name, "--json-name", f"{name}.json"),
    ]
    done = subprocess.run([sys.executable, __file__, *forwarded], check=False)
    path = args.work_dir / "steps" / f"{name}.json"
    if done.returncode != 0 or not path.exists():
        return {"error": f"the step's process ended with exit code {done.returncode}"}
    runs = json.loads(path.read_text())["runs"]
    return runs if name == "reference" else runs.get(name, {"error": "the step wrote no result"})


QWEN_FAST_PIXELS = 1024 * 28 * 28

STEPS = (
    "matmul_ceiling",
    "check_model",
    "project_bf16_scores",
    "float32_reference",
    "reference",
    "project_bf16_liger_scores",
    "project_fp8_compiled_scores",
    "project_fp8_static_scores",
    "project_fp8_static_scores_tuned",
    "profile_fp8_static_scores",
    "project_fp8_mlp_scores",
    "project_fp8_inner_scores",
    "project_bf16_scores_batch16",
    "project_bf16_scores_compile",
    "project_bf16_scores_max_tiles2",
    "project_bf16_scores_max_pixels",
    "project_nf4_scores",
    "project_nf4_liger_scores",
    "profile_bf16_scores",
    "profile_fp8_scores",
    "project_bf16_scores_2gpus",
    "train_auto",
    "train_reference_plan",
    "train_16GiB_budget",
    "train_auto_liger",
    "train_16GiB_budget_liger",
    "train_16GiB_budget_liger_upcast",
    "profile_train_16GiB_budget_liger",
    "qlora_train_batch1_checkpointing",
    "train_16GiB_budget_compiled",
    "train_16GiB_nf4_compiled",
    "profile_train_auto_compiled",
    "qlora_train_batch1_checkpointing_compiled",
    "train_auto_compiled",
    "train_auto_batch4",
    "train_auto_batch4_compiled",
    "train_16GiB_budget_no_dropout",
    "train_16GiB_budget_no_dropout_compiled",
    "train_reference_plan_compiled",
    "qlora_train_cli_1gpu",
    "qlora_train_cli_ddp_2gpus",
)


def _add_agreement(result: dict, root: Path) -> None:
    """The parity figures of every evaluation against bf16 eager, and of the fast training plan's
    loss curve against the reference plan's."""
    runs = result["runs"]
    for run in runs.values():
        if run.get("eval_dir") and run["eval_dir"] != "eval_bf16" and "project_bf16_scores" in runs:
            run["agreement_with_bf16_eager"] = prediction_agreement(root, run["eval_dir"][5:], "bf16")
        if run.get("eval_dir") and "float32_reference" in runs and "error" not in runs["float32_reference"]:
            run["agreement_with_float32"] = prediction_agreement(root, run["eval_dir"][5:], "fp32")
    # A compiled plan against the same plan eager (issue 27: <= 1 % mean relative difference in bf16).
    for compiled in [name for name in runs if name.endswith("_compiled") and "error" not in runs[name]]:
        eager = compiled.removesuffix("_compiled")
        if eager in runs and "error" not in runs[eager]:
            result.setdefault("compiled_against_eager", {})[compiled] = loss_curve_agreement(runs, compiled, eager)
    if all(
        name in runs and "error" not in runs[name]
        for name in ("train_16GiB_budget_compiled", "train_16GiB_nf4_compiled")
    ):
        result["loss_curve_against_every_layer_nf4"] = loss_curve_agreement(
            runs, "train_16GiB_budget_compiled", "train_16GiB_nf4_compiled"
        )
    for fast in [name for name in runs if name.startswith("train_") and name != "train_reference_plan"]:
        if "train_reference_plan" in runs and "error" not in runs[fast]:
            result.setdefault("loss_curve_agreement", {})[fast] = loss_curve_agreement(
                runs, fast, "train_reference_plan"
            )


def _add_derived(result: dict, sizes, processor_source, architecture: str = "llava_next") -> None:
    """Tokens/s and model FLOP utilisation: 2 x parameters x tokens per forward pass, against the
    datasheet's dense bf16 rate and against the matrix product measured in this run."""
    from forensic_vlm.config import ModelConfig
    from forensic_vlm.modeling import load_processor
    from forensic_vlm.prompting import TokenCounter, answer_tokens, build_prompt

    measured = result["runs"].get("matmul_ceiling", {}).get("TFLOP_per_s")
    means = {}
    # LLaVA-NeXT's token count is capped by anyres tiles, Qwen's by a pixel budget.
    caps = {"max_tiles": (None, 2)} if architecture == "llava_next" else {"max_pixels": (None, QWEN_FAST_PIXELS)}
    ((setting, values),) = caps.items()
    for cap in values:
        model_config = ModelConfig(name_or_path=str(processor_source), **{setting: cap})
        processor = load_processor(processor_source, model_config)
        prompt = build_prompt(processor, REFERENCE_QUESTION)
        counter = TokenCounter(processor, prompt, answer_tokens(processor, REFERENCE_QUESTION, [0, 1, 2, 3]))
        means[cap] = float(np.mean([counter(*s) for s in sizes]))
    result["mean_tokens_per_image"] = {
        ("checkpoint's own" if cap is None else f"{setting} {cap}"): round(mean, 1) for cap, mean in means.items()
    }
    parameters = result["parameters"]
    for name, run in result["runs"].items():
        if name.startswith("project") and "images_per_s" in run and parameters:
            tokens = run["images_per_s"] * means[run.get(setting)]
            run["tokens_per_s"] = round(tokens)
            run["mfu_vs_989_TFLOPs"] = round(2 * parameters * tokens / (H100_BF16_DENSE_TFLOPS * 1e12), 3)
            if measured:
                run["mfu_vs_measured"] = round(2 * parameters * tokens / (measured * 1e12 * run.get("devices", 1)), 3)
            if run.get("devices", 1) > 1:
                run["mfu_vs_989_TFLOPs"] = round(run["mfu_vs_989_TFLOPs"] / run["devices"], 3)


if __name__ == "__main__":
    main()
