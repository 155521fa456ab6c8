"""edge.vision on hand-made tensors: letterbox geometry, the three layouts, NMS (no torch)."""

from __future__ import annotations

import numpy as np
import pytest

from edge.detection import iou
from edge.vision import (
    MAX_WH,
    Letterbox,
    decode,
    letterbox,
    letterbox_batch,
    letterbox_uint8,
    nms,
    xywh2xyxy,
)

CLASSES = ["lynx", "fox", "deer"]
IDENTITY = Letterbox(scale=1.0, pad=(0.0, 0.0), shape=(160, 160))


# --- letterbox -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("h", "w", "size"),
    [(480, 640, 160), (640, 480, 160), (7, 3, 128), (1, 3000, 160), (1080, 1920, 640), (160, 160, 160)],
)
def test_letterbox_shape_pad_and_content(h, w, size):
    rng = np.random.default_rng(h * w)
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    x, lb = letterbox(img, size)
    assert x.shape == (3, size, size) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    new_w, new_h = lb.resized
    left, top = int(lb.pad[0]), int(lb.pad[1])
    # ultralytics' rule: the odd pixel of padding goes right/bottom
    assert left == round((size - new_w) / 2 - 0.1) and top == round((size - new_h) / 2 - 0.1)
    assert left + new_w <= size and top + new_h <= size
    assert lb.shape == (h, w)
    # padding is grey 114; the image region is not all padding
    u8, _ = letterbox_uint8(img, size)
    if left:
        assert (u8[:, :left] == 114).all()
    if top:
        assert (u8[:top] == 114).all()
    if size - left - new_w:
        assert (u8[:, left + new_w :] == 114).all()
    # channel order: CHW RGB from BGR input
    np.testing.assert_allclose(x[0], u8[:, :, 2] / 255.0, atol=1e-7)
    np.testing.assert_allclose(x[2], u8[:, :, 0] / 255.0, atol=1e-7)


def test_letterbox_is_ultralytics_arithmetic_on_a_known_case():
    # 480x640 into 160: r = 0.25, 160x120 image, 40 px of vertical padding split 20/20
    _x, lb = letterbox(np.zeros((480, 640, 3), np.uint8), 160)
    assert lb.scale == 0.25 and lb.pad == (0.0, 20.0) and lb.resized == (160, 120)
    # 5x3 into 128: r = 25.6, 77x128 image (76.8 rounds up), 51 px of padding split 25/26
    _, lb = letterbox(np.zeros((5, 3, 3), np.uint8), 128)
    assert lb.resized == (77, 128) and lb.pad == (25.0, 0.0)
    assert lb.gain == (77 / 3, 128 / 5)


def test_letterbox_into_a_rectangle():
    """A model exported at the camera's aspect ([h, w]): ultralytics' LetterBox(new_shape=(h, w))."""
    # a 2048x1440 frame into 480x640: r = 0.3125, 640x450, 30 px of vertical padding split 15/15
    x, lb = letterbox(np.zeros((1440, 2048, 3), np.uint8), (480, 640))
    assert x.shape == (3, 480, 640)
    assert lb.scale == 0.3125 and lb.resized == (640, 450) and lb.pad == (0.0, 15.0)
    # the same frame upright (portrait) into the landscape input: the height decides, r = 480/2048,
    # 1440 x r = 337.5 rounds (half to even, as ultralytics' round) to 338, 302 px split 151/151
    _, lb = letterbox(np.zeros((2048, 1440, 3), np.uint8), (480, 640))
    assert lb.resized == (338, 480) and lb.pad == (151.0, 0.0)
    # [s, s] is the square s, bit for bit
    img = np.random.default_rng(0).integers(0, 255, (300, 500, 3), np.uint8)
    a, b = letterbox_batch([img, img[:, ::-1]], (160, 160)), letterbox_batch([img, img[:, ::-1]], 160)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    # a box maps back through the rectangle exactly as through a square
    boxes = np.array([[10.0, 20.0, 400.0, 290.0]])
    rect = letterbox(img, (96, 128))[1]
    np.testing.assert_allclose(rect.to_original(rect.to_input(boxes)), boxes, atol=1e-9)
    with pytest.raises(ValueError, match="size must be positive"):
        letterbox(img, (0, 128))


@pytest.mark.parametrize(("h", "w"), [(480, 640), (640, 480), (9, 13), (2000, 300)])
def test_box_round_trip_through_letterbox(h, w):
    _, lb = letterbox(np.zeros((h, w, 3), np.uint8), 160)
    boxes = np.array([[0, 0, w, h], [w * 0.1, h * 0.2, w * 0.6, h * 0.9]])
    back = lb.to_original(lb.to_input(boxes))
    np.testing.assert_allclose(back, boxes, atol=1e-6 * max(h, w))
    # input-space boxes land inside the letterboxed image region
    inp = lb.to_input(boxes)
    assert inp[0, 0] == pytest.approx(lb.pad[0]) and inp[0, 2] == pytest.approx(lb.pad[0] + lb.resized[0])


def test_to_original_clips_to_the_image():
    _, lb = letterbox(np.zeros((480, 640, 3), np.uint8), 160)
    out = lb.to_original(np.array([[-10, 0, 170, 200]]))
    np.testing.assert_allclose(out, [[0, 0, 640, 480]])


def test_letterbox_accepts_grey_and_bgra_and_rejects_junk():
    grey = np.full((30, 40), 200, np.uint8)
    x, _ = letterbox(grey, 64)
    assert x.shape == (3, 64, 64)
    np.testing.assert_allclose(x[0], x[1])
    x4, _ = letterbox(np.full((30, 40, 4), 10, np.uint8), 64)
    assert x4.shape == (3, 64, 64)
    with pytest.raises(ValueError, match="uint8"):
        letterbox(np.zeros((10, 10, 3), np.float32), 64)
    with pytest.raises(ValueError, match="non-empty"):
        letterbox(np.zeros((0, 10, 3), np.uint8), 64)
    with pytest.raises(ValueError, match="shape"):
        letterbox(np.zeros((10, 10, 2), np.uint8), 64)


def test_letterbox_batch_stacks_images_of_different_shapes():
    imgs = [np.zeros((480, 640, 3), np.uint8), np.zeros((640, 480, 3), np.uint8)]
    x, lbs = letterbox_batch(imgs, 96)
    assert x.shape == (2, 3, 96, 96)
    assert lbs[0].pad[1] > 0 and lbs[1].pad[0] > 0
    single, _ = letterbox(imgs[1], 96)
    np.testing.assert_array_equal(x[1], single)
    with pytest.raises(ValueError):
        letterbox_batch([], 96)


@pytest.mark.parametrize("size", [96, 160, 640])
def test_letterbox_batch_in_one_pass_equals_the_per_image_uint8_path(size):
    """The batch is resized into one canvas and converted in one operation; every image must
    come out bit-identical to letterbox_uint8 + BGR->RGB + CHW + float32 / 255 (the old path)."""
    rng = np.random.default_rng(size)
    imgs = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in
            [(480, 640, 3), (640, 480, 3), (size, size, 3), (7, 3, 3), (1, 3000, 3), (90, 120), (50, 70, 4)]]
    x, lbs = letterbox_batch(imgs, size)
    for i, img in enumerate(imgs):
        u8, lb = letterbox_uint8(img, size)
        ref = np.ascontiguousarray(u8[:, :, ::-1].transpose(2, 0, 1)).astype(np.float32) / np.float32(255.0)
        np.testing.assert_array_equal(x[i], ref, err_msg=str(img.shape))
        assert lb == lbs[i]


# --- hand-made raw outputs -------------------------------------------------------------------
def v8_output(rows: list[tuple[float, float, float, float, list[float]]], nc: int = 3) -> np.ndarray:
    """rows of (cx, cy, w, h, class scores) -> [4+nc, A], padded with junk anchors at score 0.01."""
    a = np.full((4 + nc, len(rows) + 5), 0.01, np.float32)
    a[:4, len(rows):] = [[10], [10], [4], [4]]
    for i, (cx, cy, w, h, s) in enumerate(rows):
        a[:4, i] = (cx, cy, w, h)
        a[4:, i] = s
    return a


def test_yolov8_known_boxes_survive_and_overlaps_are_suppressed():
    out = v8_output([
        (50, 50, 20, 20, [0.9, 0.1, 0.0]),  # lynx
        (51, 51, 20, 20, [0.8, 0.0, 0.0]),  # same lynx, weaker: suppressed
        (120, 100, 30, 10, [0.0, 0.0, 0.6]),  # deer elsewhere
        (10, 140, 8, 8, [0.2, 0.0, 0.0]),  # below 0.25
    ])
    dets = decode(out, "yolov8", CLASSES, IDENTITY, model="global")
    assert [(d.species, round(d.score, 3)) for d in dets] == [("lynx", 0.9), ("deer", 0.6)]
    assert dets[0].box == pytest.approx((40, 40, 60, 60))
    assert dets[1].box == pytest.approx((105, 95, 135, 105))
    assert dets[0].cls == 0 and dets[1].cls == 2 and dets[0].model == "global"
    assert dets[0].scores == pytest.approx((0.9, 0.1, 0.0))


def test_class_aware_vs_agnostic_nms():
    out = v8_output([(50, 50, 20, 20, [0.9, 0.0, 0.0]), (52, 50, 20, 20, [0.0, 0.7, 0.0])])
    aware = decode(out, "yolov8", CLASSES, IDENTITY)
    agnostic = decode(out, "yolov8", CLASSES, IDENTITY, agnostic=True)
    assert [d.species for d in aware] == ["lynx", "fox"]
    assert [d.species for d in agnostic] == ["lynx"]


def test_iou_threshold_is_strictly_above():
    # boxes 30x10 shifted by 10: IoU exactly 0.5; torchvision keeps a box whose IoU equals the threshold
    boxes = np.array([[0, 0, 30, 10], [10, 0, 40, 10]], float)
    assert nms(boxes, np.array([0.9, 0.8]), 0.5).tolist() == [0, 1]
    assert nms(boxes, np.array([0.9, 0.8]), 0.49).tolist() == [0]
    out = v8_output([(15, 5, 30, 10, [0.9, 0, 0]), (25, 5, 30, 10, [0.8, 0, 0])])
    assert len(decode(out, "yolov8", CLASSES, IDENTITY, iou=0.5)) == 2
    assert len(decode(out, "yolov8", CLASSES, IDENTITY, iou=0.45)) == 1


def test_per_class_thresholds_and_best_class_only():
    out = v8_output([
        (30, 30, 10, 10, [0.5, 0.0, 0.0]),
        (90, 90, 10, 10, [0.0, 0.5, 0.0]),
        (130, 130, 10, 10, [0.3, 0.0, 0.45]),  # best class deer 0.45; lynx 0.3 is not a second label
    ])
    dets = decode(out, "yolov8", CLASSES, IDENTITY, conf={"lynx": 0.6, "*": 0.4})
    assert sorted(d.species for d in dets) == ["deer", "fox"]
    dets = decode(out, "yolov8", CLASSES, IDENTITY, conf={"fox": 0.55})  # others use 0.25
    assert sorted(d.species for d in dets) == ["deer", "lynx"]
    # score equal to the floor is out (ultralytics keeps strictly above)
    assert decode(out, "yolov8", CLASSES, IDENTITY, conf=0.5) == []
    with pytest.raises(ValueError, match="unknown classes"):
        decode(out, "yolov8", CLASSES, IDENTITY, conf={"wolf": 0.3})


def test_max_det_keeps_the_best():
    rows = [(10 + 20 * i, 10, 10, 10, [0.3 + 0.05 * i, 0, 0]) for i in range(7)]
    dets = decode(v8_output(rows), "yolov8", CLASSES, IDENTITY, max_det=3)
    assert [round(d.score, 2) for d in dets] == [0.6, 0.55, 0.5]


def test_boxes_map_back_to_original_pixels():
    img = np.zeros((480, 640, 3), np.uint8)
    _, lb = letterbox(img, 160)  # r = 0.25, pad top 20
    out = v8_output([(80, 80, 40, 20, [0, 0.9, 0])])
    (d,) = decode(out, "yolov8", CLASSES, lb)
    assert d.box == pytest.approx((240, 200, 400, 280))
    # a box over the padding is clipped to the image
    out = v8_output([(80, 10, 40, 20, [0, 0.9, 0])])
    (d,) = decode(out, "yolov8", CLASSES, lb)
    assert d.box[1] == 0 and d.box[3] == pytest.approx(0)


def test_yolov5_layout_scores_are_objectness_times_class():
    a = np.zeros((6, 5 + 3), np.float32)
    a[0] = (50, 50, 20, 20, 0.9, 0.1, 0.9, 0.0)  # fox 0.81
    a[1] = (51, 50, 20, 20, 0.8, 0.0, 1.0, 0.0)  # fox 0.8, overlaps: suppressed
    a[2] = (120, 120, 20, 20, 0.5, 0.0, 0.0, 1.0)  # deer 0.5
    a[3] = (20, 120, 20, 20, 0.9, 0.25, 0.25, 0.25)  # 0.225: below 0.25 though objectness is high
    a[4:, :4] = (5, 5, 2, 2)
    dets = decode(a, "yolov5", CLASSES, IDENTITY)
    assert [(d.species, round(d.score, 3)) for d in dets] == [("fox", 0.81), ("deer", 0.5)]
    assert dets[0].scores == pytest.approx((0.09, 0.81, 0.0))
    # the same boxes in the v8 layout decode identically
    v8 = np.concatenate([a[:, :4], a[:, 5:] * a[:, 4:5]], 1).T
    assert decode(v8, "yolov8", CLASSES, IDENTITY) == dets


def test_end2end_layout_filters_without_nms():
    a = np.zeros((300, 6), np.float32)
    a[0] = (40, 40, 60, 60, 0.9, 2)
    a[1] = (41, 41, 61, 61, 0.7, 2)  # overlapping, kept: the model already did NMS
    a[2] = (0, 0, 10, 10, 0.3, 1)
    dets = decode(a, "end2end", CLASSES, IDENTITY, conf={"fox": 0.5})
    assert [(d.species, round(d.score, 2)) for d in dets] == [("deer", 0.9), ("deer", 0.7)]
    assert dets[0].box == pytest.approx((40, 40, 60, 60)) and dets[0].scores == ()
    assert len(decode(a, "end2end", CLASSES, IDENTITY, max_det=1)) == 1
    a[3] = (0, 0, 10, 10, 0.9, 7)
    with pytest.raises(ValueError, match="class index 7"):
        decode(a, "end2end", CLASSES, IDENTITY)


def test_batch_dim_of_one_is_accepted_and_bad_shapes_are_named():
    out = v8_output([(50, 50, 20, 20, [0.9, 0, 0])])
    assert decode(out[None], "yolov8", CLASSES, IDENTITY) == decode(out, "yolov8", CLASSES, IDENTITY)
    with pytest.raises(ValueError, match=r"\[7, anchors\]"):
        decode(out[:6], "yolov8", CLASSES, IDENTITY)
    with pytest.raises(ValueError, match=r"\[anchors, 8\]"):
        decode(out, "yolov5", CLASSES, IDENTITY)
    with pytest.raises(ValueError, match="2-D"):
        decode(np.zeros((2, 7, 5)), "yolov8", CLASSES, IDENTITY)
    with pytest.raises(ValueError, match="unknown layout"):
        decode(out, "yolov9", CLASSES, IDENTITY)  # type: ignore[arg-type]


def test_nothing_above_threshold_gives_no_detections():
    assert decode(v8_output([]), "yolov8", CLASSES, IDENTITY) == []
    assert decode(np.zeros((0, 6)), "end2end", CLASSES, IDENTITY) == []


# --- nms -------------------------------------------------------------------------------------
def test_nms_greedy_order_and_chain():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [8, 0, 18, 10], [100, 100, 110, 110]], float)
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    # box 1 is suppressed by 0; box 2 overlaps 1 but not 0 enough, so it survives (greedy)
    assert nms(boxes, scores, 0.5).tolist() == [0, 2, 3]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []
    with pytest.raises(ValueError):
        nms(boxes, scores[:2], 0.5)


def test_nms_matches_brute_force_on_random_boxes():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(1, 40))
        xy = rng.uniform(0, 100, (n, 2))
        wh = rng.uniform(5, 40, (n, 2))
        boxes = np.concatenate([xy, xy + wh], 1)
        scores = rng.uniform(0, 1, n)
        kept = nms(boxes, scores, 0.45)
        # every dropped box overlaps a kept higher-scoring box; kept boxes never overlap each other
        for i in range(n):
            ovl = [iou(tuple(boxes[i]), tuple(boxes[k])) for k in kept if scores[k] > scores[i]]
            assert (i in kept) == (not any(o > 0.45 for o in ovl))


def test_class_offset_separates_classes_in_nms():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], float)
    cls = np.array([0, 1])
    assert len(nms(boxes + cls[:, None] * MAX_WH, np.array([0.9, 0.8]), 0.5)) == 2


def _reference_decode(out: np.ndarray, layout: str, nc: int, thr: float | np.ndarray, iou: float) -> list[tuple]:
    """The straightforward decode (transpose, score every anchor, then NMS): what the
    vectorised ``decode`` must reproduce exactly."""
    if layout == "yolov8":
        rows = out.T
        xywh, cls_scores = rows[:, :4], rows[:, 4:]
    else:
        xywh, cls_scores = out[:, :4], out[:, 5:] * out[:, 4:5]
    j = cls_scores.argmax(1)
    best = cls_scores[np.arange(len(j)), j]
    keep = best > (thr[j] if isinstance(thr, np.ndarray) else thr)
    xywh, j, best = xywh[keep], j[keep], best[keep]
    boxes = xywh2xyxy(xywh)
    kept = nms(boxes + j[:, None].astype(np.float32) * 7680, best, iou)
    return [(int(j[k]), float(best[k]), *np.clip(boxes[k], 0, 320).tolist()) for k in kept]  # 320 px image


@pytest.mark.parametrize("layout", ["yolov8", "yolov5"])
def test_vectorised_decode_equals_the_reference(layout):
    rng = np.random.default_rng(7)
    nc, a = 5, 2100
    xywh = np.column_stack([rng.uniform(0, 320, a), rng.uniform(0, 320, a), rng.uniform(4, 80, (a, 2))])
    probs = rng.beta(0.3, 3.0, (a, nc))  # mostly low scores, a few hundred above the floor
    if layout == "yolov8":
        out = np.vstack([xywh.T, probs.T]).astype(np.float32)
    else:
        out = np.column_stack([xywh, rng.uniform(0.2, 1.0, a), probs]).astype(np.float32)
    lb = Letterbox(scale=1.0, pad=(0.0, 0.0), shape=(320, 320))
    got = decode(out, layout, [f"c{i}" for i in range(nc)], lb, conf=0.3, iou=0.5, max_det=10_000)
    ref = _reference_decode(out, layout, nc, 0.3, 0.5)
    assert len(ref) > 50
    assert [(d.cls, d.score) for d in got] == [(c, s) for c, s, *_ in ref]
    np.testing.assert_allclose([d.box for d in got], [r[2:] for r in ref], atol=1e-3)


@pytest.mark.parametrize("layout", ["yolov8", "yolov5"])
def test_per_class_floors_equal_the_reference(layout):
    """Each anchor is judged by its best class's own floor (decode first screens anchors by the
    lowest floor, then applies each one's own)."""
    rng = np.random.default_rng(3)
    nc, a = 4, 2100
    xywh = np.column_stack([rng.uniform(0, 320, a), rng.uniform(0, 320, a), rng.uniform(4, 80, (a, 2))])
    probs = rng.beta(0.4, 2.0, (a, nc))
    out = (np.vstack([xywh.T, probs.T]) if layout == "yolov8"
           else np.column_stack([xywh, np.ones(a), probs])).astype(np.float32)
    floors = np.array([0.3, 0.9, 0.5, 0.7])
    lb = Letterbox(scale=1.0, pad=(0.0, 0.0), shape=(320, 320))
    got = decode(out, layout, [f"c{i}" for i in range(nc)], lb, conf=floors, iou=0.5, max_det=10_000)
    ref = _reference_decode(out, layout, nc, floors, 0.5)
    assert len(ref) > 50 and {c for c, *_ in ref} == {0, 1, 2, 3}
    assert [(d.cls, d.score) for d in got] == [(c, s) for c, s, *_ in ref]


def test_yolov8_decode_does_not_copy_the_class_scores():
    """The hot path reads a [4+nc, A] output without copying its class block: numpy's argmax along
    axis 0 transposes the whole block first (2.7 MB per image at 640 px, 80 classes)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    nc, a = 80, 8400
    out = np.vstack([rng.uniform(0, 640, (4, a)), rng.uniform(0, 0.2, (nc, a))]).astype(np.float32)
    out[4 + 7, :20] = 0.9  # a few candidates
    lb = Letterbox(scale=1.0, pad=(0.0, 0.0), shape=(640, 640))
    classes = [f"c{i}" for i in range(nc)]
    decode(out, "yolov8", classes, lb, conf=0.25)
    tracemalloc.start()
    try:
        dets = decode(out, "yolov8", classes, lb, conf=0.25)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert dets and all(d.cls == 7 for d in dets)
    assert peak < out[4:].nbytes / 8, f"decode allocated {peak / 1e6:.2f} MB for a {out[4:].nbytes / 1e6:.2f} MB block"
