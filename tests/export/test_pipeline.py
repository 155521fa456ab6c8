"""`pipeline`: config checking, fingerprints, and a real resumable run (prepare from a YOLO set)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("torch")
pytest.importorskip("ultralytics")

import fixtures  # tests/export/fixtures.py (pytest puts this folder on sys.path)

from export.pipeline import fingerprint, load_config, run_pipeline


def _write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_config_errors_name_each_field(tmp_path):
    cfg = _write(tmp_path / "p.yaml", {"workdir": "w", "data": "d.yaml", "train": {"epochs": "many", "lr": 1},
                                       "group": {"k": "some"}})
    with pytest.raises(ValueError) as e:
        load_config(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "p.yaml" in msg
    for field in ("train.epochs", "train.lr", "group.k"):
        assert field in msg
    with pytest.raises(ValueError, match="either 'data'"):
        load_config(_write(tmp_path / "q.yaml", {"workdir": "w"}))
    with pytest.raises(ValueError, match="exactly one of coco, yolo, labels_csv"):
        load_config(_write(tmp_path / "r.yaml", {"workdir": "w", "prepare": {"seed": 1}}))
    with pytest.raises(FileNotFoundError, match="pipeline config not found"):
        load_config(tmp_path / "none.yaml")


def test_config_paths_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    cfg = load_config(_write(tmp_path / "sub" / "p.yaml",
                             {"workdir": "w", "prepare": {"coco": "c.json"}, "group": {"groups": "g.yaml"}}))
    assert cfg.workdir == tmp_path / "sub" / "w"
    assert cfg.prepare.coco == tmp_path / "sub" / "c.json" and cfg.group.groups == tmp_path / "sub" / "g.yaml"


def test_fingerprint_depends_on_config_and_inputs():
    a = fingerprint("train", {"epochs": 1}, {"dataset": "x"})
    assert a == fingerprint("train", {"epochs": 1}, {"dataset": "x"})
    assert a != fingerprint("train", {"epochs": 2}, {"dataset": "x"})
    assert a != fingerprint("train", {"epochs": 1}, {"dataset": "y"})
    assert a != fingerprint("group", {"epochs": 1}, {"dataset": "x"})


@pytest.mark.slow
def test_pipeline_resumes_and_reruns_only_what_changed(tmp_path):
    f = fixtures
    f.make_dataset(tmp_path / "ds", n_train=24, n_val=8, size=96)
    groups = f.write_groups(tmp_path / "groups.yaml")
    small = {"epochs": 1, "imgsz": 96, "batch": 8, "plots": False}
    doc = {"workdir": "work", "prepare": {"yolo": "ds/data.yaml"}, "train": small,
           "group": {"groups": "groups.yaml"}, "experts": small}
    cfg = _write(tmp_path / "pipeline.yaml", doc)

    lines: list[str] = []
    res = run_pipeline(cfg, say=lines.append)
    assert res["ran"] == ["prepare", "train", "group", "experts", "control"] and res["not_shared"] == []
    work = tmp_path / "work"
    state = json.loads((work / "state.json").read_text())
    assert set(state["steps"]) == {"prepare", "train", "group", "experts", "control"}
    # the fair control: the global model fine-tuned on all species for the experts' epochs, same frozen layers
    control = json.loads((work / "control" / "run.json").read_text())
    expert = json.loads((work / "experts" / "medium" / "run" / "run.json").read_text())
    assert control["control_of"] == str((work / "train").resolve())
    assert control["args"]["model"] == str((work / "train" / "weights" / "best.pt").resolve())
    assert sorted(control["names"]) == sorted(fixtures.SPECIES)  # all species
    for k in ("epochs", "imgsz", "freeze"):
        assert control["args"][k] == expert["args"][k]
    control_mtime = (work / "control" / "weights" / "best.pt").stat().st_mtime_ns
    assert {p.name for p in (work / "experts").iterdir() if p.is_dir()} == {"medium", "small"}
    best = work / "train" / "weights" / "best.pt"
    best_mtime = best.stat().st_mtime_ns

    lines.clear()
    assert run_pipeline(cfg, say=lines.append)["ran"] == []
    assert lines == [f"skip {s}: up to date" for s in ("prepare", "train", "group", "experts", "control")]

    # a person changes the grouping: group and experts rerun, the global model stays
    f.write_groups(groups, {"a": ["fox", "rabbit"], "b": ["lynx", "mouse"]})
    lines.clear()
    assert run_pipeline(cfg, say=lines.append)["ran"] == ["group", "experts"]  # the control depends on train only
    assert lines[:2] == ["skip prepare: up to date", "skip train: up to date"]
    assert best.stat().st_mtime_ns == best_mtime
    assert (work / "control" / "weights" / "best.pt").stat().st_mtime_ns == control_mtime
    summary = json.loads((work / "experts" / "experts.json").read_text())
    assert set(summary["experts"]) == {"a", "b"}

    # editing the written groups.yaml by hand reruns only the experts
    g = yaml.safe_load((work / "group" / "groups.yaml").read_text())
    g["groups"] = {"all": ["fox", "lynx", "rabbit", "mouse"]}
    (work / "group" / "groups.yaml").write_text(yaml.safe_dump(g))
    assert run_pipeline(cfg, say=lambda s: None)["ran"] == ["experts"]

    # a changed training option reruns train and everything after it, not prepare
    doc["train"] = {**small, "seed": 1}
    _write(cfg, doc)
    assert run_pipeline(cfg, say=lambda s: None)["ran"] == ["train", "group", "experts", "control"]


@pytest.mark.slow
def test_pipeline_group_step_clusters_with_grouping(tmp_path):
    """The real group step (export.grouping on the trained model), from an existing data.yaml."""
    pytest.importorskip("export.evidence")
    f = fixtures
    data = f.make_dataset(tmp_path / "ds", n_train=16, n_val=8, size=96)
    small = {"epochs": 1, "imgsz": 96, "batch": 8, "plots": False}
    cfg = _write(tmp_path / "p.yaml", {"workdir": "w", "data": str(data), "train": small,
                                       "group": {"k": 2, "min_support": 1}, "experts": small,
                                       "control": {"enabled": False}})
    res = run_pipeline(cfg, say=lambda s: None)
    assert res["ran"] == ["train", "group", "experts"]  # no prepare section: the data.yaml is used as is
    written = yaml.safe_load((tmp_path / "w" / "group" / "groups.yaml").read_text())["groups"]
    assert sorted(s for v in written.values() for s in v) == sorted(f.SPECIES)
    experts = json.loads((tmp_path / "w" / "experts" / "experts.json").read_text())["experts"]
    assert set(experts) == set(written)
