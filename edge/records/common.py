"""What both record formats share: the box convention and which model classes are people or
vehicles (both formats file those apart from animals). Pure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

BoxNorm = tuple[float, float, float, float]  # x_min, y_min, width, height (relative, top-left)
Kind = Literal["animal", "human", "vehicle"]

PERSON_CLASSES = frozenset({"person", "human", "homo sapiens", "people"})
VEHICLE_CLASSES = frozenset({"vehicle", "car", "truck"})
# edge/imageio.py LoadedImage.format (what the bytes are, whatever the name says) -> IANA media type
MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png"}


def species_kind(species: str) -> Kind:
    """'human', 'vehicle' or 'animal' for a model class name (case and spaces ignored)."""
    s = species.strip().lower()
    return "human" if s in PERSON_CLASSES else "vehicle" if s in VEHICLE_CLASSES else "animal"


def normalise_box(box: Sequence[float], width: int, height: int) -> BoxNorm | None:
    """Pixel x1,y1,x2,y2 -> [x_min, y_min, w, h] relative to the image, top-left origin, clipped.

    None when nothing of the box is inside the image (a degenerate box has no place in either
    format: Camtrap DP requires width and height > 0).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, x2 = sorted((min(max(x1, 0.0), width), min(max(x2, 0.0), width)))
    y1, y2 = sorted((min(max(y1, 0.0), height), min(max(y2, 0.0), height)))
    x, y = round(x1 / width, 4), round(y1 / height, 4)
    w, h = round((x2 - x1) / width, 4), round((y2 - y1) / height, 4)
    w, h = min(w, round(1.0 - x, 4)), min(h, round(1.0 - y, 4))  # rounding must not push past the edge
    if w <= 0 or h <= 0:
        return None
    return (x, y, w, h)
