"""The prompt, the answer's tokens, and each image's expanded token count.

The prompt comes from the processor's own chat template: ``[INST] <image>\\n{question} [/INST]``.
The answer is `` {digit}`` then EOS. With the real Mistral tokenizer, ``"[/INST] 1"`` ends in the
two tokens ``▁`` and ``1``: the digit is *not* the first token after the prompt. So the answer
is split into a ``prefix`` (``▁``) that is fed to the model and a class token that is scored or
learned; both are found by tokenizing, never assumed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from forensic_vlm.errors import PreflightError


def build_prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@dataclass(frozen=True)
class AnswerTokens:
    """Token ids of the answer: ``prefix`` + class digit + ``eos``."""

    prefix: tuple[int, ...]
    class_ids: tuple[int, ...]
    eos: int

    def for_label(self, index: int) -> list[int]:
        """The full answer of class ``index`` (position in ``class_ids``), EOS included."""
        return [*self.prefix, self.class_ids[index], self.eos]

    @property
    def length(self) -> int:
        return len(self.prefix) + 2


def answer_tokens(tokenizer, prompt: str, labels: Sequence[int]) -> AnswerTokens:
    """Find how ``prompt + " " + digit`` tokenizes, and check it is the same for every class."""
    base = tokenizer(prompt)["input_ids"]
    prefixes, class_ids = set(), []
    for label in labels:
        full = tokenizer(f"{prompt} {label}")["input_ids"]
        if full[: len(base)] != base:
            raise ValueError(f"appending the answer {label!r} changes how the prompt tokenizes")
        tail = full[len(base) :]
        if not tail or tokenizer.convert_ids_to_tokens(tail[-1]).lstrip("▁") != str(label):
            raise ValueError(f"the class digit {label} is not a single token of its own: {tail}")
        prefixes.add(tuple(tail[:-1]))
        class_ids.append(tail[-1])
    if len(prefixes) != 1:
        raise ValueError(f"the tokens before the digit differ between classes: {prefixes}")
    if len(set(class_ids)) != len(class_ids):
        raise ValueError(f"two classes share an answer token: {class_ids}")
    return AnswerTokens(prefix=prefixes.pop(), class_ids=tuple(class_ids), eos=tokenizer.eos_token_id)


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
