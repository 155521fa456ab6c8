"""Pre- and post-processing of YOLO models in numpy + OpenCV (pure; no torch on the device).

The device must give the same answer as the workstation, so every rounding rule here copies
ultralytics 8.4 (``LetterBox(auto=False, center=True)``, ``scale_boxes``, ``non_max_suppression``
with ``multi_label=False``); tests/export/test_vision_parity.py holds the two side by side.

Three raw output layouts, one image at a time (no batch dim):

- ``yolov8`` (YOLOv8/11): ``[4+nc, A]`` rows cx, cy, w, h (input pixels), then class scores.
- ``yolov5`` (MegaDetector v5): ``[A, 5+nc]`` cx, cy, w, h, objectness, class probabilities;
  a box's class score is objectness x class probability.
- ``end2end`` (YOLOv10/26, NMS inside the model): ``[N, 6]`` x1, y1, x2, y2, score, class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from edge.detection import Detection
from edge.manifest import input_hw

Layout = Literal["yolov5", "yolov8", "end2end"]
LAYOUTS: tuple[str, ...] = ("yolov5", "yolov8", "end2end")
PAD_VALUE = 114
MAX_WH = 7680  # per-class box offset for class-aware NMS (ultralytics' max_wh)
MAX_NMS = 30000  # boxes entering NMS at most, highest scores first (ultralytics' max_nms)
DEFAULT_CONF = 0.25


@dataclass(frozen=True)
class Letterbox:
    """How one image was fitted into the model input, to map boxes back.

    ``scale`` is ultralytics' ratio r = min(H/h, W/w) for an input of H x W (a square: H = W);
    ``pad`` the (left, top) border in
    input pixels; ``shape`` the original (h, w). Because each resized side is rounded to whole
    pixels, the exact per-axis gains are ``new_w / w`` and ``new_h / h`` (see ``gain``), which is
    what ultralytics' ``scale_boxes`` divides by.
    """

    scale: float
    pad: tuple[float, float]
    shape: tuple[int, int]

    @property
    def resized(self) -> tuple[int, int]:
        """(new_w, new_h): the image's size inside the input, before padding."""
        h, w = self.shape
        return max(round(w * self.scale), 1), max(round(h * self.scale), 1)

    @property
    def gain(self) -> tuple[float, float]:
        """(gain_x, gain_y) input pixels per original pixel."""
        new_w, new_h = self.resized
        return new_w / self.shape[1], new_h / self.shape[0]

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Input-pixel x1y1x2y2 boxes [N, 4] -> original pixels, clipped to the image."""
        gx, gy = self.gain
        h, w = self.shape
        # whole-row operations (x1, y1, x2, y2 at once): the same float64 arithmetic per element
        b = (np.asarray(boxes, dtype=np.float64).reshape(-1, 4) - (self.pad * 2)) / (gx, gy, gx, gy)
        return np.minimum(np.maximum(b, 0.0, out=b), (w, h, w, h), out=b)

    def to_input(self, boxes: np.ndarray) -> np.ndarray:
        """Original-pixel x1y1x2y2 boxes [N, 4] -> input pixels (the inverse, for tests and labels)."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
        gx, gy = self.gain
        b[:, [0, 2]] = b[:, [0, 2]] * gx + self.pad[0]
        b[:, [1, 3]] = b[:, [1, 3]] * gy + self.pad[1]
        return b


def _as_bgr(img: np.ndarray) -> np.ndarray:
    """Accept grey (IR night frames), BGR and BGRA uint8 images; anything else is an error."""
    if not isinstance(img, np.ndarray) or img.size == 0:
        raise ValueError("letterbox: expected a non-empty image array")
    if img.dtype != np.uint8:
        raise ValueError(f"letterbox: expected uint8 pixels, got {img.dtype}")
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
        return cv2.cvtColor(img.reshape(img.shape[0], img.shape[1]), cv2.COLOR_GRAY2BGR)
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    if img.ndim == 3 and img.shape[2] == 3:
        return img
    raise ValueError(f"letterbox: expected an HxW, HxWx1, HxWx3 or HxWx4 image, got shape {img.shape}")


def _fit(h: int, w: int, size: int | Sequence[int]) -> tuple[int, int, int, int, int, int, Letterbox]:
    """Ultralytics' letterbox arithmetic (``LetterBox(new_shape=(H, W), auto=False)``) for an input
    of ``size`` (a square's side or (H, W)): (new_w, new_h, top, bottom, left, right, letterbox)."""
    out_h, out_w = input_hw(size)
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"letterbox: size must be positive, got {size}")
    r = min(out_h / h, out_w / w)
    new_w, new_h = max(round(w * r), 1), max(round(h * r), 1)
    dw, dh = (out_w - new_w) / 2, (out_h - new_h) / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    return new_w, new_h, top, bottom, left, right, Letterbox(scale=r, pad=(float(left), float(top)), shape=(h, w))


def letterbox_uint8(img_bgr: np.ndarray, size: int | Sequence[int]) -> tuple[np.ndarray, Letterbox]:
    """Resize (keeping aspect) and pad to ``size`` (a square's side, or (H, W)): HWC BGR uint8,
    ultralytics' rounding."""
    img = _as_bgr(img_bgr)
    h, w = img.shape[:2]
    new_w, new_h, top, bottom, left, right, lb = _fit(h, w, size)
    if (w, h) != (new_w, new_h):
        img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return img, lb


def letterbox(img_bgr: np.ndarray, size: int | Sequence[int]) -> tuple[np.ndarray, Letterbox]:
    """One image -> model input: CHW float32 RGB in [0, 1], and the letterbox to map boxes back."""
    x, lbs = letterbox_batch([img_bgr], size)
    return x[0], lbs[0]


def letterbox_batch(images: Sequence[np.ndarray], size: int | Sequence[int]) -> tuple[np.ndarray, list[Letterbox]]:
    """Several images -> NCHW float32 batch (RGB in [0, 1]) and one Letterbox per image; ``size`` is
    the model input, a square's side or (H, W).

    Two buffers per batch, none per image: each image is resized straight into its place on a
    padded uint8 NHWC canvas (``cv2.resize`` writes into the view), then one numpy operation
    swaps BGR to RGB, transposes to NCHW and scales the whole batch (``x / 255`` in float32,
    bit-identical to ultralytics' ``im.float() / 255``).
    """
    if len(images) == 0:
        raise ValueError("letterbox_batch: no images")
    out_h, out_w = input_hw(size)
    canvas = np.full((len(images), out_h, out_w, 3), PAD_VALUE, dtype=np.uint8)
    boxes: list[Letterbox] = []
    for i, im in enumerate(images):
        img = _as_bgr(im)
        h, w = img.shape[:2]
        new_w, new_h, top, _, left, _, lb = _fit(h, w, size)
        place = canvas[i, top:top + new_h, left:left + new_w]
        if (w, h) != (new_w, new_h):
            r = cv2.resize(img, (new_w, new_h), dst=place, interpolation=cv2.INTER_LINEAR)
            if r is not place:  # an OpenCV that would not write into the view: copy once
                place[...] = r
        else:
            place[...] = img
        boxes.append(lb)
    out = np.empty((len(images), 3, out_h, out_w), dtype=np.float32)
    np.divide(canvas[..., ::-1].transpose(0, 3, 1, 2), np.float32(255.0), out=out)
    return out, boxes


def xywh2xyxy(b: np.ndarray) -> np.ndarray:
    out = np.empty_like(b)
    half_w, half_h = b[:, 2] / 2, b[:, 3] / 2
    out[:, 0] = b[:, 0] - half_w
    out[:, 1] = b[:, 1] - half_h
    out[:, 2] = b[:, 0] + half_w
    out[:, 3] = b[:, 1] + half_h
    return out


def nms(boxes_xyxy: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy NMS as torchvision.ops.nms: indices kept, by descending score.

    A box is dropped when its IoU with a kept, higher-scoring box is strictly above ``iou``.
    For class-aware NMS offset boxes by ``class * MAX_WH`` first (``decode`` does).
    """
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if b.shape[0] != s.shape[0]:
        raise ValueError(f"nms: {b.shape[0]} boxes but {s.shape[0]} scores")
    if b.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    x1, y1, x2, y2 = b.T
    area = (x2 - x1) * (y2 - y1)
    order = np.argsort(-s, kind="stable")
    keep: list[int] = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        # np.maximum, not np.clip: the same values without clip's dispatch (most of NMS's time
        # on the few boxes a frame has)
        iw = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0.0)
        ih = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0.0)
        inter = iw * ih
        union = area[i] + area[rest] - inter
        ov = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[ov <= iou]
    return np.asarray(keep, dtype=np.int64)


def class_thresholds(classes: Sequence[str], conf: float | Mapping[str, float] | np.ndarray) -> np.ndarray:
    """Per-class score floors as a vector aligned with ``classes``.

    A mapping gives per-class floors; classes it does not name use its ``"*"`` entry, else 0.25.
    An array is taken as already aligned (callers that decode every frame build it once).
    """
    if isinstance(conf, np.ndarray):
        if conf.shape != (len(classes),):
            raise ValueError(f"score thresholds: expected {len(classes)} values, got shape {conf.shape}")
        t = conf.astype(np.float64, copy=False)
    elif isinstance(conf, Mapping):
        unknown = set(conf) - set(classes) - {"*"}
        if unknown:
            raise ValueError(f"thresholds for unknown classes {sorted(unknown)}")
        default = float(conf.get("*", DEFAULT_CONF))
        t = np.array([float(conf.get(c, default)) for c in classes], dtype=np.float64)
    else:
        t = np.full(len(classes), float(conf), dtype=np.float64)
    if ((t < 0) | (t > 1)).any():
        raise ValueError(f"score thresholds must lie in [0, 1], got {t.tolist()}")
    return t


def _one_image(output: np.ndarray) -> np.ndarray:
    out = np.asarray(output)
    if out.ndim == 3 and out.shape[0] == 1:
        out = out[0]
    if out.ndim != 2:
        raise ValueError(f"decode: expected one image's 2-D output, got shape {out.shape}")
    return out.astype(np.float32, copy=False)


def decode(
    output: np.ndarray,
    layout: Layout,
    classes: list[str],
    lb: Letterbox,
    conf: float | Mapping[str, float] | np.ndarray = DEFAULT_CONF,
    iou: float = 0.45,
    max_det: int = 300,
    model: str = "",
    agnostic: bool = False,
) -> list[Detection]:
    """One image's raw model output -> detections in original-image pixels, best first.

    Semantics of ultralytics' ``non_max_suppression(multi_label=False)``: each box takes its best
    class; boxes at or below that class's floor go before NMS; at most ``MAX_NMS`` highest
    scores enter class-aware NMS (agnostic if asked); ``max_det`` survivors are kept.
    ``Detection.scores`` carries the box's per-class score vector (objectness x class for
    yolov5); end-to-end outputs carry only the winning score, so their vector is empty.
    """
    nc = len(classes)
    if nc == 0:
        raise ValueError("decode: the model has no classes")
    thr = class_thresholds(classes, conf)
    out = _one_image(output)
    if layout == "end2end":
        return _decode_end2end(out, classes, lb, thr, max_det, model)
    if layout == "yolov8":
        if out.shape[0] != 4 + nc:
            raise ValueError(
                f"decode: yolov8 output for {nc} classes must be [{4 + nc}, anchors], got {list(out.shape)}"
            )
        scores = out[4:]  # [nc, A]: one contiguous row per class
        # max over the class rows is a streaming reduction; argmax along axis 0 would first copy
        # the whole [nc, A] block transposed (2.7 MB and most of decode's time at 640 px, 80
        # classes). So: anchors whose best score clears the lowest floor, then argmax on those only.
        best = scores.max(0)
        idx = np.flatnonzero(best > thr.min())
        j = scores[:, idx].argmax(0)  # the first of equal scores, as ultralytics' max(1)
        keep = best[idx] > thr[j]  # each anchor's own class floor
        idx, j = idx[keep], j[keep]
        if idx.size == 0:
            return []
        best = best[idx]
        xywh, cls_scores = out[:4, idx].T, scores[:, idx].T
    elif layout == "yolov5":
        if out.shape[1] != 5 + nc:
            raise ValueError(
                f"decode: yolov5 output for {nc} classes must be [anchors, {5 + nc}], got {list(out.shape)}"
            )
        obj = out[:, 4]
        j = out[:, 5:].argmax(1)
        best = out[np.arange(out.shape[0]), 5 + j] * obj
        idx = np.flatnonzero(best > thr[j])
        if idx.size == 0:
            return []
        xywh, cls_scores = out[idx, :4], out[idx, 5:] * obj[idx, None]
        j, best = j[idx], best[idx]
    else:
        raise ValueError(f"decode: unknown layout {layout!r} (one of {', '.join(LAYOUTS)})")
    if best.shape[0] > MAX_NMS:
        top = np.argsort(-best, kind="stable")[:MAX_NMS]
        xywh, cls_scores, j, best = xywh[top], cls_scores[top], j[top], best[top]
    boxes = xywh2xyxy(xywh)
    offset = 0.0 if agnostic else j[:, None].astype(np.float32) * MAX_WH
    kept = nms(boxes + offset, best, iou)[:max_det]
    orig = lb.to_original(boxes[kept])
    return [
        Detection(
            species=classes[int(j[k])],
            score=float(best[k]),
            box=tuple(float(v) for v in orig[n]),  # type: ignore[arg-type]
            cls=int(j[k]),
            model=model,
            scores=tuple(float(v) for v in cls_scores[k]),
        )
        for n, k in enumerate(kept)
    ]


def _decode_end2end(
    out: np.ndarray, classes: list[str], lb: Letterbox, thr: np.ndarray, max_det: int, model: str
) -> list[Detection]:
    if out.shape[1] != 6:
        raise ValueError(f"decode: end2end output must be [N, 6], got {list(out.shape)}")
    if out.shape[0] == 0:
        return []
    cls = out[:, 5].round().astype(np.int64)
    bad = (cls < 0) | (cls >= len(classes))
    if bad.any():
        raise ValueError(f"decode: end2end class index {int(cls[bad][0])} outside the {len(classes)} classes")
    keep = np.flatnonzero(out[:, 4] > thr[cls])[:max_det]
    orig = lb.to_original(out[keep, :4])
    return [
        Detection(
            species=classes[int(cls[k])],
            score=float(out[k, 4]),
            box=tuple(float(v) for v in orig[n]),  # type: ignore[arg-type]
            cls=int(cls[k]),
            model=model,
        )
        for n, k in enumerate(keep)
    ]
