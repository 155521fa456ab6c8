"""Small, real ONNX models for the device tests, written without the `onnx` package.

Why not `onnx.helper`: the device venv (.venv-edge) has onnxruntime but not `onnx`, and the
tests must run there. ONNX files are protobuf messages, and the handful of fields a tiny graph
needs are easy to encode by hand (field numbers from onnx/onnx.proto), so tests can build
models of any size, class count and layout at run time instead of shipping binary blobs.
ONNX Runtime parsing and running these files is the check that the encoding is right; the
workstation venv can also confirm it with ``onnx.checker`` (see ``__main__``).

The model maps a ``[N, 3, S, S]`` image batch to a YOLO-shaped output, deterministically:

    AveragePool(stride) -> Conv 1x1 -> Reshape [N, 4+nc, A] -> Sigmoid -> * M + C

so each grid cell is one anchor, whose box is near the cell centre and whose class-k score
rises with the mean of colour channel k % 3 in that cell. A bright patch that fills one cell
therefore yields one clear detection of a known class, which is what the self-test needs.
``layout="yolov5"`` adds an objectness row and transposes to ``[N, A, 5+nc]``.
"""

from __future__ import annotations

import struct

import numpy as np

# --- minimal protobuf writer ---------------------------------------------------------------


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 negatives are 10-byte two's complement varints
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint((field << 3) | wire)


def _int(field: int, v: int) -> bytes:
    return _key(field, 0) + _varint(v)


def _bytes(field: int, v: bytes | str) -> bytes:
    b = v.encode() if isinstance(v, str) else v
    return _key(field, 2) + _varint(len(b)) + b


def _float(field: int, v: float) -> bytes:
    return _key(field, 5) + struct.pack("<f", v)


# --- ONNX messages (field numbers from onnx.proto) -------------------------------------------
FLOAT, INT64 = 1, 7  # TensorProto.DataType
ATTR_FLOAT, ATTR_INT, ATTR_INTS = 1, 2, 7  # AttributeProto.AttributeType


def tensor(name: str, arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr)
    dtype = {np.dtype(np.float32): FLOAT, np.dtype(np.int64): INT64}[arr.dtype]
    body = b"".join(_int(1, d) for d in arr.shape)  # dims
    body += _int(2, dtype) + _bytes(8, name) + _bytes(9, arr.tobytes())  # data_type, name, raw_data
    return body


def attr(name: str, value: int | float | list[int]) -> bytes:
    body = _bytes(1, name)
    if isinstance(value, list):
        body += b"".join(_int(8, v) for v in value) + _int(20, ATTR_INTS)
    elif isinstance(value, float):
        body += _float(2, value) + _int(20, ATTR_FLOAT)
    else:
        body += _int(3, value) + _int(20, ATTR_INT)
    return body


def node(op: str, inputs: list[str], outputs: list[str], name: str, **attrs) -> bytes:
    body = b"".join(_bytes(1, i) for i in inputs) + b"".join(_bytes(2, o) for o in outputs)
    body += _bytes(3, name) + _bytes(4, op)
    body += b"".join(_bytes(5, attr(k, v)) for k, v in attrs.items())
    return body


def value_info(name: str, dims: list[int | str]) -> bytes:
    shape = b"".join(
        _bytes(1, _bytes(2, d) if isinstance(d, str) else _int(1, d)) for d in dims
    )  # TensorShapeProto.dim -> Dimension{dim_param=2 | dim_value=1}
    tensor_type = _int(1, FLOAT) + _bytes(2, shape)
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor_type))  # ValueInfo{name, TypeProto{tensor_type}}


def model(nodes: list[bytes], inputs: list[bytes], outputs: list[bytes], inits: list[bytes],
          opset: int = 13, ir_version: int = 8, graph_name: str = "g") -> bytes:
    graph = b"".join(_bytes(1, n) for n in nodes) + _bytes(2, graph_name)
    graph += b"".join(_bytes(5, t) for t in inits)
    graph += b"".join(_bytes(11, i) for i in inputs) + b"".join(_bytes(12, o) for o in outputs)
    opset_id = _bytes(1, "") + _int(2, opset)
    return _int(1, ir_version) + _bytes(2, "camtrap-tests") + _bytes(7, graph) + _bytes(8, opset_id)


# --- the YOLO-shaped test model -------------------------------------------------------------


def yolo_like(nc: int, imgsz: int | tuple[int, int] = 64, stride: int = 16, layout: str = "yolov8",
              gain: float = 12.0, input_name: str = "images", output_name: str = "output0",
              static_batch: int | None = None) -> bytes:
    """A deterministic YOLO-shaped ONNX model (see module docstring); ``imgsz`` a square's side or (h, w)."""
    in_h, in_w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    if in_h % stride or in_w % stride:
        raise ValueError("imgsz must be a multiple of stride")
    gh, g = in_h // stride, in_w // stride
    a = gh * g
    rows = 4 + nc + (1 if layout == "yolov5" else 0)
    # conv 1x1: box rows see nothing (constant offsets), class k sees channel k % 3
    w = np.zeros((rows, 3, 1, 1), np.float32)
    b = np.zeros(rows, np.float32)
    first_cls = 4
    if layout == "yolov5":  # objectness: brightest channel sum, always fairly high on a patch
        w[4, :, 0, 0] = gain / 3
        b[4] = -gain / 6
        first_cls = 5
    for k in range(nc):
        w[first_cls + k, k % 3, 0, 0] = gain * (1 + 0.1 * (k // 3))  # later classes slightly louder
        w[first_cls + k, (k + 1) % 3, 0, 0] = -gain * 0.5
        b[first_cls + k] = -gain * 0.5
    # box rows: small input dependence so they are a real function of the pixels
    w[0:4, :, 0, 0] = 0.3
    # M and C map sigmoid outputs to pixels: cx, cy around the cell centre; w, h in [s, 3s]
    ys, xs = np.divmod(np.arange(a), g)
    m = np.ones((1, rows, a), np.float32)
    c = np.zeros((1, rows, a), np.float32)
    m[0, 0], c[0, 0] = stride, (xs + 0.5) * stride - stride / 2
    m[0, 1], c[0, 1] = stride, (ys + 0.5) * stride - stride / 2
    m[0, 2:4], c[0, 2:4] = 2 * stride, stride
    batch: int | str = static_batch if static_batch else "batch"
    nodes = [
        node("AveragePool", [input_name], ["pooled"], "pool", kernel_shape=[stride, stride],
             strides=[stride, stride]),
        node("Conv", ["pooled", "W", "B"], ["conv"], "conv", kernel_shape=[1, 1]),
        node("Reshape", ["conv", "shape"], ["flat"], "reshape"),
        node("Sigmoid", ["flat"], ["sig"], "sigmoid"),
        node("Mul", ["sig", "M"], ["scaled"], "mul"),
    ]
    inits = [tensor("W", w), tensor("B", b), tensor("shape", np.array([0, rows, a], np.int64)),
             tensor("M", m), tensor("C", c)]
    if layout == "yolov5":
        nodes.append(node("Add", ["scaled", "C"], ["yolo"], "add"))
        nodes.append(node("Transpose", ["yolo"], [output_name], "transpose", perm=[0, 2, 1]))
        out_dims: list[int | str] = [batch, a, rows]
    elif layout == "yolov8":
        nodes.append(node("Add", ["scaled", "C"], [output_name], "add"))
        out_dims = [batch, rows, a]
    else:
        raise ValueError(f"layout {layout!r} not supported by the test model")
    return model(nodes, [value_info(input_name, [batch, 3, in_h, in_w])],
                 [value_info(output_name, out_dims)], inits)


def patch_image(imgsz: int, stride: int, cell: tuple[int, int], channel: int, scale: int = 1,
                value: int = 230) -> np.ndarray:
    """A dark BGR uint8 image (``scale`` x the model size) with one bright patch filling a grid cell.

    ``channel`` is the RGB channel index the model reads (0 = R), so class ``channel`` fires.
    """
    size = imgsz * scale
    img = np.full((size, size, 3), 20, np.uint8)
    r, c = cell
    s = stride * scale
    img[r * s:(r + 1) * s, c * s:(c + 1) * s, 2 - channel] = value  # BGR storage of an RGB channel
    return img


if __name__ == "__main__":  # cross-check with the real onnx package (workstation venv)
    import onnx

    for lay in ("yolov8", "yolov5"):
        m = onnx.load_from_string(yolo_like(3, layout=lay))
        onnx.checker.check_model(m, full_check=True)
        print(lay, "ok:", [n.op_type for n in m.graph.node], m.graph.output[0].type.tensor_type.shape)


# --- a complete test bundle (private to the tests; the real writer is export/bundle.py) ---------

GLOBAL_CLASSES = ["Lynx pardinus", "Felis silvestris", "Vulpes vulpes"]
TEST_GROUPS = {"felids": ["Lynx pardinus", "Felis silvestris"], "canids": ["Vulpes vulpes"]}
IMGSZ, STRIDE = 64, 16


def sample_images() -> dict[str, np.ndarray]:
    """Three one-animal frames (one per colour channel, i.e. per global class) and an empty one."""
    imgs = {f"samples/patch{ch}.png": patch_image(IMGSZ, STRIDE, (1 + ch % 2, ch + 1), ch, scale=2) for ch in range(3)}
    imgs["samples/empty.png"] = np.full((IMGSZ * 2, IMGSZ * 3, 3), 20, np.uint8)  # not square: real letterbox
    return imgs


def write_test_bundle(root, *, sign_key: bytes | None = None, layout: str = "yolov8", version: str = "2026.1.0",
                      with_samples: bool = True):
    """A real bundle folder: a global model and two experts (real ONNX), samples whose expected
    outputs come from the ONNX Runtime engine and the device decoder, an optional signature."""
    import hashlib
    from pathlib import Path

    import cv2

    from edge.engines import create_engine, detect_batch
    from edge.manifest import Manifest, ModelEntry, SampleEntry, species_codes
    from edge.vision import letterbox_batch

    root = Path(root)
    (root / "models").mkdir(parents=True)
    specs = [("global", "global", None, GLOBAL_CLASSES)] + [
        (g, "expert", g, members) for g, members in TEST_GROUPS.items()]
    entries = []
    for name, role, group, classes in specs:
        blob = yolo_like(len(classes), IMGSZ, STRIDE, layout=layout)
        (root / "models" / f"{name}.onnx").write_bytes(blob)
        entries.append(ModelEntry(name=name, file=f"models/{name}.onnx", sha256=hashlib.sha256(blob).hexdigest(),
                                  role=role, group=group, classes=classes, imgsz=IMGSZ, layout=layout,
                                  class_thresholds={classes[0]: 0.3}))
    samples = []
    if with_samples:
        (root / "samples").mkdir()
        imgs = sample_images()
        for rel, img in imgs.items():
            cv2.imwrite(str(root / rel), img)
        expected: dict[str, dict[str, list[dict]]] = {rel: {} for rel in imgs}
        for e in entries:
            with create_engine("onnxruntime", root / e.file, e) as eng:
                x, lbs = letterbox_batch([cv2.imread(str(root / rel)) for rel in imgs], e.imgsz)
                for rel, dets in zip(imgs, detect_batch(eng.infer(x), e, lbs), strict=True):
                    expected[rel][e.name] = [d.to_dict() for d in dets]
        samples = [SampleEntry(file=rel, expected=exp) for rel, exp in expected.items()]
    manifest = Manifest(bundle_version=version, created="2026-01-01T00:00:00+00:00", models=entries,
                        groups=TEST_GROUPS, codes=species_codes(GLOBAL_CLASSES), samples=samples)
    data = manifest.to_bytes()
    (root / "manifest.json").write_bytes(data)
    if sign_key is not None:
        from edge.signing import sign

        (root / "manifest.sig").write_bytes(sign(data, sign_key))
    return root
