"""The taxonomy CSV (export/taxonomy.py): read once, checked against the dataset's classes by
`prepare`, stored in meta.json, and shown beside the classes by `group`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export.cli import main
from export.datasets import prepare
from export.synth import SPECIES, TAXA, synthesize
from export.taxonomy import dataset_taxonomy, for_classes, read_taxonomy_csv

GOOD = """class,scientific_name,vernacular_name,language,rank,taxon_id
red_deer,Cervus elaphus,red deer,eng,species,gbif:2440954
lynx,Lynx pardinus,lince ibérico,spa,,
"""


def test_reads_required_and_optional_columns(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text(GOOD, encoding="utf-8")
    taxa = read_taxonomy_csv(p)
    assert taxa["red_deer"].rank == "species" and taxa["red_deer"].taxon_id == "gbif:2440954"
    assert (taxa["lynx"].language, taxa["lynx"].vernacular_name, taxa["lynx"].rank) == ("spa", "lince ibérico", None)
    assert list(for_classes(taxa, ["lynx"], p)) == ["lynx"]  # rows for other datasets are left out
    with pytest.raises(ValueError, match=r"t\.csv: no taxonomy row for class\(es\) fox"):
        for_classes(taxa, ["lynx", "fox"], p)


@pytest.mark.parametrize(("text", "expect"), [
    ("class,scientific_name\nlynx,Lynx pardinus\n", r"missing vernacular_name"),
    ("class,scientific_name,vernacular_name,colour\n", r"unknown column colour"),
    (GOOD + "lynx,Lynx lynx,Eurasian lynx,,,\n", r"line 4: class 'lynx' is listed twice"),
    (GOOD.replace(",species,", ",specis,"), r"line 2 \(red_deer\): rank: "),
    (GOOD.replace("gbif:2440954", "2440954"), r"line 2 \(red_deer\): taxon_id: "),
    (GOOD.replace("red deer", ""), r"line 2 \(red_deer\): vernacular_name: Field required"),
    ("class,scientific_name,vernacular_name\n", r"no rows"),
])
def test_bad_csv_is_one_line_naming_file_line_and_field(tmp_path, text, expect):
    p = tmp_path / "t.csv"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=expect) as e:
        read_taxonomy_csv(p)
    assert "\n" not in str(e.value) and "t.csv" in str(e.value)


def test_not_utf8_is_refused(tmp_path):
    p = tmp_path / "t.csv"
    p.write_bytes(GOOD.replace("ibérico", "ib\xe9rico").encode("latin-1"))
    with pytest.raises(ValueError, match=r"t\.csv: not UTF-8"):
        read_taxonomy_csv(p)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("scenes") / "s", seed=3, n_images=120, size=(160, 120))


def test_prepare_stores_it_and_group_shows_it(tmp_path, scenes, capsys):
    out = tmp_path / "ds"
    prepare(out, coco=scenes, taxonomy=scenes.parent / "taxonomy.csv")
    meta = json.loads((out / "meta.json").read_text())
    names = meta["names"]
    assert set(meta["taxonomy"]) == set(names)
    assert meta["taxonomy"]["red_deer"] == {"scientific_name": "Cervus elaphus", "vernacular_name": "red deer",
                                            "language": "eng", "rank": "species"}
    again = tmp_path / "again"
    prepare(again, yolo=out / "data.yaml")  # a prepared dataset keeps its taxonomy
    assert dataset_taxonomy(again / "data.yaml") == dataset_taxonomy(out / "data.yaml")
    conf = tmp_path / "confusion.csv"
    conf.write_text("true," + ",".join(SPECIES) + "\n" + "".join(
        f"{s}," + ",".join("5" if t == s else "1" for t in SPECIES) + "\n" for s in SPECIES))
    assert main(["group", "--confusion", str(conf), "--data", str(out / "data.yaml"), "--k", "3",
                 "--out", str(tmp_path / "g" / "groups.yaml")]) == 0
    shown = capsys.readouterr().out
    for s in SPECIES:
        assert f"{s} ({TAXA[s][1]}, {TAXA[s][0]})" in shown


def test_prepare_refuses_a_taxonomy_missing_a_class(tmp_path, scenes):
    partial = tmp_path / "t.csv"
    partial.write_text("".join(line + "\n" for line in (scenes.parent / "taxonomy.csv").read_text().splitlines()
                               if not line.startswith("lynx,")))
    with pytest.raises(ValueError, match=r"t\.csv: no taxonomy row for class\(es\) lynx"):
        prepare(tmp_path / "ds", coco=scenes, taxonomy=partial)
    assert not (tmp_path / "ds").exists()
