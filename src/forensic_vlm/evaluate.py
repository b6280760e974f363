"""Stages ``evaluate_zeroshot`` and ``evaluate_finetuned``: score the test split, write metrics.

``decoding: scores`` (default): one forward pass per image, class probabilities from the digit
logits at the answer position. ``decoding: generate``: the reference way (generate, then parse
the text), so both can be compared on the same images. An image that cannot be read stops the
run with its name: nothing is replaced by a blank image or scored against a made-up answer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from forensic_vlm.config import ClassSpec, EvaluateConfig, ModelConfig
from forensic_vlm.errors import IntegrityError
from forensic_vlm.figures import plot_confusion_matrix
from forensic_vlm.shards import merge_shard_caches, read_parts, score_part
from forensic_vlm.tables import Example, examples_from_table, read_tsv, write_tsv

log = logging.getLogger(__name__)


def evaluate_split(
    table: Path,
    raw_data: Path,
    *,
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
    from forensic_vlm.modeling import use_threads  # torch: only where images are scored
    from forensic_vlm.scoring import score_examples

    use_threads(threads)
    kind = "finetuned" if adapter else "zeroshot"
    examples = examples_from_table(read_tsv(Path(table)), raw_data)
    labels = [c.id for c in classes]
    result = score_examples(
        examples, labels, model_config=model_config, config=config, adapter=adapter, cache_dir=cache_dir, kind=kind
    )
    facts = {
        **result.run_facts(),
        "model_files_sha256": result.model_files_sha256,
        "adapter_files_sha256": result.adapter_files_sha256,
    }
    return write_evaluation(
        examples,
        result.rows,
        facts,
        classes=classes,
        model_config=model_config,
        config=config,
        out_dir=out_dir,
        adapter=adapter,
    )


def score_split_shard(
    table: Path,
    raw_data: Path,
    part: Path,
    *,
    scatter_item: str,
    classes: list[ClassSpec],
    model_config: ModelConfig,
    config: EvaluateConfig,
    adapter: Path | None = None,
    cache_dir: Path | None = None,
    shard_cache_dir: Path | None = None,
    parity_gate: Path | None = None,
    threads: int | None = None,
) -> dict:
    """One shard job of an evaluation (rules ``evaluate_*_shard``): its share of the test split's
    images, scored as ``shards.score_part`` does for the triage. Returns the job's record."""
    from forensic_vlm.modeling import use_threads  # torch: only where images are scored

    use_threads(threads)
    return score_part(
        examples_from_table(read_tsv(Path(table)), raw_data),
        part,
        scatter_item=scatter_item,
        stage=f"evaluate_{'finetuned' if adapter else 'zeroshot'}",
        labels=[c.id for c in classes],
        model_config=model_config,
        evaluate_config=config,
        adapter=adapter,
        cache_dir=cache_dir,
        shard_cache_dir=shard_cache_dir,
        parity_gate=parity_gate,
    )


def assemble_evaluation(
    table: Path,
    raw_data: Path,
    parts: list[Path],
    *,
    classes: list[ClassSpec],
    model_config: ModelConfig,
    config: EvaluateConfig,
    out_dir: Path,
    adapter: Path | None = None,
    cache_dir: Path | None = None,
    shard_cache_dirs: list[Path] = (),
) -> dict:
    """Merge an evaluation's shard parts into the outputs one job writes (rules ``evaluate_*``),
    after checking them (``shards.read_parts``) and that every image of the split has its score;
    then merge the shards' caches into the shared one. metrics.json lists every shard's job."""
    examples = examples_from_table(read_tsv(Path(table)), raw_data)
    scored, records, scoring = read_parts(parts)
    missing = [e.name for e in examples if e.sha256 not in scored]
    if missing:
        raise IntegrityError(f"{table}: no shard scored {len(missing)} image(s), the first {missing[0]!r}")
    facts = {
        **scoring["facts"],
        "model_files_sha256": scoring["model_files_sha256"],
        "adapter_files_sha256": scoring["adapter_files_sha256"],
        "shard_jobs": [{key: value for key, value in record.items() if key != "scoring"} for record in records],
    }
    metrics = write_evaluation(
        examples,
        [scored[e.sha256] for e in examples],
        facts,
        classes=classes,
        model_config=model_config,
        config=config,
        out_dir=out_dir,
        adapter=adapter,
    )
    merge_shard_caches(cache_dir, list(shard_cache_dirs))
    return metrics


def write_evaluation(
    examples: list[Example],
    scores: list[dict[str, str]],
    facts: dict,
    *,
    classes: list[ClassSpec],
    model_config: ModelConfig,
    config: EvaluateConfig,
    out_dir: Path,
    adapter: Path | None,
) -> dict:
    """predictions.tsv, metrics.json (with the scoring run's ``facts``), the report and the
    confusion figure, from every example's score row in the examples' order."""
    from forensic_vlm.metrics import compute_metrics, report_text  # scikit-learn: not in the shard jobs

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = "finetuned" if adapter else "zeroshot"
    labels = [c.id for c in classes]
    predicted = np.array([int(s["predicted"]) for s in scores])
    probabilities = np.array(
        [[float(s[f"p{label}"]) if s[f"p{label}"] else np.nan for label in labels] for s in scores]
    )
    answers = [s["answer"] for s in scores]

    truth = [e.label for e in examples]
    scored = probabilities if config.decoding == "scores" else None
    metrics = compute_metrics(
        truth,
        predicted.tolist(),
        scored,
        classes,
        bootstrap_samples=config.bootstrap_samples,
        calibration_bins=config.calibration_bins,
        seed=config.seed,
    )
    metrics.update(
        {
            "kind": kind,
            "decoding": config.decoding,
            "model": model_config.name_or_path,
            "adapter": str(adapter) if adapter else None,
            **facts,
        }
    )
    rows = []
    for i, e in enumerate(examples):
        row = {"sha256": e.sha256, "path": e.name, "flags": e.flags, "true": e.label, "predicted": int(predicted[i])}
        row.update(
            {f"p{label}": "" if scored is None else f"{probabilities[i, j]:.6f}" for j, label in enumerate(labels)}
        )
        row["answer"] = answers[i]
        rows.append(row)
    columns = ["sha256", "path", "flags", "true", "predicted", *[f"p{label}" for label in labels], "answer"]
    write_tsv(out_dir / "predictions.tsv", columns, rows)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "classification_report.txt").write_text(
        report_text(truth, predicted.tolist(), classes), encoding="utf-8"
    )
    title = f"{'fine-tuned' if adapter else 'zero-shot'} ({config.decoding})"
    plot_confusion_matrix(metrics, classes, title, out_dir / "confusion_matrix.png")
    log.info(
        "%s: accuracy %.4f %s, macro-F1 %.4f, %s images/s on %s",
        kind,
        metrics["accuracy"],
        metrics["bootstrap_95"]["accuracy"],
        metrics["macro_f1"],
        metrics["images_per_second"],
        metrics["device"],
    )
    return metrics
