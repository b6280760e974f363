"""Per-class review thresholds, chosen on the validation set for a target precision.

For each class c, the threshold is the lowest probability t such that, among validation images
predicted as c with p(c) >= t, the share truly of class c (the precision) reaches the target.
Predictions at or above their class's threshold may be taken as they are; the rest need review.
A class where no threshold reaches the target has none, and all its predictions need review.

Validation sets are small, so every threshold carries its support (how many validation images
lie above it) and a one-sided 95 % Clopper-Pearson lower bound of its precision: the number to
read before trusting it. Written next to the adapter at training time (``review_thresholds.json``)
and stated by classify in every output.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from forensic_vlm.errors import InputNotFoundError

FILE_NAME = "review_thresholds.json"


def precision_lower_bound(correct: int, total: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson lower bound of a proportion correct/total."""
    if total == 0 or correct == 0:
        return 0.0
    from scipy.stats import beta  # 0.8 s to import: only the training's threshold choice needs it

    return float(beta.ppf(1 - confidence, correct, total - correct + 1))


def choose_thresholds(
    probabilities: np.ndarray, targets: Sequence[int], labels: Sequence[int], target_precision: float
) -> dict:
    """Thresholds for each class (columns of ``probabilities`` follow ``labels``; targets are labels)."""
    probabilities = np.asarray(probabilities, dtype=float)
    targets = np.asarray(targets)
    predicted_index = probabilities.argmax(axis=1)
    classes = {}
    for j, label in enumerate(labels):
        mine = predicted_index == j
        confidence = probabilities[mine, j]
        correct = targets[mine] == label
        chosen = None
        for threshold in np.unique(confidence):  # ascending: the lowest threshold that reaches it
            above = confidence >= threshold
            precision = float(correct[above].mean())
            if precision >= target_precision:
                chosen = {
                    "threshold": round(float(threshold), 6),
                    "precision": round(precision, 4),
                    "support": int(above.sum()),
                    "precision_lower_95": round(precision_lower_bound(int(correct[above].sum()), int(above.sum())), 4),
                    "recall": round(float(correct[above].sum() / max(1, (targets == label).sum())), 4),
                }
                break
        classes[str(label)] = chosen or {
            "threshold": None,
            "predicted": int(mine.sum()),
            "note": f"no threshold reaches precision {target_precision} on {int(mine.sum())} validation predictions",
        }
    return {"target_precision": target_precision, "validation_images": len(targets), "classes": classes}


def write_thresholds(adapter_dir: Path, thresholds: dict) -> Path:
    path = Path(adapter_dir) / FILE_NAME
    path.write_text(json.dumps(thresholds, indent=2) + "\n", encoding="utf-8")
    return path


def read_thresholds(adapter_dir: Path | None) -> dict | None:
    """The adapter's thresholds, or None (zero-shot: nothing was validated)."""
    if adapter_dir is None:
        return None
    path = Path(adapter_dir) / FILE_NAME
    if not path.exists():
        raise InputNotFoundError(f"{path}: the adapter has no review thresholds; train it again with this version")
    return json.loads(path.read_text(encoding="utf-8"))


def threshold_of(thresholds: dict | None, label: int) -> float | None:
    """The validated threshold of class ``label``; None when it has none or nothing was validated."""
    if thresholds is None:
        return None
    return thresholds["classes"].get(str(label), {}).get("threshold")


def needs_review(thresholds: dict | None, predicted: int, confidence: float) -> bool:
    """True unless a validated threshold of the predicted class is met."""
    threshold = threshold_of(thresholds, predicted)
    return threshold is None or confidence < threshold
