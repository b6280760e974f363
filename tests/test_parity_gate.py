"""The parity gate (forensic_vlm.speed.gate): which fast path ``auto`` tries, how the gate measures
it against the reference path, and that scoring follows a verdict only for its own adapter."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import model_config
from forensic_vlm.config import DEFAULT_CLASSES, EvaluateConfig
from forensic_vlm.speed import gate
from forensic_vlm.speed.gate import ParityGateError, candidate_path, compare, gated_path, passes, read_verdict

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
LABELS = [0, 1, 2, 3]
FP8 = {"quantization": "fp8", "kernels": "transformers", "compiled": True}


def fake_gpu(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], installed: set[str]) -> None:
    """A CUDA device of ``capability`` with only ``installed`` of the speed packages, as the gate sees them."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    real = gate.importlib.util.find_spec
    monkeypatch.setattr(
        gate.importlib.util,
        "find_spec",
        lambda name: (object() if name in installed else None) if name in {"torchao", "liger_kernel"} else real(name),
    )


def test_auto_has_no_fast_path_on_the_cpu_and_explicit_settings_are_not_gated(tiny_model: Path) -> None:
    auto = replace(model_config(tiny_model), quantization="auto")
    assert candidate_path(auto, CPU, "none") == (None, "no fast path on cpu: scored the reference way")
    for explicit in ("none", "nf4", "fp8"):
        candidate, reason = candidate_path(replace(auto, quantization=explicit), CUDA, "none")
        assert candidate is None and reason == f"model.quantization is {explicit} (explicit: no gate)"


def test_auto_tries_fp8_on_an_h200_class_card_and_liger_where_fp8_cannot_be(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    auto = replace(model_config(tiny_model), quantization="auto", kernels="auto")
    fake_gpu(monkeypatch, (9, 0), {"torchao", "liger_kernel"})
    assert candidate_path(auto, CUDA, "none")[0] == FP8  # a bf16 base: FP8 first
    liger_on_nf4 = {"quantization": "nf4", "kernels": "liger", "compiled": False}
    assert candidate_path(auto, CUDA, "nf4")[0] == liger_on_nf4  # FP8 replaces a bf16 base only
    assert candidate_path(replace(auto, kernels="none"), CUDA, "nf4")[0] is None
    fake_gpu(monkeypatch, (8, 0), {"torchao", "liger_kernel"})  # an A100: no FP8 products
    assert candidate_path(auto, CUDA, "none")[0] == {"quantization": "none", "kernels": "liger", "compiled": False}
    fake_gpu(monkeypatch, (9, 0), set())  # the speed extra not installed
    candidate, reason = candidate_path(auto, CUDA, "none")
    assert candidate is None and "compute capability 9.0" in reason


def rows(*predictions: tuple[int, list[float]]) -> list[dict]:
    return [
        {"sha256": f"{i:064x}", "predicted": str(label), **{f"p{k}": f"{p:.6f}" for k, p in enumerate(probabilities)}}
        for i, (label, probabilities) in enumerate(predictions)
    ]


def test_the_gate_passes_only_the_same_classes_and_close_probabilities() -> None:
    reference = rows(*[(0, [0.7, 0.1, 0.1, 0.1])] * 99, (1, [0.3, 0.4, 0.2, 0.1]))
    close = rows(*[(0, [0.69, 0.11, 0.1, 0.1])] * 99, (1, [0.3, 0.4, 0.2, 0.1]))
    figures = compare(reference, close, LABELS)
    assert figures == {"images": 100, "same_class_fraction": 1.0, "max_probability_difference": 0.01}
    assert passes(figures, EvaluateConfig())
    one_flipped = rows(*[(0, [0.69, 0.11, 0.1, 0.1])] * 99, (0, [0.41, 0.39, 0.1, 0.1]))
    figures = compare(reference, one_flipped, LABELS)
    assert figures["same_class_fraction"] == 0.99 and figures["max_probability_difference"] == 0.11
    assert not passes(figures, EvaluateConfig())  # 99 % the same class, but a probability moved 0.11
    assert passes(figures, EvaluateConfig(parity_max_difference=0.11))
    assert not passes(figures, EvaluateConfig(parity_same_class=0.995, parity_max_difference=0.2))
    with pytest.raises(ParityGateError, match="not of the same images"):
        compare(reference, close[::-1], LABELS)


def test_a_verdict_is_followed_only_for_its_own_adapter_and_model(tiny_model: Path, tmp_path: Path) -> None:
    auto = replace(model_config(tiny_model), quantization="auto")
    verdict = {
        "gate_version": gate.GATE_VERSION,
        "model_files_sha256": {"model.safetensors": "a"},
        "adapter_files_sha256": {"adapter_model.safetensors": "b"},
        "device": "NVIDIA H200",
        "reason": "FP8",
        "chosen": FP8,
    }
    hashes = {"model_hashes": {"model.safetensors": "a"}, "adapter_hashes": {"adapter_model.safetensors": "b"}}
    with pytest.raises(ParityGateError, match="another adapter's files"):
        gated_path(verdict, model_config=auto, device=CPU, trained_on="none", **hashes | {"adapter_hashes": {}})
    with pytest.raises(ParityGateError, match="another base model's files"):
        gated_path(verdict, model_config=auto, device=CPU, trained_on="none", **hashes | {"model_hashes": {}})
    # FP8 chosen on an H200, scored on a CPU: the reference path, not FP8.
    assert gated_path(verdict, model_config=auto, device=CPU, trained_on="none", **hashes) == gate.reference_path(
        "none"
    )
    with pytest.raises(ParityGateError, match="chose no path"):
        gated_path(verdict | {"chosen": None}, model_config=auto, device=CPU, trained_on="none", **hashes)
    (tmp_path / "cut.json").write_text(json.dumps(verdict)[:40])
    with pytest.raises(ParityGateError, match=r"cut\.json: not a parity gate verdict"):
        read_verdict(tmp_path / "cut.json")
    (tmp_path / "old.json").write_text(json.dumps(verdict | {"gate_version": 0}))
    with pytest.raises(ParityGateError, match="parity gate version 0"):
        read_verdict(tmp_path / "old.json")


@pytest.mark.slow
def test_the_gate_scores_both_paths_and_scoring_follows_its_verdict(
    trained: dict, tiny_model: Path, tiny_dataset: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """On the CPU there is no fast path, so nf4 stands in for the candidate (it runs there too): a gate
    loose enough passes it and scoring then takes nf4; a strict one fails it, warns with the figures,
    and scoring stays on the adapter's own base."""
    from forensic_vlm.scoring import score_examples
    from forensic_vlm.tables import examples_from_table, read_tsv

    nf4 = {"quantization": "nf4", "kernels": "transformers", "compiled": False}
    monkeypatch.setattr(gate, "candidate_path", lambda config, device, trained_on: (nf4, "nf4 standing in"))
    auto = replace(model_config(tiny_model), quantization="auto")
    common = {"classes": list(DEFAULT_CLASSES), "model_config": auto, "adapter": trained["adapter"]}
    examples = examples_from_table(read_tsv(tiny_dataset["val"]), tiny_dataset["raw_data"])
    verdicts = {}
    for name, config in {
        "loose": EvaluateConfig(batch_size=4, num_workers=0, parity_same_class=0.0, parity_max_difference=1.0),
        "strict": EvaluateConfig(batch_size=4, num_workers=0, parity_same_class=1.0, parity_max_difference=0.0),
    }.items():
        out = tmp_path / f"{name}.json"
        with caplog.at_level(logging.WARNING, logger="forensic_vlm.speed.gate"):
            gate.run_parity_gate(
                tiny_dataset["val"],
                tiny_dataset["raw_data"],
                out,
                config=config,
                cache_dir=tmp_path / "cache",
                **common,
            )
        verdicts[name] = read_verdict(out)
        scores = score_examples(
            examples, LABELS, model_config=auto, config=config, adapter=trained["adapter"], cache_dir=None,
            kind=name, gate=verdicts[name],
        )  # fmt: skip
        assert scores.path["quantization"] == verdicts[name]["chosen"]["quantization"]
        assert scores.parity_gate == gate.summary(verdicts[name])  # recorded as metrics.json gets it
    loose, strict = verdicts["loose"], verdicts["strict"]
    assert loose["reference"] == gate.reference_path("none") and loose["candidate"] == nf4
    assert loose["measured"] == strict["measured"]  # the same two scorings (the second from the cache)
    assert loose["measured"]["images"] == len(examples)
    assert loose["measured"]["max_probability_difference"] > 0  # nf4 does move the probabilities
    assert (loose["passed"], loose["chosen"]) == (True, nf4)
    assert (strict["passed"], strict["chosen"]) == (False, gate.reference_path("none"))
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == gate.__name__]
    assert len(warning) == 1 and "parity gate failed" in warning[0]
    assert f"largest probability difference {strict['measured']['max_probability_difference']:.4f}" in warning[0]


def nan_when_4bit(real):
    """class_probabilities, but NaN for every image when the model's weights are 4-bit."""

    def probabilities(model, inputs, class_ids):
        result = real(model, inputs, class_ids)
        four_bit = any(type(p).__name__ == "Params4bit" for p in model.parameters())
        return torch.full_like(result, float("nan")) if four_bit else result

    return probabilities


def test_nan_scores_are_a_named_error_not_class_0(tiny_model: Path, tiny_dataset: dict, monkeypatch) -> None:
    """numpy's argmax of a NaN row is 0, "irrelevant": scoring must stop with the image named instead."""
    from forensic_vlm import scoring
    from forensic_vlm.errors import NonFiniteScoresError
    from forensic_vlm.tables import examples_from_table, read_tsv

    monkeypatch.setattr(scoring, "class_probabilities", nan_when_4bit(scoring.class_probabilities))
    examples = examples_from_table(read_tsv(tiny_dataset["val"]), tiny_dataset["raw_data"])[:4]
    nf4 = replace(model_config(tiny_model), quantization="nf4")
    with pytest.raises(NonFiniteScoresError, match=r"non-finite class probabilities for 4 of 4 images .* on nf4"):
        scoring.score_examples(
            examples, LABELS, model_config=nf4, config=EvaluateConfig(batch_size=4, num_workers=0), adapter=None,
            cache_dir=None, kind="nan",
        )  # fmt: skip
    bf16 = scoring.score_examples(
        examples, LABELS, model_config=model_config(tiny_model), config=EvaluateConfig(batch_size=4, num_workers=0),
        adapter=None, cache_dir=None, kind="finite",
    )  # fmt: skip
    assert len(bf16.rows) == 4


@pytest.mark.slow
def test_a_candidate_that_gives_nan_fails_the_gate(
    trained: dict, tiny_model: Path, tiny_dataset: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    from forensic_vlm import scoring

    nf4 = {"quantization": "nf4", "kernels": "transformers", "compiled": False}
    monkeypatch.setattr(gate, "candidate_path", lambda config, device, trained_on: (nf4, "nf4 standing in"))
    monkeypatch.setattr(scoring, "class_probabilities", nan_when_4bit(scoring.class_probabilities))
    loose = EvaluateConfig(batch_size=4, num_workers=0, parity_same_class=0.0, parity_max_difference=1.0)
    with caplog.at_level(logging.WARNING, logger="forensic_vlm.speed.gate"):
        verdict = gate.run_parity_gate(
            tiny_dataset["val"], tiny_dataset["raw_data"], tmp_path / "gate.json", classes=list(DEFAULT_CLASSES),
            model_config=replace(model_config(tiny_model), quantization="auto"), config=loose,
            adapter=trained["adapter"], cache_dir=None,
        )  # fmt: skip
    assert (verdict["passed"], verdict["chosen"]) == (False, gate.reference_path("none"))
    assert "non-finite class probabilities" in verdict["measured"]["non_finite"]
    assert read_verdict(tmp_path / "gate.json") == verdict
    assert "parity gate failed" in caplog.text and "non-finite" in caplog.text
