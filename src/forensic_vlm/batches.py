"""Examples, token-grouped batches, and the collator that turns images into model inputs.

Batches hold images of the same expanded length where possible (an image's token count depends on
its size: LLaVA-NeXT's anyres grid, Qwen's pixel budget, Idefics3's splitting), so left padding
wastes little. Images are decoded and preprocessed in
DataLoader workers. Every image is checked against its sha256 when it is read.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from forensic_vlm.images import load_checked_image, read_located_bytes
from forensic_vlm.prompting import AnswerTokens

# Re-exported: the examples of a table are read in modules that never import torch.
from forensic_vlm.tables import Example, examples_from_table  # noqa: F401

#: What a batch carries for the pipeline, not for the model; the rest is the processor's output
#: (input_ids, attention_mask, pixel_values, and per architecture image_sizes, image_grid_thw,
#: pixel_attention_mask, token_type_ids or mm_token_type_ids).
BOOKKEEPING = ("indices", "targets", "labels")


def model_inputs(batch: dict) -> dict:
    """The tensors of a batch that the model takes."""
    return {key: value for key, value in batch.items() if key not in BOOKKEEPING}


class ImageDataset(Dataset):
    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[int, object]:
        example = self.examples[index]
        return index, load_checked_image(example.path, example.sha256, read_located_bytes(example.locator))


class TokenGroupedBatches(Sampler[list[int]]):
    """Batches of indices with equal token counts (mixed only where a group's tail is short).

    Training shuffles the members of each group and the order of the batches, anew each epoch
    (``set_epoch``); evaluation keeps a fixed order. Under data parallelism (``replicas`` > 1) each
    rank takes every replicas-th batch of the same order; the list is padded by repeating its
    first batches, as DistributedSampler does, so every rank runs the same number of steps.
    """

    def __init__(
        self, tokens: Sequence[int], batch_size: int, *, shuffle: bool, seed: int = 0, rank: int = 0, replicas: int = 1
    ) -> None:
        self.tokens, self.batch_size, self.shuffle, self.seed, self.epoch = list(tokens), batch_size, shuffle, seed, 0
        self.rank, self.replicas = rank, replicas
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[list[int]]:
        """This epoch's batches, in order, before they are dealt to the ranks."""
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        groups: dict[int, list[int]] = defaultdict(list)
        for index, count in enumerate(self.tokens):
            groups[count].append(index)
        ordered = []
        for count in sorted(groups):
            members = groups[count]
            if self.shuffle:
                rng.shuffle(members)
            ordered.extend(members)
        batches = [ordered[i : i + self.batch_size] for i in range(0, len(ordered), self.batch_size)]
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def batches(self) -> list[list[int]]:
        """This rank's batches of this epoch."""
        batches = self.order()
        if self.replicas > 1:
            padded = (batches * self.replicas)[: len(self) * self.replicas]
            return padded[self.rank :: self.replicas]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        # A resumed epoch starts after the batches already trained (``start``, set on resume).
        start, self.start = self.start, 0
        return iter(self.batches()[start:])

    def __len__(self) -> int:
        """Batches per rank."""
        batches = -(-len(self.tokens) // self.batch_size)
        return -(-batches // self.replicas)


class Collator:
    """Images and labels -> left-padded model inputs.

    ``train``: prompt + answer (prefix, class digit, EOS); ``labels`` cover only the answer.
    ``score``: prompt + prefix, so the last position's logits give the class digit.
    ``generate``: the prompt alone, for free generation as the reference did.
    """

    def __init__(self, processor, prompt: str, answer: AnswerTokens, *, labels: Sequence[int], mode: str) -> None:
        assert mode in ("train", "score", "generate"), mode
        self.processor, self.prompt, self.answer, self.mode = processor, prompt, answer, mode
        self.position = {label: i for i, label in enumerate(labels)}
        processor.tokenizer.padding_side = "left"

    def __call__(self, items: Sequence[tuple[int, object]], targets: Sequence[int] | None = None) -> dict:
        indices = [index for index, _ in items]
        images = [image for _, image in items]
        encoded = self.processor(text=[self.prompt] * len(images), images=images, padding=True, return_tensors="pt")
        batch = dict(encoded)
        batch["indices"] = torch.tensor(indices)
        if self.mode == "generate":
            return batch
        if self.mode == "score":
            tails = [list(self.answer.prefix)] * len(images)
        else:
            assert targets is not None
            tails = [self.answer.for_label(self.position[t]) for t in targets]
        tail = torch.tensor(tails, dtype=batch["input_ids"].dtype).reshape(len(images), -1)
        for key, value in batch.items():
            # Per-token tensors beside the ids (Gemma's token_type_ids, Qwen's mm_token_type_ids)
            # mark image positions: the answer's tokens are text, 0.
            if key not in ("input_ids", "attention_mask") and value.shape == batch["input_ids"].shape:
                batch[key] = torch.cat([value, torch.zeros_like(tail, dtype=value.dtype)], dim=1)
        batch["input_ids"] = torch.cat([batch["input_ids"], tail], dim=1)
        batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(tail)], dim=1)
        if self.mode == "train":
            labels = torch.full_like(batch["input_ids"], -100)
            labels[:, -tail.shape[1] :] = tail  # the loss sees the answer and nothing else
            batch["labels"] = labels
        return batch


class LabelledCollator:
    """Collator bound to examples' labels, for a DataLoader (picklable for worker processes)."""

    def __init__(self, collator: Collator, examples: Sequence[Example]) -> None:
        self.collator, self.labels = collator, [e.label for e in examples]

    def __call__(self, items: Sequence[tuple[int, object]]) -> dict:
        batch = self.collator(items, [self.labels[i] for i, _ in items])
        batch["targets"] = torch.tensor([self.collator.position[self.labels[i]] for i, _ in items])
        return batch
