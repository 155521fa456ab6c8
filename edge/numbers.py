"""Numbers in config files and manifests: true/false is not a number.

pydantic's lax mode reads a YAML/JSON boolean as 1 or 0 wherever a number is expected, so
``route_reuse: yes`` (meant as "on") became a threshold of 1.0 (reuse never happens),
``background_max_experts: true`` ran one expert on every empty frame, and ``imgsz: true`` a
1 px input: a wrong type taken silently. :class:`NoBoolNumbers` is the base of the config's
sections, the engine configs and the manifest's entries: a boolean given to a field that
does not take one is refused with the field's name (one line, like every other bad value),
and so are infinity and nan.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


def takes_bool(annotation: Any) -> bool:
    """Whether a field's type accepts a boolean (``bool``, ``bool | None``, ``Any``...)."""
    if annotation is bool or annotation is Any:
        return True
    return any(takes_bool(a) for a in typing.get_args(annotation))


class _Boolean:
    """What a boolean becomes in a field that takes none: no type accepts it, so the field's own
    validation refuses it with the field's name and its usual message ("should be a valid number")."""

    def __init__(self, value: bool) -> None:
        self.value = value

    def __repr__(self) -> str:
        return str(self.value).lower()


class NoBoolNumbers(BaseModel):
    """A model whose non-boolean fields refuse true/false (see the module docstring). A model
    validator rather than a field validator: pydantic allows none on a discriminator (the
    engine's ``type``). Nor does any number take infinity or nan (``allow_inf_nan``): an
    infinite ``settle_s`` never read a frame, an infinite camera height wrote ``Infinity`` (not
    JSON) into Camtrap DP, and nan slips past every bound (it compares false)."""

    model_config = ConfigDict(allow_inf_nan=False)  # subclasses' own model_config merges with it

    @model_validator(mode="before")
    @classmethod
    def _no_bool(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: _Boolean(v) if isinstance(v, bool) and k in fields and not takes_bool(fields[k].annotation)
                else v for k, v in data.items()}
