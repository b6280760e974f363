"""The report's before-and-after of the reviewed labels (rule review_gain): paired on the same test
images, the held-out reviewed cases on their own, two evaluations of different images refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scipy.stats import binomtest

from forensic_vlm.config import DEFAULT_CLASSES, EvaluateConfig
from forensic_vlm.errors import ReviewGainError
from forensic_vlm.metrics import compute_metrics
from forensic_vlm.report import _review_section
from forensic_vlm.review.gain import review_gain
from forensic_vlm.tables import write_tsv

CONFIG = EvaluateConfig(bootstrap_samples=200)


def evaluation(folder: Path, truth: list[int], predicted: list[int]) -> Path:
    """An evaluation's folder as rule evaluate_finetuned writes it: predictions.tsv, metrics.json."""
    folder.mkdir(parents=True)
    rows = [
        {"sha256": f"{i:064x}", "path": f"{i}.png", "flags": "", "true": t, "predicted": p}
        for i, (t, p) in enumerate(zip(truth, predicted, strict=True))
    ]
    write_tsv(folder / "predictions.tsv", ("sha256", "path", "flags", "true", "predicted"), rows)
    metrics = compute_metrics(
        truth, predicted, None, DEFAULT_CLASSES, bootstrap_samples=200, calibration_bins=10, seed=0
    )
    (folder / "metrics.json").write_text(json.dumps({**metrics, "device": "CPU"}))
    return folder


@pytest.fixture
def paired(tmp_path: Path) -> dict:
    """12 test images: 4 from raw_data, 8 from the held-out reviewed case phone3."""
    truth = [0, 1, 2, 3] * 3
    cases = [""] * 4 + ["phone3"] * 8
    write_tsv(
        tmp_path / "test.tsv",
        ("sha256", "path", "label", "case"),
        [
            {"sha256": f"{i:064x}", "path": f"{i}.png", "label": t, "case": c}
            for i, (t, c) in enumerate(zip(truth, cases, strict=True))
        ],
    )
    # Before: raw_data right, phone3 mostly wrong; after: one raw image lost, phone3 mostly right.
    before = [0, 1, 2, 3, *[1, 2, 3, 0, 0, 1, 3, 0]]
    after = [0, 1, 2, 0, *[0, 1, 2, 3, 0, 1, 3, 0]]
    summary = {
        "cases": [
            {"case": "phone2", "file": "reviews/phone2.jsonl", "sha256": "ab" * 32, "decisions": 30, "in_force": 24,
             "side": "train", "labels": 22, "withheld": {"unusable": 2}, "agreement": {"images": 22, "model_agreed": 15}},
            {"case": "phone3", "file": "reviews/phone3.jsonl", "sha256": "cd" * 32, "decisions": 8, "in_force": 8,
             "side": "test", "labels": 8, "withheld": {}, "agreement": {"images": 8, "model_agreed": 3}},
        ],
        "test_cases": ["phone3"],
        "labels": {"train": 22, "test": 8},
    }  # fmt: skip
    (tmp_path / "reviews.json").write_text(json.dumps(summary))
    return {
        "tmp": tmp_path,
        "before": evaluation(tmp_path / "before", truth, before),
        "after": evaluation(tmp_path / "after", truth, after),
    }


def gain_of(paired: dict, **changes) -> dict:
    arguments = {
        "summary": paired["tmp"] / "reviews.json",
        "test_table": paired["tmp"] / "test.tsv",
        "before_dir": paired["before"],
        "after_dir": paired["after"],
        "classes": list(DEFAULT_CLASSES),
        "config": CONFIG,
        "out": paired["tmp"] / "gain.json",
    }
    return review_gain(**{**arguments, **changes})


def test_before_and_after_are_paired_on_the_same_images_and_the_held_out_case_is_scored_alone(paired: dict) -> None:
    gain = gain_of(paired)
    assert json.loads((paired["tmp"] / "gain.json").read_text()) == gain
    assert gain["test_images"] == 12
    assert gain["before"]["accuracy"] == pytest.approx(6 / 12) and gain["after"]["accuracy"] == pytest.approx(9 / 12)
    assert gain["accuracy_gain"] == pytest.approx(3 / 12)
    # Right only after: phone3's images 4-7; only before: raw image 3; 8 and 9 right in both.
    mcnemar = gain["mcnemar"]
    assert (mcnemar["only_after_right"], mcnemar["only_before_right"]) == (4, 1)
    assert mcnemar["p_value"] == pytest.approx(binomtest(4, 5, 0.5).pvalue)
    held_out = gain["reviewed_test_cases"]
    assert held_out["cases"] == ["phone3"] and held_out["images"] == 8
    assert held_out["before"]["accuracy"] == pytest.approx(2 / 8) and held_out["after"]["accuracy"] == pytest.approx(
        6 / 8
    )
    low, high = held_out["after"]["accuracy_95"]
    assert low <= 6 / 8 <= high
    assert gain["trained_on_reviewed_labels"] == 22 and gain["withheld"] == {"unusable": 2}
    assert [c["case"] for c in gain["cases"]] == ["phone2", "phone3"]


def test_evaluations_of_different_test_images_are_refused(paired: dict) -> None:
    predictions = paired["before"] / "predictions.tsv"
    lines = predictions.read_text().splitlines(keepends=True)
    predictions.write_text("".join(lines[:-1]))  # one test image not scored before
    with pytest.raises(ReviewGainError, match=r"before/predictions.tsv: scores 11 image\(s\), not the 12"):
        gain_of(paired)
    assert not (paired["tmp"] / "gain.json").exists()


def test_the_report_section_shows_both_models_the_held_out_case_and_each_cases_decisions(paired: dict) -> None:
    html = "\n".join(_review_section(gain_of(paired), list(DEFAULT_CLASSES)))
    assert "Examiner's review: before and after" in html
    assert "0.500 <span class=ci>" in html and "0.750 <span class=ci>" in html  # accuracy before, after
    assert "accuracy on the 8 images of phone3" in html
    assert "moved the accuracy on the same 12 test images by +0.250 (0.500 to 0.750)" in html
    assert "<td>15 of 22 (68%)</td>" in html and "unusable: 2" in html and "ab" * 32 in html
