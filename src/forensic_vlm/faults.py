"""Fault points: where the fault-injection tests kill a stage, as a power cut or ``kill -9`` would.

``FORENSIC_VLM_KILL_AT=<point>:<n>`` makes the process send itself SIGKILL the n-th time it
reaches ``<point>`` (no clean-up, no flushing, no exception handler runs); ``<point>:<n>:group``
kills its whole process group instead (a workflow and its running job at once, as a power cut
would); ``<point>:<n>:stop`` stops the process (SIGSTOP) instead, a hung job that something else
must end (the cluster test cancels it with ``scancel``). Unset, a fault point costs one dictionary lookup. The points, and what the suite compares after each, are listed in
docs/reliability.md.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENVIRONMENT = "FORENSIC_VLM_KILL_AT"
_reached: Counter[str] = Counter()


def fault_point(name: str) -> None:
    """Kill this process here if ``FORENSIC_VLM_KILL_AT`` names this point and its count is reached."""
    wanted = os.environ.get(ENVIRONMENT)
    if not wanted:
        return
    point, count, scope = ([*wanted.split(":"), "", ""])[:3]
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] == int(count or 1):
        if scope == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
            return
        if scope == "group":
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
