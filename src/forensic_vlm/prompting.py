"""The prompt, the answer's tokens, and each image's expanded token count.

The prompt is the processor's own chat template with the generation prompt, e.g. LLaVA-NeXT's
``[INST] <image>\n{question} [/INST]`` or Qwen's ``...<|im_start|>assistant\n``. The answer is what
the template writes for the assistant's turn when it answers with the class digit (Qwen:
``{digit}<|im_end|>\n``); for LLaVA-NeXT, whose shipped template writes that turn wrongly, it is
`` {digit}`` then EOS (``models.architectures``). The answer's tokens are split into a ``prefix``
fed to the model, the class token that is scored or learned, and a ``suffix`` (end of turn):
with the real Mistral tokenizer, ``"[/INST] 1"`` ends in the two tokens ``▁`` and ``1``, so the
digit is *not* the first token after the prompt. All three are found by tokenizing, never assumed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from forensic_vlm.errors import PreflightError
from forensic_vlm.models.architectures import DEFAULT, Architecture, by_processor


def build_prompt(processor, question: str) -> str:
    return processor.apply_chat_template(_conversation(question), add_generation_prompt=True, tokenize=False)


def _conversation(question: str, answer: str | None = None) -> list[dict]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def processor_architecture(processor) -> Architecture:
    """The architecture a processor belongs to, by its class (the default for any other)."""
    return by_processor(type(processor).__name__) or DEFAULT


@dataclass(frozen=True)
class AnswerTokens:
    """Token ids of the answer: ``prefix`` + class digit + ``suffix`` (the end of the turn)."""

    prefix: tuple[int, ...]
    class_ids: tuple[int, ...]
    suffix: tuple[int, ...]

    def for_label(self, index: int) -> list[int]:
        """The full answer of class ``index`` (position in ``class_ids``), its end of turn included."""
        return [*self.prefix, self.class_ids[index], *self.suffix]

    @property
    def length(self) -> int:
        return len(self.prefix) + 1 + len(self.suffix)


def answer_texts(processor, question: str, prompt: str, labels: Sequence[int]) -> list[str]:
    """What follows ``prompt`` when the model answers each label, as text (end of turn included)."""
    architecture = processor_architecture(processor)
    if not architecture.answer_from_template:
        return [f" {label}{processor.tokenizer.eos_token}" for label in labels]
    texts = []
    for label in labels:
        whole = processor.apply_chat_template(_conversation(question, str(label)), tokenize=False)
        if not whole.startswith(prompt):
            raise ValueError(f"{architecture.name}: the chat template's answer turn does not follow its prompt")
        texts.append(whole[len(prompt) :])
    return texts


def answer_tokens(processor, question: str, labels: Sequence[int]) -> AnswerTokens:
    """Find how the prompt + each label's answer tokenizes, and check that the answers differ in one
    token only, the class digit's, and that the prompt's tokens are unchanged by what follows."""
    tokenizer = processor.tokenizer
    prompt = build_prompt(processor, question)
    base = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    tails = []
    for label, text in zip(labels, answer_texts(processor, question, prompt, labels), strict=True):
        full = tokenizer(prompt + text, add_special_tokens=True)["input_ids"]
        if full[: len(base)] != base:
            raise ValueError(f"appending the answer {label!r} changes how the prompt tokenizes")
        tails.append(full[len(base) :])
    if len({len(t) for t in tails}) != 1:
        raise ValueError(f"the answers of the classes have different lengths in tokens: {tails}")
    differing = [i for i in range(len(tails[0])) if len({t[i] for t in tails}) > 1]
    if len(differing) != 1:
        raise ValueError(f"the answers of the classes should differ in exactly one token (the digit): {tails}")
    at = differing[0]
    for label, tail in zip(labels, tails, strict=True):
        if tokenizer.decode([tail[at]]).strip() != str(label):
            raise ValueError(f"the class digit {label} is not a single token of its own: {tail}")
    class_ids = tuple(t[at] for t in tails)
    if len(set(class_ids)) != len(class_ids):
        raise ValueError(f"two classes share an answer token: {class_ids}")
    return AnswerTokens(prefix=tuple(tails[0][:at]), class_ids=class_ids, suffix=tuple(tails[0][at + 1 :]))


class TokenCounter:
    """Sequence length (prompt with the image expanded, plus the answer) of an image of a given size.

    LLaVA-NeXT's expansion depends only on the image's width and height (its anyres grid), so the
    processor is asked once per distinct size, on a blank image, and the answer is cached.
    """

    def __init__(self, processor, prompt: str, answer: AnswerTokens) -> None:
        self.processor, self.prompt, self.answer = processor, prompt, answer

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - one counter per run, sizes repeat
    def __call__(self, width: int, height: int) -> int:
        encoded = self.processor(text=[self.prompt], images=[Image.new("RGB", (width, height))])
        return len(encoded["input_ids"][0]) + self.answer.length


def preflight(counter: TokenCounter, sizes: Sequence[tuple[str, int, int]], limit: int) -> list[int]:
    """Token count of each (name, width, height); stops naming the first image over ``limit``.

    Image tokens are never truncated: a sequence that does not fit is an error, not a cut.
    """
    counts = []
    for name, width, height in sizes:
        tokens = counter(width, height)
        if tokens > limit:
            raise PreflightError(
                f"{name}: a {width}x{height} image expands to {tokens} tokens, more than "
                f"model.max_sequence_tokens = {limit}; raise the limit (memory permitting) or leave the image out"
            )
        counts.append(tokens)
    return counts
