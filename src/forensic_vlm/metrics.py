"""Classification metrics with uncertainty: scikit-learn's scores, bootstrap 95 % intervals,
expected calibration error, and a confusion-matrix figure with Korean and English labels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from forensic_vlm.config import ClassSpec


def paired_mcnemar(a: list[dict], b: list[dict]) -> dict:
    """Exact McNemar test of two models' prediction rows on the images both scored (by sha256):
    do they err on different images? The binomial test of the discordant pairs (SciPy)."""
    from scipy.stats import binomtest

    truth = {r["sha256"]: r["true"] for r in a}
    right_b = {r["sha256"]: r["predicted"] == r["true"] for r in b if r["sha256"] in truth}
    right_a = {r["sha256"]: r["predicted"] == r["true"] for r in a if r["sha256"] in right_b}
    only_a = sum(1 for k in right_a if right_a[k] and not right_b[k])
    only_b = sum(1 for k in right_a if right_b[k] and not right_a[k])
    discordant = only_a + only_b
    p = binomtest(only_a, discordant, 0.5).pvalue if discordant else 1.0
    return {"paired_images": len(right_a), "only_a_right": only_a, "only_b_right": only_b, "p_value": float(p)}


def bootstrap_intervals(
    y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[int], *, samples: int, seed: int
) -> dict[str, list[float]]:
    """Percentile 95 % intervals of accuracy and macro-F1 over resamples of the images."""
    rng = np.random.default_rng(seed)
    n, k = len(y_true), len(labels)
    index = {label: i for i, label in enumerate(labels)}
    true = np.array([index[t] for t in y_true])
    pred = np.array([index.get(p, k) for p in y_pred])  # unparsed answers: a column of their own
    draws = rng.integers(0, n, size=(samples, n))
    cells = true[draws] * (k + 1) + pred[draws]
    counts = np.stack([np.bincount(row, minlength=k * (k + 1)) for row in cells]).reshape(samples, k, k + 1)
    accuracy = np.trace(counts[:, :, :k], axis1=1, axis2=2) / n
    macro = macro_f1_from_counts(counts)
    return {
        "accuracy": [float(v) for v in np.percentile(accuracy, [2.5, 97.5])],
        "macro_f1": [float(v) for v in np.percentile(macro, [2.5, 97.5])],
    }


def macro_f1_from_counts(counts: np.ndarray) -> np.ndarray:
    """Macro-F1 of stacked confusion matrices (rows: k true classes; columns: the k classes, then
    any extra predicted values such as unparsed answers), as scikit-learn's ``f1_score`` with
    ``labels`` and ``zero_division=0`` computes it."""
    k = counts.shape[-2]
    tp = np.diagonal(counts[..., :k], axis1=-2, axis2=-1).astype(float)
    denominator = counts.sum(axis=-1) + counts[..., :k].sum(axis=-2)
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return f1.mean(axis=-1)


def expected_calibration_error(probabilities: np.ndarray, correct: np.ndarray, bins: int) -> dict:
    """ECE of the top-class confidence over equal-width bins, with the per-bin table for plots."""
    confidence = probabilities.max(axis=1)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        members = which == b
        count = int(members.sum())
        if count:
            gap = abs(float(correct[members].mean()) - float(confidence[members].mean()))
            ece += gap * count / len(confidence)
            table.append(
                {
                    "low": float(edges[b]),
                    "high": float(edges[b + 1]),
                    "n": count,
                    "accuracy": float(correct[members].mean()),
                    "confidence": float(confidence[members].mean()),
                }
            )
    return {"ece": ece, "bins": table}


def compute_metrics(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    probabilities: np.ndarray | None,
    classes: Sequence[ClassSpec],
    *,
    bootstrap_samples: int,
    calibration_bins: int,
    seed: int,
) -> dict:
    labels = [c.id for c in classes]
    true, pred = np.asarray(y_true), np.asarray(y_pred)
    precision, recall, f1, support = precision_recall_fscore_support(true, pred, labels=labels, zero_division=0)
    matrix_labels = labels + ([-1] if (pred == -1).any() else [])
    result = {
        "n": len(true),
        "accuracy": float(accuracy_score(true, pred)),
        "macro_f1": float(f1_score(true, pred, labels=labels, average="macro", zero_division=0)),
        "per_class": {
            str(c.id): {
                "name_en": c.en,
                "name_ko": c.ko,
                "precision": float(p),
                "recall": float(r),
                "f1": float(f),
                "support": int(s),
            }
            for c, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
        },
        "confusion_matrix": {
            "labels": matrix_labels,
            "counts": confusion_matrix(true, pred, labels=matrix_labels).tolist(),
        },
        "unparsed_answers": int((pred == -1).sum()),
        "bootstrap_95": bootstrap_intervals(true, pred, labels, samples=bootstrap_samples, seed=seed),
        "bootstrap_samples": bootstrap_samples,
    }
    if probabilities is not None:
        calibration = expected_calibration_error(probabilities, true == pred, calibration_bins)
        result["expected_calibration_error"] = calibration["ece"]
        result["calibration_bins"] = calibration["bins"]
    else:  # generated answers carry no probability: calibration is undefined, not zero
        result["expected_calibration_error"] = None
    return result


def headline_scores(metrics: dict) -> dict:
    """What a comparison of evaluations shows of one ``metrics.json``: n, accuracy and macro-F1 with
    their bootstrap 95 % intervals, and F1 per class (by class id)."""
    return {
        "n": metrics["n"],
        "accuracy": metrics["accuracy"],
        "accuracy_95": metrics["bootstrap_95"]["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "macro_f1_95": metrics["bootstrap_95"]["macro_f1"],
        "per_class_f1": {label: scores["f1"] for label, scores in metrics["per_class"].items()},
    }


def report_text(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[ClassSpec]) -> str:
    return classification_report(
        y_true,
        y_pred,
        labels=[c.id for c in classes],
        target_names=[f"{c.id} {c.ko} / {c.en}" for c in classes],
        digits=4,
        zero_division=0,
    )
