"""What both record formats share: the box convention, which model classes are people or
vehicles (both formats file those apart from animals), media types, and how a file name that
is not text (bytes that are not UTF-8, control characters) is written. Pure.

One naming rule for both formats (:func:`safe_name`): a device file name is written as UTF-8
text with undecodable bytes, control and line-separator characters and '%' percent-encoded,
so it is valid JSON and CSV for every strict reader and ``urllib.parse.unquote_to_bytes``
gives back its exact bytes.
"""

from __future__ import annotations

import os
import unicodedata
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


def escape_char(ch: str) -> str:
    """One character as it may appear in a written name (percent-encoded if it may not)."""
    o = ord(ch)
    if 0xDC80 <= o <= 0xDCFF:  # os.fsdecode's surrogateescape: an undecodable byte o - 0xDC00
        return f"%{o - 0xDC00:02X}"
    if ch == "%" or unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp"):
        return "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    return ch


def safe_name(name: str | bytes) -> str:
    """A file name or path as UTF-8 text every CSV and JSON reader accepts, exact and
    reversible: undecodable bytes, control and line-separator characters and '%' are
    percent-encoded (RFC 3986 style); everything else is kept as it is."""
    text = os.fsdecode(name) if isinstance(name, bytes) else name
    return "".join(escape_char(c) for c in text)


def has_surrogates(text: str) -> bool:
    """True when ``text`` holds a lone surrogate (an undecodable byte): not valid UTF-8 / JSON text."""
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)
