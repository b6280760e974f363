"""What the reviewed labels changed: the model before and after them, on the same test images.

Rule ``review_gain`` pairs the evaluation of the adapter trained without the reviewed rows
(``results/review/before/``) with the one trained with them (``results/evaluate/finetuned/``),
both on ``results/split/test.tsv``, and writes ``results/review/gain.json`` for the report:
accuracy and macro-F1 with their bootstrap intervals, per-class F1, McNemar's exact test, the
same on the test images of reviewed cases alone (``review.test_cases``: held out whole, never
trained on), and what each case contributed. Two evaluations of different test images are a
named error, never a comparison.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from forensic_vlm.config import ClassSpec, EvaluateConfig
from forensic_vlm.errors import ReviewGainError
from forensic_vlm.metrics import compute_metrics, headline_scores, paired_mcnemar
from forensic_vlm.tables import read_tsv, write_atomically

log = logging.getLogger(__name__)


def _scores(metrics: dict) -> dict:
    """The figures of one evaluation the report shows, and the device it ran on."""
    return {**headline_scores(metrics), "device": metrics.get("device", "")}


def _subset_scores(rows: list[dict], classes: list[ClassSpec], config: EvaluateConfig) -> dict:
    metrics = compute_metrics(
        [int(r["true"]) for r in rows],
        [int(r["predicted"]) for r in rows],
        None,
        classes,
        bootstrap_samples=config.bootstrap_samples,
        calibration_bins=config.calibration_bins,
        seed=config.seed,
    )
    return headline_scores(metrics)


def review_gain(
    *,
    summary: Path,
    test_table: Path,
    before_dir: Path,
    after_dir: Path,
    classes: list[ClassSpec],
    config: EvaluateConfig,
    out: Path,
) -> dict:
    """Write ``out`` (gain.json) from reviews.json and the two evaluations' folders; returns it."""
    reviews = json.loads(Path(summary).read_text(encoding="utf-8"))
    test = read_tsv(Path(test_table))
    test_images = sorted(r["sha256"] for r in test)
    predictions, metrics = {}, {}
    for name, folder in (("before", Path(before_dir)), ("after", Path(after_dir))):
        rows = read_tsv(folder / "predictions.tsv")
        if sorted(r["sha256"] for r in rows) != test_images:
            raise ReviewGainError(
                f"{folder / 'predictions.tsv'}: scores {len(rows)} image(s), not the {len(test)} of {test_table}; "
                "the models before and after the review are compared on the same test images only"
            )
        predictions[name] = rows
        metrics[name] = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    paired = paired_mcnemar(predictions["after"], predictions["before"])
    test_cases = list(reviews["test_cases"])
    case_of = {r["sha256"]: r.get("case", "") for r in test}
    held_out = {name: [r for r in rows if case_of[r["sha256"]] in test_cases] for name, rows in predictions.items()}
    gain = {
        "test_images": paired["paired_images"],
        "before": _scores(metrics["before"]),
        "after": _scores(metrics["after"]),
        "accuracy_gain": metrics["after"]["accuracy"] - metrics["before"]["accuracy"],
        "macro_f1_gain": metrics["after"]["macro_f1"] - metrics["before"]["macro_f1"],
        "mcnemar": {
            "paired_images": paired["paired_images"],
            "only_after_right": paired["only_a_right"],
            "only_before_right": paired["only_b_right"],
            "p_value": paired["p_value"],
        },
        # The reviewed cases held out whole (review.test_cases): new material neither model saw.
        "reviewed_test_cases": {
            "cases": test_cases,
            "images": len(held_out["after"]),
            **(
                {name: _subset_scores(rows, classes, config) for name, rows in held_out.items()}
                if held_out["after"]
                else {}
            ),
        },
        "trained_on_reviewed_labels": reviews["labels"]["train"],
        "cases": [
            {
                key: case[key]
                for key in (
                    "case",
                    "file",
                    "sha256",
                    "decisions",
                    "in_force",
                    "side",
                    "labels",
                    "withheld",
                    "agreement",
                )
            }
            for case in reviews["cases"]
        ],
        "withheld": dict(sum((Counter(case["withheld"]) for case in reviews["cases"]), Counter())),
    }
    write_atomically(Path(out), (json.dumps(gain, indent=2, ensure_ascii=False) + "\n").encode())
    log.info(
        "review gain: accuracy %.3f -> %.3f, macro-F1 %.3f -> %.3f on %d test images (%d reviewed labels trained on)",
        gain["before"]["accuracy"], gain["after"]["accuracy"], gain["before"]["macro_f1"],
        gain["after"]["macro_f1"], gain["test_images"], gain["trained_on_reviewed_labels"],
    )  # fmt: skip
    return gain
