"""The examiner's decisions file: durable appends, a torn last line dropped, any other bad line a
named error naming the line, later decisions superseding earlier ones with both kept."""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import re
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


def triage_folder(tmp_path: Path) -> tuple[Path, list[dict]]:
    """A case's triage.tsv and the triage.csv written from it, as rule classify writes them."""
    from forensic_vlm.exchange import write_triage_csv
    from forensic_vlm.tables import write_tsv

    folder = tmp_path / "results" / "classify" / "case_117"
    rows = [
        {
            "sha256": f"{i:064x}",
            "path": f"DCIM/IMG_{i:04d}.jpg",
            "predicted": str(i % 4),
            "predicted_en": "x",
            "status": "scored",
            "md5": "0" * 32,
            "sha1": "0" * 40,
            "size_bytes": "10",
            "confidence": "0.9",
            "needs_review": "false",
            "deleted": "",
            "partition": "",
            "inode": "",
            "mtime_utc": "",
            "reason": "",
        }
        for i in range(1, 7)
    ]
    write_tsv(folder / "triage.tsv", list(rows[0]), rows)
    write_triage_csv(folder / "triage.csv", rows)
    return folder, rows


def edited_csv(folder: Path, tmp_path: Path, categories: dict[int, str]) -> Path:
    """triage.csv with some Category cells changed, as a spreadsheet saves it (BOM, CRLF)."""
    import csv
    import io

    text = (folder / "triage.csv").read_bytes().decode("utf-8-sig")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    for index, value in categories.items():
        rows[index]["Category"] = value
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    path = tmp_path / "reviewed.csv"
    path.write_bytes(("\ufeff" + out.getvalue()).encode())
    return path


def test_an_edited_triage_csv_becomes_decisions_for_the_rows_the_examiner_changed(tmp_path: Path) -> None:
    from forensic_vlm.review.imports import import_decisions
    from forensic_vlm.tables import sha256_file

    folder, rows = triage_folder(tmp_path)
    # Row 0 (model: 1) changed to 3; row 1 (model: 2) cleared: not reviewed; row 2 (model: 3) named
    # in Korean as class 0; row 3 (model: 0) unusable; rows 4 and 5 left as the model said.
    source = edited_csv(folder, tmp_path, {0: "3", 1: "", 2: "관련 없음", 3: "Unusable"})
    log = DecisionLog(tmp_path / "reviews" / "case_117.jsonl", DEFAULT_CLASSES)
    counts = import_decisions(source, folder / "triage.tsv", log, examiner="Kim Jiwoo")
    assert (counts.rows, counts.decisions, counts.not_reviewed, counts.same_as_model) == (6, 3, 1, 2)
    made = log.read()
    assert [(d.sha256, d.decision, d.predicted) for d in made] == [
        (rows[0]["sha256"], "3", "1"),
        (rows[2]["sha256"], "0", "3"),
        (rows[3]["sha256"], UNUSABLE, "0"),
    ]
    assert {d.triage_sha256 for d in made} == {sha256_file(folder / "triage.tsv")}
    assert made[0].source == "import reviewed.csv, line 2" and made[0].examiner == "Kim Jiwoo"
    again = import_decisions(source, folder / "triage.tsv", log, examiner="Park", all_rows=True)
    assert again.decisions == 5 and len(log.read()) == 8  # the earlier decisions stay; the later ones hold
    assert log.current()[rows[4]["sha256"]].decision == rows[4]["predicted"]


@pytest.mark.parametrize(
    ("edit", "named"),
    [({0: "7"}, "line 2: category '7' is no class"), ({2: "drugs?"}, "line 4: category 'drugs?' is no class")],
)
def test_an_unknown_category_stops_the_import_naming_the_line_and_writes_nothing(tmp_path, edit, named) -> None:
    from forensic_vlm.review.imports import import_decisions

    folder, _ = triage_folder(tmp_path)
    source = edited_csv(folder, tmp_path, {1: "0", **edit})  # a good decision on line 3 comes first or after
    log = DecisionLog(tmp_path / "reviews" / "case_117.jsonl", DEFAULT_CLASSES)
    with pytest.raises(DecisionFileError, match=re.escape(named)):
        import_decisions(source, folder / "triage.tsv", log, examiner="Kim Jiwoo")
    assert not log.path.exists()


def test_a_row_naming_an_image_the_triage_does_not_hold_is_named_by_the_command(tmp_path: Path, capsys) -> None:
    import os

    from forensic_vlm.cli import main

    triage_folder(tmp_path)
    source = tmp_path / "suite_export.csv"
    source.write_text(f"Hash (SHA256),Category\n{2:064x},2\n{'f' * 64},1\n", encoding="utf-8")
    before = os.getcwd()
    os.chdir(tmp_path)
    try:
        status = main(["review", "import", str(source), "--case", "case_117", "--examiner", "Kim", "--all-rows"])
        assert status == 2
        assert f"{source}, line 3: SHA-256 {'f' * 64} is not an image of the triage" in capsys.readouterr().err
        assert not (tmp_path / "reviews").exists()
        source.write_text(f"Hash (SHA256),Category\n{2:064x},2\n", encoding="utf-8")
        assert main(["review", "import", str(source), "--case", "case_117", "--examiner", "Kim", "--all-rows"]) == 0
        assert [d.decision for d in DecisionLog(tmp_path / "reviews" / "case_117.jsonl", DEFAULT_CLASSES).read()] == [
            "2"
        ]
    finally:
        os.chdir(before)


class RunningServer:
    """The review app on 127.0.0.1, in a thread of this process, on a free port."""

    def __init__(self, session) -> None:
        import threading

        from werkzeug.serving import make_server

        from forensic_vlm.review.server import create_app

        self.server = make_server("127.0.0.1", 0, create_app(session), threaded=False)
        self.url = f"http://127.0.0.1:{self.server.server_port}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join()


@pytest.mark.slow
def test_the_review_page_takes_keyboard_decisions_and_a_restart_resumes_where_they_stopped(demo_run, tmp_path) -> None:
    from playwright.sync_api import sync_playwright
    from report_screenshot import CHROMIUM_ARGS, chromium, require_chromium

    from conftest import tree_hashes
    from forensic_vlm.review.server import ReviewSession

    require_chromium()
    results = demo_run["workdir"] / "results" / "classify" / "demo"
    evidence = demo_run["workdir"] / "results" / "demo" / "extraction"
    before = tree_hashes(evidence)
    log = DecisionLog(tmp_path / "reviews" / "demo.jsonl", DEFAULT_CLASSES)
    session = ReviewSession(results, log, list(DEFAULT_CLASSES))
    first = session.items()[:3]
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        server = RunningServer(session)
        page = browser.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(server.url)
        page.fill("#examiner", "Kim Jiwoo")
        page.press("#examiner", "Enter")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('1 of')")
        assert page.eval_on_selector("#image", "e => e.complete && e.naturalWidth > 0") or page.wait_for_function(
            "document.getElementById('image').naturalWidth > 0"
        )
        # The Korean class names in the page's own font, served from this machine (Debian's
        # Chromium here has no Korean font): it decodes, and it holds the glyphs.
        assert page.evaluate("document.fonts.load('16px NanumGothicLocal', '관련 없음').then(f => f.length)") == 1
        for key, done in (("2", 1), ("c", 2), ("u", 3)):
            page.keyboard.press(key)
            page.wait_for_function(f"document.getElementById('status').textContent.includes('{done} decided')")
        server.stop()
        made = log.read()
        assert [(d.sha256, d.decision) for d in made] == [
            (first[0]["sha256"], "2"),
            (first[1]["sha256"], first[1]["predicted"]),
            (first[2]["sha256"], "unusable"),
        ]
        assert {d.examiner for d in made} == {"Kim Jiwoo"} and {d.source for d in made} == {"review page"}
        # A restarted server (on another port, so the page asks for the examiner again) opens at
        # the fourth image, the first without a decision.
        server = RunningServer(ReviewSession(results, log, list(DEFAULT_CLASSES)))
        page.goto(server.url)
        page.fill("#examiner", "Kim Jiwoo")
        page.press("#examiner", "Enter")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('4 of')")
        assert "3 decided" in page.text_content("#status")
        page.keyboard.press("ArrowLeft")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('3 of')")
        assert "decided: unusable" in page.text_content("#status")
        server.stop()
        browser.close()
    assert errors == []
    assert tree_hashes(evidence) == before  # the evidence was only read


@pytest.mark.slow
def test_a_server_killed_while_writing_a_decision_loses_only_that_one(demo_run, tmp_path) -> None:
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    results = demo_run["workdir"] / "results" / "classify" / "demo"

    def start(**environment: str) -> tuple[subprocess.Popen, str]:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "forensic_vlm", "review", "serve", "--case", "demo", "--results", str(results),
                   "--port", str(port)]  # fmt: skip
        server = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, **environment}, stderr=subprocess.PIPE)
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):  # until it answers (no time limit on the test: it waits on the process)
            try:
                urllib.request.urlopen(f"{url}/api/items")
                return server, url
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                time.sleep(0.1)
        raise AssertionError("the review server never answered")

    def post(url: str, sha256: str, choice: str) -> None:
        body = json.dumps({"sha256": sha256, "decision": choice, "examiner": "Kim Jiwoo"}).encode()
        request = urllib.request.Request(f"{url}/api/decision", body, {"Content-Type": "application/json"})
        urllib.request.urlopen(request).read()

    server, url = start(FORENSIC_VLM_KILL_AT="review.decision:3")
    items = json.loads(urllib.request.urlopen(f"{url}/api/items").read())
    post(url, items[0]["sha256"], "1")
    post(url, items[1]["sha256"], "unusable")
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.RemoteDisconnected)):
        post(url, items[2]["sha256"], "3")  # killed while writing this one
    assert server.wait() == -signal.SIGKILL
    log = DecisionLog(tmp_path / "reviews" / "demo.jsonl", DEFAULT_CLASSES)
    assert [(d.sha256, d.decision) for d in log.read()] == [(items[0]["sha256"], "1"), (items[1]["sha256"], UNUSABLE)]
    server, url = start()
    try:
        again = json.loads(urllib.request.urlopen(f"{url}/api/items").read())
        assert [i["decision"] for i in again[:3]] == ["1", UNUSABLE, None]  # the page resumes at the lost one
        post(url, items[2]["sha256"], "3")
        assert [d.decision for d in log.read()] == ["1", UNUSABLE, "3"]
    finally:
        server.terminate()
        server.wait()
