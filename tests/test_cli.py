"""The forensic-vlm command runs the same stages as the workflow."""

from __future__ import annotations

from pathlib import Path

from conftest import evidence_unchanged, write
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
