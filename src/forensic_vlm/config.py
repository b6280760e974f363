"""Typed configuration: one frozen dataclass per section of ``config.yaml``.

The workflow validates the raw YAML against ``workflow/schemas/config.schema.yaml`` (which also
fills defaults); these dataclasses are what the package functions take. ``Config.from_dict``
checks types and unknown keys itself so the CLI, used without Snakemake, gives the same kind of
error, naming the key. ``tests/test_config.py`` keeps the schema and the dataclasses in agreement.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from forensic_vlm.errors import ConfigError, InputNotFoundError

REFERENCE_MODEL = "llava-hf/llava-v1.6-mistral-7b-hf"


@dataclass(frozen=True)
class ClassSpec:
    id: int
    """Class number; images live under ``raw_data/<id>_<name>/``."""
    folder: str
    """Folder name under raw_data, e.g. ``2_transaction_place``."""
    en: str
    """English name, shown in reports."""
    ko: str
    """Korean name, shown in reports."""

    def __post_init__(self) -> None:
        if not self.folder.startswith(f"{self.id}_"):
            raise ConfigError(
                f"classes: folder {self.folder!r} must start with its id and an underscore ({self.id}_...)"
            )


REFERENCE_QUESTION = (
    "이 이미지는 다음 중 어떤 유형입니까? (0: 관련 없음, 1: 마약 대화 내역 사진, 2: 마약 거래 장소, 3: 마약 원본)"
)
LANGUAGE_MODEL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = REFERENCE_MODEL
    """Hub id or local folder of the LLaVA-NeXT model (weights are read from safetensors only)."""
    quantization: Literal["auto", "nf4", "none", "fp8"] = "auto"
    """How evaluate and classify load the base model. auto: with an adapter, the base it was trained
    and its review thresholds validated on (its training.json), or FP8 where that base is bf16, the
    GPU has compute capability 8.9 or more, torchao is installed and rule parity_gate passed FP8 for
    this adapter on the validation split (docs/performance.md); without an adapter nf4 (the reference's);
    nf4: bitsandbytes 4-bit NormalFloat with double quantization (QLoRA); none: full weights (bf16 on
    a GPU), with the adapter merged in; fp8 (GPU of compute capability 8.9 or more): full weights,
    the adapter merged in, then the decoder's linear layers in FP8 with rowwise dynamic scaling
    (torchao, the speed extra), compiled so the scaling is fused. Training is governed by
    train.quantization."""
    fp8_scope: Literal["decoder", "mlp", "inner"] = "decoder"
    """With quantization fp8, which of the decoder's linear layers are FP8. decoder: all of them; mlp:
    gate, up and down only; inner: all but those of the first two and last two decoder layers."""
    kernels: Literal["none", "auto", "liger"] = "auto"
    """Fused Triton kernels (Liger) for the decoder's RMSNorm and SwiGLU. auto: Liger in scoring only
    where rule parity_gate passed it for the adapter at hand (a CUDA GPU, liger-kernel installed, no
    FP8 chosen), transformers' own otherwise and in training; none: transformers' own; liger:
    required, in training and scoring (a named error without it). Never used on the CPU."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel passed to transformers."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: the first CUDA GPU if there is one, else the CPU."""
    question: str = REFERENCE_QUESTION
    """The fixed question put to the model for every image (the reference's)."""
    max_sequence_tokens: int = 4096
    """Preflight limit: an image whose prompt expands to more tokens stops the run, naming it."""
    max_tiles: int | None = None
    """Cap on anyres tiles (besides the overview tile): only grid shapes of at most this many tiles
    are used, fewer tokens per image for speed. null: every shape the model knows (the reference).
    Only for architectures that tile (LLaVA-NeXT, LLaVA-OneVision); a named error for the others."""
    min_pixels: int | None = None
    """Qwen2.5-VL and Qwen3-VL: images with fewer pixels are scaled up to this many. null: the
    checkpoint's own setting. A named error for architectures that do not resize by pixel count."""
    max_pixels: int | None = None
    """Qwen2.5-VL and Qwen3-VL: images with more pixels are scaled down to this many, so fewer tokens
    (one per 28x28 pixels). null: the checkpoint's own setting (12,845,056 for Qwen2.5-VL)."""
    files_sha256: str | None = None
    """A SHA256SUMS listing, or an earlier run's custody.json, that the model's files must match
    before they are used; null: the files are hashed and recorded, not checked against a record."""

    def __post_init__(self) -> None:
        if self.max_sequence_tokens < 16:
            raise ConfigError("model.max_sequence_tokens must be at least 16")
        if self.max_tiles is not None and self.max_tiles < 1:
            raise ConfigError("model.max_tiles must be at least 1, or null for no cap")
        for key in ("min_pixels", "max_pixels"):
            if getattr(self, key) is not None and getattr(self, key) < 28 * 28:
                raise ConfigError(f"model.{key} must be at least 784 (one 28x28 patch), or null")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ConfigError("model.min_pixels must not be larger than model.max_pixels")


@dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = 1e-5
    """AdamW learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay (PyTorch's default, as the reference)."""
    epochs: int = 5
    """Passes over the training table."""
    batch_size: int = 1
    """Images per step; batches are grouped by token count. Where the card has room, 4 trains
    faster (one H200, compiled: 5.74 images/s against 4.11 at 1; docs/performance.md)."""
    accumulate_grad_batches: int = 16
    """Steps whose gradients are summed before each optimizer update."""
    precision: Literal["auto", "bf16-mixed", "16-mixed", "32-true"] = "auto"
    """Lightning precision; auto is bf16-mixed on a GPU and 32-true on the CPU."""
    gradient_clip_val: float = 1.0
    """Gradient norm clipping."""
    quantization: Literal["auto", "nf4", "none"] = "auto"
    """Base weights while training. auto: bf16 where the plan fits the card's memory, else every
    layer recomputing with nf4 (QLoRA) on only as many decoder layers as the memory needs, the first
    ones keeping bf16; on the CPU, model.quantization. nf4 (every layer) or none force one
    (docs/performance.md)."""
    gradient_checkpointing: Literal["auto", True, False] = "auto"
    """Recompute activations in the backward pass to save memory. auto: as few decoder layers as
    the card's memory needs (none where everything fits; every layer on the CPU); true: every layer."""
    memory_budget_gib: float | None = None
    """GPU memory the auto plan may use, in GiB; null: the card's free memory when training starts."""
    upcast_frozen_weights: bool = False
    """With an nf4 base, cast the frozen weights kept in bf16 (embeddings, norms, lm_head, vision
    tower) to float32 first, as PEFT's prepare_model_for_kbit_training does. false keeps them in
    bf16, as on a bf16 base (LLaMA-Factory's default too); true costs memory and speed."""
    compile: bool = False
    """torch.compile each decoder layer for training (LoRA and the 4-bit products inside it), so
    its small operations are not dispatched one by one from Python; costs a compilation at the
    start of each run (about 80 s for the 7B). Compiled with eager's rounding, so its loss curve
    follows eager's (0.13 % apart over 32 steps on one H200); there the 16 GiB plan trained at 2.54
    images/s compiled and the whole card at 4.11 (docs/performance.md, issue 27)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch."""
    lora_target_modules: tuple[str, ...] = LANGUAGE_MODEL_PROJECTIONS
    """Projections of the language model that get LoRA (never the vision tower)."""
    trainable: tuple[str, ...] = ()
    """Modules trained fully beside LoRA, by name (e.g. multi_modal_projector)."""
    checkpoint_every_n_steps: int = 50
    """Optimizer steps between saves of last.ckpt (for resuming after a crash)."""
    seed: int = 42
    """Seed of shuffling, dropout and LoRA initialisation."""
    num_workers: int = 2
    """DataLoader worker processes that decode and preprocess images (per device)."""
    devices: int = 1
    """Data-parallel (DDP) processes on one machine: GPUs, or CPU processes without a GPU. Each
    takes its own share of every epoch's batches; the effective batch is devices x batch_size x
    accumulate_grad_batches."""

    review_precision: float = 0.95
    """Target precision of the per-class review thresholds chosen on the validation set and saved
    with the adapter (review_thresholds.json); classify marks predictions below them needs_review."""

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ConfigError("train.devices must be at least 1")
        if not 0 < self.review_precision <= 1:
            raise ConfigError("train.review_precision must be in (0, 1]")
        if self.learning_rate <= 0 or self.epochs < 1 or self.batch_size < 1 or self.accumulate_grad_batches < 1:
            raise ConfigError("train: learning_rate must be positive; epochs, batch_size, accumulate_grad_batches >= 1")
        if self.lora_r < 1 or not self.lora_target_modules:
            raise ConfigError("train.lora_r must be at least 1 and train.lora_target_modules not empty")
        if self.memory_budget_gib is not None and self.memory_budget_gib <= 0:
            raise ConfigError("train.memory_budget_gib must be positive, or null for the card's free memory")


@dataclass(frozen=True)
class EvaluateConfig:
    decoding: Literal["scores", "generate"] = "scores"
    """scores: one forward pass, class probabilities from the digit logits; generate: the reference way."""
    batch_size: int = 8
    """Images per forward pass; batches are grouped by token count."""
    max_new_tokens_zeroshot: int = 50
    """generate decoding: tokens generated for the base model (the reference's 50)."""
    max_new_tokens_finetuned: int = 8
    """generate decoding: tokens generated with the adapter (the reference's 8)."""
    bootstrap_samples: int = 1000
    """Resamples for the 95 % intervals of accuracy and macro-F1."""
    calibration_bins: int = 10
    """Equal-width confidence bins of the expected calibration error."""
    num_workers: int = 2
    """DataLoader worker processes that decode and preprocess images (per device)."""
    devices: int = 1
    """Devices that score shards of the images at once, one process each (GPUs; on the CPU, processes)."""
    shards: int = 1
    """Scoring jobs each evaluation is cut into (Snakemake's scattergather; the command line's
    --set-scatter evaluate=N overrides it), each asking for its own devices, on any node; rules
    evaluate_zeroshot and evaluate_finetuned merge them into the same outputs one job writes."""
    compile: bool = False
    """torch.compile the language model's decoder layers (sequence length dynamic), fusing their
    element-wise work; costs a compilation at the start of each run."""
    parity_same_class: float = 0.99
    """Rule parity_gate passes a fast scoring path only if it predicts the reference path's class on
    at least this fraction of the validation images..."""
    parity_max_difference: float = 0.02
    """...and no class probability differs from the reference path's by more than this."""
    seed: int = 0
    """Seed of the bootstrap."""

    def __post_init__(self) -> None:
        counts = (self.batch_size, self.bootstrap_samples, self.calibration_bins, self.devices, self.shards)
        if min(counts) < 1:
            raise ConfigError(
                "evaluate: batch_size, bootstrap_samples, calibration_bins, devices and shards must be at least 1"
            )
        if not (0 <= self.parity_same_class <= 1 and 0 <= self.parity_max_difference <= 1):
            raise ConfigError("evaluate: parity_same_class and parity_max_difference must be between 0 and 1")


@dataclass(frozen=True)
class DemoModelConfig:
    architecture: Literal["llava_next", "qwen2_5_vl", "idefics3"] = "llava_next"
    """Which architecture the tiny model is: llava_next (CLIP + Mistral, the reference's), qwen2_5_vl
    (Qwen2.5-VL's vision transformer and dynamic resolution), idefics3 (SigLIP + Llama, SmolVLM's)."""
    vision_hidden_size: int = 64
    """Width of the tiny vision tower."""
    text_hidden_size: int = 128
    """Width of the tiny language model."""
    num_layers: int = 2
    """Layers in each of the two towers."""
    image_size: int = 56
    """Tile size in pixels (patch 14): LLaVA-NeXT's anyres grid pinpoints are multiples of it,
    Idefics3 splits into tiles of it, and Qwen2.5-VL's pixel budget is image_size^2 to (4 x image_size)^2."""
    seed: int = 0
    """Seed of the random initialisation."""


@dataclass(frozen=True)
class ManifestConfig:
    on_bad_input: Literal["report", "fail"] = "report"
    """``report``: list unusable files in rejects.tsv and go on; ``fail``: stop at the first."""
    max_image_pixels: int = 100_000_000
    """Images with more pixels than this are rejected as decompression bombs."""
    allowed_formats: tuple[str, ...] = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF")
    """Pillow format names accepted as images; anything else is ``unsupported_format``."""

    def __post_init__(self) -> None:
        if self.max_image_pixels < 1:
            raise ConfigError("manifest.max_image_pixels must be at least 1")


@dataclass(frozen=True)
class SplitConfig:
    method: Literal["stable", "sklearn"] = "stable"
    """``stable``: split from a keyed content hash; ``sklearn``: the reference's two stratified calls."""
    seed: int = 42
    """Key of the content hash (stable) or ``random_state`` (sklearn)."""
    test_fraction: float = 0.15
    """Share of each class that goes to test."""
    val_fraction: float = 0.15
    """Share of the non-test rest that goes to validation."""
    near_duplicate_distance: int | None = 4
    """Perceptual-hash Hamming distance (of 64 bits) at or under which images are grouped; null disables."""

    def __post_init__(self) -> None:
        for key in ("test_fraction", "val_fraction"):
            value = getattr(self, key)
            if not 0.0 < value < 1.0:
                raise ConfigError(f"split.{key} must be strictly between 0 and 1, got {value}")
        if self.near_duplicate_distance is not None and not 0 <= self.near_duplicate_distance < 32:
            raise ConfigError("split.near_duplicate_distance must be between 0 and 31, or null")


@dataclass(frozen=True)
class AugmentConfig:
    seed: int = 42
    """Base seed; each child's seed is derived from it and its parent's sha256."""
    per_image: dict[int, int] = field(default_factory=lambda: {2: 4})
    """Class id -> number of augmented children per training image of that class."""
    crop_size: tuple[int, int] | None = None
    """[height, width] of the reference's RandomResizedCrop; null keeps each image's own size."""

    def __post_init__(self) -> None:
        if any(n < 0 for n in self.per_image.values()):
            raise ConfigError("augment.per_image counts must be zero or more")
        if self.crop_size is not None and (len(self.crop_size) != 2 or min(self.crop_size) < 1):
            raise ConfigError("augment.crop_size must be [height, width] with positive values, or null")


@dataclass(frozen=True)
class DemoConfig:
    images_per_class: int = 40
    """Synthetic images generated per class."""
    seed: int = 0
    """Seed of the generator; the same seed gives the same bytes."""
    bad_examples: bool = True
    """Add a few deliberately unusable files so the demo shows rejects and flags."""
    extraction_images: int = 48
    """Images in the demo's unlabeled phone extraction (results/demo/extraction), for classify."""
    review_case_images: int = 96
    """Images in each of the demo's new-phone cases (results/demo/review_cases/<case>), whose
    colours are unlike raw_data's, for the review loop (docs/review.md)."""

    def __post_init__(self) -> None:
        if self.images_per_class < 1 or self.extraction_images < 1 or self.review_case_images < 4:
            raise ConfigError(
                "demo.images_per_class and demo.extraction_images must be at least 1, demo.review_case_images at least 4"
            )


@dataclass(frozen=True)
class ReportConfig:
    title: str = "forensic-vlm: zero-shot and fine-tuned on the same test images"
    """Heading of results/report/index.html."""
    show_images: bool = True
    """Show thumbnails of misclassified images; false hides all image content (sensitive evidence)."""
    gallery_size: int = 24
    """Misclassified test images listed, most confident mistakes first."""
    thumbnail_px: int = 160
    """Longest side of a gallery thumbnail, in pixels."""

    def __post_init__(self) -> None:
        if self.gallery_size < 0 or self.thumbnail_px < 16:
            raise ConfigError("report.gallery_size must be >= 0 and report.thumbnail_px >= 16")


@dataclass(frozen=True)
class ClassifyConfig:
    input: str | None = None
    """What to triage, read-only and in place: a folder (a phone extraction) or an evidence
    container, read through dfVFS (the [evidence] extra): an E01 (its first segment; the others are
    found beside it), a raw disk or partition image, a zip or a tar (gzip, bzip2 or xz too). Null:
    input_dir, else no classify stage."""
    input_dir: str | None = None
    """The folder of unlabeled images to triage, as before classify.input existed (give one of the two)."""
    partition: str | None = None
    """Inside a disk image, triage this partition only (dfVFS's names: p1, p2, MBR and GPT alike);
    null: every partition and file system found."""
    inside_path: str | None = None
    """Inside a container, triage this folder only (e.g. /DCIM), in every file system read; null: all."""
    verify_container: bool = True
    """Read the whole container first and check its media data against the MD5/SHA-1 an E01 stores
    (a raw image or archive gets its hashes computed and recorded); false: skip (recorded)."""
    accept_hash_mismatch: bool = False
    """Triage a container whose media data does not match its stored hash instead of stopping; the
    mismatch is recorded in custody.json."""
    case: str = "case"
    """Case name: outputs go to results/classify/<case>/ (letters, digits, '.', '_' and '-')."""
    use_adapter: bool = True
    """Score with the fine-tuned adapter (results/train/adapter) and its validated review
    thresholds; false: the base model zero-shot, where every image needs review."""
    irrelevant_class: int = 0
    """The class that is not drug-related: it is listed after the drug classes."""
    thumbnails: int = 200
    """Thumbnails on the triage page, for its first rows in review order (report.show_images false: none)."""
    page_rows: int = 5000
    """Rows in the table of triage.html, the first in review order; every row is in triage.tsv."""
    shards: int = 1
    """Scoring jobs the case is cut into (Snakemake's scattergather; the command line's
    --set-scatter classify=N overrides it): whole batches, each by its first image's content hash.
    Each job asks for its own GPUs and may run on any node; rule classify merges them into the same
    outputs one job writes."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.case):
            raise ConfigError(f"classify.case {self.case!r}: use letters, digits, '.', '_' and '-' only")
        if self.thumbnails < 0:
            raise ConfigError("classify.thumbnails must be >= 0")
        if self.shards < 1:
            raise ConfigError("classify.shards must be >= 1")
        if self.page_rows < 1:
            raise ConfigError("classify.page_rows must be >= 1")
        if self.input is not None and self.input_dir is not None:
            raise ConfigError("give classify.input or classify.input_dir, not both")

    @property
    def source(self) -> str | None:
        """The folder or container to triage (classify.input, else classify.input_dir)."""
        return self.input if self.input is not None else self.input_dir


@dataclass(frozen=True)
class ReviewConfig:
    dir: str = "reviews"
    """Folder of the examiners' decisions, one reviews/<case>.jsonl a case: data, never evidence,
    so never under raw_data nor under results (which a rerun may replace)."""
    use_for_training: bool = False
    """Reviewed images of every case join the labeled set (results/review/labels.tsv), each case
    whole on one side of the split; the report then compares the model before and after them."""
    test_cases: tuple[str, ...] = ()
    """Reviewed cases held out whole for testing (the measured gain); every other case trains."""

    def __post_init__(self) -> None:
        if self.test_cases and not self.use_for_training:
            raise ConfigError("review.test_cases is set but review.use_for_training is false")
        for case in self.test_cases:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", case):
                raise ConfigError(f"review.test_cases: {case!r} is not a case name")


@dataclass(frozen=True)
class ComparedModel:
    name: str
    """Name of the run: its results are under results/models/<name>/."""
    model: dict[str, object] = field(default_factory=dict)
    """Settings of the model section that differ for this run (name_or_path at least)."""
    train: dict[str, object] = field(default_factory=dict)
    """Settings of the train section that differ for this run."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", self.name):
            raise ConfigError(f"compare: name {self.name!r}: use letters, digits, '_' and '-' only")


DEFAULT_CLASSES = (
    ClassSpec(0, "0_irrelevant", "irrelevant", "관련 없음"),
    ClassSpec(1, "1_chat_history", "drug chat screenshot", "마약 대화 내역 사진"),
    ClassSpec(2, "2_transaction_place", "drug transaction place", "마약 거래 장소"),
    ClassSpec(3, "3_drug_raw", "drug itself", "마약 원본"),
)


@dataclass(frozen=True)
class Config:
    raw_data: str = "raw_data"
    """Folder of read-only evidence, one sub-folder per class."""
    classes: tuple[ClassSpec, ...] = DEFAULT_CLASSES
    model: ModelConfig = field(default_factory=ModelConfig)
    manifest: ManifestConfig = field(default_factory=ManifestConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    demo_model: DemoModelConfig = field(default_factory=DemoModelConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    review: ReviewConfig = field(default_factory=ReviewConfig)
    compare: tuple[ComparedModel, ...] = ()
    """Base models trained and evaluated side by side on the same split (results/models/<name>/,
    the report's comparison); each entry's model and train settings are merged over the sections
    above. Empty: the one model of the model section, as always."""

    def __post_init__(self) -> None:
        reviews = Path(self.review.dir).resolve()
        for key, folder in (("raw_data", self.raw_data), ("results", "results")):
            if reviews == Path(folder).resolve() or Path(folder).resolve() in reviews.parents:
                raise ConfigError(f"review.dir {self.review.dir} is inside {key} ({folder}): decisions are kept apart")
        names = [entry.name for entry in self.compare]
        if len(set(names)) != len(names):
            raise ConfigError(f"compare: names must differ, got {names}")
        if len(names) == 1:
            raise ConfigError("compare: name two models or more, or none")
        for entry in self.compare:
            self.compared(entry.name)  # an unknown or mistyped setting stops here, named
        ids = [c.id for c in self.classes]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"classes: duplicate class ids {ids}")
        if self.classify.irrelevant_class not in ids:
            raise ConfigError(f"classify.irrelevant_class {self.classify.irrelevant_class} is not a class id {ids}")
        unknown = set(self.augment.per_image) - set(ids)
        if unknown:
            raise ConfigError(f"augment.per_image names classes that do not exist: {sorted(unknown)}")

    def compared(self, name: str) -> tuple[ModelConfig, TrainConfig]:
        """The model and train settings of the compared run ``name``, merged over the sections."""
        index, entry = next((i, e) for i, e in enumerate(self.compare) if e.name == name)
        where = f"compare[{index}] ({name})"
        model = _build(ModelConfig, {**to_dict(self.model), **entry.model}, f"{where}.model")
        train = _build(TrainConfig, {**to_dict(self.train), **entry.train}, f"{where}.train")
        return model, train

    def input_paths(self) -> dict[str, str]:
        """Every configured path the run reads, by config key (a hub id is not a path)."""
        paths = {"raw_data": self.raw_data}
        models = [("model", self.model)]
        models += [(f"compare[{i}].model", self.compared(e.name)[0]) for i, e in enumerate(self.compare)]
        for key, model in models:
            name = model.name_or_path
            hub_id = name.count("/") == 1 and not name.startswith(("/", ".", "~")) and not Path(name).exists()
            if not hub_id:
                paths[f"{key}.name_or_path"] = name
            if model.files_sha256 is not None:
                paths[f"{key}.files_sha256"] = model.files_sha256
        if self.classify.source is not None:
            key = "classify.input" if self.classify.input is not None else "classify.input_dir"
            paths[key] = self.classify.source
        return paths

    def require_input_paths(self, made_by_workflow: set[str] = frozenset()) -> None:
        """Stop, naming each config key, where a configured input path does not exist.

        Checked before anything runs, whether or not outputs exist: a mistyped evidence path must
        never end in "nothing to be done". Paths the workflow itself writes (the demo's) are left out.
        """
        made = {Path(p) for p in made_by_workflow}
        missing = [
            f"{key}: {path} does not exist"
            for key, path in self.input_paths().items()
            if Path(path) not in made and not Path(path).expanduser().exists()
        ]
        if missing:
            raise InputNotFoundError("; ".join(missing))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        return _build(cls, data, "")

    @classmethod
    def from_yaml(cls, path: Path) -> Config:
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(yaml.safe_load(handle) or {})


def coerce_strings(data: Any, schema: dict, root: dict | None = None) -> Any:
    """Typed values for strings where the schema wants a number, boolean, list or null.

    Snakemake reads nested ``--config`` values (``train="{learning_rate: 2e-3}"``) with YAML's
    BaseLoader, which leaves every scalar a string; this restores what the user meant. A mapping
    whose schema says ``x-overrides: <section>`` (a compared model's settings) is typed by that
    section's schema, without its defaults.
    """
    root = schema if root is None else root
    if "x-overrides" in schema:
        schema = root["properties"][schema["x-overrides"]]
    if isinstance(data, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        return {
            k: coerce_strings(v, properties.get(k, extra if isinstance(extra, dict) else {}), root)
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [coerce_strings(v, schema.get("items", {}), root) for v in data]
    wanted = schema.get("type")
    wanted = set(wanted) if isinstance(wanted, list) else {wanted}
    if isinstance(data, str) and wanted & {"number", "integer", "boolean", "array", "null"}:
        parsed = _number(data) if wanted & {"number", "integer"} else None
        parsed = yaml.safe_load(data) if parsed is None else parsed  # YAML 1.1 reads "2e-3" as text
        kinds = {"number": (int, float), "integer": (int,), "boolean": (bool,), "array": (list,), "null": (type(None),)}
        if any(isinstance(parsed, kinds[k]) for k in wanted if k in kinds):
            return coerce_strings(parsed, schema, root)
    return data


def _number(text: str) -> int | float | None:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return None


def build_section(cls: type, data: Any, name: str) -> Any:
    """Build one section's dataclass (e.g. ``SplitConfig``) from its plain mapping."""
    return _build(cls, data, name)


def build_classes(data: Any) -> tuple[ClassSpec, ...]:
    return _coerce(tuple[ClassSpec, ...], data, "classes")


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from plain data, naming the offending key on any error."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as error:  # a required field is missing
        raise ConfigError(f"{where or 'config'}: {error}") from error


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0]
        return tuple(_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_type, value_type = args
        if value_type is object:  # settings of another section, checked where they are merged
            return dict(value)
        return {
            _coerce(key_type, _int_key(k, where), f"{where}.{k}"): _coerce(value_type, v, f"{where}.{k}")
            for k, v in value.items()
        }
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _int_key(key: Any, where: str) -> Any:
    # YAML and Snakemake's --config give mapping keys as strings ("2"); class ids are ints.
    if isinstance(key, str) and key.lstrip("-").isdigit():
        return int(key)
    return key


def to_dict(config: Any) -> Any:
    """Plain, YAML-friendly form of a config dataclass (tuples become lists)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config
