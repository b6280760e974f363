"""``results/classify/<case>/triage.html``: the triage table as one self-contained page.

Same rules as the report: no script, no network, every evidence string escaped, thumbnails only
with ``report.show_images`` (and only for the first ``classify.thumbnails`` rows). The table holds the
first ``classify.page_rows`` rows in review order, so a page for 10⁵ or 10⁶ files stays small and
opens fast; every row is in triage.tsv. Each thumbnail is made from the file after its sha256 is
checked again.
"""

from __future__ import annotations

from pathlib import Path

from forensic_vlm.config import ClassifyConfig, ClassSpec, ReportConfig
from forensic_vlm.evidence import read_located
from forensic_vlm.pages import escape, html_page, html_table, thumbnail
from forensic_vlm.tables import decode_path
from forensic_vlm.thresholds import threshold_of


def write_triage_page(
    page: Path,
    rows: list[dict],
    *,
    root: Path,
    classes: list[ClassSpec],
    config: ClassifyConfig,
    report: ReportConfig,
    custody: dict,
) -> Path:
    counts = custody["counts"]
    thresholds = custody["review_thresholds"]
    title = f"Triage of case {config.case}"
    body = [
        f"<h1>{escape(title)}</h1>",
        f"<p>{escape(custody['input_dir'])}: {counts['files']} files, {counts['scored']} scored, "
        f"{counts['rejected']} could not be scored, <b>{counts['needs_review']} need review</b>. "
        f"Scored with {escape(custody['model']['name_or_path'])}"
        + (f" and the adapter {escape(custody['adapter']['path'])}" if custody["adapter"] else " zero-shot")
        + f" on {escape(custody['device'])}, {escape(custody['finished_utc'])} on {escape(custody['host'])}.</p>",
        _container(custody.get("container"), counts),
        "<h2>Order</h2><p>Drug classes first, most confident first; then "
        f"{escape(_name(config.irrelevant_class, classes))}, least confident first; then files that could "
        "not be scored. <i>needs review</i>: the prediction is below its class's review threshold, the "
        "class has none, or the file could not be scored.</p>",
        "<h2>Review thresholds</h2>",
        _thresholds(thresholds, classes),
        "<h2>Counts</h2>",
        html_table(["predicted class", "files"], [[k, v] for k, v in counts["predicted"].items()]),
        html_table(["could not be scored: reason", "files"], [[k, v] for k, v in counts["rejected_by_reason"].items()])
        if counts["rejected_by_reason"]
        else "<p>Every file could be scored.</p>",
        f"<h2>Files in review order ({len(rows)})</h2>",
    ]
    if len(rows) > config.page_rows:
        body.append(
            f"<p class=note><b>This page lists the first {config.page_rows} of {len(rows)} rows</b> "
            "(classify.page_rows); every row is in triage.tsv, in the same order.</p>"
        )
    if not report.show_images:
        body.append("<p class=note>Image content hidden (report.show_images: false).</p>")
    elif len(rows) > config.thumbnails:
        body.append(f"<p class=note>Thumbnails for the first {config.thumbnails} rows (classify.thumbnails).</p>")
    table_rows = []
    for row in rows[: config.page_rows]:
        image = ""
        if report.show_images and row["status"] == "scored" and int(row["rank"]) <= config.thumbnails:
            path = root / decode_path(row["path"], row["flags"])
            data = read_located(row["locator"]) if row.get("locator") else None
            source = thumbnail(path, row["sha256"], report.thumbnail_px, data)
            image = f"<img alt='{escape(row['path'])}' src='{source}' width={report.thumbnail_px}>"
        what = (
            f"{escape(row['predicted'])} {escape(row['predicted_ko'])} / {escape(row['predicted_en'])}"
            if row["status"] == "scored"
            else f"<i>{escape(row['reason'])}</i>: {escape(row['message'])}"
        )
        table_rows.append(
            [
                row["rank"],
                image,
                escape(row["path"]),
                what,
                escape(row.get("confidence", "")),
                "<b>yes</b>" if row["needs_review"] == "true" else "no",
                escape(row.get("duplicate_of", "")),
                escape(row["sha256"][:16]),
            ]
        )
    body.append(
        html_table(
            [
                "rank",
                "image",
                "path",
                "predicted / reason",
                "confidence",
                "needs review",
                "duplicate of",
                "sha256 (first 16)",
            ],
            table_rows,
            raw=True,
        )
    )
    body.append(
        f"<p class=note>Custody record: custody.json (input listing sha256 {escape(custody['input_listing_sha256'])}).</p>"
    )
    page = Path(page)
    page.write_text(html_page(title, "\n".join(body)), encoding="utf-8")
    return page


def _name(label: int, classes: list[ClassSpec]) -> str:
    spec = next(c for c in classes if c.id == label)
    return f"{spec.id} {spec.ko} / {spec.en}"


def _thresholds(thresholds, classes: list[ClassSpec]) -> str:
    if not isinstance(thresholds, dict):
        return f"<p>{escape(thresholds)}</p>"
    rows = []
    for c in classes:
        entry = thresholds["classes"].get(str(c.id), {})
        if threshold_of(thresholds, c.id) is None:
            rows.append([_name(c.id, classes), "none", "", "", entry.get("note", "")])
        else:
            rows.append(
                [
                    _name(c.id, classes),
                    entry["threshold"],
                    entry["precision"],
                    entry["support"],
                    f"95 % lower bound of precision {entry['precision_lower_95']}",
                ]
            )
    intro = (
        f"<p>Chosen on {thresholds['validation_images']} validation images for precision "
        f"{thresholds['target_precision']} (train.review_precision).</p>"
    )
    return intro + html_table(["class", "threshold", "validation precision", "validation images above", "note"], rows)


def _container(container: dict | None, counts: dict) -> str:
    """The evidence container's line: what it is, its segments and its hash verdict."""
    if not container:
        return ""
    parts = [f"{escape(container['format'])}, {len(container['segments'])} file(s), {container['size_bytes']:,} bytes"]
    if container.get("partition") or container.get("inside_path"):
        parts.append(
            f"partition {escape(container.get('partition') or 'all')}, path {escape(container.get('inside_path') or '/')}"
        )
    deleted = f" {counts['deleted_scored']} deleted file(s) were recovered and scored (flag <i>deleted</i>)."
    return (
        f"<p class=note>Container: {'; '.join(parts)}. Hashes of its data: <b>{escape(container['verified'])}</b>."
        + (deleted if counts.get("deleted_scored") else "")
        + "</p>"
    )
