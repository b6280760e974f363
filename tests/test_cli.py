"""The forensic-vlm command runs the same stages as the workflow."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO, evidence_unchanged, write
from forensic_vlm.cli import main
from forensic_vlm.tables import read_tsv


def test_stages_chain_from_the_command_line(raw_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    with evidence_unchanged(raw_tree):
        assert main(["manifest", str(raw_tree), "--out", str(out / "manifest"), "--workers", "2"]) == 0
        assert main(["split", str(out / "manifest" / "manifest.tsv"), "--out", str(out / "split")]) == 0
        assert (
            main(
                [
                    "augment",
                    str(out / "split" / "train.tsv"),
                    "--raw-data",
                    str(raw_tree),
                    "--out",
                    str(out / "augment"),
                ]
            )
            == 0
        )
    assert len(read_tsv(out / "manifest" / "manifest.tsv")) == 20
    assert (out / "augment" / "lineage.tsv").exists()


def test_bad_input_under_fail_policy_exits_2_naming_the_file(raw_tree: Path, tmp_path: Path, capsys) -> None:
    write(raw_tree / "1_chat_history" / "zero.jpg", b"")
    config = tmp_path / "config.yaml"
    config.write_text("manifest:\n  on_bad_input: fail\n")
    assert main(["--config", str(config), "manifest", str(raw_tree), "--out", str(tmp_path / "m")]) == 2
    assert "1_chat_history/zero.jpg: empty_file" in capsys.readouterr().err


def test_a_config_error_exits_2_naming_the_key(raw_tree: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("split:\n  sead: 1\n")
    assert main(["--config", str(config), "manifest", str(raw_tree), "--out", str(tmp_path / "m")]) == 2
    assert "sead" in capsys.readouterr().err


@pytest.mark.slow
def test_report_command_rebuilds_the_workflows_page(demo_run: dict, tmp_path: Path) -> None:
    results = demo_run["workdir"] / "results"
    raw_data = results / "demo" / "raw_data"
    config = REPO / "profiles" / "demo" / "demo.yaml"
    command = ["--config", str(config), "report", "--results", str(results), "--raw-data", str(raw_data)]
    assert main([*command, "--out", str(tmp_path / "report")]) == 0

    def body(page: Path) -> str:  # all but provenance (when, which configuration) and the font cut to it
        text = page.read_text(encoding="utf-8")
        return text.split("<body>", 1)[1].split("<h2>Provenance</h2>", 1)[0]

    assert body(tmp_path / "report" / "index.html") == body(results / "report" / "index.html")
    assert main([*command[:3], "--results", str(tmp_path / "missing"), "--raw-data", str(raw_data)]) == 2


def test_a_mistyped_input_path_exits_2_naming_the_argument(tmp_path: Path, capsys) -> None:
    assert main(["split", str(tmp_path / "manifset.tsv"), "--out", str(tmp_path / "split")]) == 2
    assert f"split: manifest {tmp_path / 'manifset.tsv'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "split").exists()
