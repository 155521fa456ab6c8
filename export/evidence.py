"""Confusion counts and soft evidence of a trained detector on the validation split.

Computed here rather than read from ultralytics, whose confusion matrix (8.4) is filled only
when ``plots=True``, is indexed [predicted, true], and at its default val conf of 0.001 floods
the background column. We run the PyTorch model ourselves through the device's own letterbox
and decoder (edge/vision.py), so the counts describe what the deployed model would say:

- hard counts [true, predicted] at the deployment ``conf``: each ground-truth box takes the
  highest-scoring detection that overlaps it with IoU >= ``iou_match`` (class-aware NMS, as on
  the device); no such detection -> the background column;
- soft evidence at a low ``soft_conf``: each ground-truth box takes the class-score vector of the
  best-overlapping candidate after class-agnostic NMS (one candidate per animal), so a look-alike
  that never wins the argmax still leaves score mass on its neighbours.

Each image's share of the totals is kept too (``Evidence.units``, merged by sequence when
prepare's meta.json names them), so ``export.stability`` can resample the evidence.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.detection import Detection, iou
from export.stability import Units, group_units

log = logging.getLogger(__name__)
NMS_IOU = 0.45


@dataclass
class Evidence:
    """What ``export.grouping`` needs, plus what it reports."""

    species: list[str]
    counts: np.ndarray  # [n, n+1] int64, [true, predicted], background (missed) last
    soft: np.ndarray  # [n, n] mean class-score vector of each true species' matched candidates
    soft_n: np.ndarray  # [n] GT boxes that had a candidate at soft_conf (the rows' sample sizes)
    false_positives: np.ndarray  # [n] detections at conf matching no GT box, per predicted class
    conf: float
    soft_conf: float
    iou_match: float
    imgsz: int | tuple[int, int]  # a side, or (h, w) for a model exported at a camera's aspect
    images: int
    model: str = ""
    data: str = ""
    extra: dict = field(default_factory=dict)
    units: Units | None = None  # per-sequence (or per-image) shares, for the bootstrap

    @property
    def support(self) -> np.ndarray:
        """GT boxes per species in the split (row sums, background included)."""
        return self.counts.sum(axis=1)


def sequence_of(meta: dict, img: Path, split: str) -> str:
    """The image's burst (sequence) id from prepare's meta.json, keyed images/<split>/<name>;
    the image's own name when meta.json does not say."""
    images = meta.get("images", meta) if isinstance(meta, dict) else {}
    rec = images.get(f"images/{split}/{img.name}") or images.get(img.name)
    return str(rec.get("seq_id", img.stem)) if isinstance(rec, dict) else img.stem


def read_meta(root: Path) -> dict:
    """prepare's meta.json beside data.yaml ({} when absent)."""
    import json

    p = root / "meta.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def resolve_weights(run: str | Path) -> Path:
    """A run folder (RUN/weights/best.pt) or a .pt file."""
    p = Path(run)
    if p.is_dir():
        for cand in (p / "weights" / "best.pt", p / "best.pt", p / "weights" / "last.pt"):
            if cand.is_file():
                return cand
        raise FileNotFoundError(f"{p}: no weights/best.pt in this run folder")
    if not p.is_file():
        raise FileNotFoundError(f"{p}: model checkpoint not found")
    return p


def gt_boxes(label_file: Path, w: int, h: int, nc: int) -> list[tuple[int, tuple[float, float, float, float]]]:
    """YOLO label lines (class cx cy w h, normalised) -> (class, x1y1x2y2 pixels)."""
    out: list[tuple[int, tuple[float, float, float, float]]] = []
    if not label_file.is_file():
        return out
    for n, line in enumerate(label_file.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 5:
            raise ValueError(f"{label_file}:{n}: want 'class cx cy w h', got {line!r}")
        try:
            c = int(float(parts[0]))
            cx, cy, bw, bh = (float(v) for v in parts[1:5])
        except ValueError:
            raise ValueError(f"{label_file}:{n}: non-numeric value in {line!r}") from None
        if not 0 <= c < nc:
            raise ValueError(f"{label_file}:{n}: class {c} outside 0..{nc - 1}")
        out.append((c, ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)))
    return out


def accumulate(
    gts: list[tuple[int, tuple[float, float, float, float]]],
    hard: list[Detection],
    soft: list[Detection],
    counts: np.ndarray,
    soft_sum: np.ndarray,
    soft_n: np.ndarray,
    false_pos: np.ndarray,
    iou_match: float = 0.5,
) -> None:
    """Add one image's matches to the running totals (pure; see the module doc for the rules)."""
    n = counts.shape[0]
    used = [False] * len(hard)
    for c, box in gts:
        best, best_score = None, -1.0
        for j, d in enumerate(hard):
            if d.score > best_score and iou(box, d.box) >= iou_match:
                best, best_score = j, d.score
        if best is None:
            counts[c, n] += 1
        else:
            counts[c, hard[best].cls] += 1
            used[best] = True
        cand, best_iou = None, iou_match
        for d in soft:
            v = iou(box, d.box)
            if v >= best_iou:
                cand, best_iou = d, v
        if cand is not None and len(cand.scores) == n:
            soft_sum[c] += np.asarray(cand.scores, dtype=float)
            soft_n[c] += 1
    for j, d in enumerate(hard):
        if not used[j] and not any(iou(box, d.box) >= iou_match for _, box in gts):
            false_pos[d.cls] += 1


def _model_imgsz(yolo, default: int = 640) -> int:
    args = getattr(yolo.model, "args", None) or {}
    v = args.get("imgsz") if isinstance(args, dict) else getattr(args, "imgsz", None)
    if isinstance(v, (list, tuple)):
        v = max(v)
    return int(v) if v else default


def onnx_engine(model: str | Path):
    """A model bundle folder (its global model) or an ultralytics-exported .onnx -> (engine, ModelEntry).

    Runs on edge.engines' ONNX Runtime backend, the same raw [B, 4+nc, anchors] output as PyTorch,
    so evidence can come from what is deployed (and CI needs no training to get a good model).
    A bare .onnx takes its class names and image size from the metadata ultralytics writes.
    """
    import ast

    from edge.engines import create_engine, load_engines
    from edge.manifest import ModelEntry

    p = Path(model)
    if p.is_dir():
        from edge.bundle import load_bundle

        bundle = load_bundle(p)
        entry = bundle.manifest.global_model  # a whole model, or a head over the shared backbone
        return load_engines(bundle, "onnxruntime", only=[entry.name])[entry.name], entry
    import hashlib

    import onnxruntime as ort

    meta = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    try:
        names = ast.literal_eval(meta["names"])
        imgsz = ast.literal_eval(meta["imgsz"])
    except (KeyError, ValueError, SyntaxError):
        raise ValueError(f"{p}: no ultralytics 'names'/'imgsz' metadata; pass a bundle folder instead") from None
    classes = [str(names[i]) for i in sorted(names)] if isinstance(names, dict) else [str(x) for x in names]
    size = (int(imgsz[0]), int(imgsz[1])) if isinstance(imgsz, (list, tuple)) else int(imgsz)  # [s, s] -> s
    entry = ModelEntry(name=p.stem, file=p.name, sha256=hashlib.sha256(p.read_bytes()).hexdigest(), role="global",
                       classes=classes, imgsz=size, layout="yolov8")
    return create_engine("onnxruntime", p, entry), entry


def compute_evidence(
    run: str | Path,
    data: str | Path,
    *,
    conf: float = 0.25,
    soft_conf: float = 0.01,
    iou_match: float = 0.5,
    imgsz: int | None = None,
    split: str = "val",
    batch: int = 16,
) -> Evidence:
    """Run the model on every image of ``split`` and collect hard counts and soft evidence.

    ``run``: a training run folder or .pt (PyTorch), or a bundle folder or .onnx (ONNX Runtime).
    """
    import cv2

    from edge.manifest import input_hw
    from edge.vision import decode, letterbox
    from export.train import label_path, list_images, read_data_yaml

    if not 0 < soft_conf <= conf < 1:
        raise ValueError(f"want 0 < soft_conf <= conf < 1, got soft_conf={soft_conf}, conf={conf}")
    onnx = Path(run).suffix.lower() == ".onnx" or (Path(run) / "manifest.json").is_file()
    weights = Path(run) if onnx else resolve_weights(run)
    spec = read_data_yaml(data)
    if split not in spec.splits:
        raise ValueError(f"{spec.yaml_path}: no '{split}' split")
    images = list_images(spec.splits[split])
    meta = read_meta(spec.root)
    if not images:
        raise ValueError(f"{spec.yaml_path}: the '{split}' split has no images")
    if onnx:
        engine, entry = onnx_engine(weights)
        classes, size = list(entry.classes), entry.imgsz
        if imgsz and input_hw(int(imgsz)) != entry.input_hw:
            raise ValueError(f"{weights}: the ONNX model's input is fixed at {size} px, not {imgsz}")
        model = None
    else:
        import torch

        from export.yolo_env import YOLO

        yolo = YOLO(weights)
        names = yolo.model.names
        classes = [str(names[i]) for i in range(len(names))] if isinstance(names, dict) else [str(x) for x in names]
        size = int(imgsz or _model_imgsz(yolo))
        model = yolo.model.float().eval()
    if classes != spec.names:
        raise ValueError(f"{weights}: model classes {classes} differ from {spec.yaml_path} names {spec.names}")
    n = len(classes)
    counts = np.zeros((n, n + 1), dtype=np.int64)
    soft_sum = np.zeros((n, n))
    soft_n = np.zeros(n, dtype=np.int64)
    false_pos = np.zeros(n, dtype=np.int64)
    per_image = Units(np.zeros((len(images), n, n + 1)), np.zeros((len(images), n, n)),
                      np.zeros((len(images), n)), "images")
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        xs, lbs, shapes = [], [], []
        for img_path in chunk:
            img = cv2.imread(str(img_path), cv2.IMREAD_COLOR)
            if img is None:
                raise ValueError(f"{img_path}: unreadable image")
            x, lb = letterbox(img, size)
            xs.append(x)
            lbs.append(lb)
            shapes.append(img.shape[:2])
        if model is None:
            raw = engine.infer(np.stack(xs))
        else:
            with torch.no_grad():
                out = model(torch.from_numpy(np.stack(xs)))
            raw = out[0] if isinstance(out, (tuple, list)) else out
            raw = raw.detach().cpu().numpy()
        if raw.ndim != 3 or raw.shape[1] != 4 + n:
            raise ValueError(f"{weights}: raw output {list(raw.shape)} is not the YOLOv8/11 layout "
                             f"[B, {4 + n}, anchors]; end-to-end heads carry no per-class scores")
        for b, img_path in enumerate(chunk):
            h, w = shapes[b]
            hard = decode(raw[b], "yolov8", classes, lbs[b], conf=conf, iou=NMS_IOU)
            soft = decode(raw[b], "yolov8", classes, lbs[b], conf=soft_conf, iou=NMS_IOU, agnostic=True)
            gts = gt_boxes(label_path(img_path), w, h, n)
            i = start + b
            accumulate(gts, hard, soft, per_image.counts[i], per_image.soft_sum[i], per_image.soft_n[i],
                       false_pos, iou_match)
    counts += per_image.counts.sum(axis=0).astype(np.int64)
    soft_sum += per_image.soft_sum.sum(axis=0)
    soft_n += per_image.soft_n.sum(axis=0).astype(np.int64)
    if model is None:
        engine.close()
    soft_mean = np.divide(soft_sum, soft_n[:, None], out=np.zeros_like(soft_sum), where=soft_n[:, None] > 0)
    ev = Evidence(species=classes, counts=counts, soft=soft_mean, soft_n=soft_n, false_positives=false_pos,
                  conf=conf, soft_conf=soft_conf, iou_match=iou_match, imgsz=size, images=len(images),
                  model=str(weights), data=str(spec.yaml_path),
                  units=group_units(per_image, [sequence_of(meta, p, split) for p in images]))
    log.info("evidence: %d images, %d GT boxes, %d missed at conf %.2f, %d with soft candidates",
             len(images), int(counts.sum()), int(counts[:, n].sum()), conf, int(soft_n.sum()))
    return ev
