"""Stage ``compare_models``: the compared base models side by side, pair by pair, on the same images.

For each run of ``compare``: both evaluations' accuracy and macro-F1 with their bootstrap
intervals, per-class F1, training images/s (the median over training steps) and scoring images/s
(after the first batch), each with the machine it was measured on; for every pair of runs, the
exact McNemar test of their fine-tuned predictions on the test images both scored. Runs evaluated
on different test images are not compared: that stops with the names and the counts.
"""

from __future__ import annotations

import csv
import itertools
import json
import statistics
from pathlib import Path

from forensic_vlm.config import ClassSpec
from forensic_vlm.errors import BadInputError
from forensic_vlm.metrics import headline_scores, paired_mcnemar
from forensic_vlm.tables import read_tsv, write_atomically, write_tsv

KINDS = ("zeroshot", "finetuned")


def _training_rate(curves: Path) -> float | None:
    """Median training images/s over the logged steps (the first steps' start-up included, outweighed)."""
    with open(curves, encoding="utf-8", newline="") as handle:
        rates = [float(row["train_images_per_s"]) for row in csv.DictReader(handle) if row.get("train_images_per_s")]
    return round(statistics.median(rates), 2) if rates else None


def _evaluation(folder: Path) -> dict:
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    return {
        **headline_scores(metrics),
        # None when every prediction came from the cache (an identical adapter scored them before).
        "scoring_images_per_second": metrics.get("images_per_second_after_first_batch"),
        "images_from_cache": metrics.get("images_from_cache", 0),
        "device": metrics.get("device"),
        "decoding": metrics.get("decoding"),
        "quantization": metrics.get("quantization"),
    }


def compare_models(runs: dict[str, Path], classes: list[ClassSpec], out_json: Path, out_table: Path) -> dict:
    """``runs``: name -> results/models/<name>; writes comparison.json and a flat comparison.tsv."""
    models, predictions = [], {}
    for name, folder in runs.items():
        card = json.loads((folder / "train" / "adapter" / "training.json").read_text(encoding="utf-8"))
        models.append(
            {
                "name": name,
                "architecture": card.get("architecture"),
                "base_model": card["base_model"],
                **{kind: _evaluation(folder / "evaluate" / kind) for kind in KINDS},
                "training": {
                    "images_per_second": _training_rate(folder / "train" / "metrics.csv"),
                    "device": card["validation"]["device"],
                    "epochs": card["train"]["epochs"],
                    "best_epoch": card["validation"]["best_epoch"],
                    "val_macro_f1": card["validation"]["val_macro_f1"],
                    "training_images": card["training_images"],
                    "base": card["validation"]["plan"]["quantization"],
                },
            }
        )
        predictions[name] = read_tsv(folder / "evaluate" / "finetuned" / "predictions.tsv")
    images = {name: {r["sha256"] for r in rows} for name, rows in predictions.items()}
    first = next(iter(images))
    for name, seen in images.items():
        if seen != images[first]:
            raise BadInputError(
                f"compare: {name} was evaluated on {len(seen)} test images and {first} on {len(images[first])}, "
                f"{len(seen ^ images[first])} of them not in both; the runs must share the split"
            )
    pairs = []
    for a, b in itertools.combinations(runs, 2):
        test = paired_mcnemar(predictions[a], predictions[b])
        pairs.append({"a": a, "b": b, "kind": "finetuned", **test})
    comparison = {"test_images": len(images[first]), "models": models, "pairs": pairs}
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    write_atomically(Path(out_json), (json.dumps(comparison, indent=2, ensure_ascii=False) + "\n").encode())
    rows = _flat_rows(models, classes)
    write_tsv(Path(out_table), list(rows[0]), rows)
    return comparison


def _flat_rows(models: list[dict], classes: list[ClassSpec]) -> list[dict]:
    rows = []
    for model in models:
        for kind in KINDS:
            evaluation = model[kind]
            rows.append(
                {
                    "name": model["name"],
                    "architecture": model["architecture"] or "",
                    "kind": kind,
                    "n": evaluation["n"],
                    "accuracy": f"{evaluation['accuracy']:.4f}",
                    "accuracy_low": f"{evaluation['accuracy_95'][0]:.4f}",
                    "accuracy_high": f"{evaluation['accuracy_95'][1]:.4f}",
                    "macro_f1": f"{evaluation['macro_f1']:.4f}",
                    "macro_f1_low": f"{evaluation['macro_f1_95'][0]:.4f}",
                    "macro_f1_high": f"{evaluation['macro_f1_95'][1]:.4f}",
                    **{f"f1_{c.id}": f"{evaluation['per_class_f1'][str(c.id)]:.4f}" for c in classes},
                    "scoring_images_per_second": evaluation["scoring_images_per_second"] or "",
                    "training_images_per_second": model["training"]["images_per_second"] or "",
                    "device": evaluation["device"] or "",
                }
            )
    return rows
