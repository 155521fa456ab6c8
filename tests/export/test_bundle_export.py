"""`camtrap-export bundle` end to end: real tiny models -> ONNX (parity-checked) -> signed
bundle -> loaded and self-tested by the device code."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ultralytics")

import fixtures  # tests/export/fixtures.py (pytest puts this folder on sys.path)

from edge.bundle import load_bundle
from edge.selftest import selftest
from export.cli import main as export_main
from export.experts import train_experts
from export.train import TINY_YAML, train


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    f = fixtures
    data = f.make_dataset(root / "ds", n_train=24, n_val=8, size=96)
    train(data, TINY_YAML, root / "global", epochs=1, imgsz=96, batch=8, plots=False, say=lambda s: None)
    groups = f.write_groups(root / "groups.yaml")
    train_experts(data, groups, root / "global", root / "experts", epochs=1, imgsz=96, batch=8, plots=False,
                  say=lambda s: None)
    assert export_main(["keygen", "--out", str(root / "keys" / "test")]) == 0
    rc = export_main(["bundle", "--global", str(root / "global"), "--experts", str(root / "experts"),
                      "--groups", str(groups), "--out", str(root / "B"), "--sign", str(root / "keys" / "test.key"),
                      "--version", "2026.11.0", "--samples", "3"])
    assert rc == 0
    return root


@pytest.mark.slow
def test_bundle_is_signed_complete_and_pickle_free(bundle):
    b = load_bundle(bundle / "B", public_keys=[bundle / "keys" / "test.pub"], require_signature=True)
    m = b.manifest
    assert m.bundle_version == "2026.11.0" and b.key_id
    assert [e.name for e in m.models] == ["global", *m.groups]
    assert m.global_model.layout == "yolov8" and m.global_model.imgsz == 96
    assert m.global_model.frozen_layers == 10
    assert set(m.groups) == set(fixtures.GROUPS)
    for e in m.models:
        if e.role == "expert":
            assert e.classes == m.groups[e.group] and e.frozen_layers == 10
            assert e.backbone_sha256 is not None and e.backbone_sha256 == m.global_model.backbone_sha256
    assert len(m.samples) == 3 and all(s.sha256 for s in m.samples)
    assert not [p for p in (bundle / "B").rglob("*") if p.suffix in (".pt", ".pkl", ".pickle")]
    par = m.provenance["models"]["global"]["parity"]
    assert par["images"] == 3 and par["max_raw_diff"] < 1e-3
    assert set(m.codes) == set(m.global_model.classes)


@pytest.mark.slow
def test_onnx_has_fixed_image_size_and_dynamic_batch(bundle):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(bundle / "B" / "models" / "global.onnx"), providers=["CPUExecutionProvider"])
    shape = sess.get_inputs()[0].shape
    assert shape[1:] == [3, 96, 96] and isinstance(shape[0], str)


@pytest.mark.slow
def test_device_selftest_passes_on_the_exported_bundle(bundle):
    b = load_bundle(bundle / "B", public_keys=[bundle / "keys" / "test.pub"], require_signature=True)
    report = selftest(b, "onnxruntime", runs=2)
    assert report.ok, [m.problems for m in report.models]


@pytest.mark.slow
def test_tampered_manifest_is_refused(bundle, tmp_path):
    import shutil

    copy = tmp_path / "B"
    shutil.copytree(bundle / "B", copy)
    man = json.loads((copy / "manifest.json").read_text())
    man["cascade"]["route_threshold"] = 0.01
    (copy / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="signature"):
        load_bundle(copy, public_keys=[bundle / "keys" / "test.pub"], require_signature=True)


@pytest.mark.slow
def test_evaluate_scores_single_stage_and_cascade_side_by_side(bundle, tmp_path):
    out = tmp_path / "report"
    # prepare's meta.json: frames of a burst share a seq_id; the bootstrap resamples bursts
    vals = sorted((bundle / "ds" / "images" / "val").iterdir())
    meta = {"images": {f"images/val/{p.name}": {"seq_id": f"s{k // 2}"} for k, p in enumerate(vals)}}
    (bundle / "ds" / "meta.json").write_text(json.dumps(meta))
    rc = export_main(["evaluate", "--bundle", str(bundle / "B"), "--data", str(bundle / "ds" / "data.yaml"),
                      "--split", "val", "--out", str(out), "--bootstrap", "50",
                      "--public-key", str(bundle / "keys" / "test.pub"), "--require-signature"])
    assert rc == 0
    r = json.loads((out / "report.json").read_text())
    import yaml

    names = yaml.safe_load((bundle / "ds" / "data.yaml").read_text())["names"]
    assert r["labels"] == [*(names[i] for i in sorted(names)), "background"]
    n = r["images"]
    assert n == 8 and sum(r["routes"].values()) == n
    for name in ("single_stage", "cascade"):
        rows = r[name]["per_class"]
        assert [x["class"] for x in rows] == r["labels"]
        assert sum(x["support"] for x in rows) == n  # every image scored exactly once
        assert sum(map(sum, r[name]["confusion"])) == n
        assert 0.0 <= r[name]["macro_f1"] <= 1.0
        assert (out / f"confusion_{name}.png").stat().st_size > 1000
    assert r["model_runs_per_image"] >= 1.0
    assert r["gain_bootstrap"]["clusters"] == len(vals) // 2
    md = (out / "report.md").read_text()
    assert "| background |" in md and "Macro F1" in md
