"""The base VLMs the pipeline supports, and what differs between them.

Everything else (loading, LoRA, the prompt, the answer's tokens, token accounting, quantization)
is written once against transformers' common interface (``AutoModelForImageTextToText``, the
processor's chat template) and asks this table only for what it cannot find out by itself: where
the language model sits, which modules see images (never quantized, never trained), how an image's
token count is capped, and how the answer is written after the prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from forensic_vlm.errors import ConfigError, InputNotFoundError, UnsupportedModelError


@dataclass(frozen=True)
class Architecture:
    name: str
    """The name in configs (``demo_model.architecture``, the report), e.g. qwen2_5_vl."""
    model_types: tuple[str, ...]
    """``model_type`` values of a checkpoint's config.json that are this architecture."""
    language_model: str
    """The language model's attribute under ``model.model``: LoRA goes on its projections only."""
    vision_modules: tuple[str, ...]
    """The other attributes under ``model.model`` (vision tower, projector): frozen, never quantized."""
    processor: str
    """transformers' processor class of the architecture."""
    resolution: Literal["anyres", "pixels", "splitting", "fixed"]
    """How an image's token count is set: anyres tiles (``model.max_tiles``), a pixel budget
    (``model.min_pixels`` / ``model.max_pixels``), the processor's own splitting, or a fixed count."""
    video_processor: str | None = None
    """The class of the video processor that the processor class also holds; it needs torchvision,
    and this pipeline reads images only, so it is left out (``models.processors``)."""
    answer_from_template: bool = True
    """The answer is what the chat template writes for the assistant's turn (its end-of-turn
    tokens included). False for LLaVA-NeXT: the chat template shipped with
    llava-hf/llava-v1.6-mistral-7b-hf ends the assistant's turn in a literal ``<\\s>`` (a typo for
    ``</s>``), so the answer is `` {digit}`` and EOS, Mistral's instruct format."""

    @property
    def not_quantized(self) -> list[str]:
        """Module name prefixes kept out of 4-bit quantization. In transformers 5 bitsandbytes' skip
        list matches full prefixes: a bare "vision_tower" is ignored and the tower gets quantized."""
        return [f"model.{name}" for name in self.vision_modules] + ["lm_head"]

    def lora_target_pattern(self, modules: tuple[str, ...]) -> str:
        """A regex PEFT full-matches: the given projections inside the language model only."""
        return rf"^model\.{self.language_model}\..*\.({'|'.join(modules)})$"


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture(
            name="llava_next",
            model_types=("llava_next",),
            language_model="language_model",
            vision_modules=("vision_tower", "multi_modal_projector"),
            processor="LlavaNextProcessor",
            resolution="anyres",
            answer_from_template=False,
        ),
        Architecture(
            name="llava_onevision",
            model_types=("llava_onevision",),
            language_model="language_model",
            vision_modules=("vision_tower", "multi_modal_projector"),
            processor="LlavaOnevisionProcessor",
            resolution="anyres",
            video_processor="LlavaOnevisionVideoProcessor",
        ),
        Architecture(
            name="qwen2_5_vl",
            model_types=("qwen2_5_vl",),
            language_model="language_model",
            vision_modules=("visual",),
            processor="Qwen2_5_VLProcessor",
            resolution="pixels",
            video_processor="Qwen2VLVideoProcessor",
        ),
        Architecture(
            name="qwen3_vl",
            model_types=("qwen3_vl",),
            language_model="language_model",
            vision_modules=("visual",),
            processor="Qwen3VLProcessor",
            resolution="pixels",
            video_processor="Qwen3VLVideoProcessor",
        ),
        Architecture(
            name="idefics3",
            model_types=("idefics3",),
            language_model="text_model",
            vision_modules=("vision_model", "connector"),
            processor="Idefics3Processor",
            resolution="splitting",
        ),
        Architecture(
            name="smolvlm",
            model_types=("smolvlm",),
            language_model="text_model",
            vision_modules=("vision_model", "connector"),
            processor="SmolVLMProcessor",
            resolution="splitting",
            video_processor="SmolVLMVideoProcessor",
        ),
        Architecture(
            name="gemma3",
            model_types=("gemma3",),
            language_model="language_model",
            vision_modules=("vision_tower", "multi_modal_projector"),
            processor="Gemma3Processor",
            resolution="fixed",
        ),
    )
}

#: The one used when nothing says otherwise: the reference's LLaVA-NeXT.
DEFAULT = ARCHITECTURES["llava_next"]


def supported() -> str:
    return ", ".join(f"{a.name} (model_type {'/'.join(a.model_types)})" for a in ARCHITECTURES.values())


def by_name(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}; supported: {supported()}")
    return ARCHITECTURES[name]


def by_processor(name: str | None) -> Architecture | None:
    """The architecture whose processor class is ``name`` (as a saved processor_config.json names it)."""
    return next((a for a in ARCHITECTURES.values() if a.processor == name), None)


def by_model_type(model_type: str, where: str) -> Architecture:
    for architecture in ARCHITECTURES.values():
        if model_type in architecture.model_types:
            return architecture
    raise UnsupportedModelError(f"{where}: model_type {model_type!r} is not supported; supported: {supported()}")


def architecture_of(folder: str | Path) -> Architecture:
    """The architecture of the checkpoint in ``folder``, read from its config.json."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise InputNotFoundError(f"{path}: no config.json, so the model's architecture cannot be read")
    try:
        model_type = json.loads(path.read_text(encoding="utf-8"))["model_type"]
    except (ValueError, KeyError) as error:
        raise UnsupportedModelError(f"{path}: no model_type can be read ({error})") from None
    return by_model_type(model_type, str(path))


def language_model(model, architecture: Architecture):
    """The language model module, under PEFT's wrappers too."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.model, architecture.language_model)


def vision_modules(model, architecture: Architecture) -> list:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [getattr(base.model, name) for name in architecture.vision_modules]
