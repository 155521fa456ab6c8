"""edge.vision (numpy letterbox + decode on ONNX Runtime) against ultralytics' own predictions.

The claim under test: a bundle's ONNX model run through the device's numpy pre/post-processing
gives the detections ultralytics gives on the .pt model (same count and classes, box IoU >= 0.99,
scores within 1e-3), for all three output layouts.

Models: yolov8n and yolo26n at an eighth of the channels (width 0.125), 128 px. The v8 network is
not trained: how well a tiny model trains differs across machines (a fresh clone once got 20
detections where 28 were needed), so its detect head is SET to outputs that are known. Every
stride-32 cell (16 at 128 px) emits one 64 x 64 px box whose best class scores about 0.88 (a
seeded random 1x1 projection of the image's features moves the logit by ~0.25, so scores still
depend on the pixels and preprocessing differences show); every other cell scores ~3e-4. So each
image gives exactly 16 boxes at conf 0.25 and 0.5, none suppressed by NMS (neighbours overlap at
IoU 1/3) and each reaching into the image whatever its aspect ratio up to 4:1. YOLO26 is
end-to-end: its ONNX output is [B, 300, 6]; it is trained briefly (4 epochs) and only its layout
is checked. The YOLOv5 (objectness) layout is the v8 network re-exported through a wrapper that
splits its class scores into objectness x class probability.

``predict(rect=False)``: ultralytics' default for .pt models is the minimal rectangle, a
different input than the fixed square the device feeds its static-shape engines; both sides
must see the same pixels for 1e-3 score parity.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ultralytics")
ort = pytest.importorskip("onnxruntime")
cv2 = pytest.importorskip("cv2")

from edge.detection import Detection, iou  # noqa: E402
from edge.vision import decode, letterbox, letterbox_batch  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.train]

IMGSZ = 128
CLASSES = ["red_square", "green_circle", "blue_triangle"]
_COLOURS = [(40, 40, 220), (40, 200, 40), (220, 60, 40)]


def _scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, list[str]]:
    img = np.full((h, w, 3), rng.integers(60, 200, 3), np.uint8)
    img = (img + rng.normal(0, 8, img.shape)).clip(0, 255).astype(np.uint8)
    labels = []
    for _ in range(int(rng.integers(1, 4))):
        c = int(rng.integers(0, 3))
        s = int(rng.integers(max(4, min(h, w) // 6), max(5, min(h, w) // 2)))
        x, y = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
        if c == 0:
            cv2.rectangle(img, (x, y), (x + s, y + s), _COLOURS[c], -1)
        elif c == 1:
            cv2.circle(img, (x + s // 2, y + s // 2), s // 2, _COLOURS[c], -1)
        else:
            cv2.fillPoly(img, [np.array([[x, y + s], [x + s, y + s], [x + s // 2, y]])], _COLOURS[c])
        labels.append(f"{c} {(x + s / 2) / w:.6f} {(y + s / 2) / h:.6f} {s / w:.6f} {s / h:.6f}")
    return img, labels


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("val", 8)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            img, labels = _scene(rng, int(rng.integers(96, 200)), int(rng.integers(96, 200)))
            cv2.imwrite(str(root / "images" / split / f"{i:03d}.jpg"), img)
            (root / "labels" / split / f"{i:03d}.txt").write_text("\n".join(labels) + "\n")
    names = "".join(f"  {i}: {c}\n" for i, c in enumerate(CLASSES))
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{names}")
    return root


@pytest.fixture(scope="module")
def images(shapes) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    out = [cv2.imread(str(p)) for p in sorted((shapes / "images" / "val").glob("*.jpg"))]
    for h, w in ((120, 200), (200, 90), (37, 53), (64, 64), (300, 128)):  # landscape, portrait, tiny, square
        out.append(_scene(rng, h, w)[0])
    out.append(cv2.cvtColor(cv2.cvtColor(out[0], cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR))  # IR-like grey
    return out


def _tiny_yaml(src: str, dst: Path, nc: int | None = None) -> Path:
    """The installed model yaml with its 'n' scale at width 0.125 (file name keeps the 'n' scale)."""
    import re

    from export.yolo_env import ultralytics

    text = (Path(ultralytics().__file__).parent / "cfg" / "models" / src).read_text()
    text, n = re.subn(r"^(  n: \[[0-9.]+), [0-9.]+,", r"\1, 0.125,", text, flags=re.M)
    assert n == 1, f"no 'n' scale line in {src}"
    if nc is not None:
        text, n = re.subn(r"^nc: \d+", f"nc: {nc}", text, flags=re.M)
        assert n == 1, f"no 'nc:' line in {src}"
    dst.write_text(text)
    return dst


def _train(src_yaml: str, name: str, epochs: int, shapes: Path, out: Path, **export_args):
    from export.yolo_env import YOLO

    model = YOLO(_tiny_yaml(src_yaml, out / name))
    model.train(data=str(shapes / "data.yaml"), epochs=epochs, imgsz=IMGSZ, batch=8, nbs=8, optimizer="SGD",
                lr0=0.02, warmup_epochs=0, mosaic=0.0, amp=False, workers=0, device="cpu", project=str(out),
                name="train", exist_ok=True, plots=False, val=False, verbose=False, seed=0, deterministic=True)
    model = YOLO(out / "train" / "weights" / "last.pt")
    onnx_path = Path(model.export(format="onnx", imgsz=IMGSZ, opset=17, dynamic=True, simplify=False,
                                  device="cpu", **export_args))
    return model, onnx_path


CONFIDENT_PER_IMAGE = (IMGSZ // 32) ** 2  # one box per stride-32 cell
_P5 = 2  # index of the stride-32 level in the detect head


def _set_known_head(net, images: list[np.ndarray]) -> None:
    """Set the detect head's last convolutions so the outputs are known (see the module doc).

    Box branch: weights 0; the DFL bias puts each side's distance in bin 1 (one stride), so every
    box is 2 strides square around its cell. Class branch: a seeded random projection scaled to a
    logit spread of 0.25 on these images, plus a bias: class 2 at +2 (score ~0.88) and the others
    at -1 on the stride-32 level; -8 for every class on the finer levels."""
    det = net.model[-1]
    feats: list[list[torch.Tensor]] = [[] for _ in det.cv3]
    hooks = [cls[-1].register_forward_hook(lambda m, i, o, k=k: feats[k].append(i[0].detach()))
             for k, cls in enumerate(det.cv3)]
    net.eval()
    with torch.no_grad():
        for img in images:
            net(torch.from_numpy(letterbox(img, IMGSZ)[0][None]))
    for h in hooks:
        h.remove()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, (box, cls) in enumerate(zip(det.cv2, det.cv3, strict=True)):
            conv = box[-1]
            conv.weight.zero_()
            dfl = torch.zeros(4, det.reg_max)
            dfl[:, 1] = 10.0
            conv.bias.copy_(dfl.flatten())
            conv = cls[-1]
            f = torch.cat([x.flatten(2) for x in feats[i]], 2)  # [1, C, this level's cells on all images]
            w = torch.randn(conv.weight.shape, generator=gen)
            spread = torch.einsum("oc,bca->boa", w[:, :, 0, 0], f).std()
            conv.weight.copy_(w * 0.25 / spread)
            conv.bias.copy_(torch.tensor([-1.0, -1.0, 2.0]) if i == _P5 else torch.full((det.nc,), -8.0))


@pytest.fixture(scope="module")
def v8(images, tmp_path_factory):
    from export.yolo_env import YOLO

    out = tmp_path_factory.mktemp("v8")
    torch.manual_seed(0)
    model = YOLO(_tiny_yaml("v8/yolov8.yaml", out / "yolov8n-tiny.yaml", nc=len(CLASSES)))
    _set_known_head(model.model, images)
    cwd = os.getcwd()
    os.chdir(out)  # a model built from a yaml exports into the working folder, not beside the yaml
    try:
        onnx_path = Path(model.export(format="onnx", imgsz=IMGSZ, opset=17, dynamic=True, simplify=False,
                                      device="cpu")).resolve()
    finally:
        os.chdir(cwd)
    assert onnx_path.parent == out.resolve()
    return model, onnx_path


def _ul(model, img: np.ndarray, conf: float, iou_t: float = 0.45, imgsz=IMGSZ, **kw) -> list[Detection]:
    (r,) = model.predict(img, imgsz=imgsz, conf=conf, iou=iou_t, rect=False, device="cpu", verbose=False, **kw)
    b = r.boxes
    return [Detection(CLASSES[int(c)], float(s), tuple(map(float, xy)), int(c))  # type: ignore[arg-type]
            for xy, s, c in zip(b.xyxy.numpy(), b.conf.numpy(), b.cls.numpy(), strict=True)]


def _ours(session, layout: str, img: np.ndarray, conf: float, iou_t: float = 0.45, imgsz=IMGSZ) -> list[Detection]:
    x, lb = letterbox(img, imgsz)
    (out,) = session.run(None, {session.get_inputs()[0].name: x[None]})
    return decode(out[0], layout, CLASSES, lb, conf=conf, iou=iou_t)


def _assert_same(ours: list[Detection], theirs: list[Detection], where: str) -> float:
    """Same count; each of theirs matched one-to-one by class with IoU >= 0.99, score within 1e-3."""
    assert len(ours) == len(theirs), f"{where}: {len(ours)} detections vs ultralytics' {len(theirs)}"
    free = list(ours)
    worst = 0.0
    for t in theirs:
        cands = [o for o in free if o.cls == t.cls]
        assert cands, f"{where}: no {t.species} to match {t}"
        o = max(cands, key=lambda o: iou(o.box, t.box) - abs(o.score - t.score))
        assert iou(o.box, t.box) >= 0.99, f"{where}: IoU {iou(o.box, t.box):.4f} for {t} vs {o}"
        assert abs(o.score - t.score) <= 1e-3, f"{where}: score {o.score} vs {t.score}"
        worst = max(worst, abs(o.score - t.score))
        free.remove(o)
    return worst


@pytest.mark.parametrize("conf", [0.25, 0.5])
def test_yolov8_onnx_decode_matches_ultralytics(v8, images, conf):
    model, onnx_path = v8
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    total, worst = 0, 0.0
    for i, img in enumerate(images):
        ours, theirs = _ours(session, "yolov8", img, conf), _ul(model, img, conf)
        worst = max(worst, _assert_same(ours, theirs, f"image {i} {img.shape[:2]} conf {conf}"))
        total += len(theirs)
    print(f"yolov8 conf {conf}: {total} detections on {len(images)} images, max score diff {worst:.2e}")
    assert total >= 2 * len(images), f"too few detections ({total}) for the comparison to mean anything"
    assert total == CONFIDENT_PER_IMAGE * len(images)  # the head's known output, whatever the machine


def test_batched_input_gives_the_per_image_answer(v8, images):
    _, onnx_path = v8
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x, lbs = letterbox_batch(images, IMGSZ)
    (out,) = session.run(None, {session.get_inputs()[0].name: x})
    for i, img in enumerate(images):
        batched = decode(out[i], "yolov8", CLASSES, lbs[i])
        _assert_same(batched, _ours(session, "yolov8", img, 0.25), f"image {i} batched")


def test_an_export_at_the_cameras_aspect_matches_ultralytics(v8, images, tmp_path):
    """A model exported at [h, w] (as for a 4:3 camera: export_onnx(imgsz=(96, 128)) pins those
    dims) through the device's letterbox into that rectangle and decode: ultralytics' detections
    at imgsz [96, 128]. The known-head network is exported from memory (a saved .pt reloads in
    fp16, which loses the head's known outputs); export_onnx's own path is checked on the .pt."""
    from export.onnx import _fix_spatial_dims, export_onnx

    model, _ = v8
    cwd = os.getcwd()
    os.chdir(tmp_path)  # a model built from a yaml exports into the working folder
    try:
        path = Path(model.export(format="onnx", imgsz=[96, 128], opset=17, dynamic=True, simplify=False,
                                 device="cpu")).resolve()
    finally:
        os.chdir(cwd)
    _fix_spatial_dims(path, (96, 128))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, 96, 128]
    total = 0
    for i, img in enumerate(images):
        ours = _ours(session, "yolov8", img, 0.25, imgsz=(96, 128))
        _assert_same(ours, _ul(model, img, 0.25, imgsz=[96, 128]), f"image {i} {img.shape[:2]} at 96x128")
        total += len(ours)
    assert total == (96 // 32) * (128 // 32) * len(images)  # the known head: one box per stride-32 cell
    from export.evidence import onnx_engine  # a loose .onnx: its size from ultralytics' metadata, [96, 128]

    engine, entry = onnx_engine(path)
    assert entry.imgsz == (96, 128) and engine.input_shape == (3, 96, 128)
    engine.close()

    pt = tmp_path / "v8.pt"
    model.save(str(pt))
    ex = export_onnx(pt, tmp_path / "rect.onnx", imgsz=(96, 128), simplify=False)
    assert ex.imgsz == (96, 128) and ex.layout == "yolov8"
    s2 = ort.InferenceSession(str(ex.onnx_path), providers=["CPUExecutionProvider"])
    assert s2.get_inputs()[0].shape == ["batch", 3, 96, 128]
    assert export_onnx(pt, tmp_path / "sq.onnx", imgsz=[128, 128], simplify=False).imgsz == 128  # one spelling


def _v5_onnx(model, path: Path) -> Path:
    """Re-export the same network with MegaDetector v5's output: [B, A, 5+nc], obj x cls = score."""

    class V5Layout(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            y = self.net(x)
            y = (y[0] if isinstance(y, (list, tuple)) else y).transpose(1, 2)  # [B, A, 4+nc]
            cls = y[..., 4:]
            obj = cls.amax(-1, keepdim=True)
            return torch.cat([y[..., :4], obj, cls / obj.clamp_min(1e-12)], -1)

    wrapper = V5Layout(model.model.float().eval()).eval()
    torch.onnx.export(wrapper, (torch.zeros(1, 3, IMGSZ, IMGSZ),), str(path), dynamo=False, opset_version=17,
                      input_names=["images"], output_names=["output0"],
                      dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}})
    return path


def test_yolov5_layout_gives_the_same_detections(v8, images, tmp_path):
    model, onnx_path = v8
    v8s = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    v5s = ort.InferenceSession(str(_v5_onnx(model, tmp_path / "v5.onnx")), providers=["CPUExecutionProvider"])
    (out,) = v5s.run(None, {"images": np.zeros((2, 3, IMGSZ, IMGSZ), np.float32)})
    assert out.shape[0] == 2 and out.shape[2] == 5 + len(CLASSES)  # [B, A, 5+nc], dynamic batch
    total = 0
    for i, img in enumerate(images):
        a = _ours(v5s, "yolov5", img, 0.25)
        _assert_same(a, _ours(v8s, "yolov8", img, 0.25), f"image {i} v5 vs v8")
        _assert_same(a, _ul(model, img, 0.25), f"image {i} v5 vs ultralytics")
        total += len(a)
    assert total > 0


class _E2ELayout(torch.nn.Module):
    """The v8 network with an NMS-free head's output: top-300 anchors as [B, 300, 6] x1y1x2y2, score, class."""

    def __init__(self, net, k: int = 300):
        super().__init__()
        self.net, self.k = net, k

    def forward(self, x):
        y = self.net(x)
        y = (y[0] if isinstance(y, (list, tuple)) else y).transpose(1, 2)  # [B, A, 4+nc]
        xy, wh = y[..., :2], y[..., 2:4]
        boxes = torch.cat([xy - wh / 2, xy + wh / 2], -1)
        score, cls = y[..., 4:].max(-1)
        top, idx = score.topk(min(self.k, score.shape[1]), dim=1)
        boxes = boxes.gather(1, idx[..., None].expand(-1, -1, 4))
        return torch.cat([boxes, top[..., None], cls.gather(1, idx)[..., None].float()], -1)


def _ul_end2end(wrapper, img: np.ndarray, conf: float) -> list[Detection]:
    """Ultralytics' own pre/post-processing (LetterBox, non_max_suppression(end2end), scale_boxes) on
    the torch wrapper: the reference the ONNX path must match."""
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils import nms, ops

    im = LetterBox((IMGSZ, IMGSZ), auto=False)(image=img)
    x = torch.from_numpy(np.ascontiguousarray(im[:, :, ::-1].transpose(2, 0, 1))).float()[None] / 255
    with torch.no_grad():
        (pred,) = nms.non_max_suppression(wrapper(x), conf, 0.45, end2end=True)
    pred[:, :4] = ops.scale_boxes(im.shape[:2], pred[:, :4], img.shape)
    return [Detection(CLASSES[int(p[5])], float(p[4]), tuple(map(float, p[:4])), int(p[5]))  # type: ignore[arg-type]
            for p in pred.numpy()]


def test_end2end_layout_matches_ultralytics_postprocessing(v8, images, tmp_path):
    model, _ = v8
    wrapper = _E2ELayout(model.model.float().eval()).eval()
    path = tmp_path / "e2e.onnx"
    torch.onnx.export(wrapper, (torch.zeros(1, 3, IMGSZ, IMGSZ),), str(path), dynamo=False, opset_version=17,
                      input_names=["images"], output_names=["output0"],
                      dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    total = 0
    for i, img in enumerate(images):
        ours = _ours(session, "end2end", img, 0.25)
        _assert_same(ours, _ul_end2end(wrapper, img, 0.25), f"image {i} end2end wrapper")
        total += len(ours)
    assert total >= 2 * len(images)


@pytest.fixture(scope="module")
def yolo26(shapes, tmp_path_factory):
    return _train("26/yolo26.yaml", "yolo26n-tiny.yaml", 4, shapes, tmp_path_factory.mktemp("yolo26"),
                  nms=False)  # nms=False: the NMS-free one-to-one head (the default exports raw one-to-many)


def test_real_yolo26_export_is_the_end2end_layout(yolo26, images):
    """A real YOLO26 export: [B, 300, 6] whose boxes and classes decode as ultralytics reads them.

    Four epochs leave YOLO26's one-to-one scores near 0.004 (it learns slower than v8), so this
    compares at conf 0.001: decoding end-to-end output has no NMS, the threshold is only a filter,
    and what is checked is the layout (x1y1x2y2 in input pixels, score, class) and the box mapping.
    The score-bearing end-to-end check is the wrapper test above.
    """
    model, onnx_path = yolo26  # predict(nms=False) selects the same one-to-one head as the export
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"images": np.zeros((2, 3, IMGSZ, IMGSZ), np.float32)})
    assert out.shape == (2, 300, 6)
    total = 0
    for i, img in enumerate(images):
        ours, theirs = _ours(session, "end2end", img, 0.001), _ul(model, img, 0.001, nms=False)
        _assert_same(ours, theirs, f"image {i} yolo26")
        total += len(theirs)
    assert total >= len(images)
