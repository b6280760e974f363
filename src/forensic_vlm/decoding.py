"""Turning model outputs into classes.

``class_probabilities``: one forward pass; the logits of the class digits at the answer position,
renormalised over the classes. ``generate_answers`` + ``parse_zeroshot`` / ``parse_finetuned``:
the reference system's way (free generation, then reading a digit or keywords from the text),
kept so the two can be compared on the same images.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from forensic_vlm.batches import model_inputs

UNPARSED = -1  # the reference's "drug mentioned but no class" answer; always counted wrong


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """The model's inputs of ``batch`` on ``device``, the pixels (every float tensor) in ``dtype``."""
    return {
        key: value.to(device, dtype) if value.is_floating_point() else value.to(device)
        for key, value in model_inputs(batch).items()
    }


@torch.no_grad()
def class_probabilities(model, inputs: dict, class_ids: Sequence[int]) -> torch.Tensor:
    """(batch, classes) probabilities from the last position's logits (inputs are left padded).

    No key/value cache: one forward pass reads none, and filling one costs a copy of every layer's
    keys and values, and under ``torch.compile`` a recompilation per decoder layer (its guards
    name the layer's cache slot), which fell back to eager after 8 layers (issue 14).
    """
    logits = model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1, :]
    return torch.softmax(logits[:, list(class_ids)].float(), dim=-1)


@torch.no_grad()
def generate_answers(model, inputs: dict, tokenizer, max_new_tokens: int) -> list[str]:
    generated = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    new_tokens = generated[:, inputs["input_ids"].shape[1] :]  # left padding: prompts end together
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


_DIGIT = re.compile(r"\b([0-3])\b")
_DRUG = ("마약", "drug")
_CLASS3 = ("마약 원본", "마약 사진", "약물 사진", "drug itself", "raw drug", "마약으로 보입니다", "약물로 보입니다")
_CLASS1 = ("대화 내역", "채팅 내용", "메시지", "카카오톡", "텔레그램", "문자 내용", "conversation", "chat log")
_CLASS2 = ("거래 장소", "만나는 장소", "약속 장소", "위치 정보", "지도 사진", "transaction place", "location")
_UNSURE = (
    "관련 없", "아닌 것 같", "해당하지 않", "다른 종류", "모르겠", "판단 불가", "정보 부족", "확인할 수 없", "애매",
    "not related", "cannot determine", "not sure", "insufficient information",
)  # fmt: skip


def parse_zeroshot(text: str) -> int:
    """The reference's zero-shot reading of a free answer, rule for rule.

    First standalone digit 0-3; else class keywords (chat and place only when a drug is also
    mentioned); else "unsure" phrases mean 0; a drug mention that fits no class is -1 (wrong);
    anything else is 0. That last rule flatters zero-shot accuracy when class 0 is common.
    """
    match = _DIGIT.search(text)
    if match:
        return int(match.group(1))
    lower = text.lower()
    drug = any(word in lower for word in _DRUG)
    if any(word in lower for word in _CLASS3):
        return 3
    if drug and any(word in lower for word in _CLASS1):
        return 1
    if drug and any(word in lower for word in _CLASS2):
        return 2
    if any(word in lower for word in _UNSURE):
        return 0
    return UNPARSED if drug else 0


def parse_finetuned(text: str) -> int:
    """A fine-tuned model answers with the digit: the first standalone 0-3, else unparsed."""
    match = _DIGIT.search(text)
    return int(match.group(1)) if match else UNPARSED
