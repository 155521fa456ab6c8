"""``ConfigPath``: a path in a config file, relative to that file's folder when not absolute.

Its own module because both the device config (edge/config.py) and the backends' configs
(edge/engines/) use it, and the engines must not import the device config. The folder comes
from pydantic's validation context (``{"base_dir": ...}``); without one the path is kept as is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, ValidationInfo


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    if base is not None and not value.is_absolute():
        return Path(base) / value
    return value


ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]
"""A path that is relative to the config file's folder when not absolute."""
