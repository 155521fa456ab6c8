"""camtrap-export calibrate: the gate's choice (pure, hand-made frames) and the command on a real
bundle (hand-made ONNX models run by ONNX Runtime, a real signature, the device's loader)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from edge.cascade import CascadePolicy, gated, plan
from edge.detection import Detection
from export.calibrate import (
    FrameOutcome,
    animals_needed,
    calibrate,
    choose_gate,
    choose_settings,
    drop_bound,
    gate_outcome,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "edge"))
from make_onnx import GLOBAL_CLASSES, IMGSZ, STRIDE, patch_image, write_test_bundle


def bg(best: float, animal: bool, found: bool, runs: int = 4) -> FrameOutcome:
    return FrameOutcome(animal=animal, found=found, background=True, global_best=best, runs=runs)


ROUTED_ANIMAL = FrameOutcome(animal=True, found=True, background=False, global_best=0.9, runs=2)


def test_gate_outcome_counts_recall_and_runs():
    frames = [ROUTED_ANIMAL, bg(0.0, False, False), bg(0.08, True, True), bg(0.2, False, False)]
    off = gate_outcome(frames, None)
    assert off["animal_recall"] == 1.0 and off["runs_per_frame"] == (2 + 4 + 4 + 4) / 4 and off["gated"] == 0
    at = gate_outcome(frames, 0.1)  # gates the 0.0 and the 0.08 frame: the latter's animal is lost
    assert at["animal_recall"] == 0.5 and at["runs_per_frame"] == (2 + 1 + 1 + 4) / 4 and at["gated"] == 2
    assert gate_outcome(frames, 0.0)["gated"] == 0  # nothing scores below 0


def test_choose_gate_is_the_highest_gate_within_the_recall_budget():
    # 200 animal frames routed and found; background: 100 empties at 0.00-0.099, and animals
    # only the experts find at 0.12 and 0.16
    frames = [ROUTED_ANIMAL] * 200 + [bg(i / 1000, False, False) for i in range(100)]
    frames += [bg(0.12, True, True), bg(0.16, True, True)]
    gate, with_, off = choose_gate(frames, max_recall_drop=0.0, ceiling=0.25)
    assert gate == 0.12 and with_["animal_recall"] == off["animal_recall"]
    assert with_["gated"] == 100 and with_["runs_per_frame"] < off["runs_per_frame"]
    # half a point of 202 animal frames lets one go: the gate rises past 0.12, not past 0.16
    gate, with_, off = choose_gate(frames, max_recall_drop=0.005, ceiling=0.25)
    assert gate == 0.16 and off["animal_recall"] - with_["animal_recall"] == pytest.approx(1 / 202)
    # no expert-only animals: the gate goes up to the route threshold
    gate, _, _ = choose_gate([ROUTED_ANIMAL, bg(0.01, False, False)], ceiling=0.25)
    assert gate == 0.25
    # an animal only the experts find, on a frame the global model scored 0: no gate keeps a
    # zero budget, so none is set
    gate, with_, off = choose_gate([ROUTED_ANIMAL, bg(0.0, True, True)], max_recall_drop=0.0, ceiling=0.25)
    assert gate is None and with_ == off


def xbg(best: float, animal: bool, *experts: float) -> FrameOutcome:
    """A background frame with each expert's best recorded, likeliest first (floor 0.3)."""
    return FrameOutcome(animal=animal, found=max(experts) >= 0.3, background=True, global_best=best,
                        runs=1 + len(experts), experts=experts)


def test_cap_and_stop_replay_the_device_rules_from_one_all_experts_run():
    f = xbg(0.1, True, 0.0, 0.5, 0.9)  # the second-likeliest expert finds it
    assert gate_outcome([f], None)["animal_recall"] == 1.0 and gate_outcome([f], None)["runs_per_frame"] == 4
    one = gate_outcome([f], None, cap=1)
    assert one["animal_recall"] == 0.0 and one["lost"] == 1 and one["runs_per_frame"] == 2
    two = gate_outcome([f], None, cap=2)
    assert two["animal_recall"] == 1.0 and two["runs_per_frame"] == 3
    stopped = gate_outcome([f], None, stop=0.4)  # stops at the first expert reaching 0.4
    assert stopped["animal_recall"] == 1.0 and stopped["runs_per_frame"] == 3
    assert gate_outcome([f], 0.2, cap=2)["runs_per_frame"] == 1  # gated before any cap


def test_the_drop_bound_says_how_little_a_small_sample_promises():
    assert drop_bound(0, 88) == pytest.approx(1 - 0.05 ** (1 / 88))  # ~3.3%: the 179-frame calibration
    assert drop_bound(0, 1500) < 0.005 < drop_bound(3, 600)
    assert drop_bound(5, 5) == 1.0 and drop_bound(0, 0) == 1.0
    assert animals_needed(0.005) == 598 and drop_bound(0, 598) <= 0.005 < drop_bound(0, 597)


def test_choice_by_the_bound_keeps_every_expert_when_the_sample_is_too_small():
    # 88 animal frames, one only the experts find at global 0.12: a gate up to 0.12 loses nothing,
    # which is all the point estimate sees; the bound says 88 frames still allow a 3.3% drop
    frames = [ROUTED_ANIMAL] * 87 + [xbg(0.12, True, 0.0, 0.8)] + [xbg(i / 1000, False, 0.0, 0.0) for i in range(90)]
    gate, with_, _ = choose_gate(frames, ceiling=0.25)
    assert gate == 0.12 and with_["lost"] == 0 and with_["drop_upper"] > 0.03
    assert choose_gate(frames, ceiling=0.25, confidence=0.95)[0] == 0.12  # losing nothing always keeps it
    frames2 = [*frames, xbg(0.05, True, 0.9, 0.0)]  # gating at 0.12 would lose this one
    assert choose_gate(frames2, 0.02, ceiling=0.25)[0] == 0.12  # 1 of 89 lost is within 2 pp
    assert choose_gate(frames2, 0.02, ceiling=0.25, confidence=0.95)[0] == 0.05  # the bound says no


def test_gate_and_cap_are_chosen_together_for_the_fewest_runs():
    # empties the global model scored 0.0-0.09 and an animal at 0.1 only the likeliest expert finds
    frames = [ROUTED_ANIMAL] * 50 + [xbg(i / 1000, False, 0.0, 0.0, 0.0) for i in range(90)]
    frames += [xbg(0.1, True, 0.7, 0.0, 0.0), xbg(0.2, False, 0.0, 0.0, 0.0)]
    best, rows, off = choose_settings(frames, 3, 0.0, ceiling=0.25)
    assert [r["cap"] for r in rows] == [None, 2, 1] and all(r["feasible"] for r in rows)
    assert best["cap"] == 1 and best["gate"] == 0.1 and best["lost"] == 0
    assert best["runs_per_frame"] < rows[0]["runs_per_frame"] and off["runs_per_frame"] == (100 + 92 * 4) / 142
    # an animal the second expert finds: cap 1 loses it, so cap 2 wins
    frames.append(xbg(0.15, True, 0.0, 0.6, 0.0))
    best, rows, _ = choose_settings(frames, 3, 0.0, ceiling=0.25)
    assert not rows[2]["feasible"] and best["cap"] == 2 and best["gate"] == 0.1


def test_plan_uses_the_same_gate_rule():
    policy = CascadePolicy(gate_threshold=0.1)
    weak = [Detection("Lynx pardinus", 0.08, (0, 0, 1, 1))]
    assert plan(weak, {}, ["felids"], policy).reason == "gated" and gated(0.08, 0.1)
    assert plan([Detection("Lynx pardinus", 0.1, (0, 0, 1, 1))], {}, ["felids"], policy).reason == "background"
    assert not gated(0.1, 0.1) and not gated(0.0, None)


# --- the command on a real bundle ---------------------------------------------------------------

def _dataset(root: Path) -> Path:
    """val/test splits: bright patches (animals the global model routes), dim patches (labelled
    animals the global model scores under the route threshold) and empty frames."""
    frames = {f"bright{ch}": (patch_image(IMGSZ, STRIDE, (1, ch + 1), ch, scale=2), ch) for ch in range(3)}
    frames |= {f"dim{ch}": (patch_image(IMGSZ, STRIDE, (2, ch + 1), ch, scale=2, value=95), ch) for ch in range(3)}
    frames |= {f"empty{i}": (np.full((IMGSZ * 2, IMGSZ * 2, 3), 20 + 5 * i, np.uint8), None) for i in range(3)}
    for split in ("val", "test"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for name, (img, cls) in frames.items():
            cv2.imwrite(str(root / "images" / split / f"{name}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 98])
            if cls is not None:
                (root / "labels" / split / f"{name}.txt").write_text(f"{cls} 0.5 0.5 0.2 0.2\n")
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(root), "train": "images/val", "val": "images/val",
                                    "test": "images/test", "names": GLOBAL_CLASSES}))
    return data


@pytest.fixture()
def keys(tmp_path):
    from edge.signing import generate_keypair

    priv, pub = generate_keypair()
    (tmp_path / "k.pem").write_bytes(priv)
    (tmp_path / "k.pub").write_bytes(pub)
    return priv, tmp_path / "k.pem", tmp_path / "k.pub"


def test_calibrate_writes_the_gate_into_the_signed_manifest(tmp_path, keys):
    from edge.bundle import load_bundle
    from export.evaluate import evaluate

    priv, key, pub = keys
    bundle = write_test_bundle(tmp_path / "b", sign_key=priv)
    data = _dataset(tmp_path / "data")
    before = (bundle / "manifest.sig").read_bytes()
    r = calibrate(bundle, data, sign_key=key)
    w, o = r["with_gate"], r["without_gate"]
    # the dim animals take the background route and no expert finds them, so gating costs
    # nothing and the gate rises to the route threshold (the blue animal's expert reads red:
    # missed, routed, either way)
    assert o["animal_recall"] == pytest.approx(1 / 3) and w["animal_recall"] == pytest.approx(1 / 3)
    assert r["gate_threshold"] == 0.25 and w["gated"] == 6 and w["runs_per_frame"] < o["runs_per_frame"]
    assert (bundle / "manifest.sig").read_bytes() != before  # re-signed
    loaded = load_bundle(bundle, public_keys=[pub], require_signature=True)  # verifies
    assert loaded.manifest.cascade.gate_threshold == 0.25
    cal = loaded.manifest.provenance["gate_calibration"]
    assert cal["split"] == "val" and cal["background_max_experts"] is None
    # what the promise rests on: 9 frames, 6 of them animals, none lost, and a bound that says how little that is
    assert (cal["frames"], cal["animal_frames"], cal["lost"]) == (9, 6, 0) and cal["drop_upper"] > 0.3
    # evaluate scores the deployed gate and reports both
    rep = evaluate(bundle, data, "test", tmp_path / "eval", n_boot=0, public_keys=[pub], require_signature=True)
    assert rep["key_id"]
    assert rep["gate"]["threshold"] == 0.25 and rep["routes"].get("gated") == 6
    assert rep["gate"]["with"]["runs_per_frame"] == rep["model_runs_per_image"]
    assert rep["gate"]["without"]["runs_per_frame"] > rep["model_runs_per_image"]
    assert "Background gate 0.25" in (tmp_path / "eval" / "report.md").read_text()


def test_calibrate_refuses_to_break_a_signature(tmp_path, keys):
    priv, _key, _pub = keys
    bundle = write_test_bundle(tmp_path / "b", sign_key=priv)
    data = _dataset(tmp_path / "data")
    manifest = (bundle / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match="the bundle is signed; pass --sign"):
        calibrate(bundle, data)
    assert (bundle / "manifest.json").read_bytes() == manifest


def test_calibrate_cli_dry_run_writes_nothing(tmp_path, capsys):
    from export.cli import main

    bundle = write_test_bundle(tmp_path / "b")
    data = _dataset(tmp_path / "data")
    manifest = (bundle / "manifest.json").read_bytes()
    rc = main(["calibrate", "--bundle", str(bundle), "--data", str(data), "--dry-run", "--allow-unsigned",
               "--report", str(tmp_path / "r.json")])
    assert rc == 0 and (bundle / "manifest.json").read_bytes() == manifest
    out = capsys.readouterr().out
    assert out.startswith("gate 0.2500, all of 2 experts on background frames: animal recall 0.3333 "
                          "(all experts 0.3333)")
    assert "warning: 6 animal frames cannot show a drop within 0.50 pp at 95% confidence" in out
    assert json.loads((tmp_path / "r.json").read_text())["gate_threshold"] == 0.25


def test_evaluate_simulates_burst_route_reuse_on_the_sequences(tmp_path):
    """A burst of four frames of the same lynx (one sequence in meta.json): with reuse, the first
    frame runs the whole cascade and the next three only the felids expert; same answers."""
    from export.evaluate import evaluate

    bundle = write_test_bundle(tmp_path / "b")
    data = _dataset(tmp_path / "data")
    img = cv2.imread(str(tmp_path / "data" / "images" / "test" / "bright0.jpg"))
    names = ["bright0"]
    for k in range(1, 4):
        cv2.imwrite(str(tmp_path / "data" / "images" / "test" / f"bright0_b{k}.jpg"), img)
        (tmp_path / "data" / "labels" / "test" / f"bright0_b{k}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
        names.append(f"bright0_b{k}")
    (tmp_path / "data" / "meta.json").write_text(json.dumps(
        {"images": {f"images/test/{n}.jpg": {"seq_id": "burst"} for n in names}}))
    rep = evaluate(bundle, data, "test", tmp_path / "eval", n_boot=0)
    assert rep["route_reuse"] is None  # the bundle does not set it
    rep = evaluate(bundle, data, "test", tmp_path / "eval", n_boot=0, route_reuse=0.6)
    x = rep["route_reuse"]
    assert x["reused"] == 3 and x["answers_changed"] == 0 and x["animal_recall"] == x["animal_recall_without"]
    assert x["runs_per_frame"] == pytest.approx(x["runs_per_frame_without"] - 3 / x["frames"])
    assert "Burst route reuse 0.6" in (tmp_path / "eval" / "report.md").read_text()
