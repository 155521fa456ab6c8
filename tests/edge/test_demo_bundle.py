"""The shipped demo bundle (edge/demo/): signed, self-consistent, and right on its own demo frames.

The demo, the classify tests and the grouping test all lean on this bundle, so these checks
fail loudly if a rebuild (scripts/build_demo_bundle.py) ships something broken or unsigned.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from edge.bundle import BundleError, load_bundle
from edge.demo import DEMO_BUNDLE, DEMO_FRAMES, DEMO_KEYS
from edge.detection import iou
from edge.signing import generate_keypair, key_id

PUB = DEMO_KEYS / "demo.pub"


def labels() -> dict[str, dict]:
    return json.loads((DEMO_FRAMES / "labels.json").read_text())


def truth_boxes(v: dict) -> list[tuple[float, float, float, float]]:
    return [(x, y, x + w, y + h) for x, y, w, h in v["boxes"]]


def edge_cli() -> list[str]:
    exe = Path(sys.executable).with_name("camtrap-edge")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "edge.cli"]


def test_signature_verifies_against_the_shipped_public_key():
    b = load_bundle(DEMO_BUNDLE, public_keys=[PUB], require_signature=True)
    assert b.key_id == key_id(PUB)
    assert (DEMO_BUNDLE / "manifest.sig").stat().st_size == 64


def test_altered_or_foreign_signed_bundle_is_refused(tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(DEMO_BUNDLE, copy)
    man = copy / "manifest.json"
    man.write_bytes(man.read_bytes().replace(b'"route_threshold"', b'"route_threshold" ', 1))
    with pytest.raises(BundleError, match=r"manifest\.json: signature does not match"):
        load_bundle(copy, public_keys=[PUB], require_signature=True)
    other = tmp_path / "other.pub"
    other.write_bytes(generate_keypair()[1])
    with pytest.raises(BundleError, match="signature does not match"):
        load_bundle(DEMO_BUNDLE, public_keys=[other], require_signature=True)


def test_manifest_is_a_small_three_group_cascade():
    m = load_bundle(DEMO_BUNDLE, public_keys=[PUB], require_signature=True).manifest
    species = m.global_model.classes
    assert len(species) == 9 and len(m.groups) == 3
    assert sorted(s for g in m.groups.values() for s in g) == sorted(species)  # a partition
    assert set(m.experts) == set(m.groups)
    for e in m.models:
        assert e.layout == "yolov8" and e.imgsz == 160 and e.file.endswith(".onnx")
    for g, e in m.experts.items():
        assert e.classes == m.groups[g] and e.frozen_layers == 10
        assert e.backbone_sha256 == m.global_model.backbone_sha256 is not None  # the shared backbone
    # shipped as one backbone (layers 0-9, stored once) and a head per model
    assert m.backbone is not None and m.backbone.frozen_layers == 10 and m.backbone.imgsz == 160
    assert all(e.head_inputs == m.backbone.outputs and e.file.startswith("models/heads/") for e in m.models)
    assert m.samples and all(s.sha256 for s in m.samples)
    assert all(set(s.expected) == {e.name for e in m.models} for s in m.samples)
    size = sum(p.stat().st_size for p in DEMO_BUNDLE.rglob("*") if p.is_file())
    assert size < 12e6, f"demo bundle is {size / 1e6:.1f} MB"  # 16.3 MB as four whole models
    assert not any(p.suffix in {".pt", ".pkl", ".pth"} for p in DEMO_BUNDLE.rglob("*"))


def test_frames_and_labels_agree():
    lab = labels()
    on_disk = sorted(p.name for p in DEMO_FRAMES.iterdir() if p.suffix.lower() == ".jpg")
    assert sorted(lab) == on_disk
    animals = [v for v in lab.values() if not v["empty"]]
    empties = [v for v in lab.values() if v["empty"]]
    assert len(empties) == 3 and all(not v["boxes"] for v in empties)
    assert len({s for v in animals for s in v["species"]}) >= 3
    assert any(v["ir"] for v in lab.values())
    for name, v in lab.items():
        img = cv2.imread(str(DEMO_FRAMES / name))
        assert img is not None and img.shape[:2] == (v["height"], v["width"])


def test_selftest_command_passes():
    r = subprocess.run([*edge_cli(), "selftest", "--bundle", str(DEMO_BUNDLE), "--public-key", str(PUB),
                        "--require-signature", "--runs", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "selftest: ok" in r.stdout and f"signed by key {key_id(PUB)}" in r.stdout
    # no trusted key anywhere: refused by default, accepted with --allow-unsigned and said so
    plain = subprocess.run([*edge_cli(), "selftest", "--bundle", str(DEMO_BUNDLE), "--runs", "1"],
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and "no trusted public key" in plain.stderr, plain.stdout + plain.stderr
    allowed = subprocess.run([*edge_cli(), "selftest", "--bundle", str(DEMO_BUNDLE), "--runs", "1",
                              "--allow-unsigned"], capture_output=True, text=True, timeout=120)
    assert allowed.returncode == 0 and "signature NOT verified" in allowed.stdout, allowed.stdout + allowed.stderr


def test_cascade_finds_the_animals_and_leaves_the_empties_empty():
    from edge.engines import load_engines
    from edge.runner import CascadeRunner

    b = load_bundle(DEMO_BUNDLE, public_keys=[PUB], require_signature=True)
    engines = load_engines(b, "onnxruntime")
    try:
        runner = CascadeRunner(b.manifest, engines)
        lab = labels()
        names = sorted(lab)
        results = runner.classify([cv2.imread(str(DEMO_FRAMES / n)) for n in names])
    finally:
        for e in engines.values():
            e.close()
    for name, res in zip(names, results, strict=True):
        d, truth = res.decision, lab[name]
        if truth["empty"]:
            assert d.empty, f"{name}: empty frame, cascade saw {d.counts} ({d.route.reason})"
            continue
        assert not d.empty, f"{name}: {truth['species']} missed ({d.route.reason})"
        assert d.top[0] in truth["species"], f"{name}: {truth['species']} named {d.top[0]}"
        assert d.route.reason in ("routed", "background")
        best = max(d.detections, key=lambda x: x.score)
        assert max(iou(best.box, t) for t in truth_boxes(truth)) >= 0.5, f"{name}: box {best.box} off"
        if d.route.reason == "routed":  # the expert of the species' group answered
            assert best.model == b.manifest.group_of(best.species)
