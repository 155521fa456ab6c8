"""The TensorRT backend against a faithful fake of tensorrt + pycuda (tests/edge/fake_tensorrt.py).

TensorRT cannot run here; the fake enforces the API contracts that break real deployments
and computes outputs by running the same ONNX model in ONNX Runtime, so the TensorRT path
is compared with the ONNX Runtime path on the same real bundle.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import hashlib
import inspect
import threading
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from fake_tensorrt import ContractError, FakeGPU, LogicError
from make_onnx import IMGSZ, STRIDE, patch_image, write_test_bundle, yolo_like
from trt_stubs import stub_api, stub_member, stub_params

from edge.bundle import load_bundle
from edge.cli import main as edge_main
from edge.demo import DEMO_BUNDLE, DEMO_FRAMES, DEMO_KEYS
from edge.detection import Detection
from edge.engines import compare_detections, create_engine, detect_batch, load_engines, read_samples
from edge.engines.tensorrt import (
    Int8Rejected,
    TensorRTBackbone,
    TensorRTConfig,
    TensorRTEngine,
    TensorRTHeadEngine,
    build_gated_int8,
    int8_gate,
)
from edge.engines.trt_cache import PlanKey, plan_path
from edge.manifest import BackboneEntry, ModelEntry
from edge.runner import CascadeRunner
from edge.selftest import decision_differences, selftest
from edge.vision import letterbox_batch

VERSIONS = ["8.5.2.2", "10.3.0"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_bundle(write_test_bundle(tmp_path_factory.mktemp("trt") / "b"))


@pytest.fixture
def model(tmp_path) -> tuple[Path, ModelEntry]:
    blob = yolo_like(3, IMGSZ, STRIDE)
    p = tmp_path / "global.onnx"
    p.write_bytes(blob)
    return p, ModelEntry(name="global", file="models/global.onnx", sha256=hashlib.sha256(blob).hexdigest(),
                         role="global", classes=["a", "b", "c"], imgsz=IMGSZ, layout="yolov8")


def _batch(n: int) -> np.ndarray:
    imgs = [patch_image(IMGSZ, STRIDE, (i % 4, (i * 3) % 4), i % 3, scale=2) for i in range(n)]
    return letterbox_batch(imgs, IMGSZ)[0]


def _trt(gpu: FakeGPU, path: Path, entry: ModelEntry, cache: Path, **cfg) -> TensorRTEngine:
    return create_engine("tensorrt", path, entry, runtime={"trt": gpu.trt, "cuda": gpu.cuda},  # type: ignore
                         cache_dir=cache, **cfg)


# --- same answers as ONNX Runtime ---------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_tensorrt_matches_onnxruntime(model, tmp_path, version):
    path, entry = model
    gpu = FakeGPU(version)
    x = _batch(7)  # more than max_batch 4: split in two runs
    with create_engine("onnxruntime", path, entry) as ref, _trt(gpu, path, entry, tmp_path / "c") as eng:
        a, b = ref.infer(x), eng.infer(x)
        assert b.shape == a.shape == (7, 7, 16) and b.dtype == np.float32
        assert not np.array_equal(a, b)  # FP16 really rounds ...
        np.testing.assert_allclose(b, a, rtol=2e-3, atol=2e-3)  # ... and stays close
        lbs = letterbox_batch([patch_image(IMGSZ, STRIDE, (0, 0), 0, 2)] * 7, IMGSZ)[1]
        for da, db in zip(detect_batch(a, entry, lbs), detect_batch(b, entry, lbs), strict=True):
            assert da and compare_detections(da, db, min_iou=0.99, score_tol=1e-3) == []
        assert eng.output_shape == (7, 16) and eng.describe()["tensorrt"] == version
    assert gpu.errors == []
    assert gpu.live_allocations() == 0  # close freed every device buffer


@pytest.mark.parametrize("version", VERSIONS)
def test_selftest_passes_on_tensorrt(bundle, tmp_path, version):
    gpu = FakeGPU(version)
    report = selftest(bundle, "tensorrt", runs=2, runtime={"trt": gpu.trt, "cuda": gpu.cuda},
                      cache_dir=tmp_path / "c")
    assert report.ok, report
    assert len(gpu.builds) == 3 and all(b.precision == "fp16" for b in gpu.builds)


def test_compile_and_selftest_cli_with_the_installed_fake(bundle, tmp_path, monkeypatch, capsys):
    gpu = FakeGPU("8.5.2.2", gpu_name="Xavier", cc=(7, 2))
    gpu.install(monkeypatch)  # `import tensorrt` / `import pycuda.driver` now find the fake
    cache = tmp_path / "cache"
    assert edge_main(["compile", "--bundle", str(bundle.root), "--cache", str(cache), "--allow-unsigned"]) == 0
    out = capsys.readouterr().out
    assert out.count("fp16 plan") == 3 and out.count("built in") == 3
    assert edge_main(["compile", "--bundle", str(bundle.root), "--cache", str(cache), "--allow-unsigned"]) == 0
    assert capsys.readouterr().out.count("(cached)") == 3
    assert len(gpu.builds) == 3
    assert edge_main(["selftest", "--bundle", str(bundle.root), "--backend", "tensorrt", "--cache", str(cache),
                      "--runs", "2", "--allow-unsigned"]) == 0
    assert "selftest: ok" in capsys.readouterr().out
    assert len(gpu.builds) == 3  # the self-test used the compiled plans


def test_compile_with_the_device_config_builds_the_daemons_plans(bundle, tmp_path, monkeypatch, capsys):
    """`compile --config C` builds with the config's engine: section, so the daemon (which loads
    the same section) finds every plan cached: the start-up does not build for minutes again."""
    from edge.config import load_config

    gpu = FakeGPU("10.3.0")
    gpu.install(monkeypatch)
    (tmp_path / "in").mkdir()
    conf = tmp_path / "config.yaml"
    conf.write_text(f"device: {{id: t}}\nwatch: {{folders: [in]}}\npaths: {{state_dir: state}}\n"
                    f"bundle: {{path: {bundle.root}, require_signature: false}}\n"
                    "engine: {type: tensorrt, precision: fp16, max_batch: 2}\n")
    assert edge_main(["compile", "--config", str(conf), "--allow-unsigned"]) == 0
    assert capsys.readouterr().out.count("built in") == 3
    cfg = load_config(conf)
    engines = load_engines(bundle, cfg.engine, runtime={"trt": gpu.trt, "cuda": gpu.cuda})  # as the daemon does
    try:
        assert not any(e.describe()["built"] for e in engines.values())
        assert all(Path(e.describe()["plan"]).parent == tmp_path / "state" / "engines" for e in engines.values())
    finally:
        for e in engines.values():
            e.close()
    assert len(gpu.builds) == 3
    assert edge_main(["selftest", "--config", str(conf), "--runs", "1", "--allow-unsigned"]) == 0
    assert "backend tensorrt" in capsys.readouterr().out and len(gpu.builds) == 3
    assert edge_main(["compile", "--config", str(conf), "--precision", "fp32", "--allow-unsigned"]) == 2
    assert "--config takes the engine settings from its engine: section; drop --precision" in capsys.readouterr().err


# --- plan cache ----------------------------------------------------------------------------------------


def test_cache_key_changes_with_each_component():
    base = PlanKey(model_sha256="a" * 64, trt_version="8.5.2.2", gpu_name="Orin", compute_capability="8.7",
                   precision="fp16", max_batch=4, imgsz=640)
    changes = dict(model_sha256="b" * 64, trt_version="10.3.0", gpu_name="Xavier", compute_capability="7.2",
                   precision="int8", max_batch=8, imgsz=1280, calibration_sha256="c" * 64)
    names = {base.filename()}
    for k, v in changes.items():
        names.add(dataclasses.replace(base, **{k: v}).filename())
    assert len(names) == 1 + len(changes)
    assert base.filename().startswith("aaaaaaaaaaaa-fp16-b4-") and base.filename().endswith(".plan")


def test_cache_hit_skips_the_build(model, tmp_path):
    path, entry = model
    gpu = FakeGPU()
    cache = tmp_path / "c"
    with _trt(gpu, path, entry, cache) as first:
        assert first.built and first.plan_path is not None and first.plan_path.is_file()
        out1 = first.infer(_batch(2))
    plan_bytes = first.plan_path.read_bytes()
    with _trt(gpu, path, entry, cache) as second:
        assert not second.built and second.plan_path == first.plan_path
        np.testing.assert_array_equal(second.infer(_batch(2)), out1)
    assert len(gpu.builds) == 1 and gpu.deserialized == 2  # built and loaded, then only loaded
    assert first.plan_path.read_bytes() == plan_bytes
    # a different precision, batch, GPU or TensorRT is a different plan, not a stale hit
    with _trt(gpu, path, entry, cache, precision="fp32") as fp32:
        assert fp32.built and fp32.plan_path != first.plan_path
    with _trt(gpu, path, entry, cache, max_batch=2) as small:
        assert small.built and small.plan_path != first.plan_path
    other = FakeGPU(gpu_name="Orin Nano", cc=(8, 7))
    with _trt(other, path, entry, cache) as elsewhere:
        assert elsewhere.built and elsewhere.plan_path != first.plan_path
    assert {p.suffix for p in cache.iterdir()} == {".plan", ".json", ".cache"}  # no temp files left


def test_unloadable_cached_plan_is_rebuilt(model, tmp_path):
    path, entry = model
    gpu = FakeGPU()
    with _trt(gpu, path, entry, tmp_path / "c") as e:
        plan = e.plan_path
    assert plan is not None
    plan.write_bytes(plan.read_bytes()[:20])  # a truncated plan (e.g. a full disk, an old writer)
    with _trt(gpu, path, entry, tmp_path / "c") as again:
        assert again.built and again.infer(_batch(1)).shape == (1, 7, 16)
    assert len(gpu.builds) == 2 and any("Serialization (corrupt plan" in m for m in gpu.errors)
    with _trt(gpu, path, entry, tmp_path / "c", rebuild=True) as forced:
        assert forced.built


def test_timing_cache_is_persisted_and_reloaded(model, tmp_path):
    path, entry = model
    gpu = FakeGPU("10.3.0", gpu_name="Orin")
    cache = tmp_path / "c"
    with _trt(gpu, path, entry, cache):
        pass
    tc = cache / "timing-trt10.3.0-orin-sm8.7.cache"
    assert tc.is_file()
    assert gpu.builds[0].timing_hits == 0 and gpu.builds[0].timing_misses > 0
    with _trt(gpu, path, entry, cache, rebuild=True):
        pass
    assert gpu.builds[1].timing_hits == gpu.builds[0].timing_misses  # every timing reused
    # a timing cache from another GPU is refused, not trusted; the build still succeeds
    foreign = FakeGPU("10.3.0", gpu_name="Orin")
    other = FakeGPU("10.3.0", gpu_name="Xavier", cc=(7, 2))
    with _trt(other, path, entry, tmp_path / "o"):
        pass
    (tmp_path / "o" / "timing-trt10.3.0-xavier-sm7.2.cache").replace(tmp_path / "o2")
    cache2 = tmp_path / "c2"
    cache2.mkdir()
    (tmp_path / "o2").replace(cache2 / "timing-trt10.3.0-orin-sm8.7.cache")  # planted under Orin's name
    with _trt(foreign, path, entry, cache2) as e:
        assert e.built
    assert foreign.builds[0].timing_hits == 0
    assert any("header mismatch" in m for m in foreign.errors)


def test_fp16_is_the_default_and_fp32_is_plain(model, tmp_path):
    path, entry = model
    assert TensorRTConfig().precision == "fp16"
    gpu = FakeGPU()
    with _trt(gpu, path, entry, tmp_path / "c"):
        pass
    with _trt(gpu, path, entry, tmp_path / "c", precision="fp32"):
        pass
    assert [b.flags for b in gpu.builds] == [{"FP16"}, set()]
    assert gpu.builds[0].profile == ((1, 3, IMGSZ, IMGSZ), (4, 3, IMGSZ, IMGSZ), (4, 3, IMGSZ, IMGSZ))
    assert gpu.builds[0].workspace == 1024 << 20


def test_a_rectangular_model_builds_its_own_profile(tmp_path):
    """A model exported at the camera's aspect (imgsz [h, w]): the profile is [N, 3, h, w], the plan
    is keyed by that size, and the answers are ONNX Runtime's."""
    blob = yolo_like(3, (48, 64), STRIDE)
    path = tmp_path / "rect.onnx"
    path.write_bytes(blob)
    entry = ModelEntry(name="global", file="models/rect.onnx", sha256=hashlib.sha256(blob).hexdigest(),
                       role="global", classes=["a", "b", "c"], imgsz=(48, 64), layout="yolov8")
    gpu = FakeGPU()
    x = letterbox_batch([patch_image(IMGSZ, STRIDE, (1, 2), 0, scale=2)] * 3, (48, 64))[0]
    with create_engine("onnxruntime", path, entry) as ref, _trt(gpu, path, entry, tmp_path / "c") as eng:
        assert eng.input_shape == (3, 48, 64)
        np.testing.assert_allclose(eng.infer(x), ref.infer(x), rtol=2e-3, atol=2e-3)
        fields = {"model_sha256": entry.sha256, "trt_version": eng.trt_version, "gpu_name": eng.gpu_name,
                  "compute_capability": eng.compute_capability, "precision": "fp16", "max_batch": 4}
        assert eng.plan_path == plan_path(tmp_path / "c", PlanKey(**fields, imgsz=(48, 64)))
        assert PlanKey(**fields, imgsz=(48, 64)).digest() != PlanKey(**fields, imgsz=64).digest()
    assert gpu.builds[0].profile == ((1, 3, 48, 64), (4, 3, 48, 64), (4, 3, 48, 64))
    assert gpu.errors == []


# --- INT8 ------------------------------------------------------------------------------------------------


def test_int8_without_calibration_is_refused(model, tmp_path):
    path, entry = model
    gpu = FakeGPU()
    with pytest.raises(ValueError, match="INT8 needs calibration images"):
        _trt(gpu, path, entry, tmp_path / "c", precision="int8")
    no_samples = load_bundle(write_test_bundle(tmp_path / "b", with_samples=False))
    with pytest.raises(ValueError, match="INT8 needs the bundle's sample images"):
        load_engines(no_samples, "tensorrt", precision="int8", runtime={"trt": gpu.trt, "cuda": gpu.cuda})
    assert gpu.builds == []


def _decoder(entry: ModelEntry, n: int):
    lbs = letterbox_batch([patch_image(IMGSZ, STRIDE, (0, 0), 0, 2)] * n, IMGSZ)[1]
    return lambda raw: detect_batch(raw, entry, lbs)


def test_int8_with_good_calibration_passes_the_gate(model, tmp_path):
    path, entry = model
    gpu = FakeGPU("8.5.2.2")
    x = _batch(6)
    cfg = TensorRTConfig(precision="int8", cache_dir=tmp_path / "c")
    eng, result = build_gated_int8(path, entry, cfg, calibration=x, check=x, decode=_decoder(entry, 6),
                                   trt=gpu.trt, cuda=gpu.cuda)
    with eng:
        assert result.passed and result.images == 6
        assert eng.describe()["precision"] == "int8" and eng.plan_path is not None and eng.plan_path.is_file()
    fp16, int8 = gpu.builds
    assert fp16.flags == {"FP16"} and int8.flags == {"FP16", "INT8"}
    assert int8.calibration_batches == 2 and not int8.calibration_from_cache  # 6 images, batches of 4
    assert eng.plan_path.with_suffix(".calib").is_file()
    # again with a rebuild: the calibration table is reused, the gate runs again
    eng2, _ = build_gated_int8(path, entry, cfg.model_copy(update={"rebuild": True}), calibration=x, check=x,
                               decode=_decoder(entry, 6), trt=gpu.trt, cuda=gpu.cuda)
    eng2.close()
    assert gpu.builds[-1].calibration_from_cache


def test_int8_gate_rejects_a_bad_calibration(model, tmp_path):
    path, entry = model
    gpu = FakeGPU("10.3.0")
    x = _batch(4)
    cfg = TensorRTConfig(precision="int8", cache_dir=tmp_path / "c")
    with pytest.raises(Int8Rejected, match=r"global: INT8 engine failed the accuracy gate .* missing"):
        build_gated_int8(path, entry, cfg, calibration=np.zeros_like(x), check=x, decode=_decoder(entry, 4),
                         trt=gpu.trt, cuda=gpu.cuda)
    assert [b.precision for b in gpu.builds] == ["fp16", "int8"]
    plans = sorted(p.name for p in (tmp_path / "c").glob("*.plan"))
    assert len(plans) == 1 and "-fp16-" in plans[0]  # the rejected INT8 plan is gone
    assert not list((tmp_path / "c").glob("*.calib"))
    assert gpu.live_allocations() == 0


def test_load_engines_int8_on_the_bundle(bundle, tmp_path):
    gpu = FakeGPU()
    engines = load_engines(bundle, "tensorrt", precision="int8", cache_dir=tmp_path / "c",
                           runtime={"trt": gpu.trt, "cuda": gpu.cuda})
    try:
        assert {e.config.precision for e in engines.values()} == {"int8"}  # type: ignore[attr-defined]
        assert selftest(bundle, engines=engines, runs=1).ok
    finally:
        for e in engines.values():
            e.close()


def _det(species: str, score: float, x: float = 10) -> Detection:
    return Detection(species, score, (x, 10.0, x + 40, 50.0))


def test_int8_gate_logic():
    ref = [[_det("lynx", 0.9)], []]
    assert int8_gate(ref, [[_det("lynx", 0.88)], []]).passed
    assert not int8_gate(ref, [[_det("lynx", 0.70)], []]).passed  # score drift
    assert not int8_gate(ref, [[_det("lynx", 0.9, x=25)], []]).passed  # box drift
    assert not int8_gate(ref, [[_det("lynx", 0.9)], [_det("fox", 0.6)]]).passed  # invented animal
    assert not int8_gate(ref, [[_det("lynx", 0.9)]]).passed  # image count differs
    empty = int8_gate([[], []], [[], []])
    assert not empty.passed and "cannot be judged" in empty.problems[0]


# --- threads ---------------------------------------------------------------------------------------------


def test_calls_from_other_threads_are_marshalled(model, tmp_path):
    path, entry = model
    gpu = FakeGPU()
    x = _batch(5)
    with _trt(gpu, path, entry, tmp_path / "c") as eng:
        want = eng.infer(x)
        results: dict[int, np.ndarray] = {}
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                for _ in range(3):
                    results[i] = eng.infer(x[i:i + 1])
            except BaseException as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,), name=f"caller-{i}") for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        for i in range(5):
            np.testing.assert_array_equal(results[i][0], want[i])
        assert gpu.builds[0].thread == "tensorrt-global"
        # the fake would have caught an unmarshalled call: CUDA state belongs to the engine's thread
        with pytest.raises(ContractError, match="belongs to 'tensorrt-global'"):
            eng._context.set_input_shape("images", (1, 3, IMGSZ, IMGSZ))
        with pytest.raises(LogicError, match="no currently active context"):
            gpu.cuda.mem_alloc(16)
    with pytest.raises(RuntimeError, match="closed"):
        eng.infer(x)


# --- the fake itself bites where the real stack bites -----------------------------------------------------


def test_fake_api_differs_by_version_like_the_real_one():
    old, new = FakeGPU("8.5.2.2"), FakeGPU("10.3.0")
    for attr in ("get_binding_shape", "binding_is_input", "num_bindings"):
        assert hasattr(old.trt.ICudaEngine, attr) and not hasattr(new.trt.ICudaEngine, attr)
    assert hasattr(old.trt.IExecutionContext, "execute_async_v2")
    assert not hasattr(new.trt.IExecutionContext, "execute_async_v2")
    assert hasattr(old.trt.IBuilderConfig, "max_workspace_size")
    assert not hasattr(new.trt.IBuilderConfig, "max_workspace_size")
    assert not hasattr(old.trt.DataType, "INT64") and hasattr(new.trt.DataType, "INT64")
    for gpu in (old, new):
        for attr in ("set_input_shape", "set_tensor_address", "execute_async_v3"):
            assert hasattr(gpu.trt.IExecutionContext, attr)


def test_fake_enforces_the_contracts(model):
    path, _ = model
    gpu = FakeGPU("8.5.2.2")
    trt, cuda = gpu.trt, gpu.cuda
    with pytest.raises(LogicError, match="initialization"):
        cuda.Device(0)
    cuda.init()
    ctx = cuda.Device(0).retain_primary_context()
    with pytest.raises(LogicError, match="no currently active context"):
        cuda.mem_alloc(64)  # retained but not pushed
    ctx.push()
    try:
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        implicit = builder.create_network(0)  # 8.5 without EXPLICIT_BATCH
        parser = trt.OnnxParser(implicit, logger)
        assert not parser.parse(path.read_bytes()) and "explicit batch" in str(parser.get_error(0))
        net = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
        assert trt.OnnxParser(net, logger).parse(path.read_bytes())
        cfg = builder.create_builder_config()
        assert builder.build_serialized_network(net, cfg) is None  # dynamic batch, no profile
        prof = builder.create_optimization_profile()
        prof.set_shape("images", (1, 3, 64, 64), (2, 3, 64, 64), (2, 3, 64, 64))
        cfg.add_optimization_profile(prof)
        plan = builder.build_serialized_network(net, cfg)
        engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
        context = engine.create_execution_context()
        assert not context.set_input_shape("images", (3, 3, 64, 64))  # above the profile's max
        assert context.set_input_shape("images", (1, 3, 64, 64))
        stream = cuda.Stream()
        d_in = cuda.mem_alloc(3 * 64 * 64 * 4)
        context.set_tensor_address("images", int(d_in))
        assert not context.execute_async_v3(stream.handle)  # the output has no address
        assert "Neither address or allocator is set for output tensor output0" in gpu.errors[-1]
        with pytest.raises(ContractError, match="pageable"):
            cuda.memcpy_htod_async(d_in, np.zeros((1, 3, 64, 64), np.float32), stream)
        with pytest.raises(LogicError, match="illegal memory access"):
            cuda.memcpy_htod(d_in, np.zeros((2, 3, 64, 64), np.float32))  # more than the buffer holds
        host = cuda.pagelocked_empty((1, 7, 16), np.float32)
        d_out = cuda.mem_alloc(host.nbytes)
        context.set_tensor_address("output0", int(d_out))
        host[:] = -1
        assert context.execute_async_v3(stream.handle)
        cuda.memcpy_dtoh_async(host, d_out, stream)
        assert (host == -1).all()  # nothing happens before the stream is synchronised
        stream.synchronize()
        assert not (host == -1).any()
        calib = type("Calib", (trt.IInt8EntropyCalibrator2,), {"__init__": lambda self: None})()
        cfg.set_flag(trt.BuilderFlag.INT8)
        cfg.int8_calibrator = calib
        with pytest.raises(TypeError, match="__init__"):
            builder.build_serialized_network(net, cfg)  # the base class was never initialised
        d_in.free()
        d_out.free()
    finally:
        cuda.Context.pop()


def test_plan_from_another_tensorrt_does_not_load(model, tmp_path):
    path, entry = model
    old = FakeGPU("8.5.2.2")
    with _trt(old, path, entry, tmp_path / "c") as e:
        plan = e.plan_path
    assert plan is not None
    new = FakeGPU("10.3.0")
    key = PlanKey(model_sha256=entry.sha256, trt_version="10.3.0", gpu_name="Orin", compute_capability="8.7",
                  precision="fp16", max_batch=4, imgsz=IMGSZ)
    target = plan_path(tmp_path / "c", key)
    target.write_bytes(plan.read_bytes())  # an 8.5 plan where 10.3 looks (e.g. a copied cache folder)
    with _trt(new, path, entry, tmp_path / "c") as e2:
        assert e2.built and e2.plan_path == target
    assert any("not compatible with this version" in m for m in new.errors)


def test_samples_helper_reads_the_bundle(bundle):
    imgs = read_samples(bundle)
    assert len(imgs) == 4 and all(i.dtype == np.uint8 and i.ndim == 3 for i in imgs)


# --- a shared backbone on TensorRT: the demo bundle --------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    return load_bundle(DEMO_BUNDLE, public_keys=[DEMO_KEYS / "demo.pub"], require_signature=True)


def _demo_frames() -> list[np.ndarray]:
    imgs = [cv2.imread(str(p)) for p in sorted(DEMO_FRAMES.glob("*.JPG"))]
    return [*imgs, np.full((240, 320, 3), 30, np.uint8)]


def _close(engines) -> None:
    for e in engines.values():
        e.close()


@pytest.mark.parametrize("version", VERSIONS)
def test_shared_backbone_on_tensorrt_decides_as_onnxruntime_and_keeps_features_on_the_gpu(demo, tmp_path, version):
    """The demo bundle (one backbone + four heads) on the fake TensorRT gives the ONNX Runtime shared
    path's decisions frame by frame; the backbone runs once per batch, the images are the only bytes
    that go up, the heads' outputs the only bytes that come down, and a head that runs on some of the
    frames gathers its rows device to device."""
    assert demo.manifest.backbone is not None
    frames = _demo_frames()
    every = demo.manifest.cascade.model_copy(update={"gate_threshold": None})  # every expert on background
    ort_engines = load_engines(demo, "onnxruntime")
    try:
        want = CascadeRunner(demo.manifest, ort_engines, every).classify(frames)
    finally:
        _close(ort_engines)
    gpu = FakeGPU(version)
    engines = load_engines(demo, "tensorrt", cache_dir=tmp_path / "c", runtime={"trt": gpu.trt, "cuda": gpu.cuda})
    try:
        runner = CascadeRunner(demo.manifest, engines, every)
        assert isinstance(runner.backbone, TensorRTBackbone)
        assert all(isinstance(e, TensorRTHeadEngine) and e.backbone is runner.backbone for e in engines.values())
        assert len(gpu.builds) == 1 + len(engines)  # the backbone once, then one head per model
        before, generation = dict(gpu.copied), runner.backbone.generation
        got = runner.classify(frames)
        copied = {k: gpu.copied[k] - before[k] for k in before}
        assert runner.backbone.generation == generation + 1  # once for the whole batch (9 frames, 3 chunks)
        for i, (a, b) in enumerate(zip(want, got, strict=True)):
            assert decision_differences(a.decision, b.decision) == [], f"frame {i}"
        assert any(not c.decision.empty for c in got) and any(len(c.decision.models_run) > 2 for c in got)
        s = demo.manifest.backbone.imgsz
        assert copied["htod"] == len(frames) * 3 * s * s * 4  # the images, nothing else
        name = {"global": demo.manifest.global_model.name, **{g: e.name for g, e in demo.manifest.experts.items()}}
        ran = Counter(name[m] for c in got for m in c.decision.models_run)
        out_bytes = {n: int(np.prod(e.output_shape or ())) * 4 for n, e in engines.items()}
        assert copied["dtoh"] == sum(k * out_bytes[n] for n, k in ran.items())  # the heads' outputs only
        heads = [e for e in engines.values() if isinstance(e, TensorRTHeadEngine)]
        assert copied["dtod"] > 0 and sum(h.gathered_rows for h in heads) > 0
        assert engines[demo.manifest.global_model.name].gathered_rows == 0  # all frames: read in place
    finally:
        _close(engines)
    assert gpu.live_allocations() == 0  # the last head to close freed the backbone too
    assert gpu.errors == []


def test_heads_read_any_rows_on_the_gpu_and_refuse_stale_ones(demo, tmp_path):
    gpu = FakeGPU()
    engines = load_engines(demo, "tensorrt", cache_dir=tmp_path / "c", max_batch=2,
                           runtime={"trt": gpu.trt, "cuda": gpu.cuda})
    try:
        head = engines["group2"]
        bb = head.backbone  # type: ignore[attr-defined]
        x, _ = letterbox_batch(_demo_frames()[:7], demo.manifest.backbone.imgsz)
        ref = head.infer(x)  # backbone + head, 7 images in chunks of 2
        feats = bb.run(x)  # 7 rows > max_batch 2: four chunks into one grown buffer
        full = head.run_features(feats)  # type: ignore[attr-defined]
        np.testing.assert_array_equal(full, ref)
        pick = [6, 0, 3, 4]  # a gather ([6, 0]), then two neighbours read in place ([3, 4])
        part = head.run_features({k: v[pick] for k, v in feats.items()})  # type: ignore[attr-defined]
        np.testing.assert_allclose(part, full[pick], rtol=1e-3, atol=1e-3)
        assert head.gathered_rows == 2 and head.zero_copy_runs >= 5  # type: ignore[attr-defined]
        bb.run(x[:1])  # the buffers now hold another batch
        with pytest.raises(RuntimeError, match="stale backbone features"):
            head.run_features(feats)  # type: ignore[attr-defined]
        with pytest.raises(TypeError, match="not an output of this head's backbone"):
            head.run_features({k: np.zeros(v.shape, np.float32) for k, v in feats.items()})  # type: ignore[attr-defined]
    finally:
        _close(engines)
    assert gpu.live_allocations() == 0


def _odd_split(tmp_path: Path) -> tuple[Path, BackboneEntry, Path, ModelEntry]:
    """A tiny backbone whose feature row is 300 bytes ([3, 5, 5] float32, not a multiple of 256)
    and a head over it: offsets into the backbone's buffer are mostly not 256-byte aligned."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def save(graph, name: str) -> tuple[Path, str]:
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        p = tmp_path / name
        onnx.save(m, str(p))
        return p, hashlib.sha256(p.read_bytes()).hexdigest()

    bb_path, bb_sha = save(helper.make_graph(
        [helper.make_node("AveragePool", ["images"], ["feat"], kernel_shape=[3, 3], strides=[3, 3])], "bb",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["N", 3, 5, 5])]), "backbone.onnx")
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(75, 8)).astype(np.float32), "w")
    head_path, head_sha = save(helper.make_graph(
        [helper.make_node("Flatten", ["feat"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["out"])], "head",
        [helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["N", 3, 5, 5])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 8])], [w]), "head.onnx")
    bb = BackboneEntry(file="models/backbone.onnx", sha256=bb_sha, imgsz=16, outputs=["feat"], frozen_layers=1)
    entry = ModelEntry(name="global", file="models/heads/global.onnx", sha256=head_sha, role="global",
                       classes=["a", "b", "c", "d"], imgsz=16, layout="yolov8", head_inputs=["feat"])
    return bb_path, bb, head_path, entry


def test_rows_at_unaligned_offsets_are_copied_not_addressed(tmp_path):
    """TensorRT takes only 256-byte aligned tensor addresses (the fake refuses others, as
    setTensorAddress documents): with 300-byte feature rows, the backbone's chunks after the first
    land via a device copy, and a head reads consecutive rows in place only where they are aligned."""
    import onnxruntime as ort

    bb_path, bb_entry, head_path, entry = _odd_split(tmp_path)
    gpu = FakeGPU()
    cfg = TensorRTConfig(cache_dir=tmp_path / "c", max_batch=3, precision="fp32")
    bb = TensorRTBackbone(bb_path, bb_entry, cfg, trt=gpu.trt, cuda=gpu.cuda)
    head = TensorRTHeadEngine(head_path, entry, cfg, bb, trt=gpu.trt, cuda=gpu.cuda)
    try:
        x = np.random.default_rng(1).random((7, 3, 16, 16), dtype=np.float32)
        feats = ort.InferenceSession(str(bb_path)).run(None, {"images": x})[0]
        want = ort.InferenceSession(str(head_path)).run(None, {"feat": feats})[0]
        rows = bb.run(x)  # chunks of 3 rows: the second starts at byte 900, not aligned
        np.testing.assert_allclose(head.run_features(rows), want, rtol=1e-5, atol=1e-5)
        before = head.gathered_rows
        np.testing.assert_allclose(head.run_features({"feat": rows["feat"][[1, 2]]}), want[[1, 2]],
                                   rtol=1e-5, atol=1e-5)  # consecutive, but 300 bytes in: copied
        assert head.gathered_rows == before + 2
        assert not any("not 256-byte aligned" in m for m in gpu.errors)
    finally:
        head.close()
    assert gpu.live_allocations() == 0
    # the rule the engine keeps, as the fake enforces it
    gpu.cuda.init()
    ctx = gpu.cuda.Device(0).retain_primary_context()
    ctx.push()
    try:
        logger = gpu.trt.Logger(gpu.trt.Logger.WARNING)
        engine = gpu.trt.Runtime(logger).deserialize_cuda_engine(head.plan_path.read_bytes())  # type: ignore[union-attr]
        context = engine.create_execution_context()
        buf = gpu.cuda.mem_alloc(1024)
        assert context.set_tensor_address("feat", int(buf))
        assert not context.set_tensor_address("feat", int(buf) + 300)
        assert "not 256-byte aligned" in gpu.errors[-1]
        buf.free()
    finally:
        gpu.cuda.Context.pop()


def test_selftest_and_compile_on_a_shared_bundle(demo, tmp_path, monkeypatch, capsys):
    """`compile` builds the backbone and each head once; `selftest` checks each head on rows of
    features computed once (all, and a gather) and, given the whole models, the cascade's decisions."""
    from export.backbone import join_backbone

    gpu = FakeGPU("10.3.0")
    gpu.install(monkeypatch)
    cache = tmp_path / "cache"
    pub = str(DEMO_KEYS / "demo.pub")
    assert edge_main(["compile", "--bundle", str(DEMO_BUNDLE), "--cache", str(cache), "--public-key", pub]) == 0
    out = capsys.readouterr().out
    assert "backbone (shared): ok" in out and out.count("built in") == 5
    whole = tmp_path / "whole"
    join_backbone(DEMO_BUNDLE, whole)
    assert edge_main(["selftest", "--bundle", str(DEMO_BUNDLE), "--backend", "tensorrt", "--cache", str(cache),
                      "--runs", "1", "--public-key", pub, "--whole", str(whole), "--allow-unsigned"]) == 0
    out = capsys.readouterr().out
    assert "selftest: ok" in out and out.count("(shared)") == 4
    assert "shared backbone vs whole models: same decisions" in out
    assert len(gpu.builds) == 5 + 4  # the selftest built only the whole models: the shared plans were cached
    with pytest.raises(ValueError, match="INT8 is not supported for a shared-backbone bundle"):
        load_engines(demo, "tensorrt", precision="int8", cache_dir=cache, runtime={"trt": gpu.trt, "cuda": gpu.cuda})


# --- the fake against TensorRT's real Python API (tensorrt-stubs 10.13) -------------------------------
def _fake_params(fn) -> list[tuple[str, bool]]:
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    if params and params[0].name in ("self", "cls"):
        params = params[1:]
    kinds = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return [(kinds.get(p.kind, p.name), p.default is not inspect.Parameter.empty or p.kind in kinds)
            for p in params]


def _signature_matches(fake: list[tuple[str, bool]], stub: list[tuple[str, bool]]) -> bool:
    """The fake accepts exactly the calls the stub accepts, up to stub parameters with defaults it omits:
    same names in the same order, a default where the stub has one, nothing required the stub lacks."""
    if len(fake) > len(stub) and not any(n in ("*", "**") for n, _ in stub):
        return False
    for i, (name, has_default) in enumerate(fake):
        if i >= len(stub):
            return False
        s_name, s_default = stub[i]
        if s_name in ("*", "**"):
            return True
        if name != s_name or has_default != s_default:
            return False
    return all(d for _, d in stub[len(fake):])  # what the fake leaves out, the stub does not require


def _fake_members(cls: type) -> dict[str, object]:
    """What the fake class offers the code under test: public names defined in the fake itself."""
    out: dict[str, object] = {}
    for klass in reversed(cls.__mro__):
        if klass.__module__ != "fake_tensorrt":
            continue
        for name, value in vars(klass).items():
            if not name.startswith("_") or name == "__init__":
                out[name] = value
    return out


def test_the_fake_offers_only_what_tensorrt_10_has_with_its_signatures():
    """Every class, function, method, property and enum member the 10.x fake offers exists in TensorRT
    10.13's Python API (the tensorrt-stubs generated from NVIDIA's bindings) with a matching signature,
    so the fake cannot drift from TensorRT: a method the real module lacks would pass the tests here and
    fail on the Jetson."""
    classes, module = stub_api()
    trt = FakeGPU("10.3.0").trt
    problems: list[str] = []
    checked = 0
    for name, value in vars(trt).items():
        if name.startswith("__") and name != "__version__":
            continue
        if name not in module:
            problems.append(f"tensorrt.{name}: not in TensorRT's API")
            continue
        checked += 1
        if inspect.isfunction(value):
            defs = module[name] or []
            if not any(_signature_matches(_fake_params(value), stub_params(d)) for d in defs):
                problems.append(f"tensorrt.{name}{_fake_params(value)}: stub has "
                                f"{[stub_params(d) for d in defs]}")
        if not isinstance(value, type):
            continue
        members: dict[str, object] = ({m.name: m for m in value} if issubclass(value, enum.Enum)  # type: ignore[arg-type]
                                      else _fake_members(value))
        for member, obj in members.items():
            found, defs = stub_member(classes, name, member)
            if member == "__init__" and not found:
                continue  # TensorRT has no constructor for it (its factories make them); the fake's is internal
            if not found:
                problems.append(f"tensorrt.{name}.{member}: not in TensorRT's API")
                continue
            checked += 1
            fn = obj.__func__ if isinstance(obj, staticmethod | classmethod) else obj
            if isinstance(fn, property):
                if defs is not None and not any(ast.unparse(x) == "property" for d in defs
                                                for x in d.decorator_list):
                    problems.append(f"tensorrt.{name}.{member}: a property in the fake, a method in TensorRT")
            elif inspect.isfunction(fn):
                if defs is None:
                    problems.append(f"tensorrt.{name}.{member}: a method in the fake, an attribute in TensorRT")
                elif not any(_signature_matches(_fake_params(fn), stub_params(d)) for d in defs):
                    problems.append(f"tensorrt.{name}.{member}{_fake_params(fn)}: TensorRT has "
                                    f"{[stub_params(d) for d in defs]}")
    assert problems == []
    assert checked > 100  # really compared (classes, enum members, methods)


def test_the_stub_comparison_catches_drift():
    """The checker itself: a method TensorRT 10 removed, and a renamed parameter, are both caught."""
    classes, _ = stub_api()
    assert stub_member(classes, "IExecutionContext", "execute_async_v3")[0]
    assert not stub_member(classes, "IExecutionContext", "execute_async_v2")[0]  # binding API: gone in 10.x
    assert not stub_member(classes, "Builder", "build_engine")[0]
    (parse,) = stub_member(classes, "OnnxParser", "parse")[1] or []

    def good(self, model, path=None): ...
    def renamed(self, onnx, path=None): ...
    def required(self, model, path): ...
    assert _signature_matches(_fake_params(good), stub_params(parse))
    assert not _signature_matches(_fake_params(renamed), stub_params(parse))
    assert not _signature_matches(_fake_params(required), stub_params(parse))


def test_the_stubs_are_the_pinned_ones():
    """scripts/test.sh installs pyproject's pin (with --no-deps); an older stub would hide API drift."""
    import importlib.metadata
    import re

    pin = re.search(r'"tensorrt-stubs==([^"]+)"', (Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert pin is not None
    assert importlib.metadata.version("tensorrt-stubs") == pin.group(1)
