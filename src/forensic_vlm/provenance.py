"""Where a result came from: package versions, the configuration's hash, the git commit.

The report, the triage's custody record and the adapter's model card all state these, from this
one module, so the three can be compared field by field.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import subprocess
from pathlib import Path

#: The packages a result depends on, as named on PyPI.
PACKAGES = ("forensic-vlm", "torch", "transformers", "peft", "bitsandbytes", "pytorch-lightning", "snakemake")


def package_versions() -> dict[str, str]:
    """Versions of :data:`PACKAGES` as installed where the result was made."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "(not installed here)"
    return versions


def config_sha256(configuration: dict) -> str:
    """sha256 of a configuration mapping, independent of key order."""
    text = json.dumps(configuration, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def git_commit() -> str:
    """The commit of the checkout the package runs from, marked when it has uncommitted changes."""
    here = Path(__file__).parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=here, check=False)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("status", "--porcelain").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
