"""Where torch.compile keeps what it compiled, across runs and cluster nodes.

Imported by the workflow when it parses (workflow/rules/common.smk), so it imports nothing heavy.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Where torch.compile keeps what it compiled (Inductor's FX graph and AOTAutograd caches, and
#: Triton's kernels under it); read by torch when it first compiles.
COMPILE_CACHE_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"


def keep_compile_cache(folder: Path) -> str:
    """Keep torch.compile's artefacts in ``folder`` (made absolute) unless the user set a folder of
    their own; returns the folder in use. torch's default is /tmp/torchinductor_<user>, which a
    cluster node or a fresh machine does not have: there every run compiled again. Measured on the
    2-core CPU (the demo's tiny model, evaluate.compile): 14.1 s of scoring with an empty cache,
    3.7 s with the folder a first run filled (docs/performance.md)."""
    return os.environ.setdefault(COMPILE_CACHE_VARIABLE, str(Path(folder).resolve()))
