"""The one detection type every part of the product passes around (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field

SAME_ANIMAL_IOU = 0.5  # boxes overlapping past this IoU are one animal (default of the cascade's merge_iou)


@dataclass(frozen=True)
class Detection:
    """One box from one model, in original-image pixels.

    ``species`` is the model's class name (models have different class index spaces, so
    names, not indices, cross model boundaries). ``scores`` holds the full per-class score
    vector of the box, aligned with the model's class list: the grouping step uses it as
    soft evidence of look-alikes, and the cascade keeps it for audit. ``also`` holds the other
    species claimed for the same animal by boxes the cascade merged into this one (one animal,
    one box: see ``edge.cascade.one_box_per_animal``), most confident first; outputs list them
    as the animal's ranked classifications.
    """

    species: str
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 (pixels, original image)
    cls: int = -1  # index in the emitting model's class list
    model: str = ""  # manifest name of the model that emitted it
    scores: tuple[float, ...] = field(default=(), compare=False, repr=False)
    also: tuple[tuple[str, float], ...] = field(default=(), compare=False)

    def to_dict(self) -> dict:
        d = {
            "species": self.species,
            "score": round(float(self.score), 5),
            "box": [round(float(v), 2) for v in self.box],
            "cls": self.cls,
            "model": self.model,
        }
        if self.also:
            d["also"] = [[sp, round(float(s), 5)] for sp, s in self.also]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Detection:
        return cls(
            species=str(d["species"]),
            score=float(d["score"]),
            box=tuple(float(v) for v in d["box"]),  # type: ignore[arg-type]
            cls=int(d.get("cls", -1)),
            model=str(d.get("model", "")),
            also=tuple((str(sp), float(s)) for sp, s in d.get("also", ())),
        )


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two x1y1x2y2 boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
