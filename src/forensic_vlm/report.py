"""Stage ``report``: one self-contained HTML page comparing zero-shot and fine-tuned.

Everything is embedded (figures and thumbnails as data URIs, no script, no network), so the page
can be archived with a case file. ``report.show_images: false`` leaves out every thumbnail for
sensitive evidence. Every path and message from the evidence is HTML-escaped.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from forensic_vlm.config import ClassSpec, ReportConfig
from forensic_vlm.figures import plot_learning_curves, plot_reliability
from forensic_vlm.images import read_located_bytes
from forensic_vlm.metrics import paired_mcnemar
from forensic_vlm.pages import escape, html_page, html_table, png_data_uri, thumbnail
from forensic_vlm.provenance import config_sha256, git_commit, package_versions
from forensic_vlm.tables import image_location, read_tsv, sha256_file

KINDS = ("zeroshot", "finetuned")
TITLES = {"zeroshot": "zero-shot (base model)", "finetuned": "fine-tuned (base + adapter)"}


@dataclass(frozen=True)
class ReportInputs:
    manifest: Path
    rejects: Path
    split_summary: Path
    lineage: Path
    curves: Path
    training_card: Path
    evaluations: dict[str, Path]  # kind -> folder with metrics.json, predictions.tsv, confusion_matrix.png
    raw_data: Path
    config: dict
    comparison: Path | None = None  # results/models/comparison.json, when base models are compared
    review_gain: Path | None = None  # results/review/gain.json, with review.use_for_training
    # results/split/test.tsv: where each test image lies (a reviewed case's, outside raw_data).
    test_table: Path | None = None

    @classmethod
    def from_results(cls, results: Path, raw_data: Path, config: dict) -> ReportInputs:
        """The inputs as the workflow lays them out under ``results/``."""
        results = Path(results)
        return cls(
            manifest=results / "manifest" / "manifest.tsv",
            rejects=results / "manifest" / "rejects.tsv",
            split_summary=results / "split" / "summary.tsv",
            lineage=results / "augment" / "lineage.tsv",
            curves=results / "train" / "metrics.csv",
            training_card=results / "train" / "adapter" / "training.json",
            evaluations={kind: results / "evaluate" / kind for kind in KINDS},
            raw_data=Path(raw_data),
            config=config,
            test_table=results / "split" / "test.tsv",
        )


def mcnemar(zeroshot: list[dict], finetuned: list[dict]) -> dict:
    """Exact McNemar test on the images both scored: do the two models err on different images?"""
    test = paired_mcnemar(finetuned, zeroshot)
    return {
        "paired_images": test["paired_images"],
        "only_finetuned_right": test["only_a_right"],
        "only_zeroshot_right": test["only_b_right"],
        "p_value": test["p_value"],
    }


def _interval(metrics: dict, key: str) -> str:
    return _with_interval(metrics[key], metrics["bootstrap_95"][key])


def _with_interval(value: float, interval: list[float]) -> str:
    low, high = interval
    return f"{value:.3f} <span class=ci>[{low:.3f}, {high:.3f}]</span>"


def _headline_interval(scores: dict, key: str) -> str:
    """A figure of metrics.headline_scores with its interval (``<key>_95``)."""
    return _with_interval(scores[key], scores[f"{key}_95"])


def provenance(inputs: ReportInputs, metrics: dict[str, dict]) -> list[list[object]]:
    versions = [f"{package} {version}" for package, version in package_versions().items()]
    card = json.loads(Path(inputs.training_card).read_text()) if Path(inputs.training_card).exists() else {}
    return [
        ["generated", dt.datetime.now(dt.UTC).isoformat(timespec="seconds") + f" on {platform.node()}"],
        ["package versions", ", ".join(versions)],
        ["configuration sha256", config_sha256(inputs.config)],
        ["manifest.tsv sha256", sha256_file(inputs.manifest)],
        ["training tables sha256", card.get("data_sha256", "")],
        ["base model", card.get("base_model", inputs.config.get("model", {}).get("name_or_path", ""))],
        ["git commit", git_commit()],
        *[[f"device ({TITLES[k]})", m.get("device", "")] for k, m in metrics.items()],
        ["device (training)", card.get("validation", {}).get("device", "")],
    ]


def build_report(inputs: ReportInputs, classes: list[ClassSpec], config: ReportConfig, out_dir: Path) -> Path:
    """Write ``out_dir/index.html`` (and its figures as PNG files beside it); returns the page."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {k: json.loads((inputs.evaluations[k] / "metrics.json").read_text()) for k in KINDS}
    predictions = {k: read_tsv(inputs.evaluations[k] / "predictions.tsv") for k in KINDS}
    plot_learning_curves(inputs.curves, out_dir / "learning_curves.png")
    plot_reliability({TITLES[k]: metrics[k] for k in KINDS}, out_dir / "reliability.png")
    test = mcnemar(predictions["zeroshot"], predictions["finetuned"])
    by_id = {c.id: c for c in classes}

    headline = html_table(
        ["", *[TITLES[k] for k in KINDS]],
        [
            ["accuracy [bootstrap 95 %]", *[_interval(metrics[k], "accuracy") for k in KINDS]],
            ["macro-F1 [bootstrap 95 %]", *[_interval(metrics[k], "macro_f1") for k in KINDS]],
            ["expected calibration error", *[_fmt(metrics[k].get("expected_calibration_error")) for k in KINDS]],
            ["test images", *[metrics[k]["n"] for k in KINDS]],
            ["decoding", *[escape(metrics[k]["decoding"]) for k in KINDS]],
            [
                "throughput (images/s, device)",
                *[f"{metrics[k]['images_per_second']} ({escape(metrics[k]['device'])})" for k in KINDS],
            ],
        ],
        raw=True,
    )
    per_class = html_table(
        ["class", "support", *[f"{TITLES[k]}: {m}" for k in KINDS for m in ("precision", "recall", "F1")]],
        [
            [
                f"{c.id} {c.ko} / {c.en}",
                metrics["finetuned"]["per_class"][str(c.id)]["support"],
                *[f"{metrics[k]['per_class'][str(c.id)][m]:.3f}" for k in KINDS for m in ("precision", "recall", "f1")],
            ]
            for c in classes
        ],
    )
    verdict = (
        f"The two models err on different images (p = {test['p_value']:.3g})."
        if test["p_value"] < 0.05
        else f"No significant difference at the 5 % level (p = {test['p_value']:.3g})."
    )
    sections = [
        f"<h1>{escape(config.title)}</h1>",
        "<p class=note>All figures are on the same held-out test images. Intervals are percentile bootstrap "
        f"95 % intervals over {metrics['finetuned'].get('bootstrap_samples', '?')} resamples of the images.</p>",
        "<h2>Headline</h2>",
        headline,
        "<h2>McNemar's test (paired, exact)</h2>",
        html_table(
            ["images scored by both", "right only when fine-tuned", "right only zero-shot", "p-value"],
            [
                [
                    test["paired_images"],
                    test["only_finetuned_right"],
                    test["only_zeroshot_right"],
                    f"{test['p_value']:.3g}",
                ]
            ],
        ),
        f"<p>{escape(verdict)}</p>",
        "<h2>Per class</h2>",
        per_class,
        "<h2>Confusion matrices</h2><div class=row>"
        + "".join(
            f"<figure><img alt='confusion matrix, {TITLES[k]}' src='{png_data_uri(inputs.evaluations[k] / 'confusion_matrix.png')}'>"
            f"<figcaption>{escape(TITLES[k])}</figcaption></figure>"
            for k in KINDS
        )
        + "</div>",
        "<h2>Learning curves</h2>",
        f"<figure><img alt='learning curves' src='{png_data_uri(out_dir / 'learning_curves.png')}'></figure>",
        "<h2>Calibration</h2>",
        f"<figure><img alt='reliability diagram' src='{png_data_uri(out_dir / 'reliability.png')}'></figure>",
        *(_comparison_section(json.loads(inputs.comparison.read_text()), classes) if inputs.comparison else []),
        *(_review_section(json.loads(inputs.review_gain.read_text()), classes) if inputs.review_gain else []),
        *_data_sections(inputs, classes),
        *_gallery(
            predictions["finetuned"], test_rows=_test_rows(inputs), raw_data=inputs.raw_data, by_id=by_id, config=config
        ),
        "<h2>Provenance</h2>",
        html_table(["what", "value"], provenance(inputs, metrics)),
    ]
    page = out_dir / "index.html"
    page.write_text(html_page(config.title, "\n".join(sections)), encoding="utf-8")
    return page


def _comparison_section(comparison: dict, classes: list[ClassSpec]) -> list[str]:
    """The compared base models (rule compare_models) side by side, and McNemar's test per pair."""
    models = comparison["models"]
    interval = _headline_interval

    def rate(value: float | None, device: str | None) -> str:
        return (
            "n/a (every image from the prediction cache)" if value is None else f"{value:.1f} ({escape(device or '')})"
        )

    columns = [
        "model", "architecture", "fine-tuned accuracy [95 %]", "fine-tuned macro-F1 [95 %]",
        "zero-shot accuracy [95 %]", "zero-shot macro-F1 [95 %]", "training images/s (device)",
        "scoring images/s, fine-tuned (device)",
    ]  # fmt: skip
    headline = html_table(
        columns,
        [
            [
                escape(m["name"]),
                escape(m["architecture"] or ""),
                interval(m["finetuned"], "accuracy"),
                interval(m["finetuned"], "macro_f1"),
                interval(m["zeroshot"], "accuracy"),
                interval(m["zeroshot"], "macro_f1"),
                rate(m["training"]["images_per_second"], m["training"]["device"]),
                rate(m["finetuned"]["scoring_images_per_second"], m["finetuned"]["device"]),
            ]
            for m in models
        ],
        raw=True,
    )
    per_class = html_table(
        ["class", *[f"{m['name']}: F1" for m in models]],
        [
            [f"{c.id} {c.ko} / {c.en}", *[f"{m['finetuned']['per_class_f1'][str(c.id)]:.3f}" for m in models]]
            for c in classes
        ],
    )
    pairs = html_table(
        ["model A", "model B", "images scored by both", "right only A", "right only B", "p-value"],
        [
            [p["a"], p["b"], p["paired_images"], p["only_a_right"], p["only_b_right"], f"{p['p_value']:.3g}"]
            for p in comparison["pairs"]
        ],
    )
    return [
        "<h2 id=models>Base models compared</h2>",
        f"<p class=note>Each model trained on the same training images and evaluated on the same "
        f"{comparison['test_images']} test images (results/models/&lt;name&gt;/). Training images/s: the median "
        "over training steps; scoring images/s: after the first batch; each on the machine named.</p>",
        headline,
        "<h3>Per class, fine-tuned</h3>",
        per_class,
        "<h3>McNemar's test between every pair, fine-tuned (paired, exact)</h3>",
        pairs,
    ]


def _review_section(gain: dict, classes: list[ClassSpec]) -> list[str]:
    """Examiner's review: the model before and after the reviewed labels (rule review_gain)."""
    interval = _headline_interval
    before, after, test = gain["before"], gain["after"], gain["mcnemar"]
    held_out = gain["reviewed_test_cases"]
    rows = [
        ["accuracy [bootstrap 95 %]", interval(before, "accuracy"), interval(after, "accuracy")],
        ["macro-F1 [bootstrap 95 %]", interval(before, "macro_f1"), interval(after, "macro_f1")],
        *[
            [
                f"F1, {c.id} {escape(c.ko)} / {escape(c.en)}",
                *[f"{s['per_class_f1'][str(c.id)]:.3f}" for s in (before, after)],
            ]
            for c in classes
        ],
        ["test images", before["n"], after["n"]],
    ]
    if held_out["images"]:
        cases = escape(", ".join(held_out["cases"]))
        rows += [
            [f"accuracy on the {held_out['images']} images of {cases} [95 %]",
             interval(held_out["before"], "accuracy"), interval(held_out["after"], "accuracy")],
            [f"macro-F1 on the images of {cases} [95 %]",
             interval(held_out["before"], "macro_f1"), interval(held_out["after"], "macro_f1")],
        ]  # fmt: skip
    headline = html_table(["", "before the reviewed labels", "after (trained on them)"], rows, raw=True)
    cases = html_table(
        ["case", "decisions (lines)", "in force", "side of the split", "labels joined", "withheld (reason: count)",
         "model agreed with the examiner", "decisions file sha256"],
        [
            [
                c["case"], c["decisions"], c["in_force"], c["side"], c["labels"],
                ", ".join(f"{reason}: {count}" for reason, count in sorted(c["withheld"].items())) or "none",
                f"{c['agreement']['model_agreed']} of {c['agreement']['images']}"
                + (f" ({c['agreement']['model_agreed'] / c['agreement']['images']:.0%})" if c["agreement"]["images"] else ""),
                c["sha256"],
            ]
            for c in gain["cases"]
        ],
    )  # fmt: skip
    change = gain["accuracy_gain"]
    verdict = (
        f"Training on {gain['trained_on_reviewed_labels']} reviewed labels moved the accuracy on the same "
        f"{gain['test_images']} test images by {change:+.3f} ({before['accuracy']:.3f} to {after['accuracy']:.3f}); "
        + (
            f"the two models err on different images (McNemar p = {test['p_value']:.3g})."
            if test["p_value"] < 0.05
            else f"not a significant difference at the 5 % level (McNemar p = {test['p_value']:.3g})."
        )
    )
    return [
        "<h2 id=review>Examiner's review: before and after</h2>",
        "<p class=note>The adapter trained without the reviewed images (results/review/before/) and the one "
        "trained with them (results/train/), scored on the same test images. Reviewed cases named in "
        "review.test_cases are held out whole: in the test split, never trained on. The model's agreement "
        "is with the triage that was reviewed.</p>",
        headline,
        f"<p>{escape(verdict)}</p>",
        "<h3>McNemar's test (paired, exact)</h3>",
        html_table(
            ["images scored by both", "right only after", "right only before", "p-value"],
            [[test["paired_images"], test["only_after_right"], test["only_before_right"], f"{test['p_value']:.3g}"]],
        ),
        "<h3>Decisions per case</h3>",
        cases,
    ]


def _fmt(value: float | None) -> str:
    return "n/a (generated answers carry no probability)" if value is None else f"{value:.3f}"


def _data_sections(inputs: ReportInputs, classes: list[ClassSpec]) -> list[str]:
    summary = read_tsv(inputs.split_summary)
    splits = ("train", "val", "test")
    counts = {(r["label"], r["split"]): r for r in summary}
    lineage = read_tsv(inputs.lineage)
    children = Counter(r["label"] for r in lineage)
    rows = [
        [
            f"{c.id} {c.ko} / {c.en}",
            *[counts[(str(c.id), s)]["n"] for s in splits],
            children.get(str(c.id), 0),
            "; ".join(counts[(str(c.id), s)]["note"] for s in splits if counts[(str(c.id), s)]["note"]),
        ]
        for c in classes
    ]
    manifest = read_tsv(inputs.manifest)
    rejects = read_tsv(inputs.rejects)
    reasons = Counter(r["reason"] for r in rejects)
    flagged = [r for r in manifest if r["flags"]]
    duplicates = [r for r in manifest if r["duplicate_of"]]
    return [
        "<h2>Data</h2>",
        f"<p>{len(manifest) - len(duplicates)} usable images ({len(duplicates)} exact duplicates used once, "
        f"{len(flagged)} flagged), {len(rejects)} rejected files, {len(lineage)} augmented training images.</p>",
        html_table(["class", *splits, "augmented (train)", "note"], rows),
        "<h3>Rejected files</h3>",
        html_table(["reason", "files"], sorted(reasons.items())) if rejects else "<p>None.</p>",
        html_table(["path", "reason", "message"], [[r["path"], r["reason"], r["message"]] for r in rejects])
        if rejects
        else "",
        "<h3>Flagged files (kept)</h3>",
        html_table(["path", "flags", "notes"], [[r["path"], r["flags"], r["notes"]] for r in flagged])
        if flagged
        else "<p>None.</p>",
    ]


def _confidence(row: dict[str, str]) -> float | None:
    """Top-class probability of a prediction row; None for generated answers, which have none."""
    return max((float(row[k]) for k in row if k.startswith("p") and k[1:].isdigit() and row[k]), default=None)


def _test_rows(inputs: ReportInputs) -> dict[str, dict]:
    """The test split's rows by sha256 (their case, root and locator), where the report has it."""
    if inputs.test_table is None:
        return {}
    return {row["sha256"]: row for row in read_tsv(inputs.test_table)}


def _gallery(
    rows: list[dict], *, test_rows: dict[str, dict], raw_data: Path, by_id: dict[int, ClassSpec], config: ReportConfig
) -> list[str]:
    wrong = [r for r in rows if r["predicted"] != r["true"]]
    wrong.sort(key=lambda r: -(_confidence(r) or 0.0))
    shown = wrong[: config.gallery_size]
    head = [f"<h2>Misclassified by the fine-tuned model ({len(wrong)} of {len(rows)})</h2>"]
    if not config.show_images:
        head.append("<p class=note>Image content hidden (report.show_images: false).</p>")

    def name(label: str) -> str:
        spec = by_id.get(int(label))
        return f"{label} {spec.ko} / {spec.en}" if spec else f"{label} (unparsed)"

    cards = []
    for r in shown:
        confidence = _confidence(r)
        # A reviewed case's image: found under its case's evidence, and named with its case.
        where = test_rows.get(r["sha256"], r)
        case = f"{where['case']}: " if where.get("case") else ""
        caption = (
            f"{escape(case + r['path'])}<br>true {escape(name(r['true']))}<br>predicted {escape(name(r['predicted']))}"
            + (f" ({confidence:.2f})" if confidence is not None else "")
        )
        image = ""
        if config.show_images:
            path, locator = image_location(where, raw_data)
            source = thumbnail(path, r["sha256"], config.thumbnail_px, read_located_bytes(locator))
            image = f"<img alt='{escape(r['path'])}' src='{source}'>"
        cards.append(f"<figure class=card>{image}<figcaption>{caption}</figcaption></figure>")
    return [*head, f"<div class=gallery>{''.join(cards)}</div>" if cards else "<p>None.</p>"]
