"""Prompt, answer tokens, labels and image-token expansion, on the real Mistral tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from forensic_vlm.batches import Collator, model_inputs
from forensic_vlm.config import REFERENCE_QUESTION, DemoModelConfig
from forensic_vlm.demo_model import build_processor
from forensic_vlm.modeling import load_processor
from forensic_vlm.prompting import PreflightError, TokenCounter, answer_tokens, build_prompt, preflight

LABELS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def processor(tiny_model: Path):
    return load_processor(tiny_model)


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_prompt_follows_the_models_chat_template_and_tokenizes_as_mistral(processor) -> None:
    prompt = build_prompt(processor, REFERENCE_QUESTION)
    assert prompt == f"[INST] <image>\n{REFERENCE_QUESTION} [/INST]"
    tokenizer = processor.tokenizer
    ids = tokenizer(prompt)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 1
    assert tokenizer.convert_ids_to_tokens(ids[1:4]) == ["▁[", "INST", "]"]
    assert tokenizer.convert_ids_to_tokens(ids[-4:]) == ["▁[", "/", "INST", "]"]
    assert ids.count(32000) == 1 and len(tokenizer) == 32002
    assert tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]


def test_the_digit_comes_after_a_space_token_and_each_class_has_its_own(processor) -> None:
    prompt = build_prompt(processor, REFERENCE_QUESTION)
    answer = answer_tokens(processor, REFERENCE_QUESTION, LABELS)
    tokenizer = processor.tokenizer
    assert tokenizer.convert_ids_to_tokens(list(answer.prefix)) == ["▁"]
    assert tokenizer.convert_ids_to_tokens(list(answer.class_ids)) == ["0", "1", "2", "3"]
    assert answer.suffix == (tokenizer.eos_token_id,) == (2,)
    assert tokenizer(f"{prompt} 2")["input_ids"][-2:] == [*answer.prefix, answer.class_ids[2]]


def test_only_the_answer_tokens_carry_labels_and_padding_is_on_the_left(processor) -> None:
    prompt = build_prompt(processor, REFERENCE_QUESTION)
    answer = answer_tokens(processor, REFERENCE_QUESTION, LABELS)
    collate = Collator(processor, prompt, answer, labels=LABELS, mode="train")
    batch = collate([(0, noise(112, 56)), (1, noise(56, 56, 1))], targets=[3, 1])  # different lengths
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape
    for row, target in enumerate([3, 1]):
        carried = labels[row][labels[row] != -100].tolist()
        assert carried == [*answer.prefix, answer.class_ids[target], *answer.suffix]
        assert ids[row, -3:].tolist() == carried and (labels[row, :-3] == -100).all()
    short = int(mask.sum(dim=1).argmin())
    assert mask[short, 0] == 0 and ids[short, 0] == processor.tokenizer.pad_token_id  # left padded
    assert (mask[:, -4:] == 1).all()


def test_the_scored_position_is_the_last_and_ends_with_the_space_token(processor, tiny_model: Path) -> None:
    from transformers import LlavaNextForConditionalGeneration

    from forensic_vlm.decoding import class_probabilities

    prompt = build_prompt(processor, REFERENCE_QUESTION)
    answer = answer_tokens(processor, REFERENCE_QUESTION, LABELS)
    batch = Collator(processor, prompt, answer, labels=LABELS, mode="score")(
        [(0, noise(112, 56)), (1, noise(56, 56, 1))], [0, 0]
    )
    assert (batch["input_ids"][:, -1] == answer.prefix[-1]).all()
    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32).eval()
    inputs = model_inputs(batch)
    probabilities = class_probabilities(model, inputs, answer.class_ids)
    with torch.no_grad():
        full = model(**inputs).logits[:, -1, list(answer.class_ids)]
    torch.testing.assert_close(probabilities, torch.softmax(full, dim=-1))
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(2))


@pytest.mark.parametrize("size", [(360, 780), (780, 360), (512, 288), (400, 300), (360, 360), (40, 90)])
def test_token_count_matches_the_processor_on_real_images(processor, size: tuple[int, int]) -> None:
    prompt = build_prompt(processor, REFERENCE_QUESTION)
    answer = answer_tokens(processor, REFERENCE_QUESTION, LABELS)
    counter = TokenCounter(processor, prompt, answer)
    encoded = processor(text=[prompt], images=[noise(*size)])
    assert counter(*size) == len(encoded["input_ids"][0]) + 3


def test_full_size_geometry_expands_as_the_real_model() -> None:
    """With the real model's 336 px tiles and grid pinpoints, aspect ratios cost what DESIGN.md
    measured: +20 tokens for portrait over landscape 16:9, +372 more for 4:3, +588 more for square."""
    processor = build_processor(DemoModelConfig(image_size=336))
    prompt = build_prompt(processor, REFERENCE_QUESTION)
    counter = TokenCounter(processor, prompt, answer_tokens(processor, REFERENCE_QUESTION, LABELS))
    landscape, portrait, photo, square = (counter(*s) for s in [(1920, 1080), (1080, 1920), (1280, 960), (800, 800)])
    assert (portrait - landscape, photo - portrait, square - photo) == (20, 372, 588)
    assert 2000 < landscape < portrait < photo < square < 3100


def test_preflight_stops_naming_the_image_instead_of_truncating(processor) -> None:
    prompt = build_prompt(processor, REFERENCE_QUESTION)
    counter = TokenCounter(processor, prompt, answer_tokens(processor, REFERENCE_QUESTION, LABELS))
    ok = counter(360, 780)
    assert preflight(counter, [("a.jpg", 360, 780)], limit=ok) == [ok]
    with pytest.raises(PreflightError, match=r"2_x/big\.png: a 360x360 image expands to \d+ tokens"):
        preflight(counter, [("a.jpg", 360, 780), ("2_x/big.png", 360, 360)], limit=ok)
