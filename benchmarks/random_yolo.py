"""A YOLOv8n with random weights at any input size, for benchmarks that need a 640 px model.

Built from ultralytics' own ``yolov8n.yaml`` (nothing is downloaded: no weights exist to fetch) and
exported by ``export.onnx.export_onnx``, the bundle's own exporter. Its answers are meaningless
(random weights, so decode sees few candidates) but its cost per pixel is YOLOv8n's. Needs the
workstation venv (torch, ultralytics); the device benchmarks take the exported file by path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge.manifest import ModelEntry


@dataclass(frozen=True)
class RandomYolo:
    pt: Path
    onnx: Path
    entry: ModelEntry


def random_yolov8n_pt(folder: Path) -> Path:
    """``folder``/yolov8n-random.pt, built once from the package's yaml."""
    from export.yolo_env import YOLO

    pt = folder / "yolov8n-random.pt"
    if not pt.exists():
        YOLO("yolov8n.yaml").save(str(pt))
    return pt


def export_random_yolov8n(folder: Path, size: int | tuple[int, int]) -> RandomYolo:
    """The random YOLOv8n exported at ``size`` (a side or (h, w)) into ``folder``, with a manifest entry."""
    from export.onnx import export_onnx

    pt = random_yolov8n_pt(folder)
    tag = size if isinstance(size, int) else f"{size[0]}x{size[1]}"
    ex = export_onnx(pt, folder / f"yolov8n-{tag}.onnx", imgsz=size)
    entry = ModelEntry(name=f"yolov8n-{tag}", role="global", file=ex.onnx_path.name, sha256="0" * 64,
                       classes=ex.classes, imgsz=ex.imgsz, layout=ex.layout)
    return RandomYolo(pt, ex.onnx_path, entry)
