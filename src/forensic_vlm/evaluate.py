"""Stages ``evaluate_zeroshot`` and ``evaluate_finetuned``: score the test split, write metrics.

``decoding: scores`` (default): one forward pass per image, class probabilities from the digit
logits at the answer position. ``decoding: generate``: the reference way (generate, then parse
the text), so both can be compared on the same images. An image that cannot be read stops the
run with its name: nothing is replaced by a blank image or scored against a made-up answer.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from forensic_vlm.batches import Collator, ImageDataset, LabelledCollator, TokenGroupedBatches, examples_from_table
from forensic_vlm.config import ClassSpec, EvaluateConfig, ModelConfig
from forensic_vlm.figures import plot_confusion_matrix
from forensic_vlm.metrics import compute_metrics, report_text
from forensic_vlm.modeling import compute_dtype, device_name, load_adapter, load_base_model, load_processor, resolve_device
from forensic_vlm.prompting import TokenCounter, answer_tokens, build_prompt, preflight
from forensic_vlm.scoring import class_probabilities, generate_answers, parse_finetuned, parse_zeroshot, to_device
from forensic_vlm.tables import read_tsv, write_tsv

log = logging.getLogger(__name__)


def evaluate_split(
    table: Path,
    raw_data: Path,
    classes: list[ClassSpec],
    model_config: ModelConfig,
    config: EvaluateConfig,
    out_dir: Path,
    adapter: Path | None = None,
    threads: int | None = None,
) -> dict:
    """Score every image of ``table``; write predictions.tsv, metrics.json, the report and the figure."""
    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = "finetuned" if adapter else "zeroshot"
    examples = examples_from_table(read_tsv(Path(table)), raw_data)
    device = resolve_device(model_config)
    # The adapter folder carries the processor it was trained with; the base model's otherwise.
    processor = load_processor(adapter or model_config.name_or_path)
    prompt = build_prompt(processor, model_config.question)
    labels = [c.id for c in classes]
    answer = answer_tokens(processor.tokenizer, prompt, labels)
    tokens = preflight(TokenCounter(processor, prompt, answer), [(e.name, e.width, e.height) for e in examples],
                       model_config.max_sequence_tokens)  # fmt: skip
    model = load_base_model(model_config, device)
    if adapter:
        model = load_adapter(model, Path(adapter))
    model.eval()

    mode = "score" if config.decoding == "scores" else "generate"
    loader = DataLoader(
        ImageDataset(examples),
        batch_sampler=TokenGroupedBatches(tokens, config.batch_size, shuffle=False),
        collate_fn=LabelledCollator(Collator(processor, prompt, answer, labels, mode), examples),
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
    )
    probabilities = np.full((len(examples), len(labels)), np.nan)
    predicted = np.full(len(examples), -1)
    answers = [""] * len(examples)
    max_new = config.max_new_tokens_finetuned if adapter else config.max_new_tokens_zeroshot
    parse = parse_finetuned if adapter else parse_zeroshot
    start, done, first = time.perf_counter(), 0, None
    for batch in loader:
        index = batch["indices"].numpy()
        inputs = to_device(batch, device, compute_dtype(device))
        if mode == "score":
            p = class_probabilities(model, inputs, answer.class_ids).cpu().numpy()
            probabilities[index] = p
            predicted[index] = np.asarray(labels)[p.argmax(axis=1)]
        else:
            for i, text in zip(index, generate_answers(model, inputs, processor.tokenizer, max_new)):
                answers[i], predicted[i] = text, parse(text)
        done += len(index)
        elapsed = time.perf_counter() - start
        first = first or (done, elapsed)  # after the first batch: workers up, kernels chosen
        log.info("%s: %d/%d images, %.1f images/s, ETA %.0f s", kind, done, len(examples), done / elapsed,
                 elapsed / done * (len(examples) - done))  # fmt: skip
    seconds = time.perf_counter() - start
    steady = (done - first[0]) / (seconds - first[1]) if first and done > first[0] else done / seconds

    truth = [e.label for e in examples]
    scored = probabilities if mode == "score" else None
    metrics = compute_metrics(truth, predicted.tolist(), scored, classes, config.bootstrap_samples,
                              config.calibration_bins, config.seed)  # fmt: skip
    metrics.update({"kind": kind, "decoding": config.decoding, "model": model_config.name_or_path,
                    "quantization": model_config.quantization, "adapter": str(adapter) if adapter else None,
                    "seconds": round(seconds, 2), "images_per_second": round(len(examples) / seconds, 2),
                    "images_per_second_after_first_batch": round(steady, 2),
                    "device": device_name(device)})  # fmt: skip
    rows = []
    for i, e in enumerate(examples):
        row = {"sha256": e.sha256, "path": e.name, "flags": e.flags, "true": e.label, "predicted": int(predicted[i])}
        row.update({f"p{label}": "" if scored is None else f"{probabilities[i, j]:.6f}" for j, label in enumerate(labels)})
        row["answer"] = answers[i]
        rows.append(row)
    columns = ["sha256", "path", "flags", "true", "predicted", *[f"p{label}" for label in labels], "answer"]
    write_tsv(out_dir / "predictions.tsv", columns, rows)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "classification_report.txt").write_text(report_text(truth, predicted.tolist(), classes), encoding="utf-8")
    title = f"{'fine-tuned' if adapter else 'zero-shot'} ({config.decoding})"
    plot_confusion_matrix(metrics, classes, title, out_dir / "confusion_matrix.png")
    log.info("%s: accuracy %.4f %s, macro-F1 %.4f, %.2f images/s on %s", kind, metrics["accuracy"],
             metrics["bootstrap_95"]["accuracy"], metrics["macro_f1"], metrics["images_per_second"], metrics["device"])  # fmt: skip
    return metrics

