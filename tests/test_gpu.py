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

from conftest import train_command
from forensic_vlm.config import DEFAULT_CLASSES, EvaluateConfig, ModelConfig, TrainConfig
from forensic_vlm.evaluate import evaluate_split
from forensic_vlm.modeling import compute_dtype, load_base_model, resolve_device
from forensic_vlm.tables import read_tsv
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
    metrics = train_adapter(
        data,
        list(DEFAULT_CLASSES),
        model_config=model,
        config=train,
        adapter_dir=tmp_path / "adapter",
        work_dir=tmp_path,
    )
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
    assert result["n"] == len(data.val) and 0.0 <= result["accuracy"] <= 1.0


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
        train_command(config, tiny_dataset, tmp_path / "adapter"),
        check=True,
    )
    card = json.loads((tmp_path / "adapter" / "training.json").read_text())
    assert card["validation"]["devices"] == 2 and card["validation"]["precision"] == "bf16-mixed"
    assert card["validation"]["global_step"] == 12  # 12 batches of 2 a epoch, 6 per GPU, 2 epochs
