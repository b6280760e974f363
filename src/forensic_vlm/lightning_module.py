"""The Lightning side of training: the module that wraps the PEFT model, and its callbacks.

Training computes the loss on the answer tokens only; validation reads the class probabilities at
the answer position, as evaluation does, and logs macro-F1, accuracy and the loss of the true
class (gathered over every rank under DDP). Checkpoints hold only the trained weights.
"""

from __future__ import annotations

import hashlib
import json
import random
import time

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from sklearn.metrics import accuracy_score, f1_score
from torch.utils.data import DataLoader

from forensic_vlm.batches import model_inputs
from forensic_vlm.config import TrainConfig
from forensic_vlm.decoding import class_probabilities, to_device
from forensic_vlm.errors import ResumeError
from forensic_vlm.faults import fault_point
from forensic_vlm.prompting import AnswerTokens
from forensic_vlm.thresholds import choose_thresholds


class ClassifierModule(pl.LightningModule):
    """Wraps the PEFT model: answer-only loss in training, class probabilities in validation."""

    def __init__(self, model, answer: AnswerTokens, config: TrainConfig, pixel_dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.answer, self.config, self.pixel_dtype = model, answer, config, pixel_dtype
        # Checkpoints hold only the trained weights (LoRA and `trainable`), never the base model.
        self.strict_loading = False
        self._val_probabilities: list[torch.Tensor] = []
        self._val_targets: list[torch.Tensor] = []
        self._val_indices: list[torch.Tensor] = []

    def _inputs(self, batch: dict) -> dict:
        inputs = model_inputs(batch)
        return {k: v.to(self.pixel_dtype) if v.is_floating_point() else v for k, v in inputs.items()}

    def on_train_start(self) -> None:
        self.peak_memory_gib = None
        self.first_step_seconds = None
        if torch.cuda.is_available():  # the training peak, not the loading one
            torch.cuda.reset_peak_memory_stats()

    def on_train_end(self) -> None:
        if torch.cuda.is_available():
            self.peak_memory_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    def on_train_batch_start(self, batch: dict, batch_index: int) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs, batch: dict, batch_index: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # GPU work is asynchronous: time what was done, not what was queued
        # All ranks together: each does the same number of steps at the same time.
        images = len(batch["indices"]) * self.trainer.world_size
        seconds = time.perf_counter() - self._step_start
        if self.first_step_seconds is None:  # with train.compile, this step's time holds the compilation
            self.first_step_seconds = round(seconds, 2)
        self.log("train_images_per_s", images / seconds)
        fault_point("train.batch_end")  # after this batch's checkpoint, if one was due

    def on_validation_end(self) -> None:
        fault_point("train.validation_end")  # after the best checkpoint, if this epoch was better

    def training_step(self, batch: dict, batch_index: int) -> torch.Tensor:
        loss = answer_loss(self.model, self._inputs(batch), batch["labels"])
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["indices"]))
        return loss

    def validation_step(self, batch: dict, batch_index: int) -> None:
        probabilities = class_probabilities(self.model, self._inputs(batch), self.answer.class_ids)
        self._val_probabilities.append(probabilities.cpu())
        self._val_targets.append(batch["targets"].cpu())
        self._val_indices.append(batch["indices"].cpu())

    def _gathered_validation(self) -> tuple[np.ndarray, np.ndarray]:
        """Every rank's validation results, each image once (padding batches repeat some)."""
        local = list(
            zip(
                torch.cat(self._val_indices).tolist(),
                torch.cat(self._val_probabilities).numpy(),
                torch.cat(self._val_targets).tolist(),
                strict=True,
            )
        )
        if self.trainer.world_size > 1:
            gathered: list = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, local)
            local = [item for part in gathered for item in part]
        unique = {index: (p, t) for index, p, t in local}
        ordered = [unique[index] for index in sorted(unique)]
        return np.stack([p for p, _ in ordered]), np.array([t for _, t in ordered])

    def on_validation_epoch_end(self) -> None:
        if not self._val_targets:
            return
        probabilities, targets = self._gathered_validation()
        predicted = probabilities.argmax(axis=1)
        positions = list(range(len(self.answer.class_ids)))
        self.log(
            "val_macro_f1",
            float(f1_score(targets, predicted, labels=positions, average="macro", zero_division=0)),
            prog_bar=True,
        )
        self.log("val_accuracy", float(accuracy_score(targets, predicted)), prog_bar=True)
        nll = -np.log(np.clip(probabilities[np.arange(len(targets)), targets], 1e-12, None)).mean()
        self.log("val_loss", float(nll))
        self._val_probabilities.clear()
        self._val_targets.clear()
        self._val_indices.clear()

    def configure_optimizers(self):
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        # Not fused=True: Lightning refuses gradient clipping (train.gradient_clip_val) with an
        # optimizer that unscales gradients itself, even in bf16 (measured on an H200, issue 27).
        # On a GPU PyTorch's default is already the multi-tensor (foreach) update.
        return torch.optim.AdamW(parameters, lr=self.config.learning_rate, weight_decay=self.config.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trained = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}


class ResumableLoader(DataLoader):
    """A DataLoader whose place in the epoch is part of every checkpoint, for an exact resume.

    Lightning saves ``state_dict()`` with each checkpoint and, on resume, calls ``load_state_dict``
    before it creates the interrupted epoch's iterator: the sampler then yields that epoch's
    batches from the first one not yet trained. The random number generators' states go with it
    (LoRA dropout draws from them), and the order's digest is compared, so a resumed run trains
    exactly what the interrupted one would have. The loader draws worker seeds from a generator of
    its own (``generator=``), never from the global one the checkpoint restores.
    """

    completed = 0  # batches of the current epoch already trained (counted by TrainingPosition)

    def state_dict(self) -> dict:
        sampler = self.batch_sampler
        return {
            "epoch": sampler.epoch,
            "completed": self.completed,
            "order_sha256": _order_digest(sampler.order()),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": random.getstate(),
                "numpy": _numpy_state(),
            },
        }

    def load_state_dict(self, state: dict) -> None:
        sampler = self.batch_sampler
        sampler.set_epoch(state["epoch"])
        if _order_digest(sampler.order()) != state["order_sha256"]:
            raise ResumeError(
                f"the checkpoint's batch order for epoch {state['epoch']} is not this run's; delete the checkpoints"
            )
        sampler.start = self.completed = state["completed"]
        if state["completed"] >= len(sampler):
            # Saved after an epoch's last batch: Lightning goes on with the next epoch, from the
            # iterator it creates now.
            sampler.set_epoch(state["epoch"] + 1)
            sampler.start = self.completed = 0
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        random.setstate(state["rng"]["python"])
        name, keys, position, has_gauss, cached = state["rng"]["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))


def answer_loss(model, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens, with logits computed at the answer positions only.

    The same value as the model's own ``labels=`` loss, without its sequence x vocabulary logits
    (2,381 x 32,064 floats an image at full resolution, in bf16 and again in float32). Inputs are
    left padded, so the answer is the same last columns of every row.
    """
    answer_columns = (labels != -100).any(dim=0).nonzero()
    if len(answer_columns) == 0:
        raise ValueError("a training batch has no answer tokens to learn")
    first = int(answer_columns[0])
    # The logit at position t predicts token t + 1: keep the one before the answer too.
    # No key/value cache: without gradient checkpointing transformers would otherwise fill one.
    logits = model(**inputs, logits_to_keep=labels.shape[1] - first + 1, use_cache=False).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), labels[:, first:].flatten(), ignore_index=-100
    )


def _numpy_state() -> tuple:
    """NumPy's generator state in plain types: checkpoints are loaded with ``weights_only``."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return name, keys.tolist(), int(position), int(has_gauss), float(cached)


def _order_digest(batches: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(batches).encode()).hexdigest()


class StepCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every n optimizer steps, except after an epoch's last batch.

    Resumed from there, Lightning starts the next epoch without validating the one that ended
    (measured: the epoch's validation row and its best-checkpoint decision were lost, and the
    curves differed after it). A kill there resumes from the step before and validates as usual.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:  # args: module, outputs, batch, index
        if trainer.train_dataloader.completed < trainer.num_training_batches:
            super().on_train_batch_end(trainer, *args)


class TrainingPosition(pl.Callback):
    """Counts the batches trained in the current epoch, for ``ResumableLoader.state_dict``.

    Lightning runs checkpoint callbacks after the others, so a checkpoint written at the end of a
    batch counts that batch. ``on_train_epoch_start`` is not called for an epoch resumed part way.
    """

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        trainer.train_dataloader.completed = 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:  # args: module, outputs, batch, index
        trainer.train_dataloader.completed += 1


@torch.no_grad()
def review_thresholds(
    module: ClassifierModule,
    loader: DataLoader,
    labels: list[int],
    *,
    precision: float,
    device: torch.device,
    bf16: bool,
) -> dict:
    """Per-class thresholds for ``precision`` from the module's validation probabilities."""
    module.eval().to(device)
    probabilities, targets = [], []
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):  # as validation ran
        for batch in loader:
            inputs = to_device(batch, device, module.pixel_dtype)
            probabilities.append(class_probabilities(module.model, inputs, module.answer.class_ids).cpu())
            targets.extend(labels[int(t)] for t in batch["targets"])
    return choose_thresholds(torch.cat(probabilities).numpy(), targets, labels, precision)
