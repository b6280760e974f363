"""``forensic-vlm review serve``: the review page, a Flask app on 127.0.0.1 only.

It shows a triage's scored images in review order (most uncertain first: those the calibrated
thresholds send to review, then by the margin between the two most probable classes), each read by
its path in the evidence folder or its locator in the container, its sha256 checked, converted to
JPEG in memory and never written anywhere. Keys: 0-3 set the class, ``u`` marks it unusable, ``c``
confirms the prediction, the arrows move. The examiner's name is asked once per browser session.
Every decision goes to the case's decisions file (``review.decisions``) before the page moves on;
on a restart the page opens at the first image without one. No script or font comes from the
network: the page works offline.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from forensic_vlm.config import ClassSpec
from forensic_vlm.errors import DecisionFileError, InputNotFoundError
from forensic_vlm.pages import web_font_bytes
from forensic_vlm.review.decisions import UNUSABLE, Decision, DecisionLog
from forensic_vlm.review.evidence import CaseEvidence
from forensic_vlm.tables import read_tsv, sha256_file

log = logging.getLogger(__name__)


def review_order(rows: list[dict]) -> list[dict]:
    """Scored rows, those needing review first, then the smallest margin between the top two classes."""

    def margin(row: dict) -> float:
        probabilities = sorted(
            (float(v) for k, v in row.items() if k[:1] == "p" and k[1:].isdigit() and v), reverse=True
        )
        return probabilities[0] - probabilities[1] if len(probabilities) > 1 else 1.0

    scored = [row for row in rows if row["status"] == "scored"]
    return sorted(scored, key=lambda row: (row["needs_review"] != "true", margin(row), int(row["rank"])))


class ReviewSession:
    """The triage being reviewed, where its images are, and its decisions file."""

    def __init__(self, results: Path, decisions: DecisionLog, classes: list[ClassSpec]) -> None:
        self.results, self.decisions, self.classes = Path(results), decisions, classes
        triage = self.results / "triage.tsv"
        if not triage.is_file():
            raise InputNotFoundError(f"{triage} does not exist: triage the case first")
        self.triage_sha256 = sha256_file(triage)
        self.rows = review_order(read_tsv(triage))
        self.evidence = CaseEvidence(self.results / "listing.jsonl")
        self.by_sha256 = {row["sha256"]: row for row in self.rows}
        decisions.read()  # a damaged file stops here, before the examiner starts

    def items(self) -> list[dict]:
        current = self.decisions.current()
        labels = [str(c.id) for c in self.classes]
        return [
            {
                "sha256": row["sha256"],
                "path": row["path"],
                "predicted": row["predicted"],
                "probabilities": {label: row.get(f"p{label}", "") for label in labels},
                "needs_review": row["needs_review"] == "true",
                "decision": current[row["sha256"]].decision if row["sha256"] in current else None,
            }
            for row in self.rows
        ]

    def image(self, sha256: str) -> bytes:
        """The image as JPEG, from the evidence, its content checked against the triage's sha256."""
        from forensic_vlm.pages import jpeg_bytes

        return jpeg_bytes(self.evidence.file(sha256), sha256, 1600, self.evidence.read(sha256), quality=90)

    def decide(self, sha256: str, decision: str, examiner: str) -> Decision:
        row = self.by_sha256[sha256]
        made = Decision(
            sha256=sha256,
            decision=row["predicted"] if decision == "confirm" else decision,
            predicted=row["predicted"],
            examiner=examiner,
            decided_utc=Decision.now(),
            triage_sha256=self.triage_sha256,
            path=row["path"],
            source="review page",
        )
        self.decisions.append(made)
        return made


def create_app(session: ReviewSession):
    from flask import Flask, Response, abort, jsonify, request

    app = Flask(__name__)

    @app.get("/")
    def page() -> Response:
        return Response(_page(session.classes), mimetype="text/html")

    # The whole Korean font, from this machine: class names and evidence paths in Korean render
    # where no Korean font is installed, and nothing is fetched from the network.
    @app.get("/font.ttf")
    def font() -> Response:
        return Response(web_font_bytes(), mimetype="font/ttf", headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/items")
    def items():
        return jsonify(session.items())

    @app.get("/image/<sha256>")
    def image(sha256: str) -> Response:
        if sha256 not in session.by_sha256:
            abort(404)
        return Response(session.image(sha256), mimetype="image/jpeg")

    @app.post("/api/decision")
    def decision():
        body = request.get_json(force=True)
        if body.get("sha256") not in session.by_sha256:
            abort(404)
        try:
            made = session.decide(body["sha256"], str(body.get("decision", "")), str(body.get("examiner", "")))
        except DecisionFileError as error:
            return jsonify({"error": str(error)}), 400
        return jsonify({"decision": made.decision})

    return app


def serve(session: ReviewSession, port: int = 8765) -> None:
    """Serve on 127.0.0.1 only: the page shows evidence and must not be reachable from the network."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", port, create_app(session), threaded=False)
    log.info("review page of %s on http://127.0.0.1:%d/ (Ctrl-C stops it)", session.results, server.server_port)
    server.serve_forever()


def _page(classes: list[ClassSpec]) -> str:
    names = {str(c.id): f"{c.id} {c.ko} / {c.en}" for c in classes}
    names[UNUSABLE] = "unusable"
    return PAGE.replace("__NAMES__", json.dumps(names, ensure_ascii=False))


PAGE = """<!doctype html><html lang=en><head><meta charset=utf-8><title>forensic-vlm review</title>
<style>@font-face{font-family:'NanumGothicLocal';src:url(/font.ttf) format('truetype')}
body{font-family:'NanumGothicLocal',system-ui,sans-serif;margin:1rem 2rem;color:#222}#image{max-width:100%;max-height:70vh}
.keys{color:#555}.done{color:#176b2c}#status{font-weight:600}</style></head><body>
<h1>Review</h1><p class=keys>Keys: 0-3 set the class, u unusable, c confirm, arrows move.</p>
<form id=who><label>Examiner <input id=examiner autocomplete=off required></label> <button>Start</button></form>
<div id=review hidden><p id=status></p><p id=path></p><p id=prediction></p><img id=image alt="image under review"></div>
<script>
const NAMES = __NAMES__;
let items = [], at = 0, examiner = sessionStorage.getItem("examiner");
async function load() {
  items = await (await fetch("/api/items")).json();
  at = items.findIndex(item => item.decision === null);
  if (at < 0) at = items.length - 1;
  show();
}
function show() {
  const item = items[at];
  document.getElementById("status").textContent =
    `${at + 1} of ${items.length}, ${items.filter(i => i.decision !== null).length} decided` +
    (item.decision === null ? "" : ` - decided: ${NAMES[item.decision]}`);
  document.getElementById("path").textContent = item.path;
  const p = Object.entries(item.probabilities).map(([k, v]) => `${k}: ${Number(v).toFixed(3)}`).join(", ");
  document.getElementById("prediction").textContent = `predicted ${NAMES[item.predicted]} (${p})`;
  document.getElementById("image").src = "/image/" + item.sha256;
}
async function decide(decision) {
  const item = items[at];
  const answer = await fetch("/api/decision", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({sha256: item.sha256, decision: decision, examiner: examiner})});
  if (!answer.ok) { document.getElementById("status").textContent = (await answer.json()).error; return; }
  item.decision = (await answer.json()).decision;
  if (at < items.length - 1) at += 1;
  show();
}
document.getElementById("who").addEventListener("submit", event => {
  event.preventDefault();
  examiner = document.getElementById("examiner").value.trim();
  sessionStorage.setItem("examiner", examiner);
  start();
});
function start() {
  document.getElementById("who").hidden = true;
  document.getElementById("review").hidden = false;
  load();
}
document.addEventListener("keydown", event => {
  if (!examiner || document.getElementById("review").hidden) return;
  if ("0123".includes(event.key) && event.key in NAMES) decide(event.key);
  else if (event.key === "u") decide("unusable");
  else if (event.key === "c") decide("confirm");
  else if (event.key === "ArrowRight" && at < items.length - 1) { at += 1; show(); }
  else if (event.key === "ArrowLeft" && at > 0) { at -= 1; show(); }
});
if (examiner) start();
</script></body></html>"""
