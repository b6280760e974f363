"""forensic-vlm export: the adapter merged into its base, a plain checkpoint that passes the parity
check on the test images, and a named stop, with nothing kept, when the merged weights are wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import CLI, model_config, planned_jobs, snakemake
from forensic_vlm.config import DEFAULT_CLASSES, EvaluateConfig
from forensic_vlm.errors import ExportParityError, OutputExistsError
from forensic_vlm.integrity import LISTING, read_listing, verify
from forensic_vlm.models import export
from forensic_vlm.tables import examples_from_table, read_tsv


def val_examples(tiny_dataset: dict) -> list:
    return examples_from_table(read_tsv(tiny_dataset["val"]), tiny_dataset["raw_data"])


def export_tiny(trained: dict, tiny_model: Path, tiny_dataset: dict, out: Path) -> dict:
    return export.export_merged(
        trained["adapter"],
        out,
        examples=val_examples(tiny_dataset),
        classes=list(DEFAULT_CLASSES),
        model_config=model_config(tiny_model),
        evaluate_config=EvaluateConfig(batch_size=4, num_workers=0),
    )


def test_the_merged_checkpoint_is_plain_transformers_and_passes_parity(
    trained, tiny_model, tiny_dataset, tmp_path, measured
):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = tmp_path / "merged"
    record = export_tiny(trained, tiny_model, tiny_dataset, out)
    images = len(read_tsv(tiny_dataset["val"]))
    assert record["parity"]["images"] == record["parity"]["same_class"] == images
    assert 0 < record["parity"]["largest_probability_difference"] < 0.02  # bf16 weights
    parity = record["parity"]
    measured(
        f"export parity, tiny LLaVA-NeXT: same class on {parity['same_class']} of {parity['images']} images, "
        f"largest probability difference {parity['largest_probability_difference']:.2e} ({parity['compute']})"
    )
    verify(out, read_listing(out / LISTING), str(out / LISTING))  # every file listed, as written
    assert json.loads((out / "export.json").read_text())["adapter_files_sha256"]
    assert "vllm serve" in (out / "README.md").read_text()
    model = AutoModelForImageTextToText.from_pretrained(str(out))  # no PEFT, no project code
    assert model.dtype == torch.bfloat16
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert AutoProcessor.from_pretrained(str(out)).tokenizer.get_vocab()
    with pytest.raises(OutputExistsError, match="exists"):
        export_tiny(trained, tiny_model, tiny_dataset, out)


def test_altered_merged_weights_stop_the_export_naming_the_image(
    trained, tiny_model, tiny_dataset, tmp_path, monkeypatch
):
    """A merge that went wrong (here: the output rows of the digits 0 and 1 swapped, as a bug in
    merging would) is caught by the parity check; no folder, partial or final, is left."""
    from forensic_vlm.modeling import load_processor
    from forensic_vlm.prompting import answer_tokens

    processor = load_processor(tiny_model)
    zero, one = answer_tokens(processor, model_config(tiny_model).question, [0, 1, 2, 3]).class_ids[:2]
    merge = export.merge_adapter

    def wrong_merge(base, adapter):
        merged = merge(base, adapter)
        with torch.no_grad():
            rows = merged.lm_head.weight
            rows[[zero, one]] = rows[[one, zero]].clone()
        return merged

    monkeypatch.setattr(export, "merge_adapter", wrong_merge)
    out = tmp_path / "merged"
    names = {e.name for e in val_examples(tiny_dataset)}
    with pytest.raises(ExportParityError, match="the merged model predicts class") as caught:
        export_tiny(trained, tiny_model, tiny_dataset, out)
    assert str(caught.value).split(":")[0] in names
    assert list(tmp_path.iterdir()) == []


def test_export_is_asked_for_never_part_of_all(tmp_path: Path) -> None:
    assert "export" not in planned_jobs(snakemake(tmp_path, "-n", demo=True))
    assert "export" in planned_jobs(snakemake(tmp_path, "-n", "export", demo=True))


def test_the_export_command_names_a_missing_adapter(tmp_path: Path) -> None:
    import subprocess

    result = subprocess.run(
        [*CLI, "export", "--adapter", str(tmp_path / "none"), "--out", str(tmp_path / "m"), "--raw-data", "."],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "adapter" in result.stderr and "does not exist" in result.stderr


@pytest.mark.slow  # starts processes
def test_an_export_killed_after_saving_leaves_no_model_and_its_rerun_matches(
    trained, tiny_model, tiny_dataset, tmp_path
):
    """Killed with the merged weights on disk but not yet checked: no folder by the given name (a
    model that was never checked must not look finished), and the rerun replaces the partial one."""
    import os

    import warm_processes
    import yaml

    from forensic_vlm.faults import ENVIRONMENT

    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(tiny_model), "quantization": "none", "device": "cpu"},
                "evaluate": {"batch_size": 4, "num_workers": 0},
            }
        )
    )
    out = tmp_path / "merged"
    command = ["--config", str(config), "export", "--adapter", str(trained["adapter"]), "--out", str(out)]
    command += ["--test", str(tiny_dataset["val"]), "--raw-data", str(tiny_dataset["raw_data"])]
    killed = warm_processes.run(command, env={**os.environ, ENVIRONMENT: "export.saved:1"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not out.exists() and (tmp_path / ".merged.partial" / "model.safetensors").is_file()
    rerun = warm_processes.run(command)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert not (tmp_path / ".merged.partial").exists()
    verify(out, read_listing(out / LISTING), str(out / LISTING))
    reference = tmp_path / "reference"
    export_tiny(trained, tiny_model, tiny_dataset, reference)
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
