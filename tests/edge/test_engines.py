"""Engines: the ONNX Runtime backend on real ONNX models, the registry, the self-test (real files)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from make_onnx import IMGSZ, STRIDE, patch_image, write_test_bundle, yolo_like

from edge.bundle import load_bundle
from edge.cli import main as edge_main
from edge.detection import Detection
from edge.engines import (
    available_backends,
    compare_detections,
    create_engine,
    detect_batch,
    load_engines,
    registered_backends,
)
from edge.manifest import ModelEntry
from edge.selftest import selftest
from edge.vision import letterbox, letterbox_batch


def _entry(path: Path, blob: bytes, classes: list[str], layout: str = "yolov8", **kw) -> ModelEntry:
    path.write_bytes(blob)
    return ModelEntry(name=kw.pop("name", "global"), file=f"models/{path.name}",
                      sha256=hashlib.sha256(blob).hexdigest(), role="global", classes=classes, imgsz=IMGSZ,
                      layout=layout, **kw)


def _batch(n: int) -> np.ndarray:
    imgs = [patch_image(IMGSZ, STRIDE, (i % 4, (i // 4) % 4), i % 3, scale=2) for i in range(n)]
    return letterbox_batch(imgs, IMGSZ)[0]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return write_test_bundle(tmp_path_factory.mktemp("eng") / "b")


# --- the ONNX Runtime engine -----------------------------------------------------------------------


def test_onnxruntime_engine_contract(tmp_path):
    e = _entry(tmp_path / "g.onnx", yolo_like(3), ["a", "b", "c"])
    eng = create_engine("onnxruntime", tmp_path / "g.onnx", e, max_batch=2)
    assert eng.name == "global" and eng.input_shape == (3, IMGSZ, IMGSZ) and eng.max_batch == 2
    assert eng.output_shape == (7, 16)  # learnt by the warm-up run
    x = _batch(5)
    out = eng.infer(x)
    assert out.shape == (5, 7, 16) and out.dtype == np.float32
    singles = np.concatenate([eng.infer(x[i:i + 1]) for i in range(5)])
    np.testing.assert_allclose(out, singles, rtol=1e-5, atol=1e-4)  # split batches == one by one
    assert eng.infer(x[:0]).shape == (0, 7, 16)
    with pytest.raises(ValueError, match=r"expected a \[N, 3, 64, 64\] batch"):
        eng.infer(x[:, :, :32])
    eng.close()
    with pytest.raises(RuntimeError, match="closed"):
        eng.infer(x)


def test_outputs_decode_to_the_planted_animal(tmp_path):
    for layout in ("yolov8", "yolov5"):
        e = _entry(tmp_path / f"{layout}.onnx", yolo_like(3, layout=layout), ["a", "b", "c"], layout=layout)
        with create_engine("onnxruntime", tmp_path / f"{layout}.onnx", e) as eng:
            img = patch_image(IMGSZ, STRIDE, (2, 1), 1, scale=2)
            x, lb = letterbox(img, IMGSZ)
            dets = detect_batch(eng.infer(x[None]), e, [lb])[0]
            assert [d.species for d in dets] == ["b"], layout
            cx = (dets[0].box[0] + dets[0].box[2]) / 2
            assert 2 * STRIDE <= cx <= 4 * STRIDE + 1  # near the patch's cell (original pixels)


@pytest.mark.parametrize("static", [1, 2])
def test_fixed_batch_models_still_take_any_batch(tmp_path, static):
    e = _entry(tmp_path / "s.onnx", yolo_like(3, static_batch=static), ["a", "b", "c"])
    ref = _entry(tmp_path / "d.onnx", yolo_like(3), ["a", "b", "c"])
    with create_engine("onnxruntime", tmp_path / "s.onnx", e, max_batch=8) as fixed, \
            create_engine("onnxruntime", tmp_path / "d.onnx", ref) as dyn:
        assert fixed.max_batch == static
        x = _batch(3)
        np.testing.assert_allclose(fixed.infer(x), dyn.infer(x), rtol=1e-5, atol=1e-4)


def test_missing_providers_fall_back_to_cpu(tmp_path, caplog):
    e = _entry(tmp_path / "g.onnx", yolo_like(2), ["a", "b"])
    with create_engine("onnxruntime", tmp_path / "g.onnx", e, providers=["tensorrt", "cuda", "cpu"],
                       intra_op_threads=1) as eng:
        import onnxruntime as ort

        have = ort.get_available_providers()
        assert eng.providers[-1] == "CPUExecutionProvider"
        if "CUDAExecutionProvider" not in have:
            assert "CUDAExecutionProvider" not in eng.providers
            assert "lacks CUDAExecutionProvider" in caplog.text
        assert eng.infer(_batch(1)).shape == (1, 6, 16)


def _spinning(session) -> tuple[str, str]:
    opts = session.get_session_options()
    return (opts.get_session_config_entry("session.intra_op.allow_spinning"),
            opts.get_session_config_entry("session.inter_op.allow_spinning"))


def test_every_session_of_a_bundle_gets_one_thread_pool_policy(bundle_dir, tmp_path):
    """Spinning pools off by default (one pool per session; spinning ones took the cores the working
    session and the reader needed: BENCHMARKS.md), on when asked, alike for every session."""
    engines = load_engines(load_bundle(bundle_dir), "onnxruntime", intra_op_threads=1)
    try:
        assert len(engines) == 3
        for eng in engines.values():
            assert _spinning(eng._session) == ("0", "0")
            assert eng._session.get_session_options().intra_op_num_threads == 1
    finally:
        for eng in engines.values():
            eng.close()
    from edge.demo import DEMO_BUNDLE  # a shared backbone: the backbone's session and every head's alike

    engines = load_engines(load_bundle(DEMO_BUNDLE), "onnxruntime", intra_op_threads=1)
    try:
        sessions = [e._session for e in engines.values()] + [next(iter(engines.values())).backbone._session]
        assert len(sessions) == 5
        assert all(_spinning(s) == ("0", "0") and s.get_session_options().intra_op_num_threads == 1 for s in sessions)
    finally:
        for eng in engines.values():
            eng.close()
    e = _entry(tmp_path / "g.onnx", yolo_like(2), ["a", "b"])
    with create_engine("onnxruntime", tmp_path / "g.onnx", e, allow_spinning=True) as eng:
        assert _spinning(eng._session) == ("1", "1")
        assert eng._session.get_session_options().intra_op_num_threads == 0  # ONNX Runtime's own choice


def test_a_rectangular_model_runs_end_to_end(tmp_path):
    """A model exported at the camera's aspect (manifest imgsz [h, w]): the engine takes [N, 3, h, w],
    the runner letterboxes into the rectangle and the boxes land on the original image."""
    from edge.runner import ModelRunner

    e = _entry(tmp_path / "r.onnx", yolo_like(3, (48, 64)), ["a", "b", "c"])
    e = e.model_copy(update={"imgsz": (48, 64)})
    with create_engine("onnxruntime", tmp_path / "r.onnx", e) as eng:
        assert eng.input_shape == (3, 48, 64) and eng.output_shape == (7, 12)  # 3 x 4 cells of 16 px
        img = np.full((96, 128, 3), 20, np.uint8)  # 4:3, fills the input exactly at scale 0.5
        img[32:64, 64:96, 2] = 230  # red (class a) over cell row 1, column 2 of the input
        (dets,) = ModelRunner(e, eng).detect([img])
        best = max(dets, key=lambda d: d.score)
        assert best.species == "a"
        cx, cy = (best.box[0] + best.box[2]) / 2, (best.box[1] + best.box[3]) / 2
        assert abs(cx - 80) <= 16 and abs(cy - 48) <= 16, best.box  # the patch's centre in the original
        with pytest.raises(ValueError, match=r"expected a \[N, 3, 48, 64\] batch"):
            eng.infer(np.zeros((1, 3, 64, 64), np.float32))
    square = e.model_copy(update={"imgsz": 64})
    with pytest.raises(ValueError, match=r"input \[.*48, 64\] does not match the manifest's \[N, 3, 64, 64\]"):
        create_engine("onnxruntime", tmp_path / "r.onnx", square)


def test_model_that_does_not_match_the_manifest_is_refused(tmp_path):
    e = _entry(tmp_path / "g.onnx", yolo_like(2, imgsz=32), ["a", "b"])  # manifest says 64
    with pytest.raises(ValueError, match=r"g\.onnx: model 'global' input .* does not match"):
        create_engine("onnxruntime", tmp_path / "g.onnx", e)
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(ValueError, match="ONNX Runtime cannot load"):
        create_engine("onnxruntime", tmp_path / "bad.onnx", e)


@pytest.mark.parametrize("imgsz", [[128, 160], 161, 4096])
def test_a_backbone_graph_that_does_not_take_the_manifests_size_is_refused_before_any_run(tmp_path, imgsz):
    """The whole-model check above, for the shared backbone: a manifest whose backbone and heads
    say a size the backbone graph does not take failed in the warm-up run, as ONNX Runtime's
    dimension error or a MemoryError allocating the warm-up batch (60000 px: tens of GB, now
    refused by the manifest's MAX_INPUT_SIDE; 4096 is within it). Refused when the session opens,
    naming both."""
    import shutil

    from edge.demo import DEMO_BUNDLE

    out = tmp_path / "b"
    shutil.copytree(DEMO_BUNDLE, out)
    (out / "manifest.sig").unlink()
    raw = json.loads((out / "manifest.json").read_text())
    raw["backbone"]["imgsz"] = imgsz
    for m in raw["models"]:
        m["imgsz"] = imgsz
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"backbone\.onnx: the backbone's input \[.*160, 160\] does not match "
                                         r"the manifest's \[N, 3, \d+, \d+\]"):
        load_engines(load_bundle(out), "onnxruntime")


# --- registry and typed config ---------------------------------------------------------------------


def test_registry_and_config(tmp_path):
    assert registered_backends() == ["onnxruntime", "tensorrt"]
    assert "onnxruntime" in available_backends()
    import importlib.util

    have_trt = importlib.util.find_spec("tensorrt") is not None and importlib.util.find_spec("pycuda") is not None
    assert ("tensorrt" in available_backends()) == have_trt
    e = _entry(tmp_path / "g.onnx", yolo_like(2), ["a", "b"])
    with pytest.raises(ValueError, match="unknown engine backend 'openvino'"):
        create_engine("openvino", tmp_path / "g.onnx", e)
    with pytest.raises(ValueError, match="onnxruntime engine config: threads: Extra inputs"):
        create_engine("onnxruntime", tmp_path / "g.onnx", e, threads=2)
    with pytest.raises(ValueError, match="max_batch"):
        create_engine("onnxruntime", tmp_path / "g.onnx", e, max_batch=0)
    with pytest.raises(ValueError, match="providers"):
        create_engine("onnxruntime", tmp_path / "g.onnx", e, providers=["openvino"])


def test_importing_engines_loads_no_runtime():
    code = ("import sys, edge.engines, edge.selftest, edge.bundle\n"
            "print(sorted(m for m in ('onnxruntime', 'tensorrt', 'pycuda') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- comparing detections ----------------------------------------------------------------------------


def _d(species: str, score: float, box=(10, 10, 50, 50)) -> Detection:
    return Detection(species, score, tuple(float(v) for v in box))  # type: ignore[arg-type]


def test_compare_detections():
    a = [_d("lynx", 0.9), _d("fox", 0.6, (100, 100, 140, 150))]
    assert compare_detections(a, list(reversed(a))) == []
    assert compare_detections(a, [_d("lynx", 0.9)]) == ["missing fox 0.600 at [100, 100, 140, 150]"]
    assert compare_detections([_d("lynx", 0.9)], [_d("wildcat", 0.9)]) == [
        "missing lynx 0.900 at [10, 10, 50, 50]", "unexpected wildcat 0.900 at [10, 10, 50, 50]"]
    moved = compare_detections([_d("lynx", 0.9)], [_d("lynx", 0.9, (20, 10, 60, 50))])
    assert len(moved) == 2 and "IoU 0.60" in moved[0]
    assert compare_detections([_d("lynx", 0.9)], [_d("lynx", 0.95)], score_tol=0.02) == [
        "score of lynx 0.900 at [10, 10, 50, 50] is 0.950 (tolerance 0.02)"]
    assert compare_detections([_d("lynx", 0.9)], [_d("lynx", 0.91)], score_tol=0.02) == []
    # a box hovering at its floor may appear on one side only
    assert compare_detections([_d("lynx", 0.26)], [], thresholds={"lynx": 0.25}) == []
    assert compare_detections([], [_d("lynx", 0.26)], thresholds={"lynx": 0.25}) == []
    assert compare_detections([_d("lynx", 0.5)], [], thresholds={"lynx": 0.25}) != []


# --- bundles through engines, and the self-test -----------------------------------------------------------


def test_load_engines_and_selftest_pass(bundle_dir):
    b = load_bundle(bundle_dir)
    engines = load_engines(b)
    try:
        assert set(engines) == {"global", "felids", "canids"}
        report = selftest(b, engines=engines, runs=3)
        assert report.ok, report
        assert [m.images for m in report.models] == [4, 4, 4]
        assert all(m.mean_ms > 0 and m.p95_ms >= m.mean_ms * 0.5 for m in report.models)
    finally:
        for e in engines.values():
            e.close()


def test_selftest_detects_a_mismatch(tmp_path):
    root = write_test_bundle(tmp_path / "b")
    m = json.loads((root / "manifest.json").read_text())
    exp = m["samples"][1]["expected"]["global"][0]
    exp["score"] = round(exp["score"] - 0.1, 5)  # the device now disagrees with the workstation
    m["samples"][2]["expected"]["felids"] = [dict(exp, species="Lynx pardinus", cls=0, model="felids")]
    (root / "manifest.json").write_text(json.dumps(m))
    report = selftest(load_bundle(root), runs=1)
    assert not report.ok
    bad = {c.name: c.problems for c in report.models}
    assert bad["canids"] == []
    assert len(bad["global"]) == 1 and bad["global"][0].startswith("samples/patch1.png: score of Felis silvestris")
    assert bad["felids"] == ["samples/patch2.png: missing Lynx pardinus 0.887 at [48, 48, 117, 117]"]


def test_selftest_cli(bundle_dir, tmp_path, capsys):
    assert edge_main(["selftest", "--bundle", str(bundle_dir), "--runs", "2", "--allow-unsigned"]) == 0
    out = capsys.readouterr().out
    assert "selftest: ok" in out and "global" in out and "p95 ms" in out
    assert edge_main(["compile", "--bundle", str(bundle_dir), "--backend", "onnxruntime", "--allow-unsigned"]) == 0
    assert "compiled 3 models" in capsys.readouterr().out
    # a broken bundle is an input error (exit 2) with one line naming the file
    broken = write_test_bundle(tmp_path / "broken")
    (broken / "models" / "global.onnx").write_bytes(b"changed")
    assert edge_main(["selftest", "--bundle", str(broken), "--allow-unsigned"]) == 2
    assert "models/global.onnx: sha256 mismatch" in capsys.readouterr().err
    assert edge_main(["selftest", "--bundle", str(bundle_dir), "--precision", "fp16", "--allow-unsigned"]) == 2
    assert "apply to the tensorrt backend" in capsys.readouterr().err


def test_selftest_cli_fails_on_mismatch_and_checks_signatures(tmp_path, capsys):
    from edge.signing import generate_keypair

    priv, pub = generate_keypair()
    root = write_test_bundle(tmp_path / "b", sign_key=priv)
    (tmp_path / "k.pub").write_bytes(pub)
    assert edge_main(["selftest", "--bundle", str(root), "--public-key", str(tmp_path / "k.pub"), "--runs", "1"]) == 0
    assert "signed by key" in capsys.readouterr().out
    sample = root / "samples" / "patch0.png"
    img = cv2.imread(str(sample))
    img[:] = 20  # the animal is gone from the sample (samples carry no sha256 in the manifest yet)
    cv2.imwrite(str(sample), img)
    assert edge_main(["selftest", "--bundle", str(root), "--runs", "1", "--public-key", str(tmp_path / "k.pub")]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "samples/patch0.png: missing Lynx pardinus" in out


def test_selftest_with_a_device_config_trusts_its_keys_folder(tmp_path, capsys):
    from edge.signing import generate_keypair

    priv, pub = generate_keypair()
    root = write_test_bundle(tmp_path / "b", sign_key=priv)
    (tmp_path / "keys").mkdir()
    (tmp_path / "in").mkdir()
    conf = tmp_path / "config.yaml"

    def config(keys: str, required: bool) -> str:
        conf.write_text(f"device: {{id: t}}\nwatch: {{folders: [in]}}\npaths: {{state_dir: state}}\n"
                        f"bundle: {{path: {root}, public_keys_dir: {keys}, "
                        f"require_signature: {str(required).lower()}}}\n")
        return str(conf)

    assert edge_main(["selftest", "--config", config(str(tmp_path / "keys"), True), "--runs", "1"]) == 2
    assert f"looked in {tmp_path / 'keys'}" in capsys.readouterr().err  # the config's folder, and only it
    (tmp_path / "keys" / "device.pub").write_bytes(pub)
    assert edge_main(["selftest", "--config", config(str(tmp_path / "keys"), True), "--runs", "1"]) == 0
    assert "signed by key" in capsys.readouterr().out
    (tmp_path / "keys" / "device.pub").unlink()
    assert edge_main(["selftest", "--config", config(str(tmp_path / "keys"), False), "--runs", "1"]) == 0
    assert "signature NOT verified" in capsys.readouterr().out  # the config's require_signature: false


def test_selftest_needs_samples(tmp_path):
    root = write_test_bundle(tmp_path / "b", with_samples=False)
    with pytest.raises(ValueError, match="no sample images"):
        selftest(load_bundle(root))


# --- the device config's engine section is the backend's own config -------------------------------

CPU_ONLY = ["CPUExecutionProvider"]
CUDA_CPU = ["CUDAExecutionProvider", "CPUExecutionProvider"]
JETSON = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]  # onnxruntime-gpu 1.x


def _device_config(tmp_path: Path, engine: str, bundle: Path):
    from edge.config import load_config

    (tmp_path / "in").mkdir(exist_ok=True)
    p = tmp_path / "config.yaml"
    p.write_text(f"device: {{id: t}}\nwatch: {{folders: [in]}}\npaths: {{state_dir: state}}\n"
                 f"bundle: {{path: {bundle}, require_signature: false}}\nengine: {engine}\n")
    return load_config(p)


def _documented_providers() -> list[str]:
    """Every value docs/config.md offers for engine.providers: the short keys and ONNX Runtime's names."""
    from typing import get_args

    from edge.engines.onnxruntime import PROVIDER_NAMES, Provider

    return list(get_args(Provider)) + list(PROVIDER_NAMES.values())


@pytest.mark.parametrize("engine", ["{}", "{type: onnxruntime}", "{providers: auto}",
                                    "{type: onnxruntime, max_batch: 2, intra_op_threads: 1, fp16: false, "
                                    "warmup_runs: 0}"]
                         + [f"{{providers: [{p}]}}" for p in _documented_providers()])
def test_config_file_builds_the_onnxruntime_engine(tmp_path, bundle_dir, engine):
    cfg = _device_config(tmp_path, engine, bundle_dir)
    engines = load_engines(load_bundle(cfg.bundle.path), cfg.engine)  # what check-config accepted
    try:
        assert set(engines) == {"global", "felids", "canids"}
        for eng in engines.values():
            assert eng.config is cfg.engine
            assert eng.used_providers == CPU_ONLY  # all this machine has
            assert eng.infer(_batch(1)).shape[0] == 1
    finally:
        for eng in engines.values():
            eng.close()


def test_config_file_builds_the_tensorrt_engine(tmp_path, bundle_dir):
    from fake_tensorrt import FakeGPU

    gpu = FakeGPU("10.3.0")
    for precision in ("fp16", "fp32", "int8"):
        cfg = _device_config(tmp_path, f"{{type: tensorrt, precision: {precision}, max_batch: 2}}", bundle_dir)
        assert cfg.engine.cache_dir == tmp_path / "state" / "engines"  # derived from paths.state_dir
        engines = load_engines(load_bundle(cfg.bundle.path), cfg.engine, runtime={"trt": gpu.trt, "cuda": gpu.cuda})
        try:
            for eng in engines.values():
                d = eng.describe()
                assert (d["backend"], d["precision"], eng.max_batch) == ("tensorrt", precision, 2)
                assert Path(d["plan"]).parent == tmp_path / "state" / "engines"
        finally:
            for eng in engines.values():
                eng.close()


@pytest.mark.parametrize(("providers", "available", "expected", "missing"), [
    (["auto"], JETSON, JETSON, []),  # best available, as on a Jetson with onnxruntime-gpu
    (["auto"], CUDA_CPU, CUDA_CPU, []),
    (["auto"], ["AzureExecutionProvider", "CPUExecutionProvider"], CPU_ONLY, []),  # the PyPI CPU wheel
    (["cuda"], JETSON, CUDA_CPU, []),
    (CUDA_CPU, JETSON, CUDA_CPU, []),
    (["tensorrt", "cuda"], CPU_ONLY, CPU_ONLY, ["TensorrtExecutionProvider", "CUDAExecutionProvider"]),
    (["cuda", "auto"], JETSON, ["CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"], []),
    (["cpu"], JETSON, CPU_ONLY, []),
])
def test_provider_choice_against_a_faked_provider_list(tmp_path, providers, available, expected, missing):
    from edge.engines.onnxruntime import OnnxRuntimeConfig, choose_providers

    cfg = OnnxRuntimeConfig(providers=providers, cache_dir=tmp_path)
    chosen, lacking = choose_providers(cfg, available)
    assert [p if isinstance(p, str) else p[0] for p in chosen] == expected
    assert lacking == missing
    for p in chosen:
        if not isinstance(p, str):  # the TensorRT provider: fp16 and a persistent engine cache
            assert p[1] == {"trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_timing_cache_enable": True,
                            "trt_engine_cache_path": str(tmp_path / "onnxruntime-tensorrt")}


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_a_gpu_provider_that_cannot_start_is_reported(tmp_path, monkeypatch, caplog):
    """ONNX Runtime falls back on its own when a provider it lists cannot start: the engine says so."""
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: JETSON)
    e = _entry(tmp_path / "g.onnx", yolo_like(2), ["a", "b"])
    with create_engine("onnxruntime", tmp_path / "g.onnx", e) as eng:
        assert eng.used_providers == CPU_ONLY
        assert eng.describe()["providers"] == CPU_ONLY
    assert "uses CPUExecutionProvider (asked for TensorrtExecutionProvider, CUDAExecutionProvider" in caplog.text


def test_bad_manifest_cascade_value_is_one_line(tmp_path):
    from edge.bundle import BundleError

    root = write_test_bundle(tmp_path / "b", with_samples=False)
    m = json.loads((root / "manifest.json").read_text())
    m["cascade"]["gate_threshold"] = 1.5
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError) as e:
        load_bundle(root)
    assert str(e.value) == (f"{root}: manifest.json: cascade.gate_threshold: Input should be less than or equal "
                            "to 1")
