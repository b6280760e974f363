"""Stage ``demo_model``: a tiny, randomly initialised model saved like a real checkpoint.

``demo_model.architecture`` picks it: LLaVA-NeXT (here) or Qwen2.5-VL and Idefics3
(``forensic_vlm.models.tiny``). The LLaVA-NeXT one has the same classes as the real model (CLIP vision tower, anyres tiling, Mistral language model), the
real Mistral-7B tokenizer (shipped inside the ``mistral-common`` wheel) with ``<image>`` = 32000 and
``<pad>`` = 32001 added, and the real model's chat template. The workflow then loads it by path
with ``from_pretrained``, exactly as it loads the 7B model.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

from forensic_vlm.config import DemoModelConfig
from forensic_vlm.errors import InputNotFoundError

log = logging.getLogger(__name__)

#: The chat template of llava-hf/llava-v1.6-mistral-7b-hf: "[INST] <image>\n{question} [/INST]".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + eos_token }}"
    "{% endif %}{% endfor %}"
)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def mistral_tokenizer_file() -> Path:
    """The real Mistral-7B sentencepiece model (32,000 pieces) inside the mistral-common wheel."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise InputNotFoundError("mistral-common is not installed; it ships the Mistral tokenizer")
    path = Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise InputNotFoundError(f"{path} is missing from the mistral-common wheel")
    return path


def build_tokenizer():
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(mistral_tokenizer_file(), Path(folder) / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(folder, add_bos_token=True, add_eos_token=False)
    # Order matters: the real checkpoint has <image> = 32000 and <pad> = 32001.
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = "left"
    return tokenizer


def grid_pinpoints(tile: int) -> list[list[int]]:
    """The real model's anyres shapes, [[336,672],[672,336],[672,672],[1008,336],[336,1008]], scaled."""
    return [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile], [tile, 3 * tile]]


def build_processor(config: DemoModelConfig, tokenizer=None):
    """The demo processor; ``tokenizer`` defaults to the real Mistral one from mistral-common."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": config.image_size},
        crop_size={"height": config.image_size, "width": config.image_size},
        image_grid_pinpoints=grid_pinpoints(config.image_size),
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
        patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,
    )


def build_model(config: DemoModelConfig, vocab_size: int):
    import torch
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, MistralConfig

    vision = CLIPVisionConfig(
        hidden_size=config.vision_hidden_size,
        intermediate_size=2 * config.vision_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=4,
        image_size=config.image_size,
        patch_size=14,
        projection_dim=config.vision_hidden_size,
    )
    text = MistralConfig(
        vocab_size=vocab_size,
        hidden_size=config.text_hidden_size,
        intermediate_size=2 * config.text_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        rope_theta=1_000_000.0,
        pad_token_id=32001,
        tie_word_embeddings=False,
    )
    llava = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=32000,
        image_grid_pinpoints=grid_pinpoints(config.image_size),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    torch.manual_seed(config.seed)
    return LlavaNextForConditionalGeneration(llava)


def build_demo_model(out_dir: Path, config: DemoModelConfig, tokenizer=None) -> Path:
    """Write the tiny random model of ``config.architecture`` (safetensors) and its processor to
    ``out_dir``. ``tokenizer``: LLaVA-NeXT's, instead of the real Mistral one (tests)."""
    out_dir = Path(out_dir)
    if config.architecture != "llava_next":
        from forensic_vlm.models.tiny import save_tiny

        parameters, _ = save_tiny(out_dir, config)
        log.info("demo model: %s, %.1f M parameters written to %s", config.architecture, parameters / 1e6, out_dir)
        return out_dir
    processor = build_processor(config, tokenizer)
    # The real checkpoint pads its embedding to 32064 rows (a multiple of 64); so does this one.
    model = build_model(config, vocab_size=32064)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    parameters = sum(p.numel() for p in model.parameters())
    log.info("demo model: %.1f M parameters written to %s", parameters / 1e6, out_dir)
    return out_dir
