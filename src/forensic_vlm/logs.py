"""Route the package's log records to a rule's log file (and to stderr) from a workflow shim."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def setup_logging(log_file: str | Path | None = None, level: int = logging.INFO) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w", encoding="utf-8"))
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True
    )
    logging.captureWarnings(True)
    # An uncaught error must reach the rule's log, where Snakemake tells the user to look.
    sys.excepthook = _log_uncaught


def _log_uncaught(kind, error, traceback) -> None:
    logging.getLogger("forensic_vlm").critical("stopped: %s", error, exc_info=(kind, error, traceback))
