"""`experts`: derived datasets, one real expert per group, and the frozen-backbone check."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("ultralytics")

import fixtures  # tests/export/fixtures.py (pytest puts this folder on sys.path)  # noqa: E402

from export.experts import (  # noqa: E402
    build_expert_dataset,
    compare_frozen,
    train_experts,
)
from export.grouping import read_groups  # noqa: E402
from export.train import TINY_YAML, read_data_yaml, train  # noqa: E402


def _saved_model(pt):
    ck = torch.load(pt, map_location="cpu", weights_only=False)
    return ck.get("ema") or ck["model"]  # final checkpoints keep the EMA weights under "model"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    return fixtures.make_dataset(root / "ds", n_train=24, n_val=8, size=96)


# ---------------------------------------------------------------- groups and derived datasets (fast)

def test_unknown_species_in_groups_is_one_clear_line(tmp_path, dataset):
    f = fixtures
    bad = f.write_groups(tmp_path / "g.yaml", {"medium": ["fox", "lynx"], "small": ["rabbit", "mouse", "wolf"]})
    with pytest.raises(ValueError, match="wolf") as e:
        read_groups(bad, read_data_yaml(dataset).names)
    assert "\n" not in str(e.value) and "g.yaml" in str(e.value)
    with pytest.raises(FileNotFoundError, match="groups file not found"):
        read_groups(tmp_path / "none.yaml")


def test_cli_bad_groups_exit_2(tmp_path, dataset, capsys):
    from export.cli import main

    bad = fixtures.write_groups(tmp_path / "g.yaml", {"all": ["fox", "lynx", "rabbit", "mouse", "wolf"]})
    rc = main(["experts", "--data", str(dataset), "--groups", str(bad), "--from", str(tmp_path / "norun"),
               "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "wolf" in err[0]


def test_derived_dataset_remaps_classes_and_keeps_empties(tmp_path, dataset):
    spec = read_data_yaml(dataset)
    out = tmp_path / "small"
    counts = build_expert_dataset(spec, ["mouse", "rabbit"], out)  # group order, not data.yaml order
    d = yaml.safe_load((out / "data.yaml").read_text())
    assert d["names"] == {0: "mouse", 1: "rabbit"}
    n_empty_src = sum(1 for p in (dataset.parent / "labels" / "train").glob("*.txt") if not p.read_text().strip())
    assert counts["train"]["empty_images"] == n_empty_src > 0
    assert counts["train"]["negative_images"] == 0
    for lab in (out / "labels" / "train").glob("*.txt"):
        src = dataset.parent / "labels" / "train" / lab.name
        want = [{3: "0", 2: "1"}[int(x.split()[0])] + " " + x.split(maxsplit=1)[1]
                for x in src.read_text().splitlines()]
        assert lab.read_text().splitlines() == want  # mouse (3) -> 0, rabbit (2) -> 1, boxes unchanged
    images = sorted(p.name for p in (out / "images" / "train").iterdir())
    assert len(images) == counts["train"]["group_images"] + counts["train"]["empty_images"]


def test_derived_dataset_negatives_and_empty_cap(tmp_path, dataset):
    spec = read_data_yaml(dataset)
    c = build_expert_dataset(spec, ["fox", "lynx"], tmp_path / "neg", negatives=True, empty_ratio=0.2)
    t = c["train"]
    assert t["negative_images"] > 0  # rabbits and mice, boxes dropped
    assert t["empty_images"] == int(0.2 * t["group_images"]) < t["empty_available"]
    empty_labels = [p for p in (tmp_path / "neg" / "labels" / "train").glob("*.txt") if not p.read_text()]
    assert len(empty_labels) == t["negative_images"] + t["empty_images"]


# ---------------------------------------------------------------- real experts (slow)

@pytest.mark.slow
def test_experts_share_the_frozen_backbone(tmp_path, dataset):
    f = fixtures
    run = tmp_path / "global"
    train(dataset, TINY_YAML, run, epochs=1, imgsz=96, batch=8, plots=False, say=lambda s: None)
    groups = f.write_groups(tmp_path / "groups.yaml")
    lines: list[str] = []
    s = train_experts(dataset, groups, run, tmp_path / "experts", batch=8, plots=False, say=lines.append)
    assert set(s["experts"]) == {"medium", "small"}
    for g in s["experts"]:  # not told: the global run's epochs and image size (its backbone is theirs)
        args = json.loads((tmp_path / "experts" / g / "run" / "run.json").read_text())["args"]
        assert (args["epochs"], args["imgsz"]) == (1, 96)
    # global trained whole (freeze 0): its experts still freeze layers 0-9, so the backbone is shared
    assert s["global"]["freeze"] == 10
    for g, species in f.GROUPS.items():
        rec = json.loads((tmp_path / "experts" / g / "expert.json").read_text())
        assert rec["names"] == {str(i): n for i, n in enumerate(species)}
        assert rec["frozen"]["identical"] is True and rec["frozen"]["differ"] == []
        assert rec["frozen"]["tensors"] > 100 and rec["frozen"]["dtypes"] == ["torch.float16", "torch.int64"]
        assert rec["backbone_sha256"] == s["global"]["backbone_sha256"]
        ck = torch.load(rec["best"], map_location="cpu", weights_only=False)
        model = ck["ema"] or ck["model"]
        assert model.names == dict(enumerate(species)) and model.model[-1].nc == len(species)
        assert any(x.startswith(f"expert {g}: OK, layers 0-9") for x in lines)
    # ... and heads differ from the global one (they were trained)
    g_sd = _saved_model(run / "weights" / "best.pt").state_dict()
    e_sd = _saved_model(s["experts"]["small"]["best"]).state_dict()
    assert not torch.equal(g_sd["model.12.cv1.conv.weight"], e_sd["model.12.cv1.conv.weight"])

    # the check can fail: a moved BatchNorm statistic in a frozen layer is caught by name
    bad = tmp_path / "tampered.pt"
    shutil.copyfile(s["experts"]["small"]["best"], bad)
    ck = torch.load(bad, map_location="cpu", weights_only=False)
    (ck.get("ema") or ck["model"]).model[3].bn.running_mean.add_(0.01)
    torch.save(ck, bad)
    rep = compare_frozen(run / "weights" / "best.pt", bad, 10)
    assert rep["identical"] is False and rep["differ"] == ["model.3.bn.running_mean"]
    assert rep["expert_backbone_sha256"] != rep["global_backbone_sha256"]
