"""GPU paths (nf4 on CUDA, bf16-mixed training). Marked ``gpu``: skipped without CUDA, run on the
device machine by ``benchmarks/run_on_device.sh``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import CLI, eager_and_compiled_losses, train_command
from forensic_vlm.config import DEFAULT_CLASSES, EvaluateConfig, ModelConfig, TrainConfig
from forensic_vlm.evaluate import evaluate_split
from forensic_vlm.modeling import add_lora, compute_dtype, decoder_layers, load_base_model, resolve_device
from forensic_vlm.tables import read_tsv
from forensic_vlm.train import load_training_data, train_adapter

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def train_on_cuda(model: ModelConfig, dataset: dict, work: Path, *, quantization: str, epochs: int) -> dict:
    """The tiny model's adapter trained into ``work / "adapter"`` on a ``quantization`` base."""
    data = load_training_data(dataset["train"], dataset["val"], dataset["raw_data"], None)
    train = TrainConfig(
        learning_rate=3e-3, epochs=epochs, batch_size=4, accumulate_grad_batches=1, num_workers=0,
        quantization=quantization,
    )  # fmt: skip
    return train_adapter(
        data, list(DEFAULT_CLASSES), model_config=model, config=train, adapter_dir=work / "adapter", work_dir=work
    )


def test_nf4_on_cuda_quantizes_the_language_model_only(tiny_model: Path) -> None:
    config = ModelConfig(name_or_path=str(tiny_model), quantization="nf4")
    device = resolve_device(config)
    assert device.type == "cuda" and compute_dtype(device) == torch.bfloat16
    model = load_base_model(config, device)
    assert type(model.model.language_model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    vision = model.model.vision_tower.encoder.layers[0].self_attn.q_proj
    assert type(vision).__name__ == "Linear" and vision.weight.dtype == torch.bfloat16
    assert type(model.lm_head).__name__ == "Linear"


@pytest.mark.parametrize("upcast", [False, True])
def test_nf4_training_keeps_frozen_weights_in_bf16_unless_upcast_is_asked(tiny_model: Path, upcast: bool) -> None:
    config = ModelConfig(name_or_path=str(tiny_model), quantization="nf4")
    model = load_base_model(config, resolve_device(config))
    train = TrainConfig(num_workers=0, quantization="nf4", upcast_frozen_weights=upcast)
    model = add_lora(model, train, quantized=True, checkpointed_layers=1).get_base_model()
    frozen = torch.float32 if upcast else torch.bfloat16
    assert model.lm_head.weight.dtype == frozen
    assert model.model.vision_tower.encoder.layers[0].self_attn.q_proj.weight.dtype == frozen
    assert model.model.language_model.norm.weight.dtype == frozen
    assert decoder_layers(model)[0].gradient_checkpointing and not decoder_layers(model)[1].gradient_checkpointing


def test_qlora_training_and_scoring_on_cuda(tiny_model: Path, tiny_dataset, tmp_path: Path) -> None:
    model = ModelConfig(name_or_path=str(tiny_model), quantization="nf4")
    metrics = train_on_cuda(model, tiny_dataset, tmp_path, quantization="nf4", epochs=2)
    assert metrics["precision"] == "bf16-mixed"
    assert "H100" in metrics["device"] or "H200" in metrics["device"]
    result = evaluate_split(
        tiny_dataset["val"],
        tiny_dataset["raw_data"],
        classes=list(DEFAULT_CLASSES),
        model_config=model,
        config=EvaluateConfig(num_workers=0),
        out_dir=tmp_path / "eval",
        adapter=tmp_path / "adapter",
    )
    assert result["n"] == len(read_tsv(tiny_dataset["val"])) and 0.0 <= result["accuracy"] <= 1.0


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_compiled_training_follows_the_eager_loss_curve(
    tiny_model: Path, tiny_dataset, tmp_path: Path, quantization: str
) -> None:
    """train.compile: the same steps, the same images, losses within bf16 rounding of eager. The
    gate of train.compile's eager numerics on CUDA (issue 27: without them a compiled run's losses
    fell 15 % below eager's)."""
    model = ModelConfig(name_or_path=str(tiny_model))
    losses, _ = eager_and_compiled_losses(model, tiny_dataset, tmp_path, quantization)
    relative = np.abs(losses[True] - losses[False]) / np.abs(losses[False])
    assert relative.mean() < 0.01 and relative.max() < 0.05, relative


def test_compiled_scoring_matches_eager(tiny_model: Path, tiny_dataset, tmp_path: Path) -> None:
    model = ModelConfig(name_or_path=str(tiny_model), quantization="none")
    probabilities = {}
    for compiled in (False, True):
        out = tmp_path / f"compile_{compiled}"
        evaluate_split(
            tiny_dataset["train"],
            tiny_dataset["raw_data"],
            classes=list(DEFAULT_CLASSES),
            model_config=model,
            config=EvaluateConfig(num_workers=0, bootstrap_samples=10, compile=compiled),
            out_dir=out,
        )
        rows = read_tsv(out / "predictions.tsv")
        probabilities[compiled] = np.array([[float(r[f"p{c}"]) for c in range(4)] for r in rows])
    assert np.abs(probabilities[True] - probabilities[False]).max() < 2e-2  # bf16 rounding, not a new function


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_evaluation_on_two_gpus_matches_one(tiny_model: Path, tiny_dataset, tmp_path: Path) -> None:
    model = ModelConfig(name_or_path=str(tiny_model), quantization="nf4")
    rows = {}
    for devices in (1, 2):
        metrics = evaluate_split(
            tiny_dataset["train"],
            tiny_dataset["raw_data"],
            classes=list(DEFAULT_CLASSES),
            model_config=model,
            config=EvaluateConfig(num_workers=0, bootstrap_samples=10, devices=devices),
            out_dir=tmp_path / f"gpus{devices}",
        )
        assert metrics["devices"] == devices
        rows[devices] = read_tsv(tmp_path / f"gpus{devices}" / "predictions.tsv")
    assert [r["predicted"] for r in rows[1]] == [r["predicted"] for r in rows[2]]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ddp_qlora_training_on_two_gpus(tiny_model: Path, tiny_dataset, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(tiny_model), "quantization": "nf4"},
                "train": {
                    "learning_rate": 3e-3,
                    "epochs": 2,
                    "batch_size": 2,
                    "accumulate_grad_batches": 1,
                    "num_workers": 0,
                    "devices": 2,
                },
            }
        )
    )
    subprocess.run(
        [*CLI, *train_command(config, tiny_dataset, tmp_path / "adapter")],
        check=True,
    )
    card = json.loads((tmp_path / "adapter" / "training.json").read_text())
    assert card["validation"]["devices"] == 2 and card["validation"]["precision"] == "bf16-mixed"
    assert card["validation"]["global_step"] == 12  # 12 batches of 2 a epoch, 6 per GPU, 2 epochs


def test_auto_plan_on_cuda_takes_bf16_without_recomputation_and_its_estimate_covers_the_peak(
    tiny_model: Path, tiny_dataset, tmp_path: Path
) -> None:
    data = load_training_data(tiny_dataset["train"], tiny_dataset["val"], tiny_dataset["raw_data"], None)
    metrics = train_adapter(
        data,
        list(DEFAULT_CLASSES),
        model_config=ModelConfig(name_or_path=str(tiny_model)),
        config=TrainConfig(epochs=1, batch_size=4, accumulate_grad_batches=1, num_workers=0),
        adapter_dir=tmp_path / "adapter",
        work_dir=tmp_path,
    )
    plan = metrics["plan"]
    assert (plan["quantization"], plan["checkpointed_layers"]) == ("none", 0), plan
    assert plan["estimated_peak_GiB"] >= metrics["train_peak_memory_GiB"]
    small = TrainConfig(epochs=1, batch_size=4, accumulate_grad_batches=1, num_workers=0, memory_budget_gib=0.001)
    tight = train_adapter(
        data,
        list(DEFAULT_CLASSES),
        model_config=ModelConfig(name_or_path=str(tiny_model)),
        config=small,
        adapter_dir=tmp_path / "adapter_tight",
        work_dir=tmp_path / "tight",
    )
    assert tight["plan"]["quantization"] == "nf4" and "nothing estimated to fit" in tight["plan"]["reason"]


def test_liger_changes_only_the_model_it_was_applied_to(tiny_model: Path) -> None:
    pytest.importorskip("liger_kernel")
    from transformers.models.mistral import modeling_mistral

    from forensic_vlm.kernels import apply_fused_kernels

    before = {n: getattr(modeling_mistral, n) for n in ("MistralRMSNorm", "MistralMLP", "apply_rotary_pos_emb")}
    config = ModelConfig(name_or_path=str(tiny_model), quantization="none")
    patched = load_base_model(config, resolve_device(config))
    apply_fused_kernels(patched)
    assert {n: getattr(modeling_mistral, n) for n in before} == before
    # Liger patches the instances (their forward and the name they print), not their classes.
    from liger_kernel.transformers import LigerRMSNorm, LigerSwiGLUMLP

    mlp, norm = patched.model.language_model.layers[0].mlp, patched.model.language_model.norm
    assert mlp.forward.__func__ is LigerSwiGLUMLP.forward and mlp._get_name() == "LigerSwiGLUMLP"
    assert norm.forward.__func__ is LigerRMSNorm.forward
    later = load_base_model(config, resolve_device(config))
    later_mlp, later_norm = later.model.language_model.layers[0].mlp, later.model.language_model.norm
    assert later_mlp.forward.__func__ is modeling_mistral.MistralMLP.forward and later_mlp._get_name() == "MistralMLP"
    assert later_norm.forward.__func__ is modeling_mistral.MistralRMSNorm.forward


def test_fp8_scoring_is_compiled_and_recorded(tiny_model: Path, tiny_dataset, tmp_path: Path) -> None:
    pytest.importorskip("torchao")
    results = {}
    for quantization in ("none", "fp8"):
        results[quantization] = evaluate_split(
            tiny_dataset["val"],
            tiny_dataset["raw_data"],
            classes=list(DEFAULT_CLASSES),
            model_config=ModelConfig(name_or_path=str(tiny_model), quantization=quantization),
            config=EvaluateConfig(num_workers=0),
            out_dir=tmp_path / quantization,
        )
    assert results["fp8"]["compiled"] is True and results["none"]["compiled"] is False
    assert results["fp8"]["quantization"] == "fp8"
    rows = {q: read_tsv(tmp_path / q / "predictions.tsv") for q in results}
    assert [r["sha256"] for r in rows["fp8"]] == [r["sha256"] for r in rows["none"]]


def test_an_exported_model_gives_base_plus_adapters_classes_in_bf16_on_the_gpu(
    trained, tiny_model, tiny_dataset, tmp_path, measured
) -> None:
    from forensic_vlm.models.export import export_merged
    from forensic_vlm.tables import examples_from_table

    record = export_merged(
        trained["adapter"],
        tmp_path / "merged",
        examples=examples_from_table(read_tsv(tiny_dataset["val"]), tiny_dataset["raw_data"]),
        classes=list(DEFAULT_CLASSES),
        model_config=ModelConfig(name_or_path=str(tiny_model), quantization="none", device="cuda"),
        evaluate_config=EvaluateConfig(batch_size=4, num_workers=0),
    )
    parity = record["parity"]
    assert parity["compute"].startswith("bfloat16 on ")
    assert parity["same_class"] == parity["images"] == len(read_tsv(tiny_dataset["val"]))
    measured(
        f"export parity on the GPU: same class on {parity['same_class']} of {parity['images']} images, "
        f"largest probability difference {parity['largest_probability_difference']:.2e} ({parity['compute']})"
    )


def test_auto_takes_fp8_where_the_parity_gate_passes_it_and_bf16_where_it_fails(
    tiny_model: Path, tiny_dataset, tmp_path: Path
) -> None:
    """On a card of compute capability >= 8.9 with torchao, an adapter trained on a bf16 base gets
    FP8 as its candidate; scoring under auto follows the verdict, whichever way it went."""
    pytest.importorskip("torchao")
    from forensic_vlm.scoring import score_examples
    from forensic_vlm.speed import gate
    from forensic_vlm.tables import examples_from_table

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9")
    base = ModelConfig(name_or_path=str(tiny_model), quantization="auto")
    train_on_cuda(base, tiny_dataset, tmp_path, quantization="none", epochs=1)
    examples = examples_from_table(read_tsv(tiny_dataset["val"]), tiny_dataset["raw_data"])
    chosen = {}
    for name, (same, difference) in {"loose": (0.0, 1.0), "strict": (1.0, 0.0)}.items():
        config = EvaluateConfig(num_workers=0, parity_same_class=same, parity_max_difference=difference)
        verdict = gate.run_parity_gate(
            tiny_dataset["val"], tiny_dataset["raw_data"], tmp_path / f"{name}.json", classes=list(DEFAULT_CLASSES),
            model_config=base, config=config, adapter=tmp_path / "adapter",
        )  # fmt: skip
        assert verdict["candidate"] == {"quantization": "fp8", "kernels": "transformers", "compiled": True}
        scores = score_examples(
            examples, [0, 1, 2, 3], model_config=base, config=config, adapter=tmp_path / "adapter", cache_dir=None,
            kind=name, gate=gate.read_verdict(tmp_path / f"{name}.json"),
        )  # fmt: skip
        chosen[name] = (verdict["passed"], scores.path["quantization"], scores.path["compiled"])
        assert verdict["measured"]["max_probability_difference"] > 0  # FP8 moves the probabilities
    assert chosen == {"loose": (True, "fp8", True), "strict": (False, "none", False)}


def test_static_fp8_scales_score_close_to_dynamic_fp8(tiny_model: Path, tiny_dataset, tmp_path: Path) -> None:
    """FP8 with calibrated static activation scales (per tensor) runs compiled on the GPU and scores
    close to bf16 eager (the parity gate's reference), on a tiny model 256 wide: torchao 0.18 takes a
    128 x 128 weight's per-tensor scale for 128 x 128 blockwise scaling (to_fp8 names that error).
    On one H200 the same model scored with dynamic rowwise FP8 gave NaN for some images (issue 27):
    scoring now stops on that (NonFiniteScoresError) and the gate fails such a candidate."""
    pytest.importorskip("torchao")
    from conftest import training_batch
    from forensic_vlm.config import REFERENCE_QUESTION
    from forensic_vlm.decoding import class_probabilities, to_device
    from forensic_vlm.kernels import fp8_activation_scales, to_fp8
    from forensic_vlm.modeling import compile_decoder_layers, load_processor
    from forensic_vlm.prompting import answer_tokens

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9")
    from transformers import AutoTokenizer

    from forensic_vlm.config import DemoModelConfig
    from forensic_vlm.demo_model import build_demo_model

    wide = build_demo_model(
        tmp_path / "wide", DemoModelConfig(text_hidden_size=256), tokenizer=AutoTokenizer.from_pretrained(tiny_model)
    )
    config = ModelConfig(name_or_path=str(wide), quantization="none")
    device = resolve_device(config)
    batch = training_batch(tiny_model, tiny_dataset, 3)  # the same processor and vision tower
    inputs = to_device(
        {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")}, device, torch.bfloat16
    )
    class_ids = answer_tokens(load_processor(tiny_model), REFERENCE_QUESTION, [0, 1, 2, 3]).class_ids
    probabilities = {}
    for kind in ("bf16", "static"):
        model = load_base_model(config, device).eval()
        if kind == "static":
            calibrate = lambda model=model: model(**inputs)  # noqa: E731
            to_fp8(model, "decoder", fp8_activation_scales(model, "decoder", calibrate))
            compile_decoder_layers(model)
        with torch.no_grad():
            probabilities[kind] = class_probabilities(model, inputs, class_ids).float().cpu()
    assert torch.isfinite(probabilities["static"]).all()
    assert (probabilities["static"] - probabilities["bf16"]).abs().max() < 0.05
