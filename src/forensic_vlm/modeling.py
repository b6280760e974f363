"""Loading LLaVA-NeXT: nf4 or full weights, the right dtype per device, LoRA on the language model.

Weights are read from safetensors only and no remote code is run. bitsandbytes is imported only
when nf4 is asked for, so full-precision CPU use never needs it.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import torch

from forensic_vlm.config import ModelConfig, TrainConfig
from forensic_vlm.errors import ConfigError, DeviceError

log = logging.getLogger(__name__)

#: Kept out of 4-bit quantization. In transformers 5 bitsandbytes' skip list matches full module
#: name prefixes: a bare "vision_tower" is silently ignored and the vision tower gets quantized.
NOT_QUANTIZED = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


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


def load_processor(source: str | Path, max_tiles: int | None = None):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(source), trust_remote_code=False)
    processor.tokenizer.padding_side = "left"  # decoder-only: the answer position is the last one
    image_processor = processor.image_processor
    image_processor.image_grid_pinpoints = capped_pinpoints(
        image_processor.image_grid_pinpoints, image_processor.crop_size["height"], max_tiles
    )
    return processor


def capped_pinpoints(pinpoints: list[list[int]], tile: int, max_tiles: int | None) -> list[list[int]]:
    """The anyres grid shapes of at most ``max_tiles`` tiles (``model.max_tiles``).

    The processor (how an image is cut up and how many tokens it becomes) and the model (how the
    features are put back together) must use the same list, so both are capped from this function.
    The model was pretrained on every shape, so a cap stays within what it has seen.
    """
    if max_tiles is None:
        return [list(p) for p in pinpoints]
    kept = [list(p) for p in pinpoints if (p[0] // tile) * (p[1] // tile) <= max_tiles]
    if not kept:
        smallest = min((p[0] // tile) * (p[1] // tile) for p in pinpoints)
        raise ConfigError(f"model.max_tiles {max_tiles} leaves no anyres grid; the smallest has {smallest} tiles")
    return kept


def load_base_model(config: ModelConfig, device: torch.device):
    from transformers import LlavaNextForConditionalGeneration

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
            llm_int8_skip_modules=NOT_QUANTIZED,
        )
    # Straight onto the device: no full copy in host memory first (seconds per GB, per process).
    kwargs["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}
    model = LlavaNextForConditionalGeneration.from_pretrained(config.name_or_path, **kwargs)
    tile = model.config.vision_config.image_size
    model.config.image_grid_pinpoints = capped_pinpoints(model.config.image_grid_pinpoints, tile, config.max_tiles)
    log.info("loaded %s (%s, %s) on %s", config.name_or_path, config.quantization, dtype, device)
    return model


def lora_target_pattern(modules: tuple[str, ...]) -> str:
    """A regex PEFT full-matches: the given projections inside the language model only."""
    return rf"^model\.language_model\..*\.({'|'.join(modules)})$"


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
        target_modules=lora_target_pattern(config.lora_target_modules),
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
    """Run the frozen vision tower under ``no_grad``: nothing of it is kept for the backward pass
    (nor recomputed), whatever hooks or checkpointing would otherwise make autograd record."""
    tower = model.get_base_model().model.vision_tower
    if any(p.requires_grad for p in tower.parameters()):
        return  # something in it is trained (train.trainable): it needs its graph
    tower.forward = torch.no_grad()(tower.forward)


def decoder_layers(model) -> list:
    """The language model's decoder layers, in order (under PEFT's wrappers too)."""
    return [
        module
        for name, module in model.named_modules()
        if "language_model" in name and type(module).__name__.endswith("DecoderLayer")
    ]


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
