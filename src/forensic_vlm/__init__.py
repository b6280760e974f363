"""forensic-vlm: evidence-safe fine-tuning and evaluation of LLaVA-1.6 for seized-phone images."""

import os
from importlib.metadata import PackageNotFoundError, version

# Albumentations asks PyPI for a newer release of itself on every import (a 2 s timeout): a forensic
# tool must not contact the network unasked, and on an offline lab machine every augment job would
# wait for it. Set before any module of the package imports albumentations.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

try:
    __version__ = version("forensic-vlm")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"
