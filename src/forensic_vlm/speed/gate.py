"""The parity gate: a fast scoring path is used by ``auto`` only where it scores like the slow one.

``model.quantization: auto`` and ``model.kernels: auto`` may pick a fast path for a fine-tuned
checkpoint: FP8 (torchao, the speed extra) on a GPU of compute capability 8.9 or more when the
adapter was trained on a bf16 base, otherwise Liger's fused kernels where liger-kernel is installed.
Rule ``parity_gate`` scores the validation split once per adapter with that candidate and with the
reference path (the base the adapter was trained on, transformers' kernels, not compiled) and
passes the candidate only where both hold:

- the same predicted class on at least ``evaluate.parity_same_class`` of the images (0.99), and
- no class probability moves by more than ``evaluate.parity_max_difference`` (0.02).

Its verdict (``results/evaluate/parity_gate.json``) names the adapter and model files it was
measured with; evaluation and triage use its chosen path and record the verdict in metrics.json and
custody.json. A failed gate falls back to the reference path with a warning naming the figures.
A verdict of another adapter or model is a named error, never silently applied.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from forensic_vlm.config import ClassSpec, EvaluateConfig, ModelConfig
from forensic_vlm.errors import IntegrityError, NonFiniteScoresError
from forensic_vlm.tables import examples_from_table, read_tsv, write_atomically

log = logging.getLogger(__name__)

GATE_VERSION = 1
#: The reference way of scoring: the adapter's own base, transformers' kernels, eager.
EAGER = {"kernels": "transformers", "compiled": False}


class ParityGateError(IntegrityError):
    """A parity gate verdict that is not this adapter's and model's, or is damaged."""


def reference_path(trained_on: str | None) -> dict:
    """The path the candidate is measured against: the base the adapter was trained on, eager."""
    return {"quantization": trained_on or "nf4", **EAGER}


def candidate_path(model_config: ModelConfig, device, trained_on: str | None) -> tuple[dict | None, str]:
    """The fast path ``auto`` would try for an adapter trained on ``trained_on`` on ``device``,
    and why (or why there is none). Explicit settings are obeyed as they are: no gate."""
    import torch

    if model_config.quantization != "auto":
        return None, f"model.quantization is {model_config.quantization} (explicit: no gate)"
    if device.type != "cuda":
        return None, f"no fast path on {device.type}: scored the reference way"
    capability = torch.cuda.get_device_capability(device)
    if trained_on == "none" and capability >= (8, 9) and importlib.util.find_spec("torchao") is not None:
        return {"quantization": "fp8", "kernels": "transformers", "compiled": True}, (
            f"FP8 on compute capability {capability[0]}.{capability[1]} with torchao"
        )
    if model_config.kernels == "auto" and importlib.util.find_spec("liger_kernel") is not None:
        from forensic_vlm.models.architectures import architecture_of

        if architecture_of(model_config.name_or_path).name == "llava_next":
            return {"quantization": trained_on or "nf4", "kernels": "liger", "compiled": False}, (
                "Liger's fused RMSNorm and SwiGLU (liger-kernel installed)"
            )
    return None, (
        f"no fast path for a {trained_on or 'nf4'} base on compute capability {capability[0]}.{capability[1]} "
        "with the installed packages"
    )


def compare(reference: list[dict], candidate: list[dict], labels: list[int]) -> dict:
    """How far the candidate's rows are from the reference's (the same images, in order)."""
    if [r["sha256"] for r in reference] != [c["sha256"] for c in candidate]:
        raise ParityGateError("the parity gate's two scorings are not of the same images")
    same = sum(r["predicted"] == c["predicted"] for r, c in zip(reference, candidate, strict=True))
    differences = [
        abs(float(r[f"p{label}"]) - float(c[f"p{label}"]))
        for r, c in zip(reference, candidate, strict=True)
        for label in labels
    ]
    return {
        "images": len(reference),
        "same_class_fraction": round(same / len(reference), 6) if reference else None,
        "max_probability_difference": round(max(differences), 6) if differences else None,
    }


def passes(figures: dict, config: EvaluateConfig) -> bool:
    return bool(figures["images"]) and (
        figures["same_class_fraction"] >= config.parity_same_class
        and figures["max_probability_difference"] <= config.parity_max_difference
    )


def run_parity_gate(
    table: Path,
    raw_data: Path,
    out: Path,
    *,
    classes: list[ClassSpec],
    model_config: ModelConfig,
    config: EvaluateConfig,
    adapter: Path,
    cache_dir: Path | None = None,
) -> dict:
    """Rule ``parity_gate``: decide the path ``auto`` scores ``adapter`` with; write the verdict."""
    from forensic_vlm.integrity import model_files, verify_adapter
    from forensic_vlm.modeling import device_name, resolve_device
    from forensic_vlm.scoring import adapter_base_quantization, score_examples

    started = time.perf_counter()
    device = resolve_device(model_config)
    base = model_files(model_config.name_or_path, model_config.files_sha256)
    tuned = verify_adapter(Path(adapter))
    trained_on = adapter_base_quantization(Path(adapter))
    reference = reference_path(trained_on)
    candidate, reason = candidate_path(model_config, device, trained_on)
    verdict = {
        "gate_version": GATE_VERSION,
        "model_files_sha256": base.hashes,
        "adapter_files_sha256": tuned.hashes,
        "device": device_name(device),
        "thresholds": {
            "same_class": config.parity_same_class,
            "max_probability_difference": config.parity_max_difference,
        },
        "reference": reference,
        "candidate": candidate,
        "reason": reason,
    }
    if candidate is None:
        log.info("parity gate: %s", reason)
        # An explicit model.quantization is scored as set: the verdict chooses nothing then.
        explicit = model_config.quantization != "auto"
        verdict |= {"measured": None, "passed": None, "chosen": None if explicit else reference}
    else:
        examples = examples_from_table(read_tsv(Path(table)), raw_data)
        labels = [c.id for c in classes]
        rows, non_finite = {}, None
        for name, path in (("reference", reference), ("candidate", candidate)):
            settings, scoring = path_settings(model_config, config, path)
            try:
                scores = score_examples(
                    examples,
                    labels,
                    model_config=settings,
                    config=scoring,
                    adapter=Path(adapter),
                    cache_dir=cache_dir,
                    kind=f"parity gate, {name} ({path['quantization']}, {path['kernels']})",
                )
            except NonFiniteScoresError as error:
                if name == "reference":
                    raise
                non_finite = str(error)  # a candidate that gives NaN fails the gate; the reference is kept
            else:
                rows[name] = scores.rows
        if non_finite:
            figures = {"images": len(examples), "non_finite": non_finite}
            passed = False
        else:
            figures = compare(rows["reference"], rows["candidate"], labels)
            passed = passes(figures, config)
        verdict |= {"measured": figures, "passed": passed, "chosen": candidate if passed else reference}
        if passed:
            log.info("parity gate passed for %s: %s", candidate, figures)
        elif "non_finite" in figures:
            log.warning(
                "parity gate failed for %s (%s): %s; scoring stays %s",
                candidate,
                reason,
                figures["non_finite"],
                reference,
            )
        else:
            log.warning(
                "parity gate failed for %s (%s): the same class on %.2f %% of %d validation images (at least "
                "%.2f %% needed), largest probability difference %.4f (at most %.4f allowed); scoring stays %s",
                candidate,
                reason,
                100 * figures["same_class_fraction"],
                figures["images"],
                100 * config.parity_same_class,
                figures["max_probability_difference"],
                config.parity_max_difference,
                reference,
            )
    verdict["seconds"] = round(time.perf_counter() - started, 2)
    write_atomically(Path(out), (json.dumps(verdict, indent=2) + "\n").encode("utf-8"))
    return verdict


def path_settings(model_config: ModelConfig, config: EvaluateConfig, path: dict) -> tuple[ModelConfig, EvaluateConfig]:
    """The settings that score exactly ``path`` (no ``auto`` left to resolve). FP8 compiles by itself."""
    kernels = "liger" if path["kernels"] == "liger" else "none"
    compiled = path["compiled"] and path["quantization"] != "fp8"
    return (
        replace(model_config, quantization=path["quantization"], kernels=kernels),
        replace(config, compile=compiled),
    )


def read_verdict(path: Path) -> dict:
    """A verdict file as written by :func:`run_parity_gate`; a damaged one is a named error."""
    try:
        verdict = json.loads(Path(path).read_text(encoding="utf-8"))
        verdict["chosen"], verdict["adapter_files_sha256"], verdict["model_files_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ParityGateError(f"{path}: not a parity gate verdict ({error})") from None
    if verdict.get("gate_version") != GATE_VERSION:
        raise ParityGateError(
            f"{path}: parity gate version {verdict.get('gate_version')}, not {GATE_VERSION}; rerun it"
        )
    return verdict


def gated_path(
    verdict: dict,
    *,
    model_config: ModelConfig,
    device,
    trained_on: str | None,
    model_hashes: dict,
    adapter_hashes: dict,
) -> dict:
    """The path to score with under ``auto``: the verdict's choice, after checking that the verdict
    is this model's and adapter's. A chosen fast path this device cannot take (another machine)
    gives the reference path, said in the log."""
    if verdict["adapter_files_sha256"] != adapter_hashes or verdict["model_files_sha256"] != model_hashes:
        which = "adapter" if verdict["adapter_files_sha256"] != adapter_hashes else "base model"
        raise ParityGateError(
            f"the parity gate verdict was measured with another {which}'s files; rerun rule parity_gate for this one"
        )
    chosen, reference = verdict["chosen"], reference_path(trained_on)
    if chosen is None:
        raise ParityGateError(
            f"the parity gate verdict chose no path ({verdict['reason']}) but model.quantization is auto; "
            "rerun rule parity_gate"
        )
    if chosen == reference:
        return reference
    here, _ = candidate_path(model_config, device, trained_on)
    if here != chosen:
        log.info(
            "the parity gate chose %s on %s, which this device cannot take: scoring %s",
            chosen,
            verdict["device"],
            reference,
        )
        return reference
    return chosen


def summary(verdict: dict | None) -> dict | None:
    """What metrics.json and custody.json keep of a verdict (the hashes are recorded beside it)."""
    if verdict is None:
        return None
    keep = ("device", "thresholds", "reference", "candidate", "reason", "measured", "passed", "chosen")
    return {key: verdict[key] for key in keep}
