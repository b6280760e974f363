"""Tiny random Qwen2.5-VL and Idefics3 (SmolVLM's architecture), saved like real checkpoints.

Each is the real transformers class of its architecture with the real image processor (Qwen's
dynamic resolution, Idefics3's image splitting) and the real chat template's format, at a size the
2-core CPU trains in seconds. Their tokenizers are made here: a byte-level BPE (as Qwen's and
SmolLM's are) trained on the question and the templates' words, with the architecture's special
tokens; digits are single tokens as in both real vocabularies. The workflow loads them by path with
``from_pretrained``, exactly as it loads a downloaded checkpoint. LLaVA-NeXT's tiny model, with the
real Mistral tokenizer, is in ``forensic_vlm.demo_model``.
"""

from __future__ import annotations

from pathlib import Path

from forensic_vlm.config import REFERENCE_QUESTION, DemoModelConfig
from forensic_vlm.models.processors import processor_class

#: Qwen2-VL's chat template (images only), as shipped with Qwen/Qwen2.5-VL-7B-Instruct.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
]  # fmt: skip

#: SmolVLM-Instruct's chat template (Idefics3).
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IDEFICS3_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>",
    *[f"<row_{row}_col_{column}>" for row in range(1, 7) for column in range(1, 7)],
]  # fmt: skip

CORPUS = [
    REFERENCE_QUESTION,
    "irrelevant, drug chat screenshot, drug transaction place, drug itself",
    "관련 없음 마약 대화 내역 사진 마약 거래 장소 마약 원본",
    "You are a helpful assistant. system user assistant User: Assistant: 0 1 2 3 4 5 6 7 8 9",
]


def byte_level_tokenizer(special_tokens: list[str], *, eos: str, pad: str, bos: str | None = None, vocab_size=600):
    """A byte-level BPE trained on ``CORPUS``, digits split one by one (Qwen2's and SmolLM's rule)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token=bos, eos_token=eos, pad_token=pad, model_max_length=8192
    )


def _padded_vocabulary(tokenizer) -> int:
    # Real checkpoints pad their embedding to a multiple of 64 (Qwen2.5-VL: 152,064); so do these.
    return -(-len(tokenizer) // 64) * 64


def qwen2_5_vl_processor(min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 16384):
    """Qwen2.5-VL's processor: its image processor (the real checkpoint's pixel budget by default,
    4 to 16,384 image tokens), its chat template, and a tokenizer made here."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from forensic_vlm.models.architectures import ARCHITECTURES

    tokenizer = byte_level_tokenizer(QWEN_SPECIAL_TOKENS, eos="<|im_end|>", pad="<|endoftext|>")
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    return processor_class(ARCHITECTURES["qwen2_5_vl"])(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=QWEN_CHAT_TEMPLATE
    )


def build_qwen2_5_vl(config: DemoModelConfig):
    """(model, processor) of a tiny random Qwen2.5-VL."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    # Between image_size^2 and (4 x image_size)^2 pixels: 4 to 64 image tokens at the default 56,
    # about what LLaVA-NeXT's tiny model gets from its anyres tiles.
    side = config.image_size
    processor = qwen2_5_vl_processor(min_pixels=side**2, max_pixels=(4 * side) ** 2)
    tokenizer = processor.tokenizer
    heads = 4
    head_dim = config.text_hidden_size // heads
    text = {
        "vocab_size": _padded_vocabulary(tokenizer),
        "hidden_size": config.text_hidden_size,
        "intermediate_size": 2 * config.text_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "max_position_embeddings": 8192,
        # The three multimodal rotary sections (time, height, width) share head_dim / 2 frequencies.
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": _mrope(head_dim)},
        "tie_word_embeddings": False,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,
    }
    vision = {
        "depth": config.num_layers,
        "hidden_size": config.vision_hidden_size,
        "intermediate_size": 2 * config.vision_hidden_size,
        "num_heads": 4,
        "out_hidden_size": config.text_hidden_size,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [config.num_layers - 1],
    }
    torch.manual_seed(config.seed)
    return Qwen2_5_VLForConditionalGeneration(qwen2_5_vl_config(tokenizer, text, vision)), processor


def qwen2_5_vl_config(tokenizer, text: dict, vision: dict):
    """A Qwen2.5-VL configuration whose image and video token ids are those of ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig

    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        tie_word_embeddings=False,
    )


def _mrope(head_dim: int) -> list[int]:
    """Qwen2.5-VL's split of the rotary frequencies, [16, 24, 24] of 64, scaled to ``head_dim``."""
    half = head_dim // 2
    time = half // 4
    height = (half - time) // 2
    return [time, height, half - time - height]


def build_idefics3(config: DemoModelConfig):
    """(model, processor) of a tiny random Idefics3, the architecture of SmolVLM-Instruct."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = byte_level_tokenizer(
        IDEFICS3_SPECIAL_TOKENS, bos="<|im_start|>", eos="<end_of_utterance>", pad="<|endoftext|>"
    )
    tile, patch, scale = config.image_size, 14, 2
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile}, do_image_splitting=True
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(tile // patch) ** 2 // scale**2,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    text = {
        "model_type": "llama",
        "vocab_size": _padded_vocabulary(tokenizer),
        "hidden_size": config.text_hidden_size,
        "intermediate_size": 2 * config.text_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    vision = {
        "hidden_size": config.vision_hidden_size,
        "intermediate_size": 2 * config.vision_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": 4,
        "image_size": tile,
        "patch_size": patch,
    }
    model_config = Idefics3Config(
        text_config=text,
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(config.seed)
    return Idefics3ForConditionalGeneration(model_config), processor


BUILDERS = {"qwen2_5_vl": build_qwen2_5_vl, "idefics3": build_idefics3}


def save_tiny(out_dir: Path, config: DemoModelConfig) -> tuple[int, Path]:
    """Write the tiny model of ``config.architecture`` and its processor; returns its parameters."""
    model, processor = BUILDERS[config.architecture](config)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters()), out_dir
