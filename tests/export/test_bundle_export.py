"""`camtrap-export bundle` end to end: real tiny models -> ONNX (parity-checked) -> signed
bundle -> loaded and self-tested by the device code."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("ultralytics")

import fixtures  # tests/export/fixtures.py (pytest puts this folder on sys.path)

from edge.bundle import load_bundle
from edge.selftest import selftest
from export.cli import main as export_main
from export.experts import train_experts
from export.train import TINY_YAML, train

TAXONOMY_CSV = """class,scientific_name,vernacular_name,rank,taxon_id
fox,Vulpes vulpes,red fox,species,
lynx,Lynx pardinus,Iberian lynx,species,gbif:2435261
rabbit,Oryctolagus cuniculus,European rabbit,species,
mouse,Apodemus sylvaticus,wood mouse,species,
wolf,Canis lupus,wolf,species,
"""  # a project-wide file: the wolf row is for another dataset and is left out


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    f = fixtures
    data = f.make_dataset(root / "ds", n_train=24, n_val=8, size=96)
    train(data, TINY_YAML, root / "global", epochs=1, imgsz=96, batch=8, plots=False, say=lambda s: None)
    groups = f.write_groups(root / "groups.yaml")
    train_experts(data, groups, root / "global", root / "experts", epochs=1, imgsz=96, batch=8, plots=False,
                  say=lambda s: None)
    checks = sorted((root / "ds" / "images" / "val").glob("*.jpg"))
    shutil.copyfile(root / "global" / "weights" / "best.pt", root / "untrained.pt")
    for pt in [root / "global" / "weights" / "best.pt", *root.glob("experts/*/run/weights/best.pt")]:
        f.make_it_detect(pt, checks, 96)  # 1-epoch models detect nothing: the parity check would refuse them
    assert export_main(["keygen", "--out", str(root / "keys" / "test")]) == 0
    (root / "taxonomy.csv").write_text(TAXONOMY_CSV)
    rc = export_main(["bundle", "--global", str(root / "global"), "--experts", str(root / "experts"),
                      "--groups", str(groups), "--out", str(root / "B"), "--sign", str(root / "keys" / "test.key"),
                      "--version", "2026.11.0", "--samples", "3", "--taxonomy", str(root / "taxonomy.csv")])
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
    for name, par in m.provenance["models"].items():  # every model compared on detections, not on nothing
        assert par["parity"]["images"] > 3 and par["parity"]["max_raw_diff"] < 1e-3, name
        assert par["parity"]["detections"] > 0 and par["parity"]["images_with_detections"] > 0, name
    assert set(m.codes) == set(m.global_model.classes)
    assert set(m.taxonomy) == set(m.global_model.classes)  # from --taxonomy, signed with the rest
    # by default the experts' frozen layers 0-9 are stored once: one backbone, a head per model
    assert m.backbone is not None and m.backbone.frozen_layers == 10
    assert all(e.head_inputs == m.backbone.outputs and e.file.startswith("models/heads/") for e in m.models)
    assert m.provenance["shared_backbone"]["shared"] == [e.name for e in m.models]
    assert m.taxonomy["lynx"].scientific_name == "Lynx pardinus" and m.taxonomy["lynx"].taxon_id == "gbif:2435261"


@pytest.mark.slow
def test_parity_check_fails_when_the_comparison_would_be_empty(bundle, tmp_path):
    import cv2

    from export.onnx import export_onnx, parity_check

    exp = export_onnx(bundle / "untrained.pt", tmp_path / "u.onnx")  # scores ~0.003 everywhere
    imgs = [cv2.imread(str(p)) for p in sorted((bundle / "ds" / "images" / "val").glob("*.jpg"))]
    with pytest.raises(ValueError, match="comparison would be empty"):
        parity_check(bundle / "untrained.pt", exp, imgs)
    with pytest.raises(ValueError, match="no check images"):
        parity_check(bundle / "untrained.pt", exp, [])


@pytest.mark.slow
def test_onnx_has_fixed_image_size_and_dynamic_batch(bundle):
    import onnxruntime as ort

    m = load_bundle(bundle / "B").manifest
    assert m.backbone is not None
    sess = ort.InferenceSession(str(bundle / "B" / m.backbone.file), providers=["CPUExecutionProvider"])
    shape = sess.get_inputs()[0].shape
    assert shape[1:] == [3, 96, 96] and isinstance(shape[0], str)


@pytest.mark.slow
def test_whole_models_on_request(bundle, capsys):
    """--whole-models opts out of the shared backbone: every model whole, as before; same answers."""
    rc = export_main(["bundle", "--global", str(bundle / "global"), "--experts", str(bundle / "experts"),
                      "--groups", str(bundle / "groups.yaml"), "--out", str(bundle / "W"), "--version", "2026.11.0",
                      "--samples", "3", "--whole-models", "--no-parity"])
    assert rc == 0 and "whole models" in capsys.readouterr().out
    w, s = load_bundle(bundle / "W").manifest, load_bundle(bundle / "B").manifest
    assert w.backbone is None and all(not e.head_inputs and e.file == f"models/{e.name}.onnx" for e in w.models)
    assert [x.expected for x in w.samples] == [x.expected for x in s.samples]  # recorded on the whole models
    assert selftest(load_bundle(bundle / "W"), "onnxruntime", runs=1).ok


@pytest.mark.slow
def test_device_selftest_passes_on_the_exported_bundle(bundle):
    b = load_bundle(bundle / "B", public_keys=[bundle / "keys" / "test.pub"], require_signature=True)
    report = selftest(b, "onnxruntime", runs=2)
    assert report.ok, [m.problems for m in report.models]


@pytest.mark.slow
def test_a_bundle_at_the_cameras_aspect_runs_on_the_device(bundle, tmp_path):
    """`bundle --imgsz HEIGHT,WIDTH`: every model exported at that rectangle (parity-checked against
    PyTorch on the same letterbox), the manifest says [h, w], and the device loads it, self-tests
    it (the samples' expected outputs were made through the rectangle) and runs the cascade."""
    import cv2
    import numpy as np
    import onnxruntime as ort

    from edge.engines import load_engines
    from edge.runner import CascadeRunner

    rc = export_main(["bundle", "--global", str(bundle / "global"), "--experts", str(bundle / "experts"),
                      "--groups", str(bundle / "groups.yaml"), "--out", str(tmp_path / "R"),
                      "--sign", str(bundle / "keys" / "test.key"), "--samples", "3", "--imgsz", "64,96",
                      "--taxonomy", str(bundle / "taxonomy.csv")])
    assert rc == 0
    b = load_bundle(tmp_path / "R", public_keys=[bundle / "keys" / "test.pub"], require_signature=True)
    assert {m.imgsz for m in b.manifest.models} == {(64, 96)}
    assert json.loads((tmp_path / "R" / "manifest.json").read_text())["models"][0]["imgsz"] == [64, 96]
    assert b.manifest.backbone is not None and b.manifest.backbone.imgsz == (64, 96)  # shared, at the rectangle
    sess = ort.InferenceSession(str(b.root / b.manifest.backbone.file), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[1:] == [3, 64, 96]
    report = selftest(b, "onnxruntime", runs=1)
    assert report.ok, [m.problems for m in report.models]
    runner = CascadeRunner(b.manifest, load_engines(b))
    assert runner.input_sizes == [(64, 96)] and runner.input_side == 96
    frame = cv2.imread(str(next((bundle / "ds" / "images" / "val").glob("*.jpg"))))
    frames = [frame, np.zeros((30, 200, 3), np.uint8)]
    split = runner.classify(frames)
    assert len(split) == 2
    # the shared backbone over the rectangle: same decisions as the whole models
    from export.backbone import join_backbone

    report = join_backbone(tmp_path / "R", tmp_path / "RW")
    assert report["joined"], report
    whole = load_bundle(tmp_path / "RW")
    assert whole.manifest.backbone is None and {m.imgsz for m in whole.manifest.models} == {(64, 96)}
    assert selftest(whole, "onnxruntime", runs=1).ok
    again = CascadeRunner(whole.manifest, load_engines(whole)).classify(frames)
    assert [c.decision for c in again] == [c.decision for c in split]
    with pytest.raises(SystemExit):
        export_main(["bundle", "--global", "g", "--experts", "e", "--groups", "y", "--out", "o", "--imgsz", "60,96"])


@pytest.mark.slow
def test_tampered_manifest_is_refused(bundle, tmp_path):
    copy = tmp_path / "B"
    shutil.copytree(bundle / "B", copy)
    man = json.loads((copy / "manifest.json").read_text())
    man["cascade"]["route_threshold"] = 0.01
    (copy / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="signature"):
        load_bundle(copy, public_keys=[bundle / "keys" / "test.pub"], require_signature=True)


@pytest.mark.slow
def test_signatures_are_checked_by_default_against_the_keys_keygen_trusts(bundle, tmp_path, monkeypatch, capsys):
    from edge.keys import user_keys_dir
    from edge.signing import key_id

    # keygen put its public key in the user keys folder: no flag needed to trust it
    assert (user_keys_dir() / f"{key_id(bundle / 'keys' / 'test.pub')}.pub").is_file()
    data = str(bundle / "ds" / "data.yaml")
    base = ["evaluate", "--data", data, "--split", "val", "--bootstrap", "0"]
    assert export_main([*base, "--bundle", str(bundle / "B"), "--out", str(tmp_path / "r1")]) == 0
    assert "signed by key" in capsys.readouterr().out
    copy = tmp_path / "B"  # a tampered bundle is refused without any flag ...
    shutil.copytree(bundle / "B", copy)
    man = json.loads((copy / "manifest.json").read_text())
    man["cascade"]["route_threshold"] = 0.01
    (copy / "manifest.json").write_text(json.dumps(man))
    assert export_main([*base, "--bundle", str(copy), "--out", str(tmp_path / "r2")]) == 2
    assert "signature" in capsys.readouterr().err
    # ... and with no trusted key at all, nothing loads unless --allow-unsigned, which says so
    monkeypatch.setenv("CAMTRAP_KEYS_DIR", str(tmp_path / "empty"))
    assert export_main([*base, "--bundle", str(bundle / "B"), "--out", str(tmp_path / "r3")]) == 2
    assert "no trusted public key" in capsys.readouterr().err
    assert export_main([*base, "--bundle", str(bundle / "B"), "--out", str(tmp_path / "r3"), "--allow-unsigned"]) == 0
    assert "signature NOT verified" in capsys.readouterr().out


@pytest.mark.slow
def test_control_from_a_run_and_evaluated_beside_single_and_cascade(bundle, tmp_path, capsys):
    # `train --control-of`: the global fine-tuned on all species with the experts' frozen layers
    assert export_main(["train", "--control-of", str(bundle / "global"), "--out", str(tmp_path / "control"),
                        "--batch", "8", "--no-plots"]) == 0
    run = json.loads((tmp_path / "control" / "run.json").read_text())
    expert = json.loads((bundle / "experts" / "small" / "run" / "run.json").read_text())
    for k in ("epochs", "imgsz", "freeze", "data"):
        assert run["args"][k] == (expert["args"][k] if k != "data" else str((bundle / "ds" / "data.yaml").resolve()))
    assert run["control_of"] == str((bundle / "global").resolve()) and run["from_checkpoint"] is True
    vals = sorted((bundle / "ds" / "images" / "val").iterdir())
    meta = {"images": {f"images/val/{p.name}": {"seq_id": f"s{k // 2}"} for k, p in enumerate(vals)}}
    (bundle / "ds" / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "report"
    capsys.readouterr()
    assert export_main(["evaluate", "--bundle", str(bundle / "B"), "--data", str(bundle / "ds" / "data.yaml"),
                        "--split", "val", "--out", str(out), "--bootstrap", "50",
                        "--control", str(tmp_path / "control")]) == 0
    printed = capsys.readouterr().out
    r = json.loads((out / "report.json").read_text())
    assert r["single_stage"]["model_runs_per_frame"] == 1.0 and r["control"]["model_runs_per_frame"] == 1.0
    assert r["cascade"]["model_runs_per_frame"] >= 1.0
    assert set(r["differences"]) == {"cascade - single_stage", "cascade - control", "control - single_stage"}
    for d in r["differences"].values():
        for key in ("macro_f1", "macro_f1_species"):
            lo, hi = d[key]["ci95"]
            assert lo <= hi and -1 <= d[key]["point"] <= 1
    for name in ("single_stage", "control", "cascade"):
        x = r[name]
        assert sum(map(sum, x["confusion"])) == 8 and x["macro_f1_ci95"] is not None
        rows = {row["class"]: row for row in x["per_class"]}
        assert rows["background"]["support"] > 0 and "sequences" in rows["fox"]
    assert r["sequences"] == 4 and sum(r["sequences_per_class"].values()) >= 4
    md = (out / "report.md").read_text()
    assert "control (single stage, same extra training)" in md and "cascade - control" in md
    assert "cascade - control" in printed and (out / "confusion_control.png").is_file()


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
    # species-only macro F1 beside the one with background, per-species intervals, sequences per species
    for name in ("single_stage", "cascade"):
        x = r[name]
        rows = [row for row in x["per_class"] if row["support"] and row["class"] != "background"]
        assert x["macro_f1_species"] == pytest.approx(sum(row["f1"] for row in rows) / len(rows))
        for row in rows:
            assert row["sequences"] >= 1 and len(row["f1_ci95"]) == 2
    assert r["control"] is None and r["sequences_per_class"]["background"] >= 1
    md = (out / "report.md").read_text()
    assert "| background |" in md and "species-only macro F1" in md and "No control was given" in md
    assert "| lynx (Iberian lynx, Lynx pardinus) |" in md  # classes shown with their taxa
