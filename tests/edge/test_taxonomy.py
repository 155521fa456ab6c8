"""The manifest's taxonomy (edge/manifest.py Taxon): what each class is, checked when loaded.

A manifest names the taxon of every class of its global model or of none (bundles made before
taxonomy); a taxon's names are one line, its rank a Camtrap DP rank, its id gbif:/itis:/URL."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from edge.bundle import read_manifest
from edge.demo import DEMO_BUNDLE
from edge.manifest import Manifest, Taxon, species_label


def _demo_raw() -> dict:
    return json.loads((DEMO_BUNDLE / "manifest.json").read_text())


def test_demo_bundle_names_every_class():
    m = read_manifest(DEMO_BUNDLE)
    assert set(m.taxonomy) == set(m.global_model.classes)
    assert m.taxonomy["red_deer"].scientific_name == "Cervus elaphus"
    assert all(t.vernacular_name and t.rank == "species" for t in m.taxonomy.values())
    assert species_label("lynx", m.taxonomy) == "lynx (Iberian lynx, Lynx pardinus)"
    assert species_label("ghost", m.taxonomy) == "ghost"


def test_taxonomy_must_cover_exactly_the_global_classes():
    raw = _demo_raw()
    del raw["taxonomy"]["lynx"]
    with pytest.raises(ValidationError, match=r"taxonomy lacks classes of the global model: \['lynx'\]"):
        Manifest.model_validate(raw)
    raw = _demo_raw()
    raw["taxonomy"]["unicorn"] = {"scientific_name": "Equus monoceros", "vernacular_name": "unicorn"}
    with pytest.raises(ValidationError, match="does not have: \\['unicorn'\\]"):
        Manifest.model_validate(raw)
    raw = _demo_raw()
    raw["taxonomy"] = {}
    assert Manifest.model_validate(raw).taxonomy == {}  # an older bundle: no taxa, still valid


@pytest.mark.parametrize(("field", "value"), [
    ("scientific_name", "Cervus\nelaphus"), ("vernacular_name", "  "), ("rank", "specis"),
    ("language", "en"), ("taxon_id", "2440954"), ("taxon_id", "gbif:abc"),
])
def test_bad_taxon_fields_are_refused(field, value):
    with pytest.raises(ValidationError, match=field):
        Taxon(**{"scientific_name": "Cervus elaphus", "vernacular_name": "red deer", field: value})


def test_taxon_ids_become_urls():
    t = Taxon(scientific_name="Cervus elaphus", vernacular_name="red deer", taxon_id="gbif:2440954")
    assert t.taxon_url == "https://www.gbif.org/species/2440954"
    t = Taxon(scientific_name="Cervus elaphus", vernacular_name="red deer", taxon_id="itis:180695")
    assert t.taxon_url.endswith("search_value=180695")
    url = "https://www.checklistbank.org/dataset/COL2023/taxon/QLXL"
    assert Taxon(scientific_name="Canis lupus", vernacular_name="wolf", taxon_id=url).taxon_url == url


def test_alert_names_pick_classes_by_any_of_their_names():
    """alerts.species may say the class, its code, or its scientific or vernacular name; a name
    that picks nothing is returned so the daemon can say so (it used to be ignored in silence, and
    "Lynx pardinus" picked nothing in the demo bundle, whose class is "lynx")."""
    m = read_manifest(DEMO_BUNDLE)
    picked, unknown = m.pick_classes(["Lynx pardinus", "red deer", "WOOD_MOUSE", m.code("hare"), "dragon"])
    assert picked == {"lynx", "red_deer", "wood_mouse", "hare"}
    assert unknown == ["dragon"]
