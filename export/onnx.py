"""ONNX export of trained models, checked against PyTorch before it may enter a bundle.

Export pins the opset, fixes the image size and leaves only the batch dynamic (TensorRT
then needs one optimisation profile over batch alone). The parity check runs the same
letterboxed images through PyTorch and ONNX Runtime and decodes both with the device's own
decoder (edge.vision), so what is compared is what the device will report. A comparison of no
detections proves nothing (an expert given images of other groups' species sees nothing), so
the check images should hold the model's species; if PyTorch detects nothing on any of them at
the deployment threshold the comparison is repeated at ``PARITY_FLOOR``, and if it is still
empty the check fails.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.manifest import InputSize, Layout, input_hw

log = logging.getLogger(__name__)

OPSET = 17
PARITY_FLOOR = 0.05  # check threshold when nothing is detected at the deployment threshold (runner's floor)


@dataclass
class ExportedModel:
    onnx_path: Path
    classes: list[str]
    imgsz: InputSize  # a square's side, or (h, w): the manifest's ModelEntry.imgsz
    layout: Layout
    parity: dict = field(default_factory=dict)


def detect_layout(output_shape: tuple[int, ...], nc: int) -> Layout:
    """Name the output layout from a raw output's shape [B, ...]."""
    if len(output_shape) != 3:
        raise ValueError(f"unexpected ONNX output rank {len(output_shape)}: {output_shape}")
    _, a, b = output_shape
    if a == 4 + nc:
        return "yolov8"
    if b == 6:
        return "end2end"
    if b == 5 + nc:
        return "yolov5"
    raise ValueError(f"cannot tell the output layout of shape {output_shape} for {nc} classes")


def _fix_spatial_dims(path: Path, imgsz: InputSize) -> None:
    """Pin H and W of the input to imgsz (a square's side or (h, w)), keep batch dynamic."""
    import onnx

    model = onnx.load(str(path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for i, v in zip((2, 3), input_hw(imgsz), strict=True):
        dims[i].ClearField("dim_param")
        dims[i].dim_value = v
    dims[0].dim_param = "batch"
    onnx.save(model, str(path))


def export_onnx(weights: Path, out: Path, imgsz: int | Sequence[int] | None = None,
                simplify: bool = True) -> ExportedModel:
    """Export an ultralytics checkpoint to ``out`` (an .onnx path).

    ``imgsz``: the input, a square's side (default: the training size) or (height, width), e.g.
    (480, 640) for 4:3 and 3:2 cameras in landscape: the same answers as the 640 px square on
    0.75x the pixels (both sides multiples of the model's stride, 32)."""
    from export.yolo_env import YOLO

    model = YOLO(weights)
    names = model.names
    classes = [names[i] for i in sorted(names)]
    size = _input_size(imgsz or model.overrides.get("imgsz") or 640)
    ul_size = list(size) if isinstance(size, tuple) else size  # ultralytics takes [h, w] or a side
    try:
        produced = Path(model.export(format="onnx", imgsz=ul_size, opset=OPSET, dynamic=True,
                                     simplify=simplify, device="cpu", verbose=False))
    except Exception as e:  # onnxslim failures should not block a bundle: retry plain
        if not simplify:
            raise
        log.warning("ONNX export with simplify failed (%s); retrying without", e)
        produced = Path(model.export(format="onnx", imgsz=ul_size, opset=OPSET, dynamic=True,
                                     simplify=False, device="cpu", verbose=False))
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(produced), out)
    _fix_spatial_dims(out, size)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    shape = sess.run(None, {sess.get_inputs()[0].name: np.zeros((1, 3, *input_hw(size)), np.float32)})[0].shape
    return ExportedModel(out, classes, size, detect_layout(shape, len(classes)))


def _input_size(v: int | Sequence[int]) -> InputSize:
    """A side, or (h, w) with [s, s] spelt s (the manifest's one spelling)."""
    h, w = input_hw(int(v) if isinstance(v, (int, str)) else tuple(v))
    if h <= 0 or w <= 0:
        raise ValueError(f"export: input size {h}x{w} must be positive")
    return h if h == w else (h, w)


def parity_check(weights: Path, exported: ExportedModel, images: list[np.ndarray], conf: float = 0.25,
                 iou_min: float = 0.99, score_tol: float = 1e-3, floor: float = PARITY_FLOOR) -> dict:
    """Run PyTorch and ONNX Runtime on the same inputs; same detections or raise.

    Compared at ``conf``; when PyTorch finds nothing on any image at ``conf``, at ``floor``; when
    it finds nothing even there, ValueError (an empty comparison is no check). Returns {"images": n,
    "detections": n, "images_with_detections": n, "max_raw_diff": .., "max_score_diff": .., "conf": c}.
    """
    import onnxruntime as ort
    import torch

    from edge.vision import letterbox
    from export.yolo_env import YOLO

    if not images:
        raise ValueError(f"{exported.onnx_path}: parity: no check images (give --data, a data.yaml with images of "
                         "its species, or --no-parity)")
    net = YOLO(weights).model.float().eval()
    sess = ort.InferenceSession(str(exported.onnx_path), providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    raws = []
    max_raw = 0.0
    for img in images:
        x, lb = letterbox(img, exported.imgsz)
        with torch.no_grad():
            pt = net(torch.from_numpy(x[None]))
        pt = (pt[0] if isinstance(pt, (list, tuple)) else pt).numpy()
        ox = sess.run(None, {in_name: x[None]})[0]
        max_raw = max(max_raw, float(np.abs(pt - ox).max()))
        raws.append((pt[0], ox[0], lb))
    for threshold in (conf, min(conf, floor)):
        result = _compare(exported, raws, threshold, iou_min, score_tol)
        if result["detections"]:
            break
    else:
        raise ValueError(f"{exported.onnx_path}: parity: the model detects nothing on {len(images)} check images "
                         f"even at {min(conf, floor)}, so the comparison would be empty (check images must hold "
                         f"its species: {', '.join(exported.classes)})")
    exported.parity = {"images": len(images), **result, "max_raw_diff": max_raw}
    log.info("parity %s: %d images (%d with detections), %d detections at conf %.2f, max score diff %.2e, "
             "max raw diff %.2e", exported.onnx_path.name, len(images), result["images_with_detections"],
             result["detections"], result["conf"], result["max_score_diff"], max_raw)
    return exported.parity


def _compare(exported: ExportedModel, raws: list, conf: float, iou_min: float, score_tol: float) -> dict:
    """Decode both outputs of every image at ``conf`` with the device decoder; raise on any difference."""
    from edge.detection import iou
    from edge.vision import decode

    n_dets = with_dets = 0
    max_score = 0.0
    for k, (pt, ox, lb) in enumerate(raws):
        a = decode(pt, exported.layout, exported.classes, lb, conf=conf)
        b = decode(ox, exported.layout, exported.classes, lb, conf=conf)
        if len(a) != len(b):
            raise ValueError(
                f"{exported.onnx_path}: parity: image {k}: PyTorch {len(a)} vs ONNX {len(b)} detections")
        for da, db in zip(sorted(a, key=lambda d: -d.score), sorted(b, key=lambda d: -d.score), strict=True):
            same_box = iou(da.box, db.box) >= iou_min
            if da.species != db.species or not same_box or abs(da.score - db.score) > score_tol:
                raise ValueError(f"{exported.onnx_path}: parity: image {k}: {da} != {db}")
            max_score = max(max_score, abs(da.score - db.score))
        n_dets += len(a)
        with_dets += bool(a)
    return {"detections": n_dets, "images_with_detections": with_dets, "max_score_diff": max_score, "conf": conf}
