"""The package's command line in processes of their own, started warm.

A fresh ``python -m forensic_vlm train`` spends 5-10 s of a 2-core CPU importing torch,
transformers and Lightning before it reads its first argument, and the fault and resume tests start
dozens of them. Here one server process (multiprocessing's ``forkserver``) imports those modules
once, and every command runs in a child forked from it: a real process of its own, with its own
pid, environment, working directory and exit status, which the tests kill with SIGKILL (or which
kills itself at a fault point) exactly as before. Only the interpreter's start and the imports are
shared; the server itself never runs a command, so each child begins in the state a fresh process
has after the same imports.

What this cannot stand for stays a plain subprocess: the entry point itself (``python -m
forensic_vlm`` in tests/test_training.py), commands wrapped to see the evidence read-only
(``unshare``), and anything that starts further copies of itself by its command line (Lightning's
DDP ranks).
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

#: What the server imports once; every child starts with these already imported.
PRELOAD = [
    "forensic_vlm.cli",
    "forensic_vlm.augment",
    "forensic_vlm.classify",
    "forensic_vlm.evaluate",
    "forensic_vlm.scoring",
    "forensic_vlm.train",
    "transformers.models.llava_next",
    "peft",
]


@functools.cache
def _server():
    """The forkserver context, started by its first process with PRELOAD imported."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def _child(argv: list[str], environment: dict[str, str], cwd: str, out: str, err: str) -> None:
    """Runs in the forked child: the command's environment, directory and output files, then its main."""
    os.environ.clear()
    os.environ.update(environment)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(handle, fd)
        os.close(handle)
    sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False, buffering=1)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", errors="replace", closefd=False, buffering=1)  # noqa: SIM115
    sys.argv = ["forensic-vlm", *argv]
    from forensic_vlm.cli import main

    sys.exit(main(argv))


class WarmProcess:
    """A started command: ``pid``, ``poll()``, ``wait()``, ``kill()`` as subprocess.Popen has them,
    and ``result()`` for its exit status and output once it has ended."""

    def __init__(self, argv: list[str], env: dict[str, str] | None, cwd: Path | None) -> None:
        self.args = ["forensic-vlm", *argv]
        self._output = Path(tempfile.mkdtemp(prefix="warm-process-"))
        environment = dict(os.environ if env is None else env)
        self._process = _server().Process(
            target=_child,
            args=(argv, environment, str(cwd or Path.cwd()), *self._paths()),
            daemon=False,
        )
        self._process.start()
        self.pid = self._process.pid

    def _paths(self) -> tuple[str, str]:
        return str(self._output / "stdout"), str(self._output / "stderr")

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        return self._process.exitcode

    def kill(self) -> None:
        self._process.kill()

    def result(self) -> subprocess.CompletedProcess:
        code = self.wait()
        # A child that died before it could open them (the server failed to start it) wrote none.
        out, err = (
            Path(p).read_text(encoding="utf-8", errors="replace") if Path(p).exists() else "" for p in self._paths()
        )
        shutil.rmtree(self._output, ignore_errors=True)
        return subprocess.CompletedProcess(self.args, code, out, err)


def start(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> WarmProcess:
    """``forensic-vlm <argv>`` in a warm child process."""
    return WarmProcess(list(argv), env, cwd)


def run(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``forensic-vlm <argv>`` in a warm child process, to its end (returncode -9: SIGKILL)."""
    return start(argv, env=env, cwd=cwd).result()
