"""A tiny YOLO dataset of coloured shapes, for training-mechanics tests (not for accuracy).

Four 'species' in two look-alike groups (same shape, different colour), one of them rare, plus
empty frames; laid out like `export.datasets.prepare` writes it: data.yaml, images/{split},
labels/{split}. Deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import yaml

# name -> (shape, BGR colour)
SPECIES: dict[str, tuple[str, tuple[int, int, int]]] = {
    "fox": ("circle", (40, 40, 220)),
    "lynx": ("circle", (40, 160, 230)),
    "rabbit": ("square", (220, 60, 40)),
    "mouse": ("square", (60, 200, 60)),
}
GROUPS: dict[str, list[str]] = {"medium": ["fox", "lynx"], "small": ["rabbit", "mouse"]}
RARE = "mouse"


def _draw(img: np.ndarray, shape: str, colour: tuple[int, int, int], rng: np.random.Generator):
    h, w = img.shape[:2]
    s = int(rng.integers(h // 6, h // 3))
    x1, y1 = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
    if shape == "circle":
        cv2.circle(img, (x1 + s // 2, y1 + s // 2), s // 2, colour, -1)
    else:
        cv2.rectangle(img, (x1, y1), (x1 + s - 1, y1 + s - 1), colour, -1)
    return (x1 + s / 2) / w, (y1 + s / 2) / h, s / w, s / h


def make_dataset(root: Path, *, n_train: int = 24, n_val: int = 8, size: int = 128, seed: int = 0,
                 empty_every: int = 4, rare_every: int = 12) -> Path:
    """Write the dataset under root; returns root/data.yaml.

    Every `empty_every`-th image is empty; the rare species appears in every `rare_every`-th
    image only (the others cycle), so oversampling and class weights have something to do.
    """
    rng = np.random.default_rng(seed)
    names = list(SPECIES)
    common = [n for n in names if n != RARE]
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = np.full((size, size, 3), 90, np.uint8)
            img += rng.integers(0, 30, img.shape, dtype=np.uint8)
            lines = []
            if i % empty_every != empty_every - 1:
                sp = RARE if i % rare_every == 0 else common[i % len(common)]
                shape, colour = SPECIES[sp]
                cx, cy, bw, bh = _draw(img, shape, colour, rng)
                lines.append(f"{names.index(sp)} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}")
            stem = f"{split}_{i:03d}"
            cv2.imwrite(str(root / "images" / split / f"{stem}.jpg"), img)
            (root / "labels" / split / f"{stem}.txt").write_text("".join(x + "\n" for x in lines))
    data = {"path": str(root.resolve()), "train": "images/train", "val": "images/val",
            "names": dict(enumerate(names))}
    (root / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return root / "data.yaml"


def write_groups(path: Path, groups: dict[str, list[str]] | None = None) -> Path:
    path.write_text(yaml.safe_dump({"groups": groups or GROUPS}, sort_keys=False))
    return path


def make_it_detect(pt: Path, images: list[Path], imgsz: int, top: float = 0.6, gain: float = 30.0) -> None:
    """Rewrite a barely trained checkpoint so that it detects something on ``images``.

    A tiny model trained from a yaml for an epoch or two scores every anchor alike (about 0.003),
    so nothing passes any threshold and an ONNX-vs-PyTorch check would compare nothing. Here the
    class branch's last convolution is amplified (``gain``: the anchors' scores spread apart) and
    its bias shifted so that the best anchor on these images scores ``top``: a few boxes pass 0.25.
    Only the head changes (the frozen backbone stays bit-identical). A test device, not accuracy.
    """
    import math

    import torch

    from edge.vision import letterbox
    from export.yolo_env import ultralytics

    ultralytics()
    ckpt = torch.load(pt, map_location="cpu", weights_only=False)
    model = ckpt.get("ema") or ckpt["model"]
    head = model.model[-1]
    lasts = [branch[-1] for branch in head.cv3]
    with torch.no_grad():
        for conv in lasts:
            conv.weight.mul_(gain)
        x = torch.from_numpy(np.stack([letterbox(cv2.imread(str(p)), imgsz)[0] for p in images]))
        out = model.float().eval()(x)
        scores = (out[0] if isinstance(out, (list, tuple)) else out)[:, 4:].clamp(1e-7, 1 - 1e-7)
        best = float(scores.max())
        shift = math.log(top / (1 - top)) - math.log(best / (1 - best))
        for conv in lasts:
            conv.bias.add_(shift)
    model.half()
    torch.save(ckpt, pt)
