"""Training and evaluation on the tiny model: learning, saving, reloading, resuming, scoring."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import FAST, model_config, training_batch
from forensic_vlm.batches import model_inputs
from forensic_vlm.config import DEFAULT_CLASSES, EvaluateConfig, TrainConfig
from forensic_vlm.evaluate import evaluate_split
from forensic_vlm.lightning_module import answer_loss
from forensic_vlm.modeling import add_lora, load_base_model
from forensic_vlm.tables import read_tsv
from forensic_vlm.train import load_training_data, train_adapter

LABELS = [0, 1, 2, 3]


@pytest.mark.parametrize("quantization", ["none", pytest.param("nf4", marks=pytest.mark.slow)])
def test_training_steps_lower_the_loss_and_touch_only_lora(tiny_model: Path, tiny_dataset, quantization) -> None:
    torch.manual_seed(0)
    batch = training_batch(tiny_model, tiny_dataset, 3)
    config = TrainConfig(**{**FAST, "gradient_checkpointing": quantization == "nf4"})
    model = add_lora(
        load_base_model(model_config(tiny_model, quantization), torch.device("cpu")),
        config,
        quantized=quantization == "nf4",
        checkpointed_layers=2 if quantization == "nf4" else 0,
    )
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n and ".language_model." in n for n in trained)
    if quantization == "nf4":
        assert (
            type(model.base_model.model.model.language_model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"
        )
        assert type(model.base_model.model.model.vision_tower.encoder.layers[0].mlp.fc1).__name__ == "Linear"
    # The loss training uses: the answer's logits only (test_training_plan.py checks that it equals
    # the model's own loss), not the 32,064-way logits of every position.
    inputs = model_inputs(batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = answer_loss(model, inputs, batch["labels"])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    final = answer_loss(model, inputs, batch["labels"]).item()
    assert final < losses[0] - 0.05, losses


def test_every_module_trains_in_train_mode(tiny_model: Path, tiny_dataset, tmp_path: Path, monkeypatch) -> None:
    """Checkpointing and dropout only act in train mode; Lightning keeps whatever mode it finds."""
    from forensic_vlm.lightning_module import ClassifierModule

    seen: list[int] = []
    original = ClassifierModule.training_step

    def spy(self, batch, batch_index):
        seen.append(sum(1 for m in self.model.modules() if not m.training))
        return original(self, batch, batch_index)

    monkeypatch.setattr(ClassifierModule, "training_step", spy)
    data = load_training_data(tiny_dataset["train"], tiny_dataset["val"], tiny_dataset["raw_data"], None)
    config = TrainConfig(**{**FAST, "epochs": 2, "batch_size": 12, "gradient_checkpointing": True})
    train_adapter(
        data,
        list(DEFAULT_CLASSES),
        model_config=model_config(tiny_model),
        config=config,
        adapter_dir=tmp_path / "adapter",
        work_dir=tmp_path,
    )
    assert seen and set(seen) == {0}, seen  # also after each validation pass


def test_adapter_folder_holds_peft_safetensors_processor_and_card(trained: dict) -> None:
    adapter = trained["adapter"]
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "training.json", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    card = json.loads((adapter / "training.json").read_text())
    assert card["train"]["lora_r"] == 16 and len(card["data_sha256"]) == 64 and card["versions"]["peft"]
    assert card["validation"]["val_macro_f1"] is not None
    curves = read_tsv_csv(trained["work"] / "metrics.csv")
    assert any(r.get("train_loss") for r in curves) and any(r.get("val_macro_f1") for r in curves)
    assert trained["metrics"]["global_step"] == 2 * 6  # 24 images / batch 4, 2 epochs


def read_tsv_csv(path: Path) -> list[dict]:
    import csv

    with open(path) as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_reloaded_adapter_in_a_fresh_process_gives_the_same_probabilities(
    trained: dict, tiny_model: Path, tiny_dataset, tmp_path: Path
) -> None:
    evaluation = EvaluateConfig(num_workers=0, bootstrap_samples=50)
    here = evaluate_split(
        tiny_dataset["val"],
        tiny_dataset["raw_data"],
        classes=list(DEFAULT_CLASSES),
        model_config=model_config(tiny_model),
        config=evaluation,
        out_dir=tmp_path / "here",
        adapter=trained["adapter"],
    )
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(tiny_model), "quantization": "none", "device": "cpu"},
                "evaluate": {"num_workers": 0, "bootstrap_samples": 50},
            }
        )
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "forensic_vlm",
            "--config",
            str(config),
            "evaluate",
            str(tiny_dataset["val"]),
            "--raw-data",
            str(tiny_dataset["raw_data"]),
            "--out",
            str(tmp_path / "there"),
            "--adapter",
            str(trained["adapter"]),
        ],
        check=True,
        capture_output=True,
    )
    a, b = read_tsv(tmp_path / "here" / "predictions.tsv"), read_tsv(tmp_path / "there" / "predictions.tsv")
    assert [r["sha256"] for r in a] == [r["sha256"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert np.allclose([float(x[f"p{k}"]) for k in LABELS], [float(y[f"p{k}"]) for k in LABELS], atol=1e-5)
    assert json.loads((tmp_path / "there" / "metrics.json").read_text())["accuracy"] == here["accuracy"]
    # The adapter changed the model: its probabilities differ from the base model's.
    base = evaluate_split(
        tiny_dataset["val"],
        tiny_dataset["raw_data"],
        classes=list(DEFAULT_CLASSES),
        model_config=model_config(tiny_model),
        config=evaluation,
        out_dir=tmp_path / "base",
    )
    zero = read_tsv(tmp_path / "base" / "predictions.tsv")
    assert not all(x["p0"] == y["p0"] for x, y in zip(a, zero, strict=True)) and base["kind"] == "zeroshot"


def test_evaluation_outputs_and_probabilities(trained: dict, tiny_model: Path, tiny_dataset, tmp_path: Path) -> None:
    metrics = evaluate_split(
        tiny_dataset["val"],
        tiny_dataset["raw_data"],
        classes=list(DEFAULT_CLASSES),
        model_config=model_config(tiny_model),
        config=EvaluateConfig(num_workers=0, batch_size=3),
        out_dir=tmp_path,
        adapter=trained["adapter"],
    )
    assert {p.name for p in tmp_path.iterdir()} == {
        "predictions.tsv",
        "metrics.json",
        "classification_report.txt",
        "confusion_matrix.png",
    }
    rows = read_tsv(tmp_path / "predictions.tsv")
    assert len(rows) == metrics["n"] == len(read_tsv(tiny_dataset["val"]))
    for row in rows:
        p = [float(row[f"p{k}"]) for k in LABELS]
        assert abs(sum(p) - 1) < 1e-4 and int(row["predicted"]) == int(np.argmax(p))
    low, high = metrics["bootstrap_95"]["accuracy"]
    assert low <= metrics["accuracy"] <= high
    assert 0 <= metrics["expected_calibration_error"] <= 1
    assert sum(map(sum, metrics["confusion_matrix"]["counts"])) == metrics["n"]
    assert set(metrics["per_class"]) == {"0", "1", "2", "3"}


def test_prediction_cache_scores_each_image_once_per_model(
    trained: dict, tiny_model: Path, tiny_dataset, tmp_path: Path, monkeypatch
) -> None:
    import forensic_vlm.scoring as scoring_module

    forward = {"images": 0}
    original = scoring_module.class_probabilities

    def counting(model, inputs, class_ids):
        forward["images"] += len(inputs["input_ids"])
        return original(model, inputs, class_ids)

    monkeypatch.setattr(scoring_module, "class_probabilities", counting)
    cache, config = tmp_path / "cache", EvaluateConfig(num_workers=0, bootstrap_samples=20)
    rows = read_tsv(tiny_dataset["train"])
    first_table, full_table = tmp_path / "first.tsv", tmp_path / "full.tsv"
    from forensic_vlm.split import SPLIT_COLUMNS
    from forensic_vlm.tables import write_tsv

    write_tsv(first_table, SPLIT_COLUMNS, rows[:10])
    write_tsv(full_table, SPLIT_COLUMNS, rows)

    def run(table: Path, out: str, adapter: Path | None = None) -> dict:
        return evaluate_split(
            table,
            tiny_dataset["raw_data"],
            classes=list(DEFAULT_CLASSES),
            model_config=model_config(tiny_model),
            config=config,
            out_dir=tmp_path / out,
            adapter=adapter,
            cache_dir=cache,
        )

    first = run(first_table, "a")
    assert forward["images"] == 10 and first["images_scored"] == 10
    again = run(first_table, "b")
    assert forward["images"] == 10 and again["images_from_cache"] == 10  # nothing scored twice
    assert (tmp_path / "a" / "predictions.tsv").read_bytes() == (tmp_path / "b" / "predictions.tsv").read_bytes()
    grown = run(full_table, "c")
    assert forward["images"] == len(rows) and grown["images_scored"] == len(rows) - 10
    tuned = run(first_table, "d", trained["adapter"])  # another adapter is another model: scored anew
    assert forward["images"] == len(rows) + 10 and tuned["images_scored"] == 10


def test_generate_decoding_reproduces_the_reference_way(tiny_model: Path, tiny_dataset, tmp_path: Path) -> None:
    config = EvaluateConfig(decoding="generate", num_workers=0, max_new_tokens_zeroshot=4, bootstrap_samples=20)
    metrics = evaluate_split(
        tiny_dataset["val"],
        tiny_dataset["raw_data"],
        classes=list(DEFAULT_CLASSES),
        model_config=model_config(tiny_model),
        config=config,
        out_dir=tmp_path,
    )
    rows = read_tsv(tmp_path / "predictions.tsv")
    assert metrics["decoding"] == "generate" and metrics["expected_calibration_error"] is None
    assert all(r["p0"] == "" and int(r["predicted"]) in (-1, 0, 1, 2, 3) for r in rows)
