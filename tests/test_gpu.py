"""GPU paths (nf4 on CUDA, bf16-mixed training). Marked ``gpu``: skipped without CUDA, run on the
device machine by ``benchmarks/run_on_device.sh``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from forensic_vlm.config import DEFAULT_CLASSES, EvaluateConfig, ModelConfig, TrainConfig
from forensic_vlm.evaluate import evaluate_split
from forensic_vlm.modeling import compute_dtype, load_base_model, resolve_device
from forensic_vlm.train import load_training_data, train_adapter

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_nf4_on_cuda_quantizes_the_language_model_only(tiny_model: Path) -> None:
    config = ModelConfig(name_or_path=str(tiny_model), quantization="nf4")
    device = resolve_device(config)
    assert device.type == "cuda" and compute_dtype(device) == torch.bfloat16
    model = load_base_model(config, device)
    assert type(model.model.language_model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    vision = model.model.vision_tower.encoder.layers[0].self_attn.q_proj
    assert type(vision).__name__ == "Linear" and vision.weight.dtype == torch.bfloat16
    assert type(model.lm_head).__name__ == "Linear"


def test_qlora_training_and_scoring_on_cuda(tiny_model: Path, tiny_dataset, tmp_path: Path) -> None:
    data = load_training_data(tiny_dataset["train"], tiny_dataset["val"], tiny_dataset["raw_data"], None)
    model = ModelConfig(name_or_path=str(tiny_model), quantization="nf4")
    train = TrainConfig(learning_rate=3e-3, epochs=2, batch_size=4, accumulate_grad_batches=1, num_workers=0)
    metrics = train_adapter(data, list(DEFAULT_CLASSES), model, train, tmp_path / "adapter", tmp_path)
    assert metrics["precision"] == "bf16-mixed"
    assert "H100" in metrics["device"] or "H200" in metrics["device"]
    result = evaluate_split(tiny_dataset["val"], tiny_dataset["raw_data"], list(DEFAULT_CLASSES), model,
                            EvaluateConfig(num_workers=0), tmp_path / "eval", tmp_path / "adapter")  # fmt: skip
    assert result["n"] == len(data.val) and 0.0 <= result["accuracy"] <= 1.0
