"""GPU speed paths: Liger's fused kernels and FP8 linear layers, both from the ``speed`` extra.

Neither is ever used on the CPU, and neither is imported unless asked for, so the CPU demo and CI
never need them. Both act on the Mistral language model inside LLaVA-NeXT: Liger has no LLaVA-NeXT
entry point, but its Mistral patch applies to that inner model instance.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import re
from collections.abc import Callable

import torch

from forensic_vlm.config import ModelConfig
from forensic_vlm.errors import ConfigError, DeviceError

log = logging.getLogger(__name__)

SPEED_EXTRA = "pip install 'forensic-vlm[speed]'"


def fused_kernels_wanted(config: ModelConfig, device: torch.device) -> bool:
    """Whether ``model.kernels`` asks for Liger on this device; a named error when it cannot be had.

    Only ``liger`` does. ``auto`` gets Liger only where the parity gate passed it for the adapter at
    hand (``speed.gate``, which then asks for liger); in training, and without a verdict, auto is
    transformers' kernels: Liger once failed that gate (docs/performance.md). Liger's patch used here
    is Mistral's: only LLaVA-NeXT's language model can have it (liger stops, naming the architecture)."""
    from forensic_vlm.models.architectures import architecture_of

    if config.kernels != "liger":
        return False
    if device.type != "cuda":
        raise DeviceError("model.kernels is liger, which needs a CUDA GPU; use auto or none on the CPU")
    architecture = architecture_of(config.name_or_path)
    if architecture.name != "llava_next":
        raise ConfigError(f"model.kernels liger supports LLaVA-NeXT's Mistral only, not {architecture.name}")
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError(f"model.kernels is liger but liger-kernel is not installed ({SPEED_EXTRA})")
    return True


def apply_fused_kernels(model) -> int:
    """Liger's RMSNorm and SwiGLU on this model's language model only; returns the layers patched.

    Liger's Mistral patch also replaces module-level names of transformers (the RMSNorm and MLP
    classes, the rotary function), which would silently change every Mistral model built later in
    the same process while its record said otherwise; found in issue 14's first benchmark runs.
    Those names are put back at once, so only this instance is changed, and the rotary embeddings
    stay transformers' (Liger's rotary kernel exists only as such a module-level replacement).

    Call before LoRA is added: the patched MLP calls its projections by attribute, so the LoRA
    wrappers PEFT puts there later are used. Cross-entropy is left alone: the loss is computed on
    the answer positions only (``ClassifierModule``), which is smaller than any fused version.
    """
    from liger_kernel.transformers import apply_liger_kernel_to_mistral
    from transformers.models.mistral import modeling_mistral

    language_model = model.model.language_model  # LLaVA-NeXT's Mistral (fused_kernels_wanted)
    module_names = ("MistralRMSNorm", "MistralMLP", "apply_rotary_pos_emb")
    saved = {name: getattr(modeling_mistral, name) for name in module_names}
    try:
        apply_liger_kernel_to_mistral(
            rope=False, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False,
            model=language_model,
        )  # fmt: skip
    finally:
        for name, value in saved.items():
            setattr(modeling_mistral, name, value)
    log.info("Liger fused RMSNorm and SwiGLU on %d decoder layers of this model", len(language_model.layers))
    return len(language_model.layers)


def require_fp8(device: torch.device) -> None:
    """FP8 matrix products need compute capability 8.9 (Ada) or 9.0 (Hopper) and torchao."""
    if device.type != "cuda":
        raise DeviceError("model.quantization is fp8, which needs a CUDA GPU; use nf4 or none on the CPU")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise DeviceError(
            f"model.quantization is fp8, which needs compute capability 8.9 or more; "
            f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}"
        )
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"model.quantization is fp8 but torchao is not installed ({SPEED_EXTRA})")


def fp8_targets(language_model, scope: str) -> set[str]:
    """The linear layers (names inside the language model) that ``model.fp8_scope`` puts in FP8.

    decoder: every projection of every decoder layer; mlp: gate, up and down only (attention stays
    bf16); inner: every projection except in the first two and the last two decoder layers, where
    errors have the most layers to grow through or the least to be averaged out.
    """
    count = len(language_model.layers)
    chosen = set()
    for name, module in language_model.named_modules():
        match = re.fullmatch(r"layers\.(\d+)\.(self_attn|mlp)\.\w+", name)
        if not match or not isinstance(module, torch.nn.Linear):
            continue
        index, block = int(match[1]), match[2]
        if (scope == "mlp" and block != "mlp") or (scope == "inner" and not 2 <= index < count - 2):
            continue
        chosen.add(name)
    if not chosen:
        raise ConfigError(f"model.fp8_scope {scope} leaves no linear layer in FP8 in a model of {count} decoder layers")
    return chosen


def _language_model(model):
    from forensic_vlm.modeling import architecture_of_model
    from forensic_vlm.models import architectures

    return architectures.language_model(model, architecture_of_model(model))


def fp8_activation_scales(model, scope: str, run: Callable[[], None]) -> dict[str, torch.Tensor]:
    """Static FP8 scales for the inputs of the layers ``fp8_targets`` chooses: the largest magnitude
    each input reaches while ``run()`` passes calibration images through ``model`` (still in bf16),
    divided by float8 e4m3's largest value, so that the largest value seen maps onto it."""
    language_model = _language_model(model)
    targets = fp8_targets(language_model, scope)
    largest: dict[str, torch.Tensor] = {}

    def record(name: str, module, args) -> None:
        value = args[0].detach().abs().amax().float()
        largest[name] = torch.maximum(largest[name], value) if name in largest else value

    hooks = [
        module.register_forward_pre_hook(functools.partial(record, name))
        for name, module in language_model.named_modules()
        if name in targets
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    if set(largest) != targets:
        raise ConfigError(f"FP8 calibration saw {len(largest)} of the {len(targets)} layers it scales")
    top = torch.finfo(torch.float8_e4m3fn).max
    return {
        name: (value / top).clamp(min=torch.finfo(torch.float32).tiny).reshape(1, 1, 1)
        for name, value in largest.items()
    }


def to_fp8(model, scope: str = "decoder", activation_scales: dict[str, torch.Tensor] | None = None) -> int:
    """The language model's projections chosen by ``fp8_targets`` in FP8 (torchao). Without
    ``activation_scales``: weights per output row, activations per token, scaled dynamically. With
    them (``fp8_activation_scales``): weights and activations per tensor, each activation with its
    fixed calibrated scale, which saves the per-token amax pass before every product. The vision
    tower, projector and lm_head stay bf16.

    Returns how many linear layers were converted. Compile the decoder layers afterwards: eager,
    quantizing each activation is a separate pass and FP8 lost to bf16 on an H200 (issue 14).
    """
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    language_model = _language_model(model)
    targets = fp8_targets(language_model, scope)
    if activation_scales is None:
        quantize_(
            language_model,
            Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
            filter_fn=lambda module, name: name in targets,
        )
        log.info("FP8 (rowwise, dynamic) on %d linear layers of the language model (%s)", len(targets), scope)
        return len(targets)
    from torchao.quantization import Float8StaticActivationFloat8WeightConfig

    if set(activation_scales) != targets:
        raise ConfigError(
            f"FP8 activation scales are for {len(activation_scales)} layers, not the {len(targets)} of scope {scope}"
        )
    modules = dict(language_model.named_modules())
    blockwise = sorted(name for name in targets if tuple(modules[name].weight.shape) == (128, 128))
    if blockwise:
        # torchao 0.18 represents a per-tensor scale as one block of the weight's shape, and a
        # 128 x 128 block reads as blockwise scaling: it then fails inside the compiled product.
        raise ConfigError(
            f"static FP8 scales cannot be used on 128 x 128 weights ({blockwise[0]} and {len(blockwise) - 1} more); "
            "leave model.quantization at fp8 without static scales"
        )
    for name in sorted(targets):
        scale = activation_scales[name].to(modules[name].weight.device, torch.float32)
        quantize_(
            modules[name], Float8StaticActivationFloat8WeightConfig(act_quant_scale=scale, granularity=PerTensor())
        )
    log.info("FP8 (per tensor, static calibrated activation scales) on %d linear layers (%s)", len(targets), scope)
    return len(targets)
