"""The examiner's decisions file: durable appends, a torn last line dropped, any other bad line a
named error naming the line, later decisions superseding earlier ones with both kept."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from forensic_vlm.config import DEFAULT_CLASSES, Config, ConfigError
from forensic_vlm.errors import DecisionFileError
from forensic_vlm.review.decisions import UNUSABLE, Decision, DecisionLog, decisions_path

TRIAGE = "ab" * 32


def decision(image: int, choice: str, *, examiner: str = "Kim Jiwoo", at: str = "2026-12-02T09:00:00+00:00"):
    return Decision(
        sha256=f"{image:064x}",
        decision=choice,
        predicted="1",
        examiner=examiner,
        decided_utc=at,
        triage_sha256=TRIAGE,
        path=f"DCIM/IMG_{image:04d}.jpg",
        source="review page",
    )


def test_decisions_are_read_back_in_order_and_the_latest_is_in_force(tmp_path: Path) -> None:
    log = DecisionLog(decisions_path(tmp_path / "reviews", "case_117"), DEFAULT_CLASSES)
    made = [decision(1, "1"), decision(2, UNUSABLE), decision(1, "3", at="2026-12-02T09:05:00+00:00")]
    for each in made:
        log.append(each)
    assert log.path == tmp_path / "reviews" / "case_117.jsonl"
    assert log.read() == made  # both decisions on image 1 are kept
    current = log.current()
    assert current[f"{1:064x}"].decision == "3" and current[f"{2:064x}"].decision == UNUSABLE
    assert log.path.read_bytes().count(b"\n") == 3


def test_a_torn_last_line_is_dropped_on_read_and_cut_off_before_the_next_append(tmp_path: Path, caplog) -> None:
    log = DecisionLog(tmp_path / "case.jsonl", DEFAULT_CLASSES)
    log.append(decision(1, "2"))
    whole = log.path.read_bytes()
    line = json.dumps(dataclasses.asdict(decision(2, "0"))).encode()
    log.path.write_bytes(whole + line[: len(line) // 2])  # a kill in the middle of the write
    assert log.read() == [decision(1, "2")]
    assert "unfinished" in caplog.text
    log.append(decision(3, "3"))
    assert log.read() == [decision(1, "2"), decision(3, "3")]
    assert (
        log.path.read_bytes()
        == whole + (json.dumps(dataclasses.asdict(decision(3, "3")), sort_keys=True) + "\n").encode()
    )


@pytest.mark.parametrize(
    ("line", "named"),
    [
        (b"{not json\n", "not a JSON object"),
        (b'{"sha256": "00"}\n', "expected the keys"),
        (None, "is not a SHA-256 digest"),
        ("decision", "is not a class"),
        ("decided_utc", "is not in UTC"),
    ],
)
def test_a_bad_line_before_the_last_is_a_named_error_naming_the_line(tmp_path: Path, line, named: str) -> None:
    log = DecisionLog(tmp_path / "case.jsonl", DEFAULT_CLASSES)
    good = (json.dumps(dataclasses.asdict(decision(1, "1")), sort_keys=True) + "\n").encode()
    record = dataclasses.asdict(decision(2, "2"))
    if line is None:
        record["sha256"] = "not-a-digest"
        line = (json.dumps(record) + "\n").encode()
    elif isinstance(line, str):
        record[line] = {"decision": "7", "decided_utc": "2026-12-02T18:00:00+09:00"}[line]
        line = (json.dumps(record) + "\n").encode()
    log.path.write_bytes(good + line + good)
    with pytest.raises(DecisionFileError, match=named) as caught:
        log.read()
    assert f"{log.path}, line 2" in str(caught.value)


def test_a_decision_no_triage_could_give_is_refused_before_it_is_written(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path / "case.jsonl", DEFAULT_CLASSES)
    with pytest.raises(DecisionFileError, match="is not a class"):
        log.append(decision(1, "9"))
    with pytest.raises(DecisionFileError, match="no examiner"):
        log.append(decision(1, "1", examiner=" "))
    assert not log.path.exists()


@pytest.mark.parametrize("folder", ["raw_data", "raw_data/reviews", "results", "results/reviews"])
def test_decisions_are_kept_apart_from_the_evidence_and_the_results(folder: str) -> None:
    with pytest.raises(ConfigError, match=r"review\.dir"):
        Config.from_dict({"review": {"dir": folder}})
    assert Config.from_dict({"review": {"dir": "reviews"}}).review.dir == "reviews"
