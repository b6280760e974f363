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
from forensic_vlm.prediction_cache import PredictionCache, adapter_fingerprint, model_fingerprint
from forensic_vlm.prompting import TokenCounter, answer_tokens, build_prompt, preflight
from forensic_vlm.scoring import class_probabilities, generate_answers, parse_finetuned, parse_zeroshot, to_device
from forensic_vlm.tables import read_tsv, write_tsv

log = logging.getLogger(__name__)


def _score(todo, examples, tokens, cache, processor, prompt, answer, labels, model_config, config, adapter,
           max_new, device, kind) -> tuple[float, float]:  # fmt: skip
    """Run the model on the examples at ``todo``, adding each batch's results to the cache.

    Returns (seconds, images/s after the first batch).
    """
    if not todo:
        return 0.0, 0.0
    model = load_base_model(model_config, device)
    if adapter:
        model = load_adapter(model, Path(adapter))
    model.eval()
    subset = [examples[i] for i in todo]
    mode = "score" if config.decoding == "scores" else "generate"
    loader = DataLoader(
        ImageDataset(subset),
        batch_sampler=TokenGroupedBatches([tokens[i] for i in todo], config.batch_size, shuffle=False),
        collate_fn=LabelledCollator(Collator(processor, prompt, answer, labels, mode), subset),
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
    )
    parse = parse_finetuned if adapter else parse_zeroshot
    start, done, first = time.perf_counter(), 0, None
    for batch in loader:
        index = batch["indices"].tolist()
        inputs = to_device(batch, device, compute_dtype(device))
        rows = []
        if mode == "score":
            p = class_probabilities(model, inputs, answer.class_ids).cpu().numpy()
            for i, probs in zip(index, p):
                rows.append({"sha256": subset[i].sha256, "predicted": labels[int(probs.argmax())], "answer": "",
                             **{f"p{label}": f"{v:.6f}" for label, v in zip(labels, probs)}})  # fmt: skip
        else:
            for i, text in zip(index, generate_answers(model, inputs, processor.tokenizer, max_new)):
                rows.append({"sha256": subset[i].sha256, "predicted": parse(text), "answer": text})
        cache.add(rows)
        done += len(index)
        elapsed = time.perf_counter() - start
        first = first or (done, elapsed)  # after the first batch: workers up, kernels chosen
        log.info("%s: %d/%d images, %.1f images/s, ETA %.0f s", kind, done, len(subset), done / elapsed,
                 elapsed / done * (len(subset) - done))  # fmt: skip
    seconds = time.perf_counter() - start
    steady = (done - first[0]) / (seconds - first[1]) if done > first[0] else done / seconds
    return seconds, steady


def evaluate_split(
    table: Path,
    raw_data: Path,
    classes: list[ClassSpec],
    model_config: ModelConfig,
    config: EvaluateConfig,
    out_dir: Path,
    adapter: Path | None = None,
    threads: int | None = None,
    cache_dir: Path | None = None,
) -> dict:
    """Score every image of ``table``; write predictions.tsv, metrics.json, the report and the figure.

    With ``cache_dir``, images this exact model, adapter and prompt scored before are not scored
    again (``images_scored`` / ``images_from_cache`` in metrics.json say how many).
    """
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
    max_new = config.max_new_tokens_finetuned if adapter else config.max_new_tokens_zeroshot
    score_columns = ["sha256", "predicted", *[f"p{label}" for label in labels], "answer"]
    cache = PredictionCache(cache_dir, {
        "model": model_fingerprint(model_config.name_or_path), "quantization": model_config.quantization,
        "adapter": adapter_fingerprint(Path(adapter) if adapter else None), "prompt": prompt,
        "decoding": config.decoding, "max_new_tokens": max_new if config.decoding == "generate" else None,
        "class_tokens": list(answer.class_ids),
    }, score_columns)  # fmt: skip
    todo = [i for i, e in enumerate(examples) if cache.get(e.sha256) is None]
    log.info("%s: %d images, %d already scored by this model (cache %s), %d to score", kind, len(examples),
             len(examples) - len(todo), cache.key, len(todo))  # fmt: skip
    seconds, steady = _score(todo, examples, tokens, cache, processor, prompt, answer, labels, model_config,
                             config, adapter, max_new, device, kind)  # fmt: skip
    scores = [cache.get(e.sha256) for e in examples]
    predicted = np.array([int(s["predicted"]) for s in scores])
    probabilities = np.array([[float(s[f"p{label}"]) if s[f"p{label}"] else np.nan for label in labels] for s in scores])
    answers = [s["answer"] for s in scores]

    truth = [e.label for e in examples]
    scored = probabilities if config.decoding == "scores" else None
    metrics = compute_metrics(truth, predicted.tolist(), scored, classes, config.bootstrap_samples,
                              config.calibration_bins, config.seed)  # fmt: skip
    metrics.update({"kind": kind, "decoding": config.decoding, "model": model_config.name_or_path,
                    "quantization": model_config.quantization, "adapter": str(adapter) if adapter else None,
                    "images_scored": len(todo), "images_from_cache": len(examples) - len(todo),
                    "seconds": round(seconds, 2),
                    "images_per_second": round(len(todo) / seconds, 2) if todo else None,
                    "images_per_second_after_first_batch": round(steady, 2) if todo else None,
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
    log.info("%s: accuracy %.4f %s, macro-F1 %.4f, %s images/s on %s", kind, metrics["accuracy"],
             metrics["bootstrap_95"]["accuracy"], metrics["macro_f1"], metrics["images_per_second"], metrics["device"])  # fmt: skip
    return metrics

