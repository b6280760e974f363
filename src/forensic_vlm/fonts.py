"""The Korean font every figure, page and synthetic screenshot uses: NanumGothic, shipped inside
the koreanize-matplotlib wheel, so no system font is needed."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from forensic_vlm.errors import InputNotFoundError


@functools.cache
def korean_font_path() -> Path:
    # Located, not imported: importing koreanize_matplotlib reconfigures matplotlib globally.
    spec = importlib.util.find_spec("koreanize_matplotlib")
    if spec is None or not spec.submodule_search_locations:
        raise InputNotFoundError("koreanize-matplotlib is not installed; it provides the Korean font")
    return Path(spec.submodule_search_locations[0]) / "fonts" / "NanumGothic.ttf"
