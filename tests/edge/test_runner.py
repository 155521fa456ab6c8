"""edge.runner over a real small bundle: batches, prepared inputs, empty batches."""

from __future__ import annotations

import numpy as np
import pytest
from make_onnx import IMGSZ, STRIDE, patch_image, write_test_bundle

from edge.bundle import load_bundle
from edge.engines import load_engines
from edge.runner import CascadeRunner


def _runner(tmp_path):
    b = load_bundle(write_test_bundle(tmp_path / "b"))
    return CascadeRunner(b.manifest, load_engines(b, "onnxruntime"))


def test_prepared_batch_equals_direct_classification_and_empty_batches_are_fine(tmp_path):
    r = _runner(tmp_path)
    imgs = [patch_image(IMGSZ, STRIDE, (1, 1), 0, scale=3), np.full((90, 160, 3), 20, np.uint8),
            patch_image(IMGSZ, STRIDE, (2, 2), 1, scale=2)]
    direct = r.classify(imgs)
    prepared = r.classify_prepared(r.prepare(imgs))
    assert [c.decision.to_dict() for c in direct] == [c.decision.to_dict() for c in prepared]
    assert direct[0].decision.top[0] == "Lynx pardinus" and direct[1].decision.empty
    assert direct[2].decision.top[0] == "Felis silvestris"
    # the single-stage answer comes from the same global run, at the global model's thresholds
    assert [c.single_stage for c in direct] == ["Lynx pardinus", None, "Felis silvestris"]
    assert r.classify([]) == [] and r.classify_prepared(r.prepare([])) == []
    # experts see only the frames routed to them; the empty frame goes to every expert
    assert direct[0].decision.models_run[0] == "global" and "felids" in direct[0].decision.models_run
    assert direct[1].decision.route.reason == "background"


def test_background_pass_can_stop_at_the_first_confident_expert(tmp_path):
    """background_stop: the experts run one at a time, the group the global model scored
    highest first, and the pass stops once one is confident; unset, every expert runs."""
    b = load_bundle(write_test_bundle(tmp_path / "b"))
    engines = load_engines(b, "onnxruntime")
    green = patch_image(IMGSZ, STRIDE, (1, 1), 1, scale=2, value=125)  # Felis at ~0.47
    empty = np.full((128, 128, 3), 20, np.uint8)
    policy = b.manifest.cascade.model_copy(update={"route_threshold": 0.6})  # so the Felis frame is background
    every = CascadeRunner(b.manifest, engines, policy).classify([green, empty])
    staged_ = CascadeRunner(b.manifest, engines, policy.model_copy(update={"background_stop": 0.3}))
    staged_ = staged_.classify([green, empty])
    # the paper's rule: every expert, the likeliest group (felids, from the global's weak Felis) first
    assert every[0].decision.route.reason == "background"
    assert every[0].decision.models_run == ("global", "felids", "canids")
    # staged: felids answers Felis above the stop, canids never runs; same answer
    assert staged_[0].decision.models_run == ("global", "felids")
    assert staged_[0].decision.top[0] == every[0].decision.top[0] == "Felis silvestris"
    assert "stopped after 1 of 2 experts" in staged_[0].decision.route.why
    # an empty frame: no expert reaches the stop, so every expert still runs
    assert staged_[1].decision.models_run == every[1].decision.models_run == ("global", "felids", "canids")
    assert staged_[1].decision.empty and "none reached stop" in staged_[1].decision.route.why


def _bundle_engines(tmp_path):
    b = load_bundle(write_test_bundle(tmp_path / "b"))
    return b, load_engines(b, "onnxruntime")


def test_background_pass_capped_at_the_likeliest_experts(tmp_path):
    """background_max_experts: on a background frame only the N experts of the groups the global
    model scored highest (below the route threshold) run; the others are skipped."""
    b, engines = _bundle_engines(tmp_path)
    green = patch_image(IMGSZ, STRIDE, (1, 1), 1, scale=2, value=125)  # Felis at ~0.47 for the global
    empty = np.full((128, 128, 3), 20, np.uint8)
    policy = b.manifest.cascade.model_copy(update={"route_threshold": 0.6})  # so the Felis frame is background
    every = CascadeRunner(b.manifest, engines, policy).classify([green, empty])
    capped = CascadeRunner(b.manifest, engines, policy.model_copy(update={"background_max_experts": 1}))
    capped_ = capped.classify([green, empty])
    assert every[0].decision.models_run == ("global", "felids", "canids")
    assert capped_[0].decision.models_run == ("global", "felids")  # the likeliest group only
    assert capped_[0].decision.top[0] == every[0].decision.top[0] == "Felis silvestris"
    assert "the 1 likeliest of 2 experts run" in capped_[0].decision.route.why
    assert len(capped_[1].decision.models_run) == 2 and capped_[1].decision.empty  # truly empty: 1 expert


def _reusing(tmp_path, **kw):
    b, engines = _bundle_engines(tmp_path)
    policy = b.manifest.cascade.model_copy(update={"route_reuse": 0.6, **kw})
    return b, engines, CascadeRunner(b.manifest, engines, policy)


RED = patch_image(IMGSZ, STRIDE, (1, 1), 0, scale=2)  # Lynx pardinus, confident


def _red_and_blue() -> np.ndarray:
    img = RED.copy()
    img[2 * 32:3 * 32, 3 * 32:4 * 32, 0] = 230  # a blue patch elsewhere: Vulpes vulpes for the global model
    return img


def test_a_burst_reuses_its_confident_route_and_a_species_entering_later_is_still_found(tmp_path):
    """route_reuse: the first frame of an event runs the whole cascade; the next frames (at most
    route_reuse_frames in a row) run only the expert it was routed to; then a frame runs the whole
    cascade again, which finds a fox that walked in beside the lynx."""
    _, _, r = _reusing(tmp_path, route_reuse_frames=3)
    first = r.classify_prepared(r.prepare([RED]), events=[7])
    burst = [RED, _red_and_blue(), RED, _red_and_blue()]
    out = first + r.classify_prepared(r.prepare(burst), events=[7] * 4)
    runs = [c.decision.models_run for c in out]
    assert runs[:4] == [("global", "felids"), ("felids",), ("felids",), ("felids",)]
    assert runs[4][0] == "global" and set(runs[4]) == {"global", "felids", "canids"}
    assert all(c.decision.top[0] == "Lynx pardinus" for c in out[:4])
    assert [c.decision.route.reused for c in out] == [False, True, True, True, False]
    assert "Vulpes vulpes" not in out[2].decision.counts  # the cost: a reused frame sees only its route
    assert "Vulpes vulpes" in out[4].decision.counts  # found by the frame that renews the route
    assert "global model skipped" in out[1].decision.route.why
    d = out[1].decision.to_dict()
    assert d["route"]["reused"] is True and type(out[1].decision).from_dict(d).route.reused
    # events unknown or reuse off: every frame runs the whole cascade, with the same answers
    plain = r.classify([RED, *burst])
    assert all(c.decision.models_run[0] == "global" for c in plain)
    assert [c.decision.top for c in plain][:2] == [c.decision.top for c in out][:2]
    # routes come from earlier batches: a new event's frames in the batch that sets its route all
    # run the whole cascade (waves of smaller calls cost more than the global runs they save)
    new = r.classify_prepared(r.prepare([RED, RED]), events=[8, 8])
    assert [c.decision.models_run for c in new] == [("global", "felids")] * 2


def test_reused_route_that_is_no_longer_confident_runs_the_whole_cascade(tmp_path):
    """The animal left: the reused expert sees nothing, so the frame runs the whole cascade (the
    expert is not run twice), and an event's route carries across batches but not to a new runner
    (a restart or a bundle swap starts with no routes)."""
    b, engines, r = _reusing(tmp_path)
    empty = np.full((128, 128, 3), 20, np.uint8)
    first, = r.classify_prepared(r.prepare([RED]), events=["e"])
    assert first.decision.models_run == ("global", "felids") and len(r.routes) == 1
    again, gone = r.classify_prepared(r.prepare([RED, empty]), events=["e", "e"])
    assert again.decision.models_run == ("felids",)  # across batches
    assert gone.decision.route.reason == "background" and gone.decision.empty
    assert gone.decision.models_run == ("global", "felids", "canids")  # felids ran once, as the reused route
    assert "reused but not confident" in gone.decision.why
    assert len(r.routes) == 0  # an empty frame renews no route
    fresh = CascadeRunner(b.manifest, engines, r.policy)
    fresh.classify_prepared(fresh.prepare([RED]), events=["x"])
    restarted = CascadeRunner(b.manifest, engines, r.policy)  # same event, memory gone
    assert restarted.classify_prepared(restarted.prepare([RED]), events=["x"])[0].decision.models_run[0] == "global"


def test_events_interleaved_in_one_batch_each_reuse_their_own_route(tmp_path):
    """Two bursts interleaved: each frame reuses its own event's route, and the reused experts run
    in the same call as the experts the other frames' routes need (one call per expert)."""
    _, _, r = _reusing(tmp_path)
    green = patch_image(IMGSZ, STRIDE, (2, 2), 1, scale=2)  # Felis silvestris
    r.classify_prepared(r.prepare([RED, green]), events=[1, 2])
    calls: list[tuple[str, int]] = []
    for runner in (r.global_runner, *r.experts.values()):
        real = runner.engine.infer
        runner.engine.infer = lambda x, real=real, name=runner.entry.name: calls.append((name, len(x))) or real(x)
    out = r.classify_prepared(r.prepare([RED, green, RED, green]), events=[1, 2, None, 3])
    assert [c.decision.models_run for c in out] == [("felids",), ("felids",), ("global", "felids"),
                                                    ("global", "felids")]
    assert [c.decision.top[0] for c in out] == ["Lynx pardinus", "Felis silvestris"] * 2
    assert sorted(calls) == [("felids", 4), ("global", 2)]
    with pytest.raises(ValueError, match="2 events for 1 images"):
        r.classify_prepared(r.prepare([RED]), events=[1, 2])


def test_a_batch_runs_each_model_once(tmp_path):
    """One batch, one run of the global model (on all its frames) and one of each expert (on
    the frames routed to it). The whole cascade ran once per frame of the batch (the global
    model n times, n x its cost), and the results' ``ms`` hid it (each run split n ways)."""
    r = _runner(tmp_path)
    runs: list[tuple[str, int]] = []
    for runner in (r.global_runner, *r.experts.values()):
        real = runner.engine.infer
        runner.engine.infer = lambda x, real=real, name=runner.entry.name: runs.append((name, len(x))) or real(x)
    imgs = [patch_image(IMGSZ, STRIDE, (1, 1), 0, scale=3), np.full((90, 160, 3), 20, np.uint8),
            patch_image(IMGSZ, STRIDE, (2, 2), 1, scale=2), np.full((90, 160, 3), 30, np.uint8)]
    out = r.classify(imgs)
    assert sorted(runs) == sorted({(n, k) for n, k in runs})  # no model twice
    assert ("global", 4) in runs and sum(1 for n, _ in runs if n == "global") == 1
    assert [c.decision.models_run[0] for c in out] == ["global"] * 4
