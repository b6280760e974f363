"""Route the package's log records to a rule's log file (and to stderr) from a workflow shim."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def setup_logging(log_file: str | Path | None = None, level: int = logging.INFO) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    # DDP's further ranks run the same command (LOCAL_RANK set): they add to rank 0's log.
    rank = os.environ.get("LOCAL_RANK", "0")
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        if rank == "0":
            Path(log_file).write_text("")  # a fresh log; then appends only, so ranks never overwrite
        handlers.append(logging.FileHandler(log_file, mode="a", encoding="utf-8"))
    prefix = "" if rank == "0" else f"[rank {rank}] "
    logging.basicConfig(
        level=level, format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s", handlers=handlers, force=True
    )
    logging.captureWarnings(True)
    # An uncaught error must reach the rule's log, where Snakemake tells the user to look.
    sys.excepthook = _log_uncaught


def _log_uncaught(kind, error, traceback) -> None:
    logging.getLogger("forensic_vlm").critical("stopped: %s", error, exc_info=(kind, error, traceback))
