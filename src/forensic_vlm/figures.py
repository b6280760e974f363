"""Figures (matplotlib, Agg): confusion matrices, learning curves and reliability diagrams, with
Korean and English class names in the bundled NanumGothic font."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from forensic_vlm.config import ClassSpec


@contextmanager
def korean_figure(width: float, height: float, columns: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import font_manager
    from matplotlib import pyplot as plt

    from forensic_vlm.fonts import korean_font_path

    font_manager.fontManager.addfont(str(korean_font_path()))
    with plt.rc_context({"font.family": "NanumGothic", "axes.unicode_minus": False}):
        figure, axes = plt.subplots(1, columns, figsize=(width, height), squeeze=False)
        try:
            yield figure, list(axes[0])
        finally:
            plt.close(figure)


def class_label(label: int, classes: Sequence[ClassSpec]) -> str:
    by_id = {c.id: c for c in classes}
    if label in by_id:
        return f"{label} {by_id[label].ko}\n{by_id[label].en}"
    return f"{label} 분류 불가\nunparsed"


def plot_confusion_matrix(metrics: dict, classes: Sequence[ClassSpec], title: str, out: Path) -> None:
    """PNG of the confusion matrix, Korean and English class names (NanumGothic, bundled)."""
    from matplotlib import pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    labels = metrics["confusion_matrix"]["labels"]
    names = [class_label(label, classes) for label in labels]
    with korean_figure(7.5, 6.5) as (figure, (axes,)):
        display = ConfusionMatrixDisplay(np.array(metrics["confusion_matrix"]["counts"]), display_labels=names)
        display.plot(ax=axes, cmap="Blues", colorbar=False, values_format="d")
        axes.set_xlabel("predicted / 예측")
        axes.set_ylabel("true / 정답")
        axes.set_title(
            f"{title}\naccuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}, n = {metrics['n']}"
        )
        plt.setp(axes.get_xticklabels(), rotation=30, ha="right")
        figure.tight_layout()
        figure.savefig(out, dpi=120)


def plot_learning_curves(curves_csv: Path, out: Path) -> None:
    """Training loss per step and validation macro-F1 / accuracy per epoch, from Lightning's CSV."""
    with open(curves_csv, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    train = [(int(r["step"]), float(r["train_loss"])) for r in rows if r.get("train_loss")]
    val = [(int(r["epoch"]), float(r["val_macro_f1"]), float(r["val_accuracy"])) for r in rows if r.get("val_macro_f1")]
    with korean_figure(11, 4, columns=2) as (figure, (left, right)):
        if train:
            left.plot(*zip(*train, strict=True), color="tab:blue", linewidth=1)
        left.set(xlabel="step", ylabel="training loss (answer tokens)", title="training loss / 학습 손실")
        if val:
            epochs, f1, accuracy = zip(*val, strict=True)
            right.plot(epochs, f1, marker="o", label="macro-F1")
            right.plot(epochs, accuracy, marker="s", label="accuracy")
            right.legend()
        right.set(xlabel="epoch", ylabel="validation score", ylim=(0, 1.02), title="validation / 검증")
        right.xaxis.get_major_locator().set_params(integer=True)
        figure.tight_layout()
        figure.savefig(out, dpi=110)


def plot_reliability(models: dict[str, dict], out: Path) -> None:
    """Reliability diagram: accuracy against confidence per bin, for each model's metrics.json."""
    with korean_figure(6, 5) as (figure, (axes,)):
        axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
        for name, metrics in models.items():
            bins = metrics.get("calibration_bins") or []
            if bins:
                ece = metrics["expected_calibration_error"]
                axes.plot(
                    [b["confidence"] for b in bins],
                    [b["accuracy"] for b in bins],
                    marker="o",
                    label=f"{name} (ECE {ece:.3f})",
                )
        axes.set(
            xlabel="confidence (top-class probability)",
            ylabel="accuracy",
            xlim=(0, 1),
            ylim=(0, 1.02),
            title="reliability / 신뢰도",
        )
        axes.legend(loc="upper left")
        figure.tight_layout()
        figure.savefig(out, dpi=110)
