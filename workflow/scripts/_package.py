"""Put the workflow's own ``src/`` first on the path, so every rule's shim imports this checkout's
forensic_vlm — also inside a per-rule conda env (``--software-deployment-method conda``), where
the package is not installed. Snakemake adds this folder to a script's path."""

import sys
from pathlib import Path

SOURCE = str(Path(__file__).resolve().parents[2] / "src")
if SOURCE not in sys.path:
    sys.path.insert(0, SOURCE)
