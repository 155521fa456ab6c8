"""`camtrap-edge classify` on the demo frames plus junk -> a MegaDetector 1.6 file, checked field by field.

The `megadetector` package cannot be installed here, so the output is held to the format
document (megadetector-output-format.md, 1.6) through edge.records.validate_md_output and the
explicit checks below: every input accounted for once, failures recorded with null detections,
boxes normalised [x_min, y_min, w, h], classifications sorted by confidence.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from badinputs import make_bad_corpus

from edge.bundle import load_bundle
from edge.classify import classify_paths
from edge.demo import DEMO_BUNDLE, DEMO_FRAMES, DEMO_KEYS
from edge.detection import iou
from edge.records.megadetector import validate_md_output
from edge.signing import key_id

PUB = DEMO_KEYS / "demo.pub"
BAD = ("zero_bytes", "truncated_jpeg", "text_named_jpg")  # each must come back as a failure entry
ODD_BUT_OK = ("png", "odd_spaces")  # readable: processed, whatever they hold


def edge_cli() -> list[str]:
    exe = Path(sys.executable).with_name("camtrap-edge")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "edge.cli"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("classify")
    frames = tmp / "frames"
    shutil.copytree(DEMO_FRAMES, frames)  # a folder argument, searched for images (labels.json is skipped)
    corpus = make_bad_corpus(tmp / "bad")
    extra = [corpus[k][0] for k in BAD + ODD_BUT_OK]
    out = tmp / "r.json"
    r = subprocess.run([*edge_cli(), "classify", str(frames), *map(str, extra), "--bundle", str(DEMO_BUNDLE),
                        "--public-key", str(PUB), "--require-signature", "--out", str(out)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    labels = json.loads((DEMO_FRAMES / "labels.json").read_text())
    return {"doc": json.loads(out.read_text()), "stdout": r.stdout, "frames": frames, "labels": labels,
            "bad": [corpus[k][0] for k in BAD], "ok_odd": [corpus[k][0] for k in ODD_BUT_OK], "out": out}


def test_document_is_valid_md_1_6(run):
    doc = run["doc"]
    assert validate_md_output(doc) == []
    assert set(doc) == {"info", "detection_categories", "classification_categories", "images"}
    info = doc["info"]
    assert info["format_version"] == "1.6"
    version = load_bundle(DEMO_BUNDLE).version
    assert info["detector"] == f"global@{version}" and info["classifier"] == f"cascade@{version}"
    for k in ("detection_completion_time", "classification_completion_time"):
        datetime.strptime(info[k], "%Y-%m-%d %H:%M:%S")
    assert 0 <= info["detector_metadata"]["typical_detection_threshold"] <= 1
    assert doc["detection_categories"] == {"1": "animal", "2": "person", "3": "vehicle"}
    species = load_bundle(DEMO_BUNDLE).manifest.global_model.classes
    assert doc["classification_categories"] == {str(i): s for i, s in enumerate(species)}
    assert not run["out"].with_name("r.json.journal").read_bytes()  # flushed and closed


def test_every_input_is_accounted_for_once_relative_to_the_common_root(run):
    files = [im["file"] for im in run["doc"]["images"]]
    root = run["frames"].parent.resolve()  # the deepest folder holding the frames folder and the bad files
    want = [f"frames/{n}" for n in run["labels"]] + [p.resolve().relative_to(root).as_posix()
                                                     for p in run["bad"] + run["ok_odd"]]
    assert sorted(files) == sorted(want)
    assert f"file names relative to {root}" in run["stdout"] and f"signed by key {key_id(PUB)}" in run["stdout"]
    assert f"{len(want)} images: " in run["stdout"] and f"{len(run['bad'])} unreadable" in run["stdout"]


def test_unreadable_files_are_failure_entries(run):
    by_file = {im["file"]: im for im in run["doc"]["images"]}
    for p in run["bad"]:
        im = by_file[_rel(run, p)]
        assert set(im) == {"file", "failure", "detections"}
        assert im["detections"] is None
        assert isinstance(im["failure"], str) and im["failure"] and "\n" not in im["failure"]
    for p in run["ok_odd"]:
        im = by_file[_rel(run, p)]
        assert "failure" not in im and isinstance(im["detections"], list)


def test_animals_and_empties_field_by_field(run):
    doc = run["doc"]
    names = doc["classification_categories"]
    by_file = {im["file"]: im for im in doc["images"]}
    thr = doc["info"]["detector_metadata"]["typical_detection_threshold"]
    for name, truth in run["labels"].items():
        im = by_file[f"frames/{name}"]
        assert set(im) == {"file", "detections"}
        dets = im["detections"]
        if truth["empty"]:
            assert dets == [], f"{name}: empty frame with detections {dets}"
            continue
        assert dets, f"{name}: {truth['species']} not detected"
        assert [d["conf"] for d in dets] == sorted((d["conf"] for d in dets), reverse=True)
        w, h = truth["width"], truth["height"]
        gt = [(x / w, y / h, (x + bw) / w, (y + bh) / h) for x, y, bw, bh in truth["boxes"]]
        for d in dets:
            assert d["category"] == "1" and isinstance(d["conf"], float) and thr <= d["conf"] <= 1
            x, y, bw, bh = d["bbox"]
            assert 0 <= x <= 1 and 0 <= y <= 1 and 0 < bw <= 1 - x + 1e-4 and 0 < bh <= 1 - y + 1e-4
            cl = d["classifications"]
            assert cl and all(isinstance(c, str) and c in names and 0 <= p <= 1 for c, p in cl)
            assert [p for _, p in cl] == sorted((p for _, p in cl), reverse=True)
            assert len({c for c, _ in cl}) == len(cl)
        top = dets[0]
        assert names[top["classifications"][0][0]] in truth["species"], f"{name}: {top}"
        assert top["classifications"][0][1] == pytest.approx(top["conf"], abs=1e-3)
        x, y, bw, bh = top["bbox"]
        assert max(iou((x, y, x + bw, y + bh), g) for g in gt) >= 0.5, f"{name}: bbox {top['bbox']} vs {gt}"


def _rel(run, p) -> str:
    return p.resolve().relative_to(run["frames"].parent.resolve()).as_posix()


def test_relative_to_a_given_root_and_refused_outside_it(tmp_path):
    frames = tmp_path / "card" / "DCIM"
    shutil.copytree(DEMO_FRAMES, frames)
    c = classify_paths([frames], DEMO_BUNDLE, tmp_path / "r.json", relative_to=tmp_path / "card")
    files = {im["file"] for im in json.loads((tmp_path / "r.json").read_text())["images"]}
    assert c["image_root"] == str((tmp_path / "card").resolve())
    assert files == {f"DCIM/{n}" for n in json.loads((DEMO_FRAMES / "labels.json").read_text())}
    one = next(frames.glob("*.JPG"))
    classify_paths([one], DEMO_BUNDLE, tmp_path / "one.json")  # a single file: named relative to its folder
    assert [im["file"] for im in json.loads((tmp_path / "one.json").read_text())["images"]] == [one.name]
    with pytest.raises(ValueError, match="not under the image root"):
        classify_paths([frames], DEMO_BUNDLE, tmp_path / "x.json", relative_to=tmp_path / "elsewhere")


def test_unsigned_or_unverifiable_bundles_are_refused_unless_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("CAMTRAP_KEYS_DIR", str(tmp_path / "no-keys"))
    base = [*edge_cli(), "classify", str(DEMO_FRAMES), "--bundle", str(DEMO_BUNDLE), "--out", str(tmp_path / "r.json")]
    r = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "no trusted public key" in r.stderr and "--allow-unsigned" in r.stderr and "no-keys" in r.stderr
    r = subprocess.run([*base, "--allow-unsigned"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "signature NOT verified" in r.stdout
    # the user keys folder (which `camtrap-export keygen` fills) is trusted without a flag
    (tmp_path / "no-keys").mkdir()
    shutil.copy(PUB, tmp_path / "no-keys" / "demo.pub")
    r = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and f"signed by key {key_id(PUB)}" in r.stdout


def test_missing_input_is_one_clear_line(tmp_path):
    r = subprocess.run([*edge_cli(), "classify", str(tmp_path / "nope"), "--bundle", str(DEMO_BUNDLE),
                        "--public-key", str(PUB), "--out", str(tmp_path / "r.json")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "nope: no such file or folder" in r.stderr


def test_a_folder_with_a_symlink_to_elsewhere_is_classified_whole(tmp_path):
    """One link to a file outside the folder aborted the whole run ("not under the image root"):
    the link keeps its own name, and a FIFO or device it may lead to is a failure entry."""
    import os

    frames = tmp_path / "card"
    shutil.copytree(DEMO_FRAMES, frames)
    outside = tmp_path / "elsewhere.jpg"
    shutil.copy(next(DEMO_FRAMES.glob("*.JPG")), outside)
    (frames / "link.jpg").symlink_to(outside)
    os.mkfifo(tmp_path / "pipe")
    (frames / "to-a-pipe.jpg").symlink_to(tmp_path / "pipe")
    c = classify_paths([frames, frames / "to-a-pipe.jpg"], DEMO_BUNDLE, tmp_path / "r.json")
    images = {im["file"]: im for im in json.loads((tmp_path / "r.json").read_text())["images"]}
    assert c["image_root"] == str(frames.resolve())
    assert "detections" in images["link.jpg"] and "failure" not in images["link.jpg"]
    assert "not a regular file" in images["to-a-pipe.jpg"]["failure"]
