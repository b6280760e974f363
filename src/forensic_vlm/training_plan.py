"""Which training plan fits the card: which decoder layers keep bf16 base weights (the rest nf4),
and how many layers recompute.

``train.quantization: auto`` and ``train.gradient_checkpointing: auto`` are resolved here, before
the model is loaded, from the model's shape (its config and safetensors headers), the longest
training batch in tokens, and the card's free memory (or ``train.memory_budget_gib``). Each plan's
time is estimated from two measured costs per decoder layer (``NF4_LAYER_COST``, recomputation
costing 1) and the fastest plan estimated to fit is taken: a bf16 base with no recomputation where
it fits; else, since a layer's 4-bit weights cost more time than recomputing it but save far less
memory, bf16 layers recomputing, then as few nf4 layers as it takes (``train.quantization: auto``
only; ``nf4`` is QLoRA on every layer, ``none`` never 4 bits). On the CPU there is no card to plan
for: the base is loaded as ``model.quantization`` says and every layer recomputes.

The estimates are deliberately high (see ``ACTIVATION_BYTES_PER_TOKEN``); the benchmark prints the
estimate beside the measured peak (docs/performance.md).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from forensic_vlm.config import ModelConfig, TrainConfig

log = logging.getLogger(__name__)

GiB = 2**30
#: Activations one decoder layer keeps for the backward pass, per token, in units of
#: (hidden + intermediate) bytes. Measured on an H200 for Mistral-7B with LoRA on every
#: projection (docs/performance.md): about 306 KiB per token per layer, that is 17 units; 20 leaves
#: a margin, since running out of memory after an hour of loading is worse than a slower plan.
ACTIVATION_BYTES_PER_TOKEN = 20
#: bitsandbytes nf4 with double quantization: 4 bits a weight plus its block constants.
NF4_BYTES_PER_PARAMETER = 0.52
#: What the allocator's peak does not show: the CUDA context, cuBLAS workspaces, fragmentation.
RESERVE_BYTES = 2 * GiB
#: LoRA weights, their gradients and AdamW's two moments, all in float32.
LORA_BYTES_PER_PARAMETER = 16
#: The time one decoder layer's nf4 base weights add to a training step (dequantizing them in the
#: forward pass, again when recomputing, and in the backward pass), relative to the time
#: recomputing one layer adds. Measured compiled on one H200 at 2,381 tokens an image
#: (docs/performance.md, issue 27): about 3.0 ms and 2.2 ms a layer a step.
NF4_LAYER_COST = 1.4


def tensor_sizes(folder: str | Path):
    """(name, number of values) of every tensor in the folder's safetensors, from the headers alone."""
    from safetensors import safe_open

    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 (safe_open is not a dict)
                count = 1
                for size in tensors.get_slice(name).get_shape():
                    count *= size
                yield name, count


def decoder_projection(name: str, vision_modules) -> tuple[int, str] | None:
    """(layer index, projection path in the layer) of a decoder projection's weight, e.g.
    ``(3, "self_attn.q_proj")``, or None for any other tensor: what nf4 quantizes. The vision
    tower's layers (SigLIP's q_proj too) are not decoder projections."""
    match = _DECODER_PROJECTION.search(name)
    if match is None or any(f"{module}." in name for module in vision_modules):
        return None
    return int(match["layer"]), match["projection"]


_DECODER_PROJECTION = re.compile(r"\.layers\.(?P<layer>\d+)\.(?P<projection>.*proj)\.weight$")


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know about the model, read without loading it."""

    layers: int
    hidden_size: int
    intermediate_size: int
    quantizable_parameters: int  # the decoder layers' linear weights: what nf4 shrinks
    other_parameters: int  # embeddings, norms, lm_head, vision tower, projector (kept in bf16)
    lora_parameters: int

    @classmethod
    def from_folder(cls, folder: str | Path, config: TrainConfig) -> ModelShape:
        """From ``config.json`` and the safetensors headers (no tensor is read)."""
        from forensic_vlm.models.architectures import architecture_of

        vision = architecture_of(folder).vision_modules
        raw = json.loads((Path(folder) / "config.json").read_text())
        text = raw.get("text_config") or raw  # Qwen2.5-VL's own checkpoints keep it at the top level
        layers, hidden, intermediate = text["num_hidden_layers"], text["hidden_size"], text["intermediate_size"]
        quantizable = other = 0
        for name, count in tensor_sizes(folder):
            if decoder_projection(name, vision) is not None:
                quantizable += count
            else:
                other += count
        heads, kv_heads = text["num_attention_heads"], text.get("num_key_value_heads", text["num_attention_heads"])
        head_dim = text.get("head_dim") or hidden // heads
        sizes = {  # (in, out) of each projection of one decoder layer
            "q_proj": (hidden, heads * head_dim),
            "k_proj": (hidden, kv_heads * head_dim),
            "v_proj": (hidden, kv_heads * head_dim),
            "o_proj": (heads * head_dim, hidden),
            "gate_proj": (hidden, intermediate),
            "up_proj": (hidden, intermediate),
            "down_proj": (intermediate, hidden),
        }
        lora = layers * sum(config.lora_r * sum(sizes[m]) for m in config.lora_target_modules if m in sizes)
        return cls(layers, hidden, intermediate, quantizable, other, lora)

    def weight_bytes(self, quantization: str, bf16_layers: int = 0) -> float:
        """Base weights when the decoder layers after the first ``bf16_layers`` are in ``quantization``."""
        four_bit = (
            self.quantizable_parameters * (self.layers - bf16_layers) / self.layers if quantization == "nf4" else 0
        )
        return four_bit * NF4_BYTES_PER_PARAMETER + (self.quantizable_parameters - four_bit + self.other_parameters) * 2

    def layer_activation_bytes(self, tokens: int) -> float:
        return tokens * ACTIVATION_BYTES_PER_TOKEN * (self.hidden_size + self.intermediate_size)

    def peak_bytes(self, quantization: str, checkpointed: int, tokens: int, bf16_layers: int = 0) -> float:
        """Estimated peak when ``checkpointed`` of the decoder layers recompute their activations
        (and, nf4, the first ``bf16_layers`` keep bf16 weights)."""
        kept = (self.layers - checkpointed) * self.layer_activation_bytes(tokens)
        # A checkpointed layer keeps its input; one at a time holds everything while it recomputes.
        recomputed = checkpointed * tokens * 2 * self.hidden_size
        recomputing = self.layer_activation_bytes(tokens) if checkpointed else 0
        lora = self.lora_parameters * LORA_BYTES_PER_PARAMETER
        return self.weight_bytes(quantization, bf16_layers) + lora + kept + recomputed + recomputing + RESERVE_BYTES


@dataclass(frozen=True)
class TrainingPlan:
    """The resolved plan; recorded in training.json and the log."""

    quantization: str  # "nf4" or "none" (bf16 on a GPU, float32 on the CPU)
    checkpointed_layers: int  # decoder layers that recompute their activations in the backward pass
    layers: int
    reason: str
    estimated_peak_GiB: float | None = None
    budget_GiB: float | None = None
    batch_tokens: int | None = None
    bf16_layers: int = 0  # nf4: the first decoder layers whose base weights stay bf16 (the budget allowed)

    def as_dict(self) -> dict:
        return asdict(self)


def choose_plan(
    shape: ModelShape,
    *,
    model: ModelConfig,
    train: TrainConfig,
    batch_tokens: int,
    budget_bytes: float | None,
) -> TrainingPlan:
    """The fastest plan whose estimated peak fits ``budget_bytes`` (None: no GPU, nothing to plan)."""
    layers = shape.layers
    fixed_layers = {True: layers, False: 0}.get(train.gradient_checkpointing)  # type: ignore[call-overload]
    if budget_bytes is None:
        quantization = train.quantization if train.quantization != "auto" else _cpu_quantization(model)
        checkpointed = layers if fixed_layers is None else fixed_layers
        return TrainingPlan(
            quantization,
            checkpointed,
            layers,
            f"no GPU: {quantization} base ({'train' if train.quantization != 'auto' else 'model'}.quantization), "
            f"{checkpointed} of {layers} layers recompute",
            batch_tokens=batch_tokens,
        )
    budget_gib = round(budget_bytes / GiB, 1)
    four_bit_counts = {"auto": range(layers + 1), "none": (0,), "nf4": (layers,)}[train.quantization]
    checkpoint_counts = range(layers + 1) if fixed_layers is None else (fixed_layers,)
    fitting = [
        (four_bit * NF4_LAYER_COST + checkpointed, peak, four_bit, checkpointed)
        for four_bit in four_bit_counts
        for checkpointed in checkpoint_counts
        if (peak := shape.peak_bytes(_quantization(four_bit), checkpointed, batch_tokens, layers - four_bit))
        <= budget_bytes
    ]
    if fitting:
        _cost, peak, four_bit, checkpointed = min(fitting)
        quantization = _quantization(four_bit)
        if quantization == "none":
            base = "bf16 base"
        elif four_bit == layers:
            base = "nf4 base"
        else:
            base = f"nf4 base with the first {layers - four_bit} of {layers} layers' weights kept in bf16"
        return TrainingPlan(
            quantization,
            checkpointed,
            layers,
            f"{base} with {checkpointed} of {layers} layers recomputing is the fastest plan "
            f"estimated to fit: {peak / GiB:.1f} GiB of {budget_gib} GiB for {batch_tokens} tokens a batch",
            estimated_peak_GiB=round(peak / GiB, 1),
            budget_GiB=budget_gib,
            batch_tokens=batch_tokens,
            bf16_layers=0 if quantization == "none" else layers - four_bit,
        )
    quantization = _quantization(max(four_bit_counts))  # the smallest weights allowed
    checkpointed = layers if fixed_layers is None else fixed_layers
    peak = shape.peak_bytes(quantization, checkpointed, batch_tokens)
    log.warning(
        "train: no plan is estimated to fit %.1f GiB (the smallest needs %.1f GiB); trying %s with %d layers "
        "recomputing. If it runs out of memory, lower train.batch_size or model.max_tiles.",
        budget_bytes / GiB,
        peak / GiB,
        quantization,
        checkpointed,
    )
    return TrainingPlan(
        quantization,
        checkpointed,
        layers,
        f"nothing estimated to fit {budget_gib} GiB; the smallest plan needs {peak / GiB:.1f} GiB",
        estimated_peak_GiB=round(peak / GiB, 1),
        budget_GiB=budget_gib,
        batch_tokens=batch_tokens,
    )


def _quantization(four_bit_layers: int) -> str:
    return "nf4" if four_bit_layers else "none"


def _cpu_quantization(model: ModelConfig) -> str:
    """The base trained on without a GPU: full weights only where model.quantization asks for them."""
    return "none" if model.quantization in ("none", "fp8") else "nf4"


def memory_budget(train: TrainConfig, device) -> float | None:
    """Bytes the plan may use: ``train.memory_budget_gib``, else the card's free memory; None on the CPU."""
    import torch

    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    if train.memory_budget_gib is None:
        return float(free)
    return min(float(free), train.memory_budget_gib * GiB)
