"""Report building blocks: McNemar's test, escaping, and the page with images hidden."""

from __future__ import annotations

from scipy.stats import binomtest

from forensic_vlm.report import html_table, mcnemar


def rows(pairs: list[tuple[int, int, int]]) -> tuple[list[dict], list[dict]]:
    """(true, zero-shot prediction, fine-tuned prediction) -> prediction tables."""
    zs = [{"sha256": str(i), "true": str(t), "predicted": str(z)} for i, (t, z, _) in enumerate(pairs)]
    ft = [{"sha256": str(i), "true": str(t), "predicted": str(f)} for i, (t, _, f) in enumerate(pairs)]
    return zs, ft


def test_mcnemar_counts_discordant_pairs_and_tests_them_exactly() -> None:
    pairs = [(1, 0, 1)] * 9 + [(2, 2, 0)] * 2 + [(3, 3, 3)] * 5 + [(0, 1, 2)] * 4
    result = mcnemar(*rows(pairs))
    assert (result["paired_images"], result["only_finetuned_right"], result["only_zeroshot_right"]) == (20, 9, 2)
    assert result["p_value"] == binomtest(9, 11, 0.5).pvalue
    assert mcnemar(*rows([(1, 1, 1)] * 3))["p_value"] == 1.0  # no discordant pair: no evidence either way


def test_tables_escape_evidence_names() -> None:
    html = html_table(["path"], [["<script>alert(1)</script>&.jpg"]])
    assert "<script>" not in html and "&lt;script&gt;" in html and "&amp;.jpg" in html
