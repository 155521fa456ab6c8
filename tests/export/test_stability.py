"""How sure the grouping is: the bootstrap of the evidence, its verdicts and K=auto's choice."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from test_grouping import COUNTS, SPECIES

from export.cli import main as export_main
from export.grouping import leaf_label, write_confusion_csv
from export.stability import (
    STABLE_SHARE,
    Stability,
    Units,
    advice,
    group_units,
    lands,
    prefer_stable,
    units_from_counts,
)


def test_lands_matches_groups_by_overlap_not_by_name():
    original = {"a": ["x", "y", "z"], "b": ["u", "v"]}
    resampled = {"g2": ["u", "v", "z"], "g1": ["x", "y"]}  # z moved over; names differ
    assert lands(original, resampled) == {"x": True, "y": True, "z": False, "u": True, "v": True}


def test_units_resample_and_merge_by_sequence():
    u = units_from_counts(np.array([[2, 1, 0], [0, 1, 1]]))
    assert len(u) == 5 and u.kind == "boxes"
    counts, soft = u.total()
    assert counts.tolist() == [[2, 1, 0], [0, 1, 1]] and soft is None
    w = np.array([2, 0, 0, 1, 0])  # the first box twice, the fourth once
    assert u.total(w)[0].tolist() == [[2, 0, 0], [0, 1, 0]]
    per_image = Units(np.ones((3, 1, 2)), np.ones((3, 1, 1)), np.ones((3, 1)), "images")
    seq = group_units(per_image, ["s1", "s2", "s1"])  # frames of one burst resample together
    assert seq.kind == "sequences" and len(seq) == 2 and seq.counts[:, 0, 0].tolist() == [2, 1]


def _st(k, share):
    return Stability(k, share, 100, "sequences", 50, sorted(s for s, v in share.items() if v < STABLE_SHARE))


def test_k_auto_prefers_the_cut_the_resamples_pick_most_often():
    assert prefer_stable({2: 30, 3: 170}, 3) == 3
    assert prefer_stable({2: 120, 3: 80}, 3) == 2  # a largest gap that one thin species can move is not taken
    assert prefer_stable({2: 100, 3: 100}, 3) == 3  # a tie: the full evidence's own cut
    assert prefer_stable({2: 90, 4: 90, 3: 20}, 3) == 2


def test_thin_evidence_is_flagged_with_advice_and_marked_on_the_dendrogram(tmp_path, capsys):
    # the planted matrix: roe_deer and wildcat have 5 validation boxes and one confusion between them
    csv_path = tmp_path / "c.csv"
    write_confusion_csv(csv_path, SPECIES, COUNTS)
    out = tmp_path / "groups.yaml"
    assert export_main(["group", "--confusion", str(csv_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    st = yaml.safe_load(out.read_text())["meta"]["stability"]
    share = st["share_in_group"]
    assert set(share) == set(SPECIES) and st["resamples"] == 200 and st["units"] == f"{COUNTS.sum()} boxes"
    assert "roe_deer" in st["unstable"] and all(share[s] < STABLE_SHARE for s in st["unstable"])
    for common in ("red_deer", "fox", "mouse"):  # dozens of boxes each: stable
        assert share[common] >= 0.9
    assert "--val-frac" in st["advice"] and "groups.yaml" in st["advice"] and "roe_deer" in printed
    assert st["k_largest_gap"] == 3 and sum(st["k_votes"].values()) == 200 and st["k_votes"]["3"] > 100
    assert leaf_label("roe_deer", "group1", share, st["unstable"]).endswith(" ?")
    assert leaf_label("fox", "group2", share, st["unstable"]) == f"fox [group2] {share['fox']:.0%}"
    assert export_main(["group", "--confusion", str(csv_path), "--out", str(tmp_path / "n.yaml"),
                        "--bootstrap", "0"]) == 0
    assert "stability" not in yaml.safe_load((tmp_path / "n.yaml").read_text())["meta"]
    assert "unstable" in advice(_st(3, {"a": 0.5}))


def test_k_auto_takes_the_cut_stability_prefers(tmp_path, monkeypatch):
    import export.grouping as grouping

    csv_path = tmp_path / "c.csv"
    write_confusion_csv(csv_path, SPECIES, COUNTS)
    seen = {}

    def pick(votes, gap):
        seen.update(votes)
        return 2

    monkeypatch.setattr(grouping, "prefer_stable", pick)
    groups = grouping.run_grouping(out=tmp_path / "g.yaml", k="auto", confusion_csv=csv_path, n_boot=20)
    assert len(groups) == 2 and sum(seen.values()) == 20
    assert sorted(s for m in groups.values() for s in m) == sorted(SPECIES)


@pytest.mark.parametrize("k", [2, 3])
def test_a_given_k_is_kept_and_scored(tmp_path, k):
    from export.grouping import run_grouping

    csv_path = tmp_path / "c.csv"
    write_confusion_csv(csv_path, SPECIES, COUNTS)
    groups = run_grouping(out=tmp_path / "g.yaml", k=k, confusion_csv=csv_path, n_boot=30)
    st = yaml.safe_load((tmp_path / "g.yaml").read_text())["meta"]["stability"]
    assert len(groups) == k and st["resamples"] == 30 and "k_votes" not in st


def test_a_species_with_too_few_validation_boxes_is_flagged_whatever_its_share(tmp_path):
    from export.grouping import run_grouping

    counts = COUNTS.copy()
    counts[2] = [1, 0, 1, 0, 0, 0, 0, 0, 0, 0]  # roe_deer: 2 validation boxes
    csv_path = tmp_path / "c.csv"
    write_confusion_csv(csv_path, SPECIES, counts)
    run_grouping(out=tmp_path / "g.yaml", k=3, confusion_csv=csv_path, n_boot=50)
    st = yaml.safe_load((tmp_path / "g.yaml").read_text())["meta"]["stability"]
    assert "roe_deer" in st["unstable"] and "roe_deer (" in st["advice"] and "2 boxes)" in st["advice"]
