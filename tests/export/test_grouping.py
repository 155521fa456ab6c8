"""Look-alike grouping: planted sparse matrices, soft evidence, files, plots, CLI errors."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from export.cli import main as export_main
from export.grouping import (
    adjusted_rand_index,
    cluster,
    groups_to_labels,
    load_confusion_csv,
    read_groups,
    run_grouping,
    similarity_profile,
    write_confusion_csv,
    write_groups,
)

SPECIES = ["red_deer", "fallow_deer", "roe_deer", "fox", "lynx", "wildcat", "rabbit", "mouse", "genet"]
PLANTED = {"g1": ["red_deer", "fallow_deer", "roe_deer"], "g2": ["fox", "lynx", "wildcat"],
           "g3": ["rabbit", "mouse", "genet"]}
TRUTH = groups_to_labels(PLANTED, SPECIES)
# [true, predicted + background]. Sparse and noisy: ~7% of matched boxes confused, some across
# groups (red_deer->mouse, lynx->fallow_deer, fox->rabbit, mouse->red_deer); the rare species
# (roe_deer, wildcat, genet: 5 boxes each) are never confused in their own rows.
COUNTS = np.array([
    [41, 3, 1, 0, 0, 0, 0, 1, 0, 14],
    [2, 37, 0, 0, 1, 0, 0, 0, 0, 12],
    [0, 0, 3, 0, 0, 0, 0, 0, 0, 2],
    [0, 0, 0, 44, 2, 0, 1, 0, 0, 15],
    [0, 1, 0, 4, 35, 1, 0, 0, 0, 11],
    [0, 0, 0, 0, 0, 2, 0, 0, 0, 3],
    [0, 0, 0, 0, 0, 0, 47, 2, 0, 18],
    [1, 0, 0, 0, 0, 0, 3, 33, 2, 10],
    [0, 0, 0, 0, 0, 0, 0, 0, 4, 1],
])


def _ari(groups: dict[str, list[str]], species=SPECIES, truth=TRUTH) -> float:
    return adjusted_rand_index(groups_to_labels(groups, species), truth)


def _same_partition(groups: dict[str, list[str]], planted: dict[str, list[str]]) -> bool:
    return sorted(sorted(m) for m in groups.values()) == sorted(sorted(m) for m in planted.values())


def _planted_sparse(seed: int):
    """9 species in 3 groups, hard counts from a modest model (half missed, 7% confused, 40% of
    confusions across groups), rare rows (2-5 boxes) never confused, and soft score vectors in
    which look-alikes carry mass without winning the argmax."""
    rng = np.random.default_rng(seed)
    n, group = 9, np.repeat(np.arange(3), 3)
    rare = {2, 5, 8}
    counts = np.zeros((n, n + 1), dtype=np.int64)
    soft_sum = np.zeros((n, n))
    for i in range(n):
        mates = [j for j in range(n) if group[j] == group[i] and j != i]
        others = [j for j in range(n) if group[j] != group[i]]
        for _ in range(rng.integers(2, 6) if i in rare else rng.integers(15, 40)):
            logit = rng.normal(-4.5, 1.0, n)
            logit[mates] = rng.normal(-1.5, 1.2, len(mates))
            logit[i] = rng.normal(-0.3 if i in rare else 1.5, 1.0)
            soft_sum[i] += 1 / (1 + np.exp(-logit))
            if rng.random() < 0.5:
                counts[i, n] += 1
            elif i in rare or rng.random() < 0.93:
                counts[i, i] += 1
            else:
                counts[i, rng.choice(mates if rng.random() < 0.6 else others)] += 1
    soft = soft_sum / counts.sum(axis=1, keepdims=True)
    return counts, soft, [f"g{g}" for g in group]


# ----------------------------------------------------------------- (a) planted confusion CSV


@pytest.mark.parametrize("k", [3, "auto"])
def test_planted_csv_recovers_groups_exactly(tmp_path, k):
    csv_path = tmp_path / "confusion.csv"
    write_confusion_csv(csv_path, SPECIES, COUNTS)
    species, counts = load_confusion_csv(csv_path)
    assert species == SPECIES and (counts == COUNTS).all()
    groups = cluster(similarity_profile(counts), species, k, support=counts.sum(axis=1))
    assert _same_partition(groups, PLANTED), groups


def test_planted_csv_defeats_the_paper_recipe():
    """The fixture is hard enough: the paper's plain cut on D = 1 - (S + S^T)/2 fails on it."""
    naive = cluster(similarity_profile(COUNTS), SPECIES, 3, allow_singletons=True)
    assert _ari(naive) < 0.6
    assert any(len(m) == 1 for m in naive.values())  # a rare species left alone


def test_allow_singletons_keeps_isolated_species_alone():
    p = np.eye(4) + np.array([[0, 0.2, 0, 0], [0.2, 0, 0, 0], [0, 0, 0, 0.01], [0, 0, 0.01, 0]])
    sp = ["a", "b", "c", "d"]
    assert _same_partition(cluster(p, sp, 3, allow_singletons=True), {"x": ["a", "b"], "y": ["c"], "z": ["d"]})
    assert _same_partition(cluster(p, sp, 2), {"x": ["a", "b"], "y": ["c", "d"]})


def test_k_out_of_range_rejected():
    with pytest.raises(ValueError, match="k must be between 1 and 9"):
        cluster(similarity_profile(COUNTS), SPECIES, 10)


# ----------------------------------------------------------------- (b) sparse hard + soft evidence


@pytest.mark.parametrize("k", [3, "auto"])
def test_soft_evidence_recovers_groups_where_hard_counts_fail(k):
    species = [f"s{i}" for i in range(9)]
    hard_aris, soft_aris, naive_aris = [], [], []
    for seed in range(20):
        counts, soft, truth = _planted_sparse(seed)
        sup = counts.sum(axis=1)
        naive = cluster(similarity_profile(counts), species, k, allow_singletons=True)
        hard = cluster(similarity_profile(counts), species, k, support=sup)
        both = cluster(similarity_profile(counts, soft), species, k, support=sup)
        naive_aris.append(_ari(naive, species, truth))
        hard_aris.append(_ari(hard, species, truth))
        soft_aris.append(_ari(both, species, truth))
    assert min(soft_aris) == pytest.approx(1.0), soft_aris
    assert np.mean(naive_aris) < 0.4 and np.mean(hard_aris) < 0.5  # hard counts alone carry too little


def test_profile_mixes_hard_and_soft_rows():
    counts = np.array([[8, 2, 5], [0, 0, 3]])  # second species: every box missed
    soft = np.array([[0.6, 0.2], [0.3, 0.1]])
    p = similarity_profile(counts, soft, soft_weight=0.5)
    assert np.allclose(p[0], [0.5 * 0.8 + 0.5 * 0.75, 0.5 * 0.2 + 0.5 * 0.25])
    assert np.allclose(p[1], [0.75, 0.25])  # soft only: no hard row
    assert np.allclose(similarity_profile(counts)[1], 0)  # background is not species evidence
    with pytest.raises(ValueError, match="soft evidence must be"):
        similarity_profile(counts, soft[:1])


# ----------------------------------------------------------------- (c) bad CSVs


@pytest.mark.parametrize("text, message", [
    ("true,a,b,background\na,3,x,1\nb,0,2,0\n", r"row 'a', column 'b': 'x' is not an integer"),
    ("true,a,b\na,3,1\nc,0,2\n", r"unknown species 'c'"),
    ("true,a,b,background\na,3,1,0\n", r"no row for species \['b'\]"),
    ("true,a,b\na,3,-1\nb,0,2\n", r"negative count -1"),
    ("species,a,b\na,3,1\nb,0,2\n", r"header must start with 'true'"),
    ("true,a,b\na,3,1\na,3,1\nb,0,2\n", r"duplicate row for species 'a'"),
    ("true,a,b\na,3\nb,0,2\n", r"row 'a' has 2 cells, header has 3"),
    ("", r"empty confusion CSV"),
])
def test_bad_csv_one_clear_error(tmp_path, text, message):
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(ValueError, match=message) as e:
        load_confusion_csv(p)
    assert str(p) in str(e.value)


def test_cli_reports_bad_csv_and_exits_2(tmp_path, capsys):
    p = tmp_path / "bad.csv"
    p.write_text("true,a,b\na,3,1.5\nb,0,2\n")
    assert export_main(["group", "--confusion", str(p), "--k", "2", "--out", str(tmp_path / "g.yaml")]) == 2
    err = capsys.readouterr().err
    assert "bad.csv" in err and "not an integer" in err and "Traceback" not in err
    assert not (tmp_path / "g.yaml").exists()


# ----------------------------------------------------------------- (d) hand-edited groups files


def _edit(path, groups):
    doc = yaml.safe_load(path.read_text())
    doc["groups"] = groups
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def test_groups_file_roundtrip_and_edits(tmp_path):
    path = tmp_path / "groups.yaml"
    write_groups(path, PLANTED, {"species": SPECIES, "k": 3})
    text = path.read_text()
    assert text.startswith("#") and "may edit" in text
    assert read_groups(path) == PLANTED

    _edit(path, {"g1": ["red_deer", "fallow_deer"], "g2": ["fox", "lynx", "wildcat", "roe_deer"],
                 "g3": ["rabbit", "mouse", "genet"]})  # a legitimate move
    assert read_groups(path)["g2"][-1] == "roe_deer"

    _edit(path, {"g1": ["red_deer", "fallow_deer", "roe_deer", "fox"], "g2": ["fox", "lynx", "wildcat"],
                 "g3": ["rabbit", "mouse", "genet"]})
    with pytest.raises(ValueError, match=r"species 'fox' is in group 'g1' and again in group 'g2'"):
        read_groups(path)

    _edit(path, {"g1": ["red_deer", "fallow_deer"], "g2": ["fox", "lynx", "wildcat"],
                 "g3": ["rabbit", "mouse", "genet"]})
    with pytest.raises(ValueError, match=r"species \['roe_deer'\] are in no group"):
        read_groups(path)

    _edit(path, {**PLANTED, "g4": []})
    with pytest.raises(ValueError, match=r"group 'g4' is empty"):
        read_groups(path)

    _edit(path, {**PLANTED, "g4": ["unicorn"]})
    with pytest.raises(ValueError, match=r"unknown species \['unicorn'\]") as e:
        read_groups(path)
    assert str(path) in str(e.value)


def test_duplicate_group_names_rejected(tmp_path):
    path = tmp_path / "groups.yaml"
    path.write_text("groups:\n  a: [x, y]\n  a: [z]\n")
    with pytest.raises(ValueError, match=r"groups.yaml: not valid YAML: duplicate key 'a'"):
        read_groups(path)
    path.write_text("groups:\n  a/b: [x]\n")
    with pytest.raises(ValueError, match="group name 'a/b'"):
        read_groups(path)
    path.write_text("groups:\n  a: [x, y]\n")
    assert read_groups(path, ["x", "y"]) == {"a": ["x", "y"]}
    with pytest.raises(ValueError, match=r"species \['z'\] are in no group"):
        read_groups(path, ["x", "y", "z"])


# ----------------------------------------------------------------- (e) the command: files and plots


def test_run_grouping_writes_yaml_and_pngs(tmp_path, capsys):
    csv_path = tmp_path / "confusion.csv"
    write_confusion_csv(csv_path, SPECIES, COUNTS)
    out = tmp_path / "out" / "groups.yaml"
    assert export_main(["group", "--confusion", str(csv_path), "--k", "auto", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    groups = read_groups(out)
    assert _same_partition(groups, PLANTED)
    assert list(groups) == ["group1", "group2", "group3"]
    meta = yaml.safe_load(out.read_text())["meta"]
    assert meta["k"] == 3 and meta["species"] == SPECIES and meta["support"]["roe_deer"] == 5
    assert meta["low_support"] == ["roe_deer", "wildcat", "genet"]
    assert meta["miss_rate"]["genet"] == pytest.approx(0.2)
    assert "symmetric" in meta["method"]
    for name in ("groups_dendrogram.png", "groups_similarity.png"):
        png = out.parent / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000


def test_run_grouping_flags_species_without_evidence(tmp_path):
    counts = COUNTS.copy()
    counts[0, 2] = 0  # nobody is ever confused with roe_deer, in either direction
    csv_path = tmp_path / "c.csv"
    write_confusion_csv(csv_path, SPECIES, counts)
    run_grouping(out=tmp_path / "g.yaml", k=3, confusion_csv=csv_path)
    meta = yaml.safe_load((tmp_path / "g.yaml").read_text())["meta"]
    assert meta["no_evidence"] == ["roe_deer"]
    assert sum(len(m) for m in read_groups(tmp_path / "g.yaml").values()) == 9
