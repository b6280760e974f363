"""Loading a base VLM: nf4 or full weights, the right dtype per device, LoRA on the language model.

Any architecture of ``models.architectures`` loads through ``AutoModelForImageTextToText``; what
differs between them (module names, token caps) comes from that table. Weights are read from
safetensors only and no remote code is run. bitsandbytes is imported only when nf4 is asked for,
so full-precision CPU use never needs it.
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

import torch

from forensic_vlm.config import ModelConfig, TrainConfig
from forensic_vlm.errors import DeviceError, UnsupportedModelError
from forensic_vlm.models.architectures import Architecture, architecture_of, by_model_type, language_model
from forensic_vlm.models.processors import capped_pinpoints, load_processor
from forensic_vlm.training_plan import decoder_projection, tensor_sizes

__all__ = ["load_processor"]  # re-exported: loading a model and its processor go together

log = logging.getLogger(__name__)


def use_threads(threads: int | None) -> int:
    """Let torch use ``threads`` CPU threads (the rule's ``threads``), at most the CPUs this process
    may run on; None keeps torch's choice. Returns the count set.

    Snakemake hands a rule its declared ``threads`` even where ``--cores`` is smaller (the demo asks
    for 8 on a 2-core machine). More OpenMP threads than CPUs only wait on each other: scoring the
    demo's 48 images four times took 13.7 s with 8 threads and 7.7 s with 2 on the 2-core CPU, with
    the same probabilities.
    """
    if threads:
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if threads > available:
            log.info("%d threads asked for, %d CPUs available: using %d", threads, available, available)
        torch.set_num_threads(min(threads, available))
    return torch.get_num_threads()


def resolve_device(config: ModelConfig) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DeviceError("model.device is cuda but no CUDA GPU is visible")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def require_gpus(count: int, setting: str) -> None:
    """Stop, naming the setting, when it asks for more GPUs than are visible."""
    if count > torch.cuda.device_count():
        raise DeviceError(f"{setting} is {count} but {torch.cuda.device_count()} GPUs are visible")


def device_name(device: torch.device) -> str:
    """What a reported figure was measured on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def compute_dtype(device: torch.device) -> torch.dtype:
    # bf16 on the CPUs we measured runs several times slower than float32.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def architecture_of_model(model) -> Architecture:
    """The architecture of a loaded model (a PEFT model too), from its config."""
    return by_model_type(model.config.model_type, type(model).__name__)


def load_base_model(config: ModelConfig, device: torch.device, *, bf16_layers: int = 0):
    """The base model on ``device``; with nf4, the first ``bf16_layers`` decoder layers keep their
    weights in bf16 (a training plan that had the memory for them, and scoring its adapter)."""
    from transformers import AutoModelForImageTextToText

    architecture = architecture_of(config.name_or_path)
    dtype = compute_dtype(device)
    kwargs = {
        "dtype": dtype,
        "attn_implementation": config.attn_implementation,
        "use_safetensors": True,
        "trust_remote_code": False,
    }
    if config.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=architecture.not_quantized
            + kept_in_bf16(config.name_or_path, architecture, bf16_layers),
        )
    # Straight onto the device: no full copy in host memory first (seconds per GB, per process).
    kwargs["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}
    model = AutoModelForImageTextToText.from_pretrained(config.name_or_path, **kwargs)
    if architecture.resolution == "anyres":
        tile = model.config.vision_config.image_size
        model.config.image_grid_pinpoints = capped_pinpoints(model.config.image_grid_pinpoints, tile, config.max_tiles)
    if config.quantization == "nf4":
        check_four_bit_layers(model, architecture, bf16_layers)
    log.info(
        "loaded %s (%s, %s%s, %s) on %s",
        config.name_or_path,
        architecture.name,
        config.quantization,
        f", the first {bf16_layers} decoder layers bf16" if bf16_layers and config.quantization == "nf4" else "",
        dtype,
        device,
    )
    return model


def kept_in_bf16(folder: str, architecture: Architecture, bf16_layers: int) -> list[str]:
    """The full names of the first ``bf16_layers`` decoder layers' projections, for bitsandbytes'
    skip list. Full names, not a layer's prefix: transformers matches the list as regular
    expressions, where "layers.1." also matches "layers.10"."""
    if not bf16_layers:
        return []
    names: set[str] = set()
    for name, _count in tensor_sizes(folder):
        projection = decoder_projection(name, architecture.vision_modules)
        if projection is not None and projection[0] < bf16_layers:
            names.add(f"model.{architecture.language_model}.layers.{projection[0]}.{projection[1]}")
    return sorted(names)


def check_four_bit_layers(model, architecture: Architecture, bf16_layers: int) -> None:
    """Every decoder projection is 4-bit except those of the first ``bf16_layers`` layers, or a
    named error: a transformers that matched the skip list otherwise would train another model."""
    for index, layer in enumerate(language_model(model, architecture).layers):
        for name, module in layer.named_modules():
            weight = getattr(module, "weight", None)
            if weight is None or not name.endswith("proj"):
                continue
            four_bit = type(weight).__name__ == "Params4bit"
            if four_bit != (index >= bf16_layers):
                raise UnsupportedModelError(
                    f"decoder layer {index}'s {name} loaded {'in 4 bits' if four_bit else 'unquantized'}, but the "
                    f"plan keeps the first {bf16_layers} layers in bf16 and quantizes the rest "
                    f"(transformers' skip list was matched otherwise)"
                )


def add_lora(model, config: TrainConfig, *, quantized: bool, checkpointed_layers: int):
    """LoRA on the language model; the first ``checkpointed_layers`` decoder layers recompute their
    activations in the backward pass (``training_plan`` chooses how many)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    checkpointing = checkpointed_layers > 0
    if quantized and config.upcast_frozen_weights:
        # Every frozen weight outside the 4-bit layers goes to float32, and with the embeddings the
        # whole residual stream: more memory and slower element-wise work (docs/performance.md).
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if checkpointing:
        model.enable_input_require_grads()
        set_checkpointed_layers(model, checkpointed_layers)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=architecture_of_model(model).lora_target_pattern(config.lora_target_modules),
        modules_to_save=list(config.trainable) or None,
        bias="none",
    )
    model = get_peft_model(model, lora)
    _vision_tower_without_autograd(model)
    # from_pretrained returns eval mode and Lightning keeps the modes it finds: without this,
    # gradient checkpointing and LoRA dropout (both active only in train mode) would be silently off.
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("trainable parameters: %.2f M of %.1f M", trainable / 1e6, total / 1e6)
    return model


def _vision_tower_without_autograd(model) -> None:
    """Run the frozen vision tower (and projector) under ``no_grad``: nothing of them is kept for
    the backward pass (nor recomputed), whatever hooks or checkpointing would make autograd record."""
    architecture = architecture_of_model(model)
    for name in architecture.vision_modules:
        module = getattr(model.get_base_model().model, name)
        if any(p.requires_grad for p in module.parameters()):
            continue  # something in it is trained (train.trainable): it needs its graph
        module.forward = torch.no_grad()(module.forward)


def decoder_layers(model) -> list:
    """The language model's decoder layers, in order (under PEFT's wrappers too)."""
    return list(language_model(model, architecture_of_model(model)).layers)


#: Inductor's options for layers compiled for training: eager's numbers, not merely close ones.
#: ``emulate_precision_casts``: round to bf16 wherever eager does. Without it Inductor keeps float32
#: between the operations it fuses (norms, rotary, residual adds), the small LoRA contributions
#: that eager rounds away survive, and on one H200 the compiled run's losses fell 2 % (4 layers) to
#: 15 % (32 layers) below eager's within 32 steps: another training, not a faster one; emulated,
#: 0.1 % (docs/performance.md, issue 27). ``fallback_random``: eager's generator, so LoRA dropout
#: draws the same masks and a compiled run can follow an eager one and resume exactly.
TRAINING_COMPILE_OPTIONS = {"emulate_precision_casts": True, "fallback_random": True}


def compile_decoder_layers(model, *, training: bool = False) -> int:
    """torch.compile every decoder layer of the language model in place; returns how many.

    All layers share one compiled graph (parameters are graph inputs); the sequence length is
    dynamic, so new token counts do not recompile. ``training``: with eager's numerics
    (``TRAINING_COMPILE_OPTIONS``); the checkpointed layers replay the same compiled graph.
    """
    layers = decoder_layers(model)
    for module in model.modules():
        # bitsandbytes' CPU inference path repacks a 4-bit weight in place on its first no-grad
        # call (Linear4bit.forward, AVX512-BF16 machines); traced, the shared graph then meets
        # weights in two layouts and fails its input checks at the first validation batch.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    options = TRAINING_COMPILE_OPTIONS if training else None
    for layer in layers:
        layer.compile(dynamic=True, options=options)
    log.info("compiled %d decoder layers%s", len(layers), " with eager's numerics" if training else "")
    return len(layers)


def compile_vision_layers(model) -> int:
    """torch.compile the repeated blocks of the vision tower (its longest ``ModuleList``: CLIP's
    encoder layers, Qwen's visual blocks) in place, for scoring; returns how many.

    On one H200 the vision tower and projector took 9.6 ms of the 41 ms an image of compiled FP8
    scoring, eager (docs/performance.md, issue 27): their element-wise work (layer norms, GELU) is
    what Inductor fuses. The number of tiles a batch carries is dynamic, so it does not recompile.
    """
    from forensic_vlm.models.architectures import vision_modules

    compiled = 0
    for module in vision_modules(model, architecture_of_model(model)):
        lists = [child for child in module.modules() if isinstance(child, torch.nn.ModuleList)]
        if not lists:
            continue
        for block in max(lists, key=len):
            block.compile(dynamic=True)
            compiled += 1
    log.info("compiled %d vision blocks", compiled)
    return compiled


def set_checkpointed_layers(model, count: int) -> None:
    """Recompute only the first ``count`` decoder layers. Checkpointing must be enabled on the
    model already; it is switched off for the rest, which then keep their activations."""
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index < count
    log.info("%d of %d decoder layers recompute their activations in the backward pass", count, len(layers))


def load_adapter(model, adapter: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
