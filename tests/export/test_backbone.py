"""camtrap-export share-backbone and whole-models on the shipped demo bundle (real ultralytics ONNX
exports; shipped shared, so its whole models are made here by whole-models): graph surgery, parity
with the whole models through the device's runner, the round trip, the fallback when an expert's
frozen layers differ, and what the manifest and the engines accept."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.bundle import load_bundle
from edge.engines import load_engines
from edge.manifest import Manifest
from edge.runner import CascadeRunner
from export.backbone import cut_tensors, frozen_digest, join_backbone, share_backbone

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "edge" / "demo"


def _frames() -> list[np.ndarray]:
    imgs = [cv2.imread(str(p)) for p in sorted((DEMO / "frames").glob("*.JPG"))]
    return [*imgs, np.full((240, 320, 3), 30, np.uint8)]


def _decisions(bundle_dir: Path) -> tuple[list[dict], CascadeRunner]:
    """The cascade's decisions on the demo frames, every expert on background frames (gate off:
    the most heads run, so the most of the split is compared)."""
    b = load_bundle(bundle_dir, public_keys=None)
    every = b.manifest.cascade.model_copy(update={"gate_threshold": None})
    runner = CascadeRunner(b.manifest, load_engines(b, "onnxruntime"), every)
    return [c.decision.to_dict() for c in runner.classify(_frames())], runner


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """The demo's models as whole graphs (backbone + head merged), as `camtrap-export whole-models` makes them."""
    out = tmp_path_factory.mktemp("whole") / "bundle"
    report = join_backbone(DEMO / "bundle", out, public_keys=[DEMO / "keys" / "demo.pub"], require_signature=True)
    assert report["joined"] == ["global", "group1", "group2", "group3"]
    assert max(report["parity_max_abs"].values()) <= 1e-4
    return out


@pytest.fixture(scope="module")
def shared(tmp_path_factory, whole) -> tuple[Path, dict]:
    from edge.signing import generate_keypair

    tmp = tmp_path_factory.mktemp("shared")
    priv, pub = generate_keypair()
    (tmp / "k.pem").write_bytes(priv)
    (tmp / "k.pub").write_bytes(pub)
    out = tmp / "bundle"
    report = share_backbone(whole, out, sign_key=tmp / "k.pem")
    return out, report | {"pub": tmp / "k.pub", "source": whole}


def test_cut_is_the_frozen_layers_outputs_the_neck_reads(whole):
    import onnx

    m = onnx.load(str(whole / "models" / "global.onnx"))
    assert cut_tensors(m, 10) == ["/model.4/cv2/act/Mul_output_0", "/model.6/cv2/act/Mul_output_0",
                                  "/model.9/cv2/act/Mul_output_0"]
    e = onnx.load(str(whole / "models" / "group1.onnx"))
    assert frozen_digest(m, 10) == frozen_digest(e, 10)  # experts froze layers 0-9
    assert frozen_digest(m, 13) != frozen_digest(e, 13)  # layer 12 (a C2f, weights) was trained further


def test_shared_bundle_is_smaller_signed_and_answers_exactly_as_the_whole_models(shared):
    out, report = shared
    assert report["shared"] == ["global", "group1", "group2", "group3"] and report["whole"] == {}
    assert max(report["parity_max_abs"].values()) <= 1e-4
    assert report["mb_after"] < report["mb_before"] * 0.75  # the backbone is stored once
    b = load_bundle(out, public_keys=[report["pub"]], require_signature=True)
    assert b.manifest.backbone is not None and b.manifest.backbone.frozen_layers == 10
    assert all(m.head_inputs == b.manifest.backbone.outputs for m in b.manifest.models)
    whole_answers, _ = _decisions(report["source"])
    split, runner = _decisions(out)
    assert runner.backbone is not None
    assert split == whole_answers
    assert any(not d["empty"] for d in split) and any(len(d["route"]["models_run"]) > 2 for d in split)


def test_the_shipped_bundle_is_the_split_of_its_whole_models(shared):
    """share-backbone(whole-models(demo)) gives the shipped bundle's graphs and answers: the split is
    reproducible from the whole models, and the demo answers exactly as its whole models do."""
    out, _ = shared
    ours, theirs = load_bundle(out).manifest, load_bundle(DEMO / "bundle").manifest
    assert ours.backbone is not None and theirs.backbone is not None
    assert ours.backbone.outputs == theirs.backbone.outputs and ours.samples == theirs.samples
    assert [m.model_dump(exclude={"sha256"}) for m in ours.models] == \
        [m.model_dump(exclude={"sha256"}) for m in theirs.models]
    assert _decisions(out)[0] == _decisions(DEMO / "bundle")[0]


def test_the_backbone_runs_once_per_batch_and_heads_run_only_where_routed(shared):
    out, _ = shared
    b = load_bundle(out)
    runner = CascadeRunner(b.manifest, load_engines(b, "onnxruntime"))
    calls: list[int] = []
    real = runner.backbone.run
    runner.backbone.run = lambda x: calls.append(len(x)) or real(x)  # type: ignore[method-assign]
    res = runner.classify(_frames())
    assert calls == [len(_frames())]  # once, for the whole batch
    assert len(res) == len(_frames())


def test_an_expert_whose_frozen_layers_differ_stays_a_whole_model(tmp_path, whole):
    import onnx
    from onnx import numpy_helper

    src = tmp_path / "src"
    shutil.copytree(whole, src)
    path = src / "models" / "group3.onnx"
    m = onnx.load(str(path))
    first = next(n for n in m.graph.node if n.name.startswith("/model.0/") and n.op_type == "Conv")
    w = next(t for t in m.graph.initializer if t.name == first.input[1])
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.01, w.name))  # "retrained" layer 0
    onnx.save(m, str(path))
    man = json.loads((src / "manifest.json").read_text())
    for e in man["models"]:
        if e["name"] == "group3":
            e["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (src / "manifest.json").write_bytes(Manifest.model_validate(man).to_bytes())
    report = share_backbone(src, tmp_path / "out")
    assert report["shared"] == ["global", "group1", "group2"]
    assert "frozen layers differ" in report["whole"]["group3"]
    b = load_bundle(tmp_path / "out")
    assert b.manifest.experts["group3"].head_inputs == [] and b.manifest.experts["group3"].file == "models/group3.onnx"
    engines = load_engines(b, "onnxruntime")
    assert not hasattr(engines["group3"], "backbone") and hasattr(engines["group1"], "backbone")
    res = CascadeRunner(b.manifest, engines).classify(_frames())  # heads and a whole model together
    assert any("group3" in c.decision.models_run for c in res)


def test_manifest_and_engines_refuse_what_cannot_run(shared, tmp_path):
    out, report = shared
    man = json.loads((out / "manifest.json").read_text())
    bad = {**man, "backbone": None}
    with pytest.raises(ValueError, match="is a head graph but the bundle has no backbone"):
        Manifest.model_validate(bad)
    with pytest.raises(ValueError, match="already shares a backbone"):
        share_backbone(out, tmp_path / "again")
    with pytest.raises(ValueError, match="no shared backbone; its models are whole already"):
        join_backbone(report["source"], tmp_path / "again")
    # the update store and release fetch the backbone like every model file
    from edge.updates_store import bundle_files

    man_ = load_bundle(out).manifest
    assert man_.backbone is not None and ("models/backbone.onnx", man_.backbone.sha256) in bundle_files(man_)
    # the backbone file is verified like every model file
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    with open(copy / "models" / "backbone.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match=r"backbone\.onnx: sha256 mismatch"):
        load_bundle(copy)


@pytest.mark.parametrize("frozen", [10, 0])
def test_bundle_shares_by_default_and_falls_back_to_whole_models(whole, tmp_path, monkeypatch, frozen):
    """`build_bundle` splits the whole models it exported when their frozen layers are shared, and
    keeps them whole (signed) when nothing can be shared (here: no frozen layers recorded). The
    export itself (training runs -> ONNX) is replaced by the demo's whole models."""
    from edge.signing import generate_keypair
    from export import bundle as bundle_mod

    def exported(*, out: Path, sign_key, **_kw) -> None:  # what _build_whole writes: whole models, unsigned
        assert sign_key is None  # the split signs, or the fallback does
        shutil.copytree(whole, out)
        man = json.loads((out / "manifest.json").read_text())
        for m in man["models"]:
            m["frozen_layers"] = frozen
        (out / "manifest.json").write_bytes(Manifest.model_validate(man).to_bytes())

    monkeypatch.setattr(bundle_mod, "_build_whole", exported)
    priv, pub = generate_keypair()
    (tmp_path / "k.pem").write_bytes(priv)
    (tmp_path / "k.pub").write_bytes(pub)
    m = bundle_mod.build_bundle(global_run=tmp_path, experts_dir=tmp_path, groups_file=tmp_path / "g.yaml",
                                out=tmp_path / "B", sign_key=tmp_path / "k.pem")
    b = load_bundle(tmp_path / "B", public_keys=[tmp_path / "k.pub"], require_signature=True)
    assert b.manifest == m
    if frozen:
        assert m.backbone is not None and all(e.head_inputs for e in m.models)
    else:
        assert m.backbone is None and all(not e.head_inputs for e in m.models)
    assert not list(tmp_path.glob("B.*"))  # no temporary folder left beside it


def test_whole_models_command(tmp_path, capsys):
    from export.cli import main as export_main

    assert export_main(["whole-models", "--bundle", str(DEMO / "bundle"), "--out", str(tmp_path / "W"),
                        "--public-key", str(DEMO / "keys" / "demo.pub")]) == 0
    out = capsys.readouterr().out
    assert "whole models global, group1, group2, group3" in out and "UNSIGNED" in out
    assert load_bundle(tmp_path / "W").manifest.backbone is None
