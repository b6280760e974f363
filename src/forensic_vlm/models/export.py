"""``forensic-vlm export`` (rule ``export``): the adapter merged into its base, for serving.

The LoRA weights are added into the base model's (PEFT's ``merge_and_unload``, in float32) and the
result is saved in bf16 as a plain transformers checkpoint: safetensors, the processor, a model
card, and ``SHA256SUMS``, which vLLM or TGI can serve with no project code. Before the folder is
given its name, a parity check scores the test split with the merged checkpoint, loaded back from
disk, and with base + adapter (float32 on the CPU, bf16 on a GPU): any image whose class differs
stops the export, naming the image, and the folder is not kept. The largest probability difference
is recorded in ``export.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

from forensic_vlm.config import ClassSpec, EvaluateConfig, ModelConfig
from forensic_vlm.errors import ExportParityError, IntegrityError, OutputExistsError
from forensic_vlm.faults import fault_point
from forensic_vlm.integrity import model_files, verify_adapter, write_listing
from forensic_vlm.models.architectures import architecture_of
from forensic_vlm.provenance import package_versions

log = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float32")


def merge_adapter(base: Path, adapter: Path):
    """Base + adapter, the LoRA products added into the frozen weights (in float32, on the CPU)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        str(base), dtype=torch.float32, use_safetensors=True, trust_remote_code=False
    )
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()


def export_merged(
    adapter: Path,
    out: Path,
    *,
    examples: list,
    classes: list[ClassSpec],
    model_config: ModelConfig,
    evaluate_config: EvaluateConfig,
    dtype: str = "bfloat16",
) -> dict:
    """Merge ``adapter`` into ``model_config.name_or_path``, check parity on ``examples`` (the test
    split), and write the checkpoint to ``out``; returns what ``export.json`` records."""
    import torch

    from forensic_vlm.modeling import load_processor

    out = Path(out)
    if out.exists():
        raise OutputExistsError(f"{out} exists; export writes a new folder (remove it, or choose another --out)")
    tuned = verify_adapter(Path(adapter))
    base = model_files(model_config.name_or_path, model_config.files_sha256)
    card = json.loads((Path(adapter) / "training.json").read_text(encoding="utf-8"))
    trained_on = card.get("base_model_files_sha256")
    if trained_on and trained_on != base.hashes:
        differing = sorted(k for k in set(trained_on) | set(base.hashes) if trained_on.get(k) != base.hashes.get(k))
        raise IntegrityError(
            f"{base.folder} is not the base {adapter} was trained on: {', '.join(differing)} differ from its training.json"
        )
    architecture = architecture_of(base.folder)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # an earlier export that was killed
    log.info("merging %s into %s (%s) and saving in %s", adapter, base.folder, architecture.name, dtype)
    merged = merge_adapter(base.folder, Path(adapter)).to(getattr(torch, dtype))
    merged.save_pretrained(partial, safe_serialization=True)
    del merged
    load_processor(adapter, replace(model_config, name_or_path=str(base.folder))).save_pretrained(partial)
    fault_point("export.saved")  # the merged weights on disk, not checked, not named
    try:
        parity = check_parity(
            partial, base.folder, Path(adapter), examples=examples, classes=classes, evaluate_config=evaluate_config,
            model_config=model_config,
        )  # fmt: skip
    except ExportParityError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    record = {
        "base_model": str(base.folder),
        "architecture": architecture.name,
        "base_model_files_sha256": base.hashes,
        "adapter": str(adapter),
        "adapter_files_sha256": tuned.hashes,
        "dtype": dtype,
        "parity": parity,
        "classes": [{"id": c.id, "en": c.en, "ko": c.ko} for c in classes],
        "question": model_config.question,
        "versions": package_versions(),
    }
    (partial / "export.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (partial / "README.md").write_text(_model_card(record), encoding="utf-8")
    write_listing(partial)
    for state in (base, tuned):
        state.check_unchanged()
    partial.rename(out)
    log.info(
        "exported %s: %d test images, same class on all, largest probability difference %.2e (%s)",
        out, parity["images"], parity["largest_probability_difference"], parity["compute"],
    )  # fmt: skip
    return record


def check_parity(
    merged: Path,
    base: Path,
    adapter: Path,
    *,
    examples: list,
    classes: list[ClassSpec],
    evaluate_config: EvaluateConfig,
    model_config: ModelConfig,
) -> dict:
    """Score ``examples`` with the merged checkpoint and with base + adapter; stop, naming the first
    image, where the two give different classes."""
    from forensic_vlm.modeling import compute_dtype, resolve_device
    from forensic_vlm.scoring import score_examples

    labels = [c.id for c in classes]
    settings = replace(evaluate_config, decoding="scores", devices=1, shards=1, compile=False)
    plain = replace(model_config, quantization="none", kernels="none", files_sha256=None)
    scored = {}
    for what, folder, with_adapter in (("merged", merged, None), ("base + adapter", base, adapter)):
        scores = score_examples(
            examples, labels, model_config=replace(plain, name_or_path=str(folder)), config=settings,
            adapter=with_adapter, cache_dir=None, kind=f"export parity ({what})",
        )  # fmt: skip
        scored[what] = scores
    largest = 0.0
    for example, merged_row, reference in zip(
        examples, scored["merged"].rows, scored["base + adapter"].rows, strict=True
    ):
        if merged_row["predicted"] != reference["predicted"]:
            raise ExportParityError(
                f"{example.name}: the merged model predicts class {merged_row['predicted']} and base + adapter "
                f"class {reference['predicted']}; the export is not kept"
            )
        largest = max(largest, *(abs(float(merged_row[f"p{k}"]) - float(reference[f"p{k}"])) for k in labels))
    return {
        "images": len(examples),
        "same_class": len(examples),
        "largest_probability_difference": largest,
        "compute": f"{str(compute_dtype(resolve_device(model_config))).removeprefix('torch.')} on "
        f"{scored['merged'].device}",
    }


def _model_card(record: dict) -> str:
    classes = ", ".join(f"{c['id']} {c['ko']} ({c['en']})" for c in record["classes"])
    parity = record["parity"]
    return "\n".join(
        [
            "# forensic-vlm: merged model",
            "",
            f"`{record['base_model']}` ({record['architecture']}) with the LoRA adapter `{record['adapter']}` merged "
            f"into its weights, saved in {record['dtype']}: a plain transformers checkpoint, served as is by vLLM or "
            "TGI (e.g. `vllm serve <this folder>`).",
            "",
            f"- Asked the fixed question `{record['question']}` about one image, it answers with one class digit: "
            f"{classes}. Read the class from the logits of the four digit tokens at the answer position, or "
            "generate one token greedily.",
            f"- Parity with base + adapter on {parity['images']} test images: the same class on every one, largest "
            f"probability difference {parity['largest_probability_difference']:.2e} ({parity['compute']}).",
            "- Every file's sha256 is in `SHA256SUMS`; the base model's and the adapter's, and the versions used, "
            "are in `export.json`.",
            "",
        ]
    )
