"""The training plan (train.quantization / gradient_checkpointing: auto), the answer-only loss, the
vision tower without autograd, and the scoring paths' named errors: all on the CPU with the tiny model.
What they buy on a GPU is measured by benchmarks/gpu_full_scale.py (docs/performance.md)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FAST, eager_and_compiled_losses, model_config, training_batch
from forensic_vlm.batches import model_inputs
from forensic_vlm.config import REFERENCE_QUESTION, EvaluateConfig, ModelConfig, TrainConfig
from forensic_vlm.errors import ConfigError, DeviceError
from forensic_vlm.kernels import fused_kernels_wanted, require_fp8
from forensic_vlm.lightning_module import answer_loss
from forensic_vlm.modeling import add_lora, decoder_layers, load_adapter, load_base_model, load_processor
from forensic_vlm.prompting import answer_tokens
from forensic_vlm.scoring import scoring_path
from forensic_vlm.training_plan import GiB, ModelShape, choose_plan

LABELS = [0, 1, 2, 3]
CPU = torch.device("cpu")
#: LLaVA-1.6-Mistral-7B's shape (its config and parameter counts), without its files.
MISTRAL_7B = ModelShape(
    layers=32,
    hidden_size=4096,
    intermediate_size=14336,
    quantizable_parameters=6_979_321_856 - 2 * 32064 * 4096 - 32 * 2 * 4096 - 4096,
    other_parameters=7_566_747_648 - (6_979_321_856 - 2 * 32064 * 4096 - 32 * 2 * 4096 - 4096),
    lora_parameters=41_943_040,
)


def plan_for(budget_gib: float | None, tokens: int = 3013, **train):
    return choose_plan(
        MISTRAL_7B,
        model=ModelConfig(quantization="nf4"),
        train=TrainConfig(**train),
        batch_tokens=tokens,
        budget_bytes=None if budget_gib is None else budget_gib * GiB,
    )


def test_auto_plan_takes_the_fastest_plan_that_fits_the_card() -> None:
    roomy = plan_for(139)
    assert (roomy.quantization, roomy.checkpointed_layers) == ("none", 0)
    assert roomy.estimated_peak_GiB <= 139 and "bf16 base with 0 of 32" in roomy.reason
    middle = plan_for(32)  # bf16 weights fit, not every layer's activations
    assert middle.quantization == "none" and 0 < middle.checkpointed_layers < 32
    assert middle.estimated_peak_GiB <= 32
    fewer = plan_for(32, tokens=1500)  # shorter batches: fewer layers need to recompute
    assert fewer.checkpointed_layers < middle.checkpointed_layers
    small = plan_for(16)  # a 16 GB card: not every layer's bf16 weights fit
    assert small.quantization == "nf4" and small.estimated_peak_GiB <= 16
    assert plan_for(12).quantization == "nf4" and plan_for(24).quantization == "none"  # bf16 recomputing fits 24


def test_a_tight_budget_keeps_as_many_layers_bf16_as_fit_and_recomputes_them_all() -> None:
    """4-bit weights cost a layer more time than recomputing it and save less memory, so the plan
    spends memory on bf16 weights first (training_plan.NF4_LAYER_COST)."""
    small = plan_for(16)
    assert small.checkpointed_layers == 32 and 0 < small.bf16_layers < 32
    assert f"the first {small.bf16_layers} of 32 layers' weights kept in bf16" in small.reason
    one_more = MISTRAL_7B.peak_bytes("nf4", 32, 3013, small.bf16_layers + 1)
    assert one_more > 16 * GiB >= MISTRAL_7B.peak_bytes("nf4", 32, 3013, small.bf16_layers)
    assert 0 < plan_for(12).bf16_layers < small.bf16_layers < plan_for(18).bf16_layers
    qlora = plan_for(16, quantization="nf4")  # every layer 4-bit, as asked: fewer layers recompute instead
    assert (qlora.bf16_layers, qlora.quantization) == (0, "nf4") and qlora.checkpointed_layers < 32
    assert plan_for(139).bf16_layers == plan_for(24).bf16_layers == 0  # bf16 bases: nothing to keep


def test_a_plan_that_cannot_fit_says_so_and_takes_the_smallest(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        tiny_card = plan_for(6)
    assert (tiny_card.quantization, tiny_card.checkpointed_layers) == ("nf4", 32)
    assert "nothing estimated to fit 6" in tiny_card.reason
    assert "lower train.batch_size or model.max_tiles" in caplog.text


def test_fixed_settings_are_kept_and_the_cpu_follows_the_model_setting() -> None:
    forced = plan_for(139, quantization="nf4", gradient_checkpointing=True)
    assert (forced.quantization, forced.checkpointed_layers) == ("nf4", 32)
    assert plan_for(139, gradient_checkpointing=False).checkpointed_layers == 0
    cpu = plan_for(None)
    assert (cpu.quantization, cpu.checkpointed_layers) == ("nf4", 32)  # model.quantization nf4
    assert cpu.reason.startswith("no GPU") and cpu.estimated_peak_GiB is None
    assert plan_for(None, quantization="none", gradient_checkpointing=False).checkpointed_layers == 0


def test_the_plans_bf16_layers_load_in_bf16_and_the_rest_in_four_bits(tiny_model: Path, tmp_path: Path) -> None:
    """Twelve layers, two kept bf16: bitsandbytes' skip list must not take "layers.1" for
    "layers.10" and "layers.11" (transformers matches it as regular expressions)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoTokenizer

    from forensic_vlm.config import DemoModelConfig
    from forensic_vlm.demo_model import build_demo_model
    from forensic_vlm.errors import UnsupportedModelError
    from forensic_vlm.modeling import architecture_of_model, check_four_bit_layers

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)  # the tiny model's: no download
    folder = build_demo_model(tmp_path / "twelve", DemoModelConfig(num_layers=12), tokenizer=tokenizer)
    model = load_base_model(ModelConfig(name_or_path=str(folder), quantization="nf4"), CPU, bf16_layers=2)
    four_bit = [
        sorted({type(m.weight).__name__ == "Params4bit" for n, m in layer.named_modules() if n.endswith("proj")})
        for layer in decoder_layers(model)
    ]
    assert four_bit == [[False]] * 2 + [[True]] * 10
    with pytest.raises(UnsupportedModelError, match=r"decoder layer 2's self_attn\.q_proj loaded in 4 bits"):
        check_four_bit_layers(model, architecture_of_model(model), 3)


def test_model_shape_is_read_from_the_files_without_loading(tiny_model: Path) -> None:
    shape = ModelShape.from_folder(tiny_model, TrainConfig())
    model = load_base_model(model_config(tiny_model), CPU)
    projections = sum(
        p.numel() for n, p in model.named_parameters() if "language_model.layers." in n and n.endswith("proj.weight")
    )
    assert shape.quantizable_parameters == projections
    assert shape.quantizable_parameters + shape.other_parameters == sum(p.numel() for p in model.parameters())
    lora = add_lora(model, TrainConfig(**FAST), quantized=False, checkpointed_layers=0)
    assert shape.lora_parameters == sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    assert shape.layers == len(decoder_layers(lora))


def test_answer_loss_equals_the_models_own_loss_from_the_answer_logits_only(tiny_model: Path, tiny_dataset) -> None:
    batch = training_batch(tiny_model, tiny_dataset, 4)
    model = add_lora(
        load_base_model(model_config(tiny_model), CPU), TrainConfig(**FAST), quantized=False, checkpointed_layers=0
    ).eval()  # no dropout: both losses from the same function
    inputs = model_inputs(batch)
    answer_length = int((batch["labels"] != -100).any(dim=0).sum())
    kept = []
    model.register_forward_hook(lambda module, args, out: kept.append(out.logits.shape[1]))
    with torch.no_grad():
        own = model(**inputs, labels=batch["labels"]).loss
        ours = answer_loss(model, inputs, batch["labels"])
    assert ours.item() == pytest.approx(own.item(), rel=1e-5)
    assert kept == [batch["labels"].shape[1], answer_length + 1]  # the full sequence, then the answer only
    with pytest.raises(ValueError, match="no answer tokens"):
        answer_loss(model, inputs, torch.full_like(batch["labels"], -100))


@pytest.mark.parametrize("checkpointed", [0, 1])
def test_vision_tower_keeps_no_graph_and_only_the_chosen_layers_recompute(
    tiny_model: Path, tiny_dataset, checkpointed: int
) -> None:
    batch = training_batch(tiny_model, tiny_dataset, 4)
    model = add_lora(
        load_base_model(model_config(tiny_model), CPU),
        TrainConfig(**FAST),
        quantized=False,
        checkpointed_layers=checkpointed,
    )
    assert [layer.gradient_checkpointing for layer in decoder_layers(model)] == [i < checkpointed for i in range(2)]
    seen = {}
    base = model.get_base_model().model
    base.vision_tower.register_forward_hook(lambda m, a, out: seen.update(vision=out.pooler_output.requires_grad))
    base.multi_modal_projector.register_forward_hook(lambda m, a, out: seen.update(projector=out.requires_grad))
    loss = answer_loss(model, model_inputs(batch), batch["labels"])
    loss.backward()
    assert seen == {"vision": False, "projector": False}
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    # A projector trained fully (train.trainable) still gets its gradient through the image features.
    trained = add_lora(
        load_base_model(model_config(tiny_model), CPU),
        TrainConfig(**{**FAST, "trainable": ("multi_modal_projector",)}),
        quantized=False,
        checkpointed_layers=checkpointed,
    )
    answer_loss(trained, model_inputs(batch), batch["labels"]).backward()
    projector = [p for n, p in trained.named_parameters() if "multi_modal_projector" in n and p.requires_grad]
    assert projector and all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector)


def test_training_records_the_plan_it_took(trained: dict) -> None:
    plan = trained["metrics"]["plan"]
    assert plan["quantization"] == "none" and plan["reason"].startswith("no GPU")
    assert trained["metrics"]["kernels"] == "transformers"


def test_gpu_only_paths_stop_with_a_named_error_on_the_cpu() -> None:
    assert not fused_kernels_wanted(ModelConfig(kernels="auto"), CPU)
    with pytest.raises(DeviceError, match=r"model\.kernels is liger, which needs a CUDA GPU"):
        fused_kernels_wanted(ModelConfig(kernels="liger"), CPU)
    with pytest.raises(DeviceError, match=r"model\.quantization is fp8, which needs a CUDA GPU"):
        require_fp8(CPU)
    assert scoring_path(ModelConfig(quantization="nf4"), EvaluateConfig(), CPU) == {
        "quantization": "nf4",
        "kernels": "transformers",
        "compiled": False,
    }
    with pytest.raises(ConfigError, match=r"train\.memory_budget_gib"):
        TrainConfig(memory_budget_gib=0)


def test_an_adapter_merged_for_scoring_gives_the_same_probabilities(tiny_model: Path, tiny_dataset, trained) -> None:
    from forensic_vlm.decoding import class_probabilities

    batch = training_batch(tiny_model, tiny_dataset, 4)
    processor = load_processor(tiny_model)
    answer = answer_tokens(processor, REFERENCE_QUESTION, LABELS)
    inputs = model_inputs(batch)
    with torch.no_grad():
        unmerged = load_adapter(load_base_model(model_config(tiny_model), CPU), trained["adapter"]).eval()
        expected = class_probabilities(unmerged, inputs, answer.class_ids)
        merged = unmerged.merge_and_unload()
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        got = class_probabilities(merged, inputs, answer.class_ids)
    assert (expected - got).abs().max().item() < 1e-5
    assert expected.std(dim=0).max() > 0.01  # the adapter's answers depend on the image


def test_ddp_ranks_take_rank_0s_plan_and_stop_without_one(tmp_path: Path) -> None:
    from forensic_vlm.errors import ResumeError
    from forensic_vlm.train import _shared_plan

    with pytest.raises(ResumeError, match="rank 1 found no plan from rank 0"):
        _shared_plan(tmp_path, 1, lambda: pytest.fail("only rank 0 chooses"))
    chosen = plan_for(32)
    assert _shared_plan(tmp_path, 0, lambda: chosen) == chosen
    assert _shared_plan(tmp_path, 1, lambda: plan_for(139)) == chosen  # not its own card's plan


def test_scoring_quantization_auto_follows_the_base_the_adapter_was_trained_on(trained, tmp_path: Path, caplog) -> None:
    import json
    import shutil

    from forensic_vlm.scoring import scoring_quantization

    adapter = trained["adapter"]  # trained on the CPU with model.quantization none
    assert scoring_quantization(ModelConfig(quantization="auto"), adapter) == "none"
    assert scoring_quantization(ModelConfig(quantization="auto"), None) == "nf4"  # zero-shot: the reference's
    with caplog.at_level(logging.WARNING):
        assert scoring_quantization(ModelConfig(quantization="nf4"), adapter) == "nf4"
    assert "its review thresholds validated on a none base" in caplog.text
    older = tmp_path / "older"  # an adapter from before the training plan: its model.quantization
    shutil.copytree(adapter, older)
    card = json.loads((older / "training.json").read_text())
    del card["validation"]["plan"]
    card["model"]["quantization"] = "nf4"
    (older / "training.json").write_text(json.dumps(card))
    assert scoring_quantization(ModelConfig(quantization="auto"), older) == "nf4"


def test_fp8_scope_picks_the_decoder_projections_it_names(tiny_model: Path) -> None:
    from forensic_vlm.kernels import fp8_targets

    language_model = load_base_model(model_config(tiny_model), CPU).model.language_model
    every = fp8_targets(language_model, "decoder")
    assert len(every) == 7 * len(language_model.layers)  # q, k, v, o, gate, up, down of each layer
    assert all(name.startswith("layers.") for name in every)  # never lm_head, embeddings or vision
    assert fp8_targets(language_model, "mlp") == {n for n in every if ".mlp." in n}
    with pytest.raises(ConfigError, match="fp8_scope inner leaves no linear layer in FP8 in a model of 2"):
        fp8_targets(language_model, "inner")  # the tiny model has only its first and last two layers
    fp8 = ModelConfig(quantization="fp8", fp8_scope="mlp")
    assert scoring_path(fp8, EvaluateConfig(), CPU)["fp8_scope"] == "mlp"  # part of the cache key


def test_static_fp8_scales_map_the_largest_input_seen_onto_float8s_largest(tiny_model: Path, tiny_dataset) -> None:
    """Calibration (kernels.fp8_activation_scales) sees every FP8 layer's input and scales it so the
    largest magnitude over all calibration images is e4m3's 448; the model is left as it was."""
    from forensic_vlm.kernels import fp8_activation_scales

    model = load_base_model(model_config(tiny_model), CPU)
    language_model = model.model.language_model
    batches = [training_batch(tiny_model, tiny_dataset, every) for every in (5, 7)]
    seen: dict[str, float] = {}
    probes = [
        module.register_forward_pre_hook(
            lambda module, args, name=name: seen.__setitem__(name, max(seen.get(name, 0.0), args[0].abs().max().item()))
        )
        for name, module in language_model.named_modules()
        if name.endswith(".mlp.down_proj") or name.endswith(".self_attn.q_proj")
    ]

    def run() -> None:
        for batch in batches:
            model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")})

    scales = fp8_activation_scales(model, "decoder", run)
    for probe in probes:
        probe.remove()
    assert len(scales) == 7 * len(language_model.layers) and len(seen) == 2 * len(language_model.layers)
    for name, largest in seen.items():  # across both batches, not the last one's
        assert scales[name].shape == (1, 1, 1)
        assert scales[name].item() == pytest.approx(largest / 448.0, rel=1e-6)
    assert not any(module._forward_pre_hooks for module in language_model.modules())  # its hooks are gone


@pytest.mark.slow  # Inductor compiles C++ for the CPU: about 20 s
def test_compiled_decoder_layers_share_one_graph_across_layers_and_lengths(tiny_model: Path, tiny_dataset) -> None:
    """Scoring compiles each decoder layer (model.quantization: fp8, evaluate.compile). A guard that
    differs per layer (a key/value cache slot did) recompiles every layer, and past Dynamo's limit
    of 8 the rest run eager: on an H200 FP8 fell from 21 to 13.6 images/s without a word. Here any
    recompilation is an error: the second layer, a second padded length and a smaller batch must
    reuse the graph; a batch of one image may compile once more, and no more (issue 27: a 10^5-image
    triage compiles a handful of times at most)."""
    import torch._dynamo

    from forensic_vlm.decoding import class_probabilities
    from forensic_vlm.modeling import compile_decoder_layers, compile_vision_layers

    batch = training_batch(tiny_model, tiny_dataset, 4)
    processor = load_processor(tiny_model)
    answer = answer_tokens(processor, REFERENCE_QUESTION, LABELS)
    model = load_base_model(model_config(tiny_model), CPU).eval()
    inputs = model_inputs(batch)
    with torch.no_grad():
        eager = class_probabilities(model, inputs, answer.class_ids)
    torch._dynamo.reset()
    assert compile_decoder_layers(model) == 2
    # And the vision tower's blocks (compiled scoring, issue 27), under the same limits.
    assert compile_vision_layers(model) == model.config.vision_config.num_hidden_layers
    shorter = {k: (v[:, 3:] if k in ("input_ids", "attention_mask") else v) for k, v in inputs.items()}
    images = inputs["pixel_values"].shape[0]
    fewer = {k: v[: images - 1] for k, v in inputs.items()}  # a triage's last, smaller batch
    # Dynamo counts compilations per code object, and both kinds of layer run transformers'
    # GradientCheckpointingLayer.__call__: one graph for the decoder's layers, one for the vision's.
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True), torch.no_grad():
        compiled = class_probabilities(model, inputs, answer.class_ids)
        class_probabilities(model, shorter, answer.class_ids)
        class_probabilities(model, fewer, answer.class_ids)
    # A batch of one image is the only other shape: Dynamo specialises a size of 1, once.
    one = {k: v[:1] for k, v in inputs.items()}
    with torch._dynamo.config.patch(recompile_limit=4, fail_on_recompile_limit_hit=True), torch.no_grad():
        class_probabilities(model, one, answer.class_ids)
        class_probabilities(
            model,
            {k: (v[:, 2:] if k in ("input_ids", "attention_mask") else v) for k, v in one.items()},
            answer.class_ids,
        )
    torch._dynamo.reset()
    assert (compiled - eager).abs().max().item() < 1e-4


@pytest.mark.slow  # Inductor compiles C++ for the CPU: about 40 s
def test_compiled_training_follows_eager_through_validation(tiny_model: Path, tiny_dataset, tmp_path: Path) -> None:
    """train.compile: the same losses step by step as eager, and the validation pass after them runs.
    It once failed there on the CPU: bitsandbytes repacked the 4-bit weights in place on the first
    no-grad call, and the compiled graph shared by the layers met them in two layouts."""
    losses, metrics = eager_and_compiled_losses(model_config(tiny_model, "nf4"), tiny_dataset, tmp_path, "nf4")
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-3)
    assert metrics[True]["first_step_seconds"] > 0  # reported: the compilation's cost is in it
    assert metrics[True]["val_macro_f1"] == pytest.approx(metrics[False]["val_macro_f1"])
