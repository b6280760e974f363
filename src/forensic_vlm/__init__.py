"""forensic-vlm: evidence-safe fine-tuning and evaluation of LLaVA-1.6 for seized-phone images."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("forensic-vlm")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"
