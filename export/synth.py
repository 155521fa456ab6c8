"""Synthetic camera-trap scenes with planted look-alike groups.

Why: tests, the demo and benchmarks need data whose answer is known. Species come in three
body plans (the groups); species inside a group share the plan, size range and palette and
differ only by subtle cues (tail, ears, spots/stripes, a tint that vanishes at night), so a
small detector confuses them within a group more than across groups - the structure the
two-stage method is meant to exploit. One species per group is >= 10x rarer than the others.

Scenes mimic what a trap sees: a fixed background style per location (ground texture, grass,
trees, rocks, sky), bursts of 1-5 frames 1 s apart with the animal moving a little, far/tiny
animals, night frames in infrared grey (with eye-shine), a data bar with the timestamp, and
about half the frames empty. Output is a COCO Camera Traps JSON plus JPEGs; the same seed
gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from edge.atomic import building

log = logging.getLogger(__name__)

# group -> species; the last species of each group is the rare one.
PLANTED_GROUPS: dict[str, list[str]] = {
    "ungulates": ["red_deer", "fallow_deer", "mouflon"],
    "felids": ["wildcat", "feral_cat", "lynx"],
    "small_mammals": ["rabbit", "hare", "wood_mouse"],
}
RARE: set[str] = {"mouflon", "lynx", "wood_mouse"}
SPECIES: list[str] = [s for g in PLANTED_GROUPS.values() for s in g]  # category ids 1..9 in this order
GROUP_OF: dict[str, str] = {s: g for g, ss in PLANTED_GROUPS.items() for s in ss}
# class -> (scientific name, English vernacular name): the taxa the drawings stand for, written as
# taxonomy.csv beside coco.json (columns as export/taxonomy.py reads them)
TAXA: dict[str, tuple[str, str]] = {
    "red_deer": ("Cervus elaphus", "red deer"), "fallow_deer": ("Dama dama", "fallow deer"),
    "mouflon": ("Ovis orientalis", "mouflon"), "wildcat": ("Felis silvestris", "European wildcat"),
    "feral_cat": ("Felis catus", "domestic cat"), "lynx": ("Lynx pardinus", "Iberian lynx"),
    "rabbit": ("Oryctolagus cuniculus", "European rabbit"), "hare": ("Lepus granatensis", "Iberian hare"),
    "wood_mouse": ("Apodemus sylvaticus", "wood mouse"),
}

# Body colours (BGR) per species: within a group only a slight tint apart.
_COLOUR: dict[str, tuple[int, int, int]] = {
    "red_deer": (45, 72, 130), "fallow_deer": (52, 92, 146), "mouflon": (40, 60, 100),
    "wildcat": (92, 110, 122), "feral_cat": (78, 112, 140), "lynx": (80, 122, 150),
    "rabbit": (92, 108, 118), "hare": (74, 106, 136), "wood_mouse": (62, 84, 108),
}
_BASE_LENGTH = {"ungulates": 0.38, "felids": 0.26, "small_mammals": 0.15}  # body length / image width, near
_BAR_FRAC = 0.06  # data bar height / image height
_SHIFT = 4  # cv2 sub-pixel bits
_ONE = 1 << _SHIFT
_START = datetime(2024, 5, 1)


# ----------------------------------------------------------------------------- drawing
class _Pen:
    """Draws on the image (anti-aliased) and the animal's mask at once, in local body units.

    Local coordinates: u forward along the facing, v up from the feet, both in body lengths.
    """

    def __init__(self, img: np.ndarray, mask: np.ndarray, x: float, y: float, length: float, facing: int):
        import cv2

        self.cv2, self.img, self.mask = cv2, img, mask
        self.x, self.y, self.length, self.facing = x, y, length, facing

    def pt(self, u: float, v: float) -> tuple[float, float]:
        return self.x + self.facing * u * self.length, self.y - v * self.length

    def _ip(self, u: float, v: float) -> tuple[int, int]:
        px, py = self.pt(u, v)
        return round(px * _ONE), round(py * _ONE)

    def _thick(self, t: float) -> int:
        return max(1, round(t * self.length))

    def ellipse(self, u, v, au, av, angle, colour, mask=True):
        ax = (max(1, round(au * self.length * _ONE)), max(1, round(av * self.length * _ONE)))
        ang = angle if self.facing > 0 else 180 - angle
        c = self._ip(u, v)
        self.cv2.ellipse(self.img, c, ax, ang, 0, 360, colour, -1, self.cv2.LINE_AA, _SHIFT)
        if mask:
            self.cv2.ellipse(self.mask, c, ax, ang, 0, 360, 255, -1, self.cv2.LINE_8, _SHIFT)

    def line(self, p, q, thick, colour, mask=True):
        a, b, t = self._ip(*p), self._ip(*q), self._thick(thick)
        self.cv2.line(self.img, a, b, colour, t, self.cv2.LINE_AA, _SHIFT)
        if mask:
            self.cv2.line(self.mask, a, b, 255, t, self.cv2.LINE_8, _SHIFT)

    def poly(self, pts, colour, mask=True):
        arr = np.array([self._ip(u, v) for u, v in pts], dtype=np.int32)
        self.cv2.fillPoly(self.img, [arr], colour, self.cv2.LINE_AA, _SHIFT)
        if mask:
            self.cv2.fillPoly(self.mask, [arr], 255, self.cv2.LINE_8, _SHIFT)

    def circle(self, u, v, r, colour, mask=True):
        self.ellipse(u, v, r, r, 0, colour, mask)


def _shade(c, k: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(v * k, 0, 255)) for v in c)  # type: ignore[return-value]


@dataclass
class _Pose:
    phase: float  # gait phase (legs)
    head_down: bool  # grazing (ungulates)
    variant: bool  # per-individual option: antlers (red deer), tail curl, ...


def _draw_ungulate(p: _Pen, sp: str, col, pose: _Pose) -> list[tuple[float, float]]:
    dark, pale = _shade(col, 0.6), _shade(col, 1.7)
    sw = 0.07 * math.sin(pose.phase)
    for u, s in ((0.30, 1), (0.22, -1), (-0.30, -1), (-0.38, 1)):  # far legs a bit darker
        c = dark if s < 0 else col
        lo = pale if sp == "mouflon" else c
        p.line((u, 0.55), (u + s * sw, 0.22), 0.055, c)
        p.line((u + s * sw, 0.22), (u + s * sw * 1.3, 0.0), 0.045, lo)
    p.ellipse(0, 0.62, 0.5, 0.19, 0, col)
    if sp == "mouflon":
        p.ellipse(-0.02, 0.6, 0.18, 0.09, 0, pale, mask=False)  # saddle patch
    if sp == "fallow_deer":
        for u, v in ((-0.25, 0.68), (-0.1, 0.7), (0.05, 0.69), (0.2, 0.66), (-0.18, 0.58), (0.0, 0.6),
                     (0.15, 0.57), (-0.32, 0.6)):
            p.circle(u, v, 0.022, (205, 225, 235), mask=False)
        p.line((-0.49, 0.7), (-0.57, 0.5), 0.04, (25, 25, 30))  # longer dark tail
    else:
        p.line((-0.49, 0.7), (-0.54, 0.6), 0.04, dark)
    if sp == "red_deer":
        p.ellipse(-0.45, 0.62, 0.06, 0.11, 0, (150, 185, 205), mask=False)  # pale rump
    head = (0.66, 0.36) if pose.head_down else (0.6, 1.0)
    p.line((0.36, 0.68), head, 0.13, col)
    p.ellipse(head[0] + 0.04, head[1] - 0.01, 0.12, 0.06, -25 if pose.head_down else 15, col)
    hu, hv = head
    p.poly([(hu - 0.04, hv + 0.03), (hu - 0.1, hv + 0.14), (hu + 0.0, hv + 0.06)], dark)  # ear
    if sp == "red_deer" and pose.variant:
        p.line((hu, hv + 0.05), (hu - 0.08, hv + 0.35), 0.025, (60, 90, 110))  # antlers
        p.line((hu - 0.04, hv + 0.18), (hu + 0.06, hv + 0.28), 0.02, (60, 90, 110))
        p.line((hu - 0.07, hv + 0.3), (hu - 0.18, hv + 0.38), 0.02, (60, 90, 110))
    if sp == "mouflon":
        p.ellipse(hu - 0.02, hv + 0.02, 0.09, 0.08, 0, (95, 120, 140))  # curled horn
        p.ellipse(hu - 0.02, hv + 0.02, 0.05, 0.04, 0, col, mask=False)
    return [p.pt(hu + 0.1, hv + 0.01)]


def _draw_felid(p: _Pen, sp: str, col, pose: _Pose) -> list[tuple[float, float]]:
    dark = _shade(col, 0.55)
    lift = 0.1 if sp == "lynx" else 0.0  # lynx: longer legs
    by = 0.42 + lift
    sw = 0.08 * math.sin(pose.phase)
    for u, s in ((0.30, 1), (0.24, -1), (-0.28, -1), (-0.34, 1)):
        c = dark if s < 0 else col
        p.line((u, by - 0.05), (u + s * sw, 0.0), 0.075, c)
    # tail
    if sp == "lynx":
        p.line((-0.43, by + 0.05), (-0.55, by - 0.02), 0.07, col)
        p.circle(-0.56, by - 0.03, 0.035, (20, 20, 20))
    else:
        n, length = 6, 0.62 if sp == "feral_cat" else 0.55
        thick = 0.05 if sp == "feral_cat" else 0.085
        curl = 0.25 if pose.variant else -0.25
        pts = [(-0.43 - length * i / n, by + 0.04 + curl * math.sin(math.pi * i / n / 1.5) * length * 0.6)
               for i in range(n + 1)]
        for i in range(n):
            c = col
            if sp == "wildcat" and i % 2 == 1:
                c = dark  # ringed tail
            p.line(pts[i], pts[i + 1], thick, c)
        if sp == "wildcat":
            p.circle(*pts[-1], thick * 0.6, (20, 20, 20))  # blunt black tip
    p.ellipse(0, by, 0.45, 0.15, 0, col)
    if sp == "wildcat":
        for u in (-0.3, -0.18, -0.06, 0.06, 0.18):
            p.line((u, by + 0.12), (u + 0.03, by - 0.06), 0.03, dark, mask=False)  # tabby stripes
    if sp == "lynx":
        for u, v in ((-0.3, by + 0.05), (-0.15, by + 0.08), (0.0, by + 0.03), (0.15, by + 0.07),
                     (-0.22, by - 0.05), (0.08, by - 0.05), (0.28, by + 0.02)):
            p.circle(u, v, 0.03, dark, mask=False)
    hu, hv = 0.52, by + 0.16
    p.circle(hu, hv, 0.14, col)
    ear_h = 0.15 if sp == "lynx" else 0.12
    for du in (-0.07, 0.05):
        p.poly([(hu + du - 0.05, hv + 0.09), (hu + du, hv + 0.09 + ear_h), (hu + du + 0.05, hv + 0.1)], col)
        if sp == "lynx":
            p.line((hu + du, hv + 0.03 + ear_h), (hu + du, hv + 0.15 + ear_h), 0.025, (20, 20, 20))  # tufts
    return [p.pt(hu + 0.08, hv + 0.02)]


def _draw_small(p: _Pen, sp: str, col, pose: _Pose) -> list[tuple[float, float]]:
    dark = _shade(col, 0.55)
    hop = 0.04 * max(0.0, math.sin(pose.phase))
    by = 0.3 + hop
    if sp == "wood_mouse":  # long thin tail
        p.line((-0.4, by - 0.08), (-0.8, by - 0.22), 0.025, dark)
        p.line((-0.8, by - 0.22), (-1.15, by - 0.18), 0.02, dark)
    foot = 0.2 if sp == "hare" else 0.14
    p.ellipse(-0.22, foot * 0.3, foot, 0.05, 0, dark)  # hind foot
    p.line((0.25, by - 0.1), (0.28, 0.0), 0.05, col)  # front leg
    p.ellipse(0, by, 0.42, 0.27 if sp != "hare" else 0.24, -10, col)
    if sp == "rabbit":
        p.circle(-0.42, by + 0.1, 0.08, (235, 235, 235))  # white scut
    elif sp == "hare":
        p.circle(-0.42, by + 0.1, 0.06, (30, 30, 35))  # dark-topped tail
    hu, hv = 0.4, by + 0.15
    if sp == "wood_mouse":
        p.circle(hu - 0.05, hv + 0.14, 0.08, col)  # round ears
        p.circle(hu - 0.05, hv + 0.14, 0.045, _shade(col, 1.4), mask=False)
    else:
        ear = 0.5 if sp == "hare" else 0.34
        tilt = 0.12 if pose.variant else 0.04
        for du in (-0.04, 0.03):
            base = (hu - 0.06 + du, hv + 0.08)
            tip = (base[0] - tilt - 0.05, base[1] + ear)
            p.line(base, tip, 0.085, col)
            if sp == "hare":  # black ear tips
                p.line((base[0] + 0.82 * (tip[0] - base[0]), base[1] + 0.82 * ear), tip, 0.075, (25, 25, 25),
                       mask=False)
    p.ellipse(hu, hv, 0.17, 0.13, 0, col)
    eye = 0.045 if sp == "wood_mouse" else 0.03
    p.circle(hu + 0.07, hv + 0.03, eye, (15, 15, 15), mask=False)
    return [p.pt(hu + 0.07, hv + 0.03)]


_DRAW = {"ungulates": _draw_ungulate, "felids": _draw_felid, "small_mammals": _draw_small}


# ----------------------------------------------------------------------------- backgrounds
def _location_style(rng: np.random.Generator) -> dict:
    grounds = [(90, 128, 160), (62, 128, 92), (45, 62, 72), (150, 188, 208), (118, 124, 126), (70, 110, 120)]
    return {
        "sky": None if rng.random() < 0.25 else tuple(int(v) for v in rng.integers([170, 150, 110], [255, 235, 190])),
        "horizon": float(rng.uniform(0.18, 0.42)),
        "ground": grounds[int(rng.integers(len(grounds)))],
        "grass_colour": tuple(int(v) for v in rng.integers([30, 90, 40], [90, 170, 130])),
        "grass": int(rng.integers(0, 500)),
        "trees": int(rng.integers(0, 5)),
        "rocks": int(rng.integers(0, 6)),
        "bushes": int(rng.integers(0, 6)),
        "texture": float(rng.uniform(6, 22)),
    }


def _background(style: dict, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    import cv2

    img = np.empty((h, w, 3), np.float32)
    hz = int(style["horizon"] * h) if style["sky"] is not None else 0
    ground = np.array(style["ground"], np.float32)
    # low- and high-frequency texture: patches of soil and grass
    low = cv2.resize(rng.standard_normal((max(2, h // 24), max(2, w // 24))).astype(np.float32), (w, h),
                     interpolation=cv2.INTER_CUBIC)
    hi = rng.standard_normal((h, w)).astype(np.float32)
    img[:] = ground
    img += (low * style["texture"] + hi * 5)[..., None]
    if hz:
        sky = np.array(style["sky"], np.float32)
        grad = np.linspace(1.0, 0.85, hz, dtype=np.float32)[:, None, None]
        img[:hz] = sky * grad
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(style["trees"]):
        x = int(rng.integers(0, w))
        tw = int(rng.integers(max(2, w // 60), max(3, w // 18)))
        bottom = int(hz + rng.uniform(0.05, 0.3) * (h - hz))
        bark = tuple(int(v) for v in rng.integers([30, 40, 50], [70, 80, 100]))
        cv2.rectangle(img, (x - tw // 2, 0), (x + tw // 2, bottom), bark, -1)
        for _ in range(4):
            c = (int(x + rng.normal(0, w / 16)), int(rng.uniform(0, max(1, hz or h // 5))))
            ax = (int(rng.uniform(w / 20, w / 8)), int(rng.uniform(h / 20, h / 9)))
            leaf = tuple(int(v) for v in rng.integers([20, 60, 20], [60, 120, 70]))
            cv2.ellipse(img, c, ax, 0, 0, 360, leaf, -1, cv2.LINE_AA)
    for _ in range(style["bushes"]):
        c = (int(rng.integers(0, w)), int(hz + rng.uniform(0, 0.15) * (h - hz)))
        ax = (int(rng.uniform(w / 25, w / 9)), int(rng.uniform(h / 30, h / 12)))
        cv2.ellipse(img, c, ax, 0, 180, 360, tuple(int(v) for v in rng.integers([20, 50, 20], [60, 100, 60])),
                    -1, cv2.LINE_AA)
    for _ in range(style["rocks"]):
        y = int(rng.uniform(hz, h))
        s = (0.3 + 0.7 * (y - hz) / max(1, h - hz)) * w / 30
        c = (int(rng.integers(0, w)), y)
        g = int(rng.integers(90, 170))
        cv2.ellipse(img, c, (int(s * 1.6) + 1, int(s) + 1), 0, 180, 360, (g, g, g + 5), -1, cv2.LINE_AA)
    gc = np.array(style["grass_colour"], np.float32)
    for _ in range(style["grass"]):
        gx, gy = float(rng.uniform(0, w)), float(rng.uniform(hz, h))
        ln = (0.2 + 0.8 * (gy - hz) / max(1, h - hz)) * h / 14
        col = tuple(int(v) for v in np.clip(gc * rng.uniform(0.7, 1.3), 0, 255))
        cv2.line(img, (int(gx), int(gy)), (int(gx + rng.normal(0, ln / 3)), int(gy - ln)), col, 1, cv2.LINE_AA)
    return img


# ----------------------------------------------------------------------------- planning
@dataclass
class _Burst:
    location: str
    species: list[str]  # one entry per individual; empty list = empty burst
    n_frames: int
    start: datetime = field(default_factory=lambda: _START)
    index: int = 0  # global burst index (render rng stream)


def _plan(rng: np.random.Generator, n_images: int, locations: list[str], rare_ratio: float,
          empty_frac: float) -> list[_Burst]:
    """Bursts with species quotas: every common species gets ``rare_ratio`` times the frames of a rare one."""
    n_animal = round(n_images * (1 - empty_frac))
    weights = {s: 1.0 if s in RARE else rare_ratio for s in SPECIES}
    total = sum(weights.values())
    bursts: list[_Burst] = []
    for s in SPECIES:
        left = max(1, round(n_animal * weights[s] / total))
        while left > 0:
            n = min(int(rng.integers(1, 6)), left)
            herd = [s]
            if s not in RARE and rng.random() < 0.15:
                herd.append(s)  # a second individual (the rare species stay rare in boxes too)
            bursts.append(_Burst(str(locations[int(rng.integers(len(locations)))]), herd, n))
            left -= n
    used = sum(b.n_frames for b in bursts)
    while used < n_images:
        n = min(int(rng.integers(1, 6)), n_images - used)
        bursts.append(_Burst(str(locations[int(rng.integers(len(locations)))]), [], n))
        used += n
    # trim if the animal quotas alone overshoot (tiny n_images): drop from the end of the empties first
    while used > n_images and bursts:
        b = bursts[-1]
        cut = min(b.n_frames, used - n_images)
        b.n_frames -= cut
        used -= cut
        if b.n_frames == 0:
            bursts.pop()
    order = rng.permutation(len(bursts))
    bursts = [bursts[i] for i in order]
    # timeline per location: random moments over three weeks, ~35% at night, never overlapping
    for loc in locations:
        mine = [b for b in bursts if b.location == loc]
        starts = []
        for _ in mine:
            day = int(rng.integers(0, 21))
            night = rng.random() < 0.35
            hour = int(rng.choice([20, 21, 22, 23, 0, 1, 2, 3, 4, 5])) if night else int(rng.integers(6, 20))
            starts.append(_START + timedelta(days=day, hours=hour, seconds=int(rng.integers(0, 3600))))
        starts.sort()
        last = _START - timedelta(hours=1)
        for b, t in zip(mine, starts, strict=True):
            t = max(t, last + timedelta(seconds=60))
            b.start = t
            last = t + timedelta(seconds=b.n_frames)
    bursts.sort(key=lambda b: (b.location, b.start))
    for i, b in enumerate(bursts):
        b.index = i
    return bursts


def _is_night(t: datetime) -> bool:
    return t.hour >= 20 or t.hour < 6


# ----------------------------------------------------------------------------- rendering
@dataclass
class _Individual:
    species: str
    x: float
    y: float
    length: float
    facing: int
    speed: float
    pose: _Pose
    colour: tuple[int, int, int]


def _individuals(rng: np.random.Generator, herd: list[str], w: int, h_scene: int, hz: float) -> list[_Individual]:
    out = []
    for s in herd:
        depth = float(rng.uniform(0, 1)) if rng.random() > 0.25 else float(rng.uniform(0, 0.15))  # 25% far
        ground_top = hz * h_scene
        y = ground_top + (h_scene - ground_top) * (0.12 + 0.85 * depth)
        scale = 0.3 + 0.7 * depth
        length = _BASE_LENGTH[GROUP_OF[s]] * w * scale * float(rng.uniform(0.85, 1.15))
        jitter = rng.integers(-12, 13, 3)
        colour = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(_COLOUR[s], jitter, strict=True))
        out.append(_Individual(
            s, float(rng.uniform(0.1, 0.9) * w), y, length, 1 if rng.random() < 0.5 else -1,
            float(rng.uniform(0.04, 0.2)),
            _Pose(float(rng.uniform(0, 2 * math.pi)), bool(rng.random() < 0.3), bool(rng.random() < 0.5)),
            colour))  # type: ignore[arg-type]
    out.sort(key=lambda a: a.y)  # far ones first (painter's order)
    return out


def _render_frame(bg: np.ndarray, animals: list[_Individual], t: datetime, ir: bool, shine: bool,
                  cast: np.ndarray, rng: np.random.Generator, h_scene: int,
                  temp_c: int) -> tuple[np.ndarray, list[tuple[str, list[float]]]]:
    import cv2

    h, w = bg.shape[:2]
    img = bg.copy()
    boxes: list[tuple[str, list[float]]] = []
    eyes: list[tuple[float, float]] = []
    for a in animals:
        mask = np.zeros((h, w), np.uint8)
        pen = _Pen(img, mask, a.x, a.y, a.length, a.facing)
        eyes += _DRAW[GROUP_OF[a.species]](pen, a.species, a.colour, a.pose)
        ys, xs = np.nonzero(mask[:h_scene])
        if len(xs) == 0:
            continue
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        boxes.append((a.species, [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]))
    img = img.astype(np.float32)
    if ir:
        grey = img[..., 0] * 0.15 + img[..., 1] * 0.55 + img[..., 2] * 0.30  # foliage bright in IR
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        vign = 1.15 - 0.75 * (((xx - w / 2) / (w / 2)) ** 2 + ((yy - h * 0.6) / h) ** 2)  # flash fall-off
        grey = grey * vign * float(rng.uniform(0.8, 1.1)) + 10
        img = np.repeat(grey[..., None], 3, axis=2)
    else:
        img *= cast * float(rng.uniform(0.96, 1.04))  # burst's light and colour cast, flicker per frame
    img += rng.standard_normal((h, w, 1) if ir else (h, w, 3), dtype=np.float32) * (6.0 if ir else 3.5)
    img = np.clip(img, 0, 255).astype(np.uint8)
    if ir and shine:
        for ex, ey in eyes:
            r = max(1, round(w / 400))
            cv2.circle(img, (round(ex), round(ey)), r, (245, 245, 245), -1, cv2.LINE_AA)
    # data bar, as traps imprint it
    img[h_scene:] = 0
    text = f"{temp_c:+d}C  {t:%Y-%m-%d %H:%M:%S}"
    scale = (h - h_scene) / 30
    cv2.putText(img, text, (3, h - max(2, (h - h_scene) // 4)), cv2.FONT_HERSHEY_SIMPLEX, scale,
                (230, 230, 230), 1, cv2.LINE_AA)
    return img, boxes


def _move(a: _Individual, rng: np.random.Generator, w: int) -> None:
    step = a.facing * a.speed * a.length * float(rng.uniform(0.6, 1.4))
    if not 0.05 * w < a.x + step < 0.95 * w:
        a.facing = -a.facing
        step = -step
    a.x += step
    a.y += float(rng.normal(0, 0.01)) * a.length
    a.pose.phase += float(rng.uniform(0.8, 1.6))
    if rng.random() < 0.2:
        a.pose.head_down = not a.pose.head_down


# ----------------------------------------------------------------------------- public API
def write_taxonomy(path: Path) -> Path:
    """The synthetic species' taxonomy CSV (docs/taxonomy.md): what `prepare --taxonomy` reads."""
    path.write_text("class,scientific_name,vernacular_name,language,rank\n" + "".join(
        f"{s},{TAXA[s][0]},{TAXA[s][1]},eng,species\n" for s in SPECIES), encoding="utf-8")
    return path


def synthesize(out: Path, seed: int = 0, n_images: int = 600, size: tuple[int, int] = (320, 240),
               n_locations: int = 8, *, rare_ratio: float = 12.0, empty_frac: float = 0.5,
               jpeg_quality: int = 90, overwrite: bool = False) -> Path:
    """Write ``out/coco.json``, ``out/taxonomy.csv`` and ``out/images/<location>/IMG_NNNN.JPG``;
    returns the JSON path.

    Built in a temporary sibling folder and renamed into place, so ``out`` is either the whole
    result or absent. An existing ``out`` is replaced only with ``overwrite`` and only if it
    looks like an earlier synth output (holds coco.json), so a typo cannot wipe a real folder.
    """
    import cv2

    out = Path(out)
    w, h = int(size[0]), int(size[1])
    if w < 64 or h < 48:
        raise ValueError(f"synth: size {w}x{h} too small (minimum 64x48)")
    if n_images < 1 or n_locations < 1:
        raise ValueError(f"synth: need n_images >= 1 and n_locations >= 1 (got {n_images}, {n_locations})")
    if rare_ratio < 1 or not 0 <= empty_frac < 1:
        raise ValueError(f"synth: rare_ratio must be >= 1 and empty_frac in [0, 1) (got {rare_ratio}, {empty_frac})")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"synth: {out} exists and is not empty (pass --overwrite to replace it)")
        if not (out / "coco.json").is_file():
            raise ValueError(f"synth: refusing to replace {out}: it holds no coco.json, so it is not a synth output")
    locations = [f"L{i}" for i in range(n_locations)]
    bursts = _plan(np.random.default_rng([seed, 0]), n_images, locations, rare_ratio, empty_frac)
    h_scene = h - max(8, round(h * _BAR_FRAC))
    styles = {loc: _location_style(np.random.default_rng([seed, 1, i])) for i, loc in enumerate(locations)}
    backgrounds = {loc: _background(styles[loc], w, h_scene, np.random.default_rng([seed, 2, i]))
                   for i, loc in enumerate(locations)}
    cat_id = {s: i + 1 for i, s in enumerate(SPECIES)}

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    counter = dict.fromkeys(locations, 0)
    with building(out) as tmp:
        for loc in locations:
            (tmp / "images" / loc).mkdir(parents=True)
        for b in bursts:
            rng = np.random.default_rng([seed, 3, b.index])
            base = np.zeros((h, w, 3), np.uint8)
            base[:h_scene] = backgrounds[b.location]
            animals = _individuals(rng, b.species, w, h_scene, styles[b.location]["horizon"]
                                   if styles[b.location]["sky"] is not None else 0.0)
            seq_id = f"{b.location}_seq{b.index:05d}"
            shine = bool(rng.random() < 0.6)
            cast = (rng.uniform(0.93, 1.07, 3) * rng.uniform(0.7, 1.1)).astype(np.float32)
            temp_c = int(rng.integers(-2, 30))
            for f in range(b.n_frames):
                t = b.start + timedelta(seconds=f)
                counter[b.location] += 1
                image_id = f"{b.location}/IMG_{counter[b.location]:04d}"
                rel = f"images/{image_id}.JPG"
                ir = _is_night(t)
                img, boxes = _render_frame(base, animals, t, ir, shine, cast, rng, h_scene, temp_c)
                ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
                if not ok:  # pragma: no cover - cv2 failure
                    raise RuntimeError(f"synth: JPEG encoding failed for {rel}")
                (tmp / rel).write_bytes(buf.tobytes())
                images.append({"id": image_id, "file_name": rel, "width": w, "height": h,
                               "location": b.location, "seq_id": seq_id, "seq_num_frames": b.n_frames,
                               "frame_num": f, "datetime": f"{t:%Y-%m-%d %H:%M:%S}", "ir": ir})
                if not boxes:
                    annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 0})
                for sp, box in boxes:
                    annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                        "category_id": cat_id[sp], "bbox": box})
                for a in animals:
                    _move(a, rng, w)
        coco = {
            "info": {"description": "camtrap cascade synthetic scenes", "version": "1",
                     "generator": "camtrap-export synth", "seed": seed,
                     "planted_groups": PLANTED_GROUPS, "rare": sorted(RARE)},
            "images": images,
            "categories": [{"id": 0, "name": "empty"}] + [
                {"id": cat_id[s], "name": s, "group": GROUP_OF[s], "rare": s in RARE} for s in SPECIES],
            "annotations": annotations,
        }
        (tmp / "coco.json").write_text(json.dumps(coco, indent=1) + "\n")
        write_taxonomy(tmp / "taxonomy.csv")
    log.info("synth: %d images (%d empty) in %d locations -> %s", len(images),
             sum(1 for a in annotations if a["category_id"] == 0), n_locations, out / "coco.json")
    return out / "coco.json"


# ----------------------------------------------------------------------------- CLI
def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 320x240, got {text!r}") from None
    return w, h


def add_cli(sub) -> None:
    p = sub.add_parser("synth", help="synthetic camera-trap scenes with planted look-alike groups (COCO CT JSON)")
    p.add_argument("out", type=Path, help="output folder (gets coco.json and images/<location>/)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    p.add_argument("--images", type=int, default=600, help="number of frames (default 600)")
    p.add_argument("--size", type=_size, default=(320, 240), help="WIDTHxHEIGHT (default 320x240)")
    p.add_argument("--locations", type=int, default=8, help="number of camera locations L0..L{n-1} (default 8)")
    p.add_argument("--rare-ratio", type=float, default=12.0, help="common/rare frame ratio (default 12)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier synth output in OUT")
    p.set_defaults(func=_run)


def _run(args) -> int:
    path = synthesize(args.out, seed=args.seed, n_images=args.images, size=args.size,
                      n_locations=args.locations, rare_ratio=args.rare_ratio, overwrite=args.overwrite)
    print(path)
    return 0
