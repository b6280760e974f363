"""The speed options, checked for behaviour on the CPU: the anyres tile cap, evaluation sharded over
several processes, and DDP training. Their speed is measured by benchmarks/gpu_full_scale.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from conftest import CLI, train_command
from forensic_vlm.batches import TokenGroupedBatches
from forensic_vlm.config import DEFAULT_CLASSES, REFERENCE_QUESTION, ConfigError, EvaluateConfig, ModelConfig
from forensic_vlm.demo_model import grid_pinpoints
from forensic_vlm.evaluate import evaluate_split
from forensic_vlm.modeling import capped_pinpoints, load_base_model, load_processor, use_threads
from forensic_vlm.prompting import TokenCounter, answer_tokens, build_prompt
from forensic_vlm.scoring import shard_batches
from forensic_vlm.speed.compile_cache import keep_compile_cache
from forensic_vlm.tables import read_tsv

LABELS = [0, 1, 2, 3]


def test_tile_cap_keeps_only_grids_of_at_most_that_many_tiles() -> None:
    full = grid_pinpoints(336)  # tiles: 2, 2, 4, 3, 3
    assert capped_pinpoints(full, 336, None) == full
    assert capped_pinpoints(full, 336, 2) == [[336, 672], [672, 336]]
    assert capped_pinpoints(full, 336, 3) == [[336, 672], [672, 336], [1008, 336], [336, 1008]]
    with pytest.raises(ConfigError, match="max_tiles 1 leaves no anyres grid; the smallest has 2"):
        capped_pinpoints(full, 336, 1)


def test_a_rule_gets_no_more_threads_than_the_cpus_it_may_run_on() -> None:
    import os

    before = torch.get_num_threads()
    try:
        cpus = len(os.sched_getaffinity(0))
        assert use_threads(cpus + 6) == cpus  # the demo's rules ask for 8 on 2 cores
        assert use_threads(1) == 1
        assert use_threads(None) == 1  # None keeps what is set
    finally:
        torch.set_num_threads(before)


def test_compiled_artefacts_are_kept_with_the_results_unless_the_user_chose_a_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert keep_compile_cache(Path("results/cache/torch_compile")) == str(tmp_path / "results/cache/torch_compile")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/scratch/mine")
    assert keep_compile_cache(Path("results/cache/torch_compile")) == "/scratch/mine"


def test_capped_processor_and_model_agree_and_use_fewer_tokens(tiny_model: Path) -> None:
    image = Image.new("RGB", (300, 290), "white")  # near square: the 2x2 grid when uncapped
    counts = {}
    for cap in (None, 2):
        processor = load_processor(tiny_model, ModelConfig(name_or_path=str(tiny_model), max_tiles=cap))
        prompt = build_prompt(processor, REFERENCE_QUESTION)
        counts[cap] = TokenCounter(processor, prompt, answer_tokens(processor, REFERENCE_QUESTION, LABELS))(*image.size)
        model = load_base_model(
            ModelConfig(name_or_path=str(tiny_model), quantization="none", device="cpu", max_tiles=cap),
            torch.device("cpu"),
        ).eval()
        inputs = processor(text=[prompt], images=[image], return_tensors="pt")
        with torch.no_grad():
            assert model(**inputs, logits_to_keep=1).logits.shape[-1] > 0
    assert counts[2] < counts[None]
    # Why both must be capped together: a capped processor feeding an uncapped model fails.
    uncapped = load_base_model(
        ModelConfig(name_or_path=str(tiny_model), quantization="none", device="cpu"), torch.device("cpu")
    ).eval()
    processor = load_processor(tiny_model, ModelConfig(name_or_path=str(tiny_model), max_tiles=2))
    inputs = processor(text=[build_prompt(processor, REFERENCE_QUESTION)], images=[image], return_tensors="pt")
    with pytest.raises(Exception, match=r"(?i)token|feature|shape|size"), torch.no_grad():
        uncapped(**inputs)


def test_data_parallel_ranks_share_every_batch_and_run_the_same_number_of_steps() -> None:
    tokens = [10] * 7 + [20] * 6 + [30] * 2  # 15 images, batch 2: 8 batches (groups' tails mixed)
    whole = TokenGroupedBatches(tokens, 2, shuffle=True, seed=1).batches()
    for replicas in (2, 3, 5):
        ranks = [
            TokenGroupedBatches(tokens, 2, shuffle=True, seed=1, rank=r, replicas=replicas) for r in range(replicas)
        ]
        per_rank = [sampler.batches() for sampler in ranks]
        assert {len(b) for b in per_rank} == {len(ranks[0])} == {-(-len(whole) // replicas)}
        seen = [tuple(batch) for batches in per_rank for batch in batches]
        assert set(seen) == {tuple(batch) for batch in whole}  # every batch, padding repeats only
    for batches in shard_batches(whole, 3):  # evaluation: dealt out, no padding
        assert batches
    assert sorted(b for shard in shard_batches(whole, 3) for batch in shard for b in batch) == list(range(15))


@pytest.mark.slow
def test_evaluation_sharded_over_processes_gives_the_same_predictions(
    tiny_model: Path, tiny_dataset, tmp_path: Path
) -> None:
    model = ModelConfig(name_or_path=str(tiny_model), quantization="none", device="cpu")
    results = {}
    for devices in (1, 2):
        config = EvaluateConfig(batch_size=2, num_workers=1, bootstrap_samples=50, devices=devices)
        out = tmp_path / f"devices{devices}"
        metrics = evaluate_split(
            tiny_dataset["train"],
            tiny_dataset["raw_data"],
            classes=list(DEFAULT_CLASSES),
            model_config=model,
            config=config,
            out_dir=out,
        )
        assert metrics["devices"] == devices and metrics["images_scored"] == metrics["n"] == 24
        results[devices] = read_tsv(out / "predictions.tsv")
    assert [r["sha256"] for r in results[1]] == [r["sha256"] for r in results[2]]
    for one, two in zip(results[1], results[2], strict=True):
        assert one["predicted"] == two["predicted"]
        assert all(abs(float(one[f"p{c}"]) - float(two[f"p{c}"])) < 1e-5 for c in LABELS)


@pytest.mark.slow
def test_a_failing_scoring_process_stops_the_evaluation_with_its_error(
    tiny_model: Path, tiny_dataset, tmp_path: Path
) -> None:
    raw = tmp_path / "raw_data"
    for row in read_tsv(tiny_dataset["train"]):
        target = raw / row["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((tiny_dataset["raw_data"] / row["path"]).read_bytes())
    changed = raw / read_tsv(tiny_dataset["train"])[-1]["path"]
    changed.write_bytes(changed.read_bytes()[:-1] + b"\0")  # no longer the image the table names
    config = EvaluateConfig(batch_size=2, num_workers=0, bootstrap_samples=10, devices=2)
    model = ModelConfig(name_or_path=str(tiny_model), quantization="none", device="cpu")
    with pytest.raises(RuntimeError, match=rf"scoring process \d on cpu failed:[\s\S]*{changed.name}"):
        evaluate_split(
            tiny_dataset["train"],
            raw,
            classes=list(DEFAULT_CLASSES),
            model_config=model,
            config=config,
            out_dir=tmp_path / "out",
        )
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.slow
def test_ddp_training_on_two_processes_saves_one_adapter(tiny_model: Path, tiny_dataset, tmp_path: Path) -> None:
    """Lightning DDP (gloo on the CPU), started the way a user does: the CLI, which each rank reruns."""
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(tiny_model), "quantization": "none", "device": "cpu"},
                "train": {
                    "learning_rate": 3e-3,
                    "batch_size": 2,
                    "accumulate_grad_batches": 1,
                    "precision": "32-true",
                    "gradient_checkpointing": False,
                    "num_workers": 0,
                    "epochs": 2,
                    "devices": 2,
                },
            }
        )
    )
    log = tmp_path / "train.log"
    subprocess.run(
        [*CLI, *train_command(config, tiny_dataset, tmp_path / "adapter", log=log)],
        check=True,
        capture_output=True,
        timeout=None,
    )
    card = json.loads((tmp_path / "adapter" / "training.json").read_text())
    # 24 images in batches of 2 = 12 batches, 6 per rank: 6 optimizer steps an epoch, not 12.
    assert card["validation"]["devices"] == 2 and card["validation"]["global_step"] == 12
    assert card["validation"]["val_macro_f1"] is not None
    text = log.read_text()
    assert "[rank 1]" in text and "best epoch" in text  # both ranks logged; rank 0 saved
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_the_benchmarks_labelled_check_model_classifies_held_out_images(tmp_path: Path) -> None:
    """The GPU benchmark's parity gate is only as good as its check model: its class rows must reach
    the model scoring loads (they once went into the input embeddings unnoticed), and classify
    images it was not fitted on. Here at the demo's tiny geometry."""
    script = Path(__file__).parents[1] / "benchmarks" / "gpu_full_scale.py"
    command = [sys.executable, str(script), "--tiny", "--same-process", "--eval-images", "32"]
    command += ["--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "bench")]
    run = subprocess.run(
        [*command, "--steps", "check_model", "project_bf16_scores"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    facts = json.loads((tmp_path / "bench" / "check_model.json").read_text())
    metrics = json.loads((tmp_path / "bench" / "eval_bf16" / "metrics.json").read_text())
    assert facts["calibration_accuracy"] >= 0.9 and facts["mean_top_probability"] == pytest.approx(0.9, abs=1e-3)
    assert metrics["accuracy"] >= 0.9  # 32 held-out images; chance is 0.25
    again = subprocess.run(  # one work dir holds one check model
        [*command, "--check-model", "sharpened", "--steps", "check_model"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 2 and "holds a model given the other check model" in again.stderr
