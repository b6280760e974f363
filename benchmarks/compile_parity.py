"""Why a compiled training run departs from the eager one on CUDA (issue 27): a narrow, fast probe.

A random LLaVA-1.6-Mistral-7B with the full geometry but few decoder layers (the full processor, so
the same 2,381-token images), on the GPU:

- ``forward``: the language model's hidden states and their LoRA gradients, eager against the same
  layers compiled, in training mode with recomputation; and causality: whether changing the last
  tokens' inputs moves any earlier position's output (it must not in a causal decoder).
- ``train``: ``train_adapter`` eager and compiled on the same images, the per-step losses.

Usage (on the device machine): python benchmarks/compile_parity.py --out-dir $OUT --processor .bench/processor
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_full_scale import FULL_SIZES, TINY_SIZES, full_size_config, write_images

from forensic_vlm.config import DEFAULT_CLASSES, ModelConfig, TrainConfig

log = logging.getLogger("compile_parity")


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def write_model(folder: Path, processor, *, text_layers: int, vision_layers: int, tiny: bool) -> None:
    from transformers import AutoModelForImageTextToText

    config = full_size_config(tiny)
    config.text_config.num_hidden_layers = text_layers
    config.vision_config.num_hidden_layers = vision_layers
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForImageTextToText.from_config(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)


def forward_probe(model_dir: Path, tokens: int, *, checkpointing: bool, dynamic: bool) -> dict:
    """Eager against compiled on one sequence of ``tokens`` inputs: outputs, gradients, causality."""
    from forensic_vlm.modeling import add_lora, architecture_of_model, language_model, load_base_model

    device = torch.device(DEVICE, 0) if DEVICE == "cuda" else torch.device(DEVICE)
    model = load_base_model(ModelConfig(name_or_path=str(model_dir), quantization="none"), device)
    layers_count = model.config.text_config.num_hidden_layers
    model = add_lora(
        model,
        TrainConfig(lora_dropout=0.0),
        quantized=False,
        checkpointed_layers=layers_count if checkpointing else 0,
    )
    model.train()
    decoder = language_model(model, architecture_of_model(model))
    torch.manual_seed(1)
    embeds = torch.randn(1, tokens, model.config.text_config.hidden_size, device=device, dtype=torch.bfloat16)
    changed = embeds.clone()
    changed[:, -8:] = torch.randn_like(changed[:, -8:])
    # A fixed random projection of the output as the loss (a mean of squares is dominated by the
    # residual stream and leaves LoRA's gradients at rounding level); LoRA's B drawn at random, so
    # that A has gradients too.
    projection = torch.randn_like(embeds, dtype=torch.float32)
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)

    def run(inputs):
        for p in lora:
            p.grad = None
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            hidden = decoder(inputs_embeds=inputs, use_cache=False).last_hidden_state
        (hidden.float() * projection).sum().backward()
        return hidden.detach().float(), torch.cat([p.grad.flatten().float() for p in lora])

    eager_out, eager_grad = run(embeds)
    eager_changed, _ = run(changed)
    for layer in decoder.layers:
        layer.compile(dynamic=dynamic)
    compiled_out, compiled_grad = run(embeds)
    compiled_again, compiled_grad_again = run(embeds)
    compiled_changed, _ = run(changed)
    head = slice(0, tokens - 8)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    result = {
        "tokens": tokens,
        "checkpointing": checkpointing,
        "dynamic": dynamic,
        "output_rel_diff": rel(compiled_out, eager_out),
        "second_call_output_rel_diff": rel(compiled_again, eager_out),
        "grad_rel_diff": rel(compiled_grad, eager_grad),
        "second_call_grad_rel_diff": rel(compiled_grad_again, eager_grad),
        "eager_earlier_positions_moved_by_later_inputs": float(
            (eager_changed[:, head] - eager_out[:, head]).abs().max()
        ),
        "compiled_earlier_positions_moved_by_later_inputs": float(
            (compiled_changed[:, head] - compiled_out[:, head]).abs().max()
        ),
    }
    log.info("forward %s", result)
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return result


def train_probe(model_dir: Path, root: Path, table: Path, name: str, **train) -> dict:
    """The same steps eager, compiled, and compiled with Inductor rounding to bf16 where eager
    does (``emulate_precision_casts``); per step the loss, LoRA's gradient norm before the
    optimizer step and the size of the step it takes."""
    import csv

    import torch._inductor.config as inductor

    from forensic_vlm.train import load_training_data, train_adapter

    data = load_training_data(table, table, root / "raw_data", None)
    runs = {}
    adamw_step = torch.optim.AdamW.step
    for label, compiled, emulate in (("eager", False, False), ("compiled", True, False), ("emulated", True, True)):
        work = root / f"train_{name}_{label}"
        inductor.emulate_precision_casts = emulate
        grads, updates = [], []

        def recorded_step(self, closure=None, grads=grads, updates=updates):
            # Lightning passes forward and backward (and the clipping) as the closure.
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            grads.append(float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params]))))
            before = [p.detach().clone() for p in params]
            adamw_step(self)
            updates.append(
                float(
                    torch.linalg.vector_norm(
                        torch.stack([(p - q).float().norm() for p, q in zip(params, before, strict=True)])
                    )
                )
            )
            return loss

        torch.optim.AdamW.step = recorded_step
        config = TrainConfig(
            epochs=1, batch_size=1, accumulate_grad_batches=1, num_workers=2, compile=compiled, **train
        )
        try:
            train_adapter(
                data,
                list(DEFAULT_CLASSES),
                model_config=ModelConfig(name_or_path=str(model_dir)),
                config=config,
                adapter_dir=work / "adapter",
                work_dir=work,
            )
        finally:
            torch.optim.AdamW.step = adamw_step
            inductor.emulate_precision_casts = False
        with open(work / "metrics.csv", newline="") as handle:
            losses = [float(r["train_loss"]) for r in csv.DictReader(handle) if r["train_loss"]]
        runs[label] = {
            "losses": [round(x, 4) for x in losses],
            "grad_norms": [float(f"{x:.4g}") for x in grads],
            "update_norms": [float(f"{x:.4g}") for x in updates],
        }
        torch._dynamo.reset()
    eager = np.array(runs["eager"]["losses"])
    for label in ("compiled", "emulated"):
        relative = np.abs(np.array(runs[label]["losses"]) - eager) / np.abs(eager)
        runs[label]["mean_rel_to_eager"] = float(relative.mean())
        runs[label]["max_rel_to_eager"] = float(relative.max())
    result = {"train": train, **runs}
    log.info("train %s %s", name, json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/compile_parity"))
    parser.add_argument("--processor", type=Path, required=True)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2381, help="the forward probe's sequence length")
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--tiny", action="store_true", help="the demo's geometry (a check of this script on the CPU)")
    parser.add_argument("--probes", nargs="*", default=["forward", "train"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from transformers import AutoProcessor

    root = args.work_dir
    model_dir = root / "model"
    if not model_dir.exists():
        write_model(
            model_dir,
            AutoProcessor.from_pretrained(args.processor),
            text_layers=args.text_layers,
            vision_layers=args.vision_layers,
            tiny=args.tiny,
        )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / "compile_parity.json"
    result: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"}
    if "forward" in args.probes:
        result["forward"] = [
            forward_probe(model_dir, tokens, checkpointing=ckpt, dynamic=dyn)
            for tokens, ckpt, dyn in [
                (args.tokens, True, True),
                (args.tokens, False, True),
                (args.tokens, True, False),
                (300, True, True),
            ]
        ]
        out.write_text(json.dumps(result, indent=2))
    if "train" in args.probes:
        table = write_images(root, args.images, TINY_SIZES if args.tiny else FULL_SIZES, seed=7)
        result["train"] = {}
        for name, train in {
            "recompute": {"quantization": "none", "gradient_checkpointing": True},
        }.items():
            result["train"][name] = train_probe(model_dir, root, table, name, **train)
            out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
