"""Camtrap DP 1.0.2 packages written by edge/records/camtrapdp.py, validated offline with frictionless.

Nothing may be fetched, and frictionless would fetch the profile and table-schema URLs of a
package. So the validator here maps each official 1.0.2 URL to the local copy in
tests/data/camtrap-dp-1.0.2 and checks:
  1. the descriptor against the local Camtrap DP profile (JSON Schema draft 4, jsonschema), its
     remote ``$ref``s resolved locally: GeoJSON from frictionless' bundled copy, the base Data
     Package profile stood in for by frictionless' own package rules (``Package.metadata_profile``
     and ``Package.metadata_validate``), as no local copy of specs.frictionlessdata.io exists;
  2. every table against its local table schema with frictionless (types, formats, enums,
     patterns, required, unique), and the foreign keys between the three tables.
The official example package must pass it and a broken copy must fail it: proof that the
validator is real. Sockets are blocked during the tests, so any fetch attempt fails loudly.
"""

from __future__ import annotations

import json
import shutil
import socket
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from edge.manifest import Taxon

frictionless = pytest.importorskip("frictionless")
jsonschema = pytest.importorskip("jsonschema")

from edge.records.camtrapdp import (  # noqa: E402
    CAMTRAP_DP_PROFILE,
    DEPLOYMENT_COLUMNS,
    MEDIA_COLUMNS,
    OBSERVATION_COLUMNS,
    TABLE_SCHEMAS,
    DeploymentInfo,
    MediaResult,
    ProjectMeta,
    write_camtrapdp,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "camtrap-dp-1.0.2"
LOCAL = {
    CAMTRAP_DP_PROFILE: DATA / "camtrap-dp-profile.json",
    **{url: DATA / f"{name}-table-schema.json" for name, url in TABLE_SCHEMAS.items()},
}
CAMTRAP_TABLES = ("deployments", "media", "observations")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise OSError("network access attempted during an offline validation test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _profile_validator():
    from frictionless import Package
    from frictionless import settings as fl_settings
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT4

    def res(contents):
        return Resource.from_contents(contents, default_specification=DRAFT4)

    registry = Registry().with_resources([
        ("https://specs.frictionlessdata.io/schemas/data-package.json", res(Package.metadata_profile)),
        ("http://json.schemastore.org/geojson.json", res(fl_settings.GEOJSON_PROFILE)),
    ])  # fmt: skip
    profile = json.loads(LOCAL[CAMTRAP_DP_PROFILE].read_text())
    cls = jsonschema.Draft4Validator
    return cls(profile, registry=registry, format_checker=cls.FORMAT_CHECKER)


def validate_camtrapdp(pkg_dir: Path) -> list[str]:
    """Every problem found in the package at pkg_dir; [] means valid Camtrap DP 1.0.2."""
    from frictionless import Package, Resource, Schema

    errors: list[str] = []
    desc = json.loads((pkg_dir / "datapackage.json").read_text())
    if desc.get("profile") != CAMTRAP_DP_PROFILE:
        errors.append(f"profile: {desc.get('profile')!r} is not the Camtrap DP 1.0.2 profile URL")
    for e in _profile_validator().iter_errors(desc):
        errors.append(f"descriptor {'/'.join(map(str, e.absolute_path)) or '.'}: {e.message}")
    base = {k: v for k, v in desc.items() if k != "profile"}  # base Data Package rules, no fetch
    for e in Package.metadata_validate(base):
        errors.append(f"descriptor: {e.message}")
    resources = []
    by_name = {r.get("name"): r for r in desc.get("resources", []) if isinstance(r, dict)}
    for name in CAMTRAP_TABLES:
        r = by_name.get(name)
        if r is None:
            errors.append(f"resource {name}: missing")
            continue
        if r.get("schema") not in LOCAL:
            errors.append(f"resource {name}: schema {r.get('schema')!r} is not a Camtrap DP 1.0.2 table schema")
            continue
        schema = Schema.from_descriptor(json.loads(LOCAL[r["schema"]].read_text()))
        resources.append(Resource(path=r["path"], name=name, schema=schema, basepath=str(pkg_dir)))
    if len(resources) == len(CAMTRAP_TABLES):
        report = Package(resources=resources, basepath=str(pkg_dir)).validate()
        for task in report.tasks:
            for err in task.errors:
                errors.append(f"{task.name}: {err.message}")
    return errors


# --- the validator is real ------------------------------------------------------------------
def test_official_example_is_valid():
    assert validate_camtrapdp(DATA / "example") == []


@pytest.mark.parametrize(
    ("table", "old", "new", "expect"),
    [
        ("media.csv", ",image/jpeg,", ",jpeg,", "fileMediatype"),  # pattern
        ("observations.csv", ",media,animal,", ",media,ghost,", "observationType"),  # enum
        ("media.csv", "07840dcc,00a2c20d", "07840dcc,nosuchdep", "foreign"),  # foreign key
    ],
)
def test_broken_copies_fail(tmp_path, table, old, new, expect):
    pkg = tmp_path / "example"
    shutil.copytree(DATA / "example", pkg)
    text = (pkg / table).read_text()
    assert old in text
    (pkg / table).write_text(text.replace(old, new, 1))
    errors = validate_camtrapdp(pkg)
    assert errors and any(expect.lower() in e.lower() for e in errors), errors


def test_descriptor_breakage_fails(tmp_path):
    pkg = tmp_path / "example"
    shutil.copytree(DATA / "example", pkg)
    desc = json.loads((pkg / "datapackage.json").read_text())
    del desc["project"]["samplingDesign"]
    desc["temporal"] = {"start": "2020-05-30"}
    (pkg / "datapackage.json").write_text(json.dumps(desc))
    errors = validate_camtrapdp(pkg)
    assert any("samplingDesign" in e for e in errors), errors
    assert any("end" in e for e in errors), errors


def test_column_lists_match_the_official_schemas():
    for name, cols in (("deployments", DEPLOYMENT_COLUMNS), ("media", MEDIA_COLUMNS),
                       ("observations", OBSERVATION_COLUMNS)):  # fmt: skip
        schema = json.loads((DATA / f"{name}-table-schema.json").read_text())
        assert cols == [f["name"] for f in schema["fields"]], name


# --- what the device writes -------------------------------------------------------------------
def _media() -> list[MediaResult]:
    tz = timezone(timedelta(hours=2))
    t0 = datetime(2025, 6, 1, 3, 14, 0, tzinfo=tz)
    done = t0 + timedelta(minutes=1)
    return [
        MediaResult("1", "trap-07", t0, "cam1/IMG_0001.JPG", "IMG_0001.JPG",
                    detections=(("Lynx pardinus", 0.93, (0.1, 0.2, 0.3, 0.4)),
                                ("Oryctolagus cuniculus", 0.41, (0.6, 0.7, 0.2, 0.1))),
                    event_id="17", classified_at=done),
        MediaResult("2", "trap-07", t0 + timedelta(seconds=1), "cam1/IMG_0002.JPG", "IMG_0002.JPG",
                    detections=(("Lynx pardinus", 0.88, None),), event_id="17", classified_at=done),
        # an empty frame the device deleted: media row kept, blank observation, not public
        MediaResult("3", "trap-07", t0 + timedelta(minutes=30), "cam1/IMG_0003.JPG", "IMG_0003.JPG",
                    disposed="deleted", event_id="18", classified_at=done),
        MediaResult("4", "trap-07", t0 + timedelta(minutes=31), "cam1/IMG_0004.JPG", "IMG_0004.JPG",
                    event_id="19", classified_at=done),
        MediaResult("5", "trap-07", t0 + timedelta(hours=2), "cam1/broken.jpg", "broken.jpg",
                    failure="truncated JPEG"),
        MediaResult("6", "trap-07", t0 + timedelta(hours=3), "cam1/IMG_0006.JPG", "IMG_0006.JPG",
                    detections=(("person", 0.8, (0.0, 0.0, 0.5, 1.0)),), event_id="20", classified_at=done),
    ]  # fmt: skip


TAXA = {
    "Lynx pardinus": Taxon(scientific_name="Lynx pardinus", vernacular_name="Iberian lynx", rank="species",
                           taxon_id="gbif:2435261"),
    "Oryctolagus cuniculus": Taxon(scientific_name="Oryctolagus cuniculus", vernacular_name="European rabbit"),
}


def test_written_package_validates_and_keeps_effort(tmp_path):
    meta = ProjectMeta(title="Doñana pilot", contributors=({"title": "A. Ranger", "role": "contact"},),
                       classified_by="camtrap-cascade 2026.11.1", taxa=TAXA)  # fmt: skip
    dep = DeploymentInfo("trap-07", 37.0, -6.4, camera_model="Reconyx-HF2X", coordinate_uncertainty=10)
    path = write_camtrapdp(tmp_path / "pkg", [dep], _media(), meta)
    assert path.name == "datapackage.json"
    assert validate_camtrapdp(tmp_path / "pkg") == []

    import csv

    def rows(name):
        with open(tmp_path / "pkg" / f"{name}.csv", newline="") as f:
            return list(csv.DictReader(f))

    media = {r["mediaID"]: r for r in rows("media")}
    obs = rows("observations")
    assert set(media) == {"1", "2", "3", "4", "5", "6"}  # deleted frame still counted as effort
    assert media["3"]["filePublic"] == "false" and "deleted" in media["3"]["mediaComments"]
    by_media: dict[str, list[dict]] = {}
    for o in obs:
        by_media.setdefault(o["mediaID"], []).append(o)
        assert o["observationLevel"] == "media"
    assert [o["observationType"] for o in by_media["3"]] == ["blank"]
    assert [o["observationType"] for o in by_media["4"]] == ["blank"]
    assert [o["observationType"] for o in by_media["5"]] == ["unclassified"]
    assert [o["observationType"] for o in by_media["6"]] == ["human"]
    lynx, rabbit = by_media["1"]
    assert (lynx["scientificName"], lynx["classificationProbability"]) == ("Lynx pardinus", "0.93")
    assert (lynx["bboxX"], lynx["bboxY"], lynx["bboxWidth"], lynx["bboxHeight"]) == ("0.1", "0.2", "0.3", "0.4")
    assert lynx["classificationMethod"] == "machine" and lynx["classifiedBy"] == "camtrap-cascade 2026.11.1"
    assert lynx["eventID"] == "17" and lynx["eventStart"] == "2025-06-01T03:14:00+02:00"
    assert rabbit["scientificName"] == "Oryctolagus cuniculus"
    assert by_media["2"][0]["bboxX"] == ""  # no box known: left empty, still valid
    desc = json.loads(path.read_text())
    assert desc["profile"] == CAMTRAP_DP_PROFILE
    assert {t["scientificName"] for t in desc["taxonomic"]} == {"Lynx pardinus", "Oryctolagus cuniculus"}
    assert desc["temporal"] == {"start": "2025-06-01", "end": "2025-06-01"}
    dep_row = rows("deployments")[0]
    assert dep_row["deploymentStart"] == "2025-06-01T03:14:00+02:00"
    assert dep_row["deploymentEnd"] == "2025-06-01T06:14:00+02:00"


def test_bad_values_written_are_caught(tmp_path):
    """A package with a probability above 1 must fail: the validator sees what the writer wrote."""
    bad = [MediaResult("1", "trap-07", datetime(2025, 6, 1, tzinfo=timezone.utc), "a.jpg", "a.jpg",
                       detections=(("Lynx pardinus", 0.9, (0.1, 0.1, 0.2, 0.2)),))]  # fmt: skip
    write_camtrapdp(tmp_path, [DeploymentInfo("trap-07", 37.0, -6.4)], bad)
    obs = (tmp_path / "observations.csv").read_text().replace(",0.9,", ",1.9,")
    (tmp_path / "observations.csv").write_text(obs)
    assert any("classificationProbability" in e for e in validate_camtrapdp(tmp_path))


def test_export_cli_from_a_real_ledger(tmp_path, capsys):
    """The thin CLI over edge/ledger.py: done, disposed (deleted), quarantined and waiting images."""
    from edge.cli import main
    from edge.ledger import Ledger

    db = tmp_path / "ledger.sqlite3"
    t0 = datetime(2025, 6, 1, 1, 14, tzinfo=timezone.utc).timestamp()  # 03:14 in Madrid (CEST)
    lynx = {"empty": False, "width": 1000, "height": 500,
            "detections": [{"species": "lynx", "score": 0.9, "box": [100, 50, 400, 250], "cls": 0, "model": "medium"}]}
    with Ledger(db) as led:
        a = led.see("/srv/cam/a/IMG_1.JPG", 100, t0 + 5, taken_at=t0)
        b = led.see("/srv/cam/a/IMG_2.JPG", 100, t0 + 60)
        c = led.see("/srv/cam/a/bad.jpg", 3, t0 + 70)
        led.see("/srv/cam/a/IMG_4.JPG", 100, t0 + 80)  # not classified yet: left out
        led.claim(3)
        led.complete(a, lynx, event_id=1)
        led.complete(b, {"empty": True, "detections": []}, event_id=2)
        led.mark_disposed(b, "deleted")
        led.quarantine(c, "truncated JPEG")
    out = tmp_path / "pkg"
    rc = main(["export-camtrapdp", "--ledger", str(db), "--out", str(out), "--deployment-id", "trap-07",
               "--latitude", "37.0", "--longitude", "-6.4", "--timezone", "Europe/Madrid", "--root", "/srv/cam"])
    assert rc == 0
    assert "3 media (1 blank, 1 disposed on the device, 1 unreadable)" in capsys.readouterr().out
    assert validate_camtrapdp(out) == []
    media = (out / "media.csv").read_text()
    obs = (out / "observations.csv").read_text()
    assert ",a/IMG_1.JPG," in media and "IMG_4" not in media
    assert "1_1,trap-07,1,1,2025-06-01T03:14:00+02:00" in obs  # device time zone offset
    assert ",0.1,0.1,0.3,0.4," in obs  # pixel box normalised top-left x, y, w, h
    assert "2_0,trap-07,2,2," in obs and ",blank," in obs
    assert "image could not be read: truncated JPEG" in obs


# --- hostile field data: awkward names, replaced files, device paths, taxa -------------------
def _export(tmp_path, db, *extra) -> tuple[int, Path]:
    from edge.cli import main

    out = tmp_path / "pkg"
    rc = main(["export-camtrapdp", "--ledger", str(db), "--out", str(out), "--deployment-id", "trap-07",
               "--latitude", "37.0", "--longitude", "-6.4", "--root", "/srv/cam", *extra])
    return rc, out


def _rows(pkg: Path, name: str) -> list[dict]:
    import csv

    with open(pkg / f"{name}.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_awkward_file_names_give_a_valid_package(tmp_path):
    """A newline, bytes that are not UTF-8, '..' inside a name, a leading dot, '%', a very long
    name in a deep folder and a file outside the watch folder: the package stays valid, every
    filePath decodes back to the exact relative name, and no absolute device path is written."""
    import os
    from urllib.parse import unquote_to_bytes

    from edge.ledger import Ledger

    long_dir = "/".join(["deep" * 10] * 60)  # ~2,400 characters of folders
    names = {
        "newline": "/srv/cam/a/IMG\n0001.JPG",
        "latin1": os.fsdecode(b"/srv/cam/a/caf\xe9 \xff.jpg"),
        "dots": "/srv/cam/a/IMG..0002.JPG",
        "hidden": "/srv/cam/.hidden/.IMG_3.JPG",
        "percent": "/srv/cam/a/100%25 sure.jpg",
        "long": f"/srv/cam/{long_dir}/{'L' * 250}.JPG",
        "outside": "/mnt/usb/../x/IMG_9.JPG",
        "bad": "/srv/cam/a/broken\n.jpg",
    }
    db = tmp_path / "ledger.sqlite3"
    t0 = datetime(2025, 6, 1, tzinfo=timezone.utc).timestamp()
    with Ledger(db) as led:
        ids = {k: led.see(p, 100, t0 + i) for i, (k, p) in enumerate(names.items())}
        led.claim(len(ids))
        for k, i in ids.items():
            if k == "bad":
                led.quarantine(i, f"{names['bad']}: truncated JPEG (also seen in /srv/cam/a/other.jpg)")
            else:
                led.complete(i, {"empty": True, "detections": []})
    rc, pkg = _export(tmp_path, db)
    assert rc == 0
    assert validate_camtrapdp(pkg) == []
    media = {r["mediaID"]: r for r in _rows(pkg, "media")}
    assert len(media) == len(names)
    for k, path in names.items():
        row = media[str(ids[k])]
        back = unquote_to_bytes(row["filePath"])
        raw = os.fsencode(path)
        if k != "outside":
            assert back == raw[len(b"/srv/cam/"):], k  # exact and reversible
        assert "\n" not in row["filePath"] and not row["filePath"].startswith((".", "/", "~"))
        assert ".." not in row["filePath"]
    assert unquote_to_bytes(media[str(ids["outside"])]["filePath"]) == b"mnt/usb/x/IMG_9.JPG"
    for name in ("media", "observations"):
        text = (pkg / f"{name}.csv").read_text(encoding="utf-8")
        assert "/srv/cam" not in text and "/mnt/usb" not in text, name
    bad = media[str(ids["bad"])]["mediaComments"]
    assert bad == "not classified: a/broken%0A.jpg: truncated JPEG (also seen in a/other.jpg)"


def test_quarantined_file_replaced_by_a_good_one_is_one_capture(tmp_path):
    """The camera was still writing: the half file was quarantined, then the whole file arrived at
    the same path. One media row (the good one); an earlier classified file at a reused path stays."""
    from edge.ledger import Ledger

    db = tmp_path / "ledger.sqlite3"
    t0 = datetime(2025, 6, 1, tzinfo=timezone.utc).timestamp()
    with Ledger(db) as led:
        half = led.see("/srv/cam/a/IMG_1.JPG", 10, t0)
        led.claim(1)
        led.quarantine(half, "truncated JPEG")
        whole = led.see("/srv/cam/a/IMG_1.JPG", 100, t0 + 2)
        assert whole != half
        old = led.see("/srv/cam/a/IMG_2.JPG", 100, t0 + 5)  # a real capture, later overwritten by a new one
        led.claim(2)
        led.complete(whole, {"empty": True, "detections": []})
        led.complete(old, {"empty": True, "detections": []})
        new = led.see("/srv/cam/a/IMG_2.JPG", 120, t0 + 9000)
        led.claim(1)
        led.complete(new, {"empty": True, "detections": []})
    rc, pkg = _export(tmp_path, db)
    assert rc == 0 and validate_camtrapdp(pkg) == []
    media = _rows(pkg, "media")
    assert sorted(r["mediaID"] for r in media) == sorted(str(i) for i in (whole, old, new))
    assert [r["filePath"] for r in media].count("a/IMG_1.JPG") == 1
    assert not any(o["observationType"] == "unclassified" for o in _rows(pkg, "observations"))


def test_scientific_names_come_from_the_bundle_taxonomy(tmp_path, capsys):
    """The demo bundle's manifest names its classes' taxa: scientificName is the taxon, never the
    class name; the class travels in observationTags; without a bundle the name is left empty."""
    from edge.demo import DEMO_BUNDLE
    from edge.ledger import Ledger

    db = tmp_path / "ledger.sqlite3"
    t0 = datetime(2025, 6, 1, tzinfo=timezone.utc).timestamp()
    deer = {"width": 100, "height": 100, "detections": [
        {"species": "red_deer", "score": 0.9, "box": [10, 10, 50, 50]},
        {"species": "wood_mouse", "score": 0.6, "box": [60, 60, 70, 70]}]}
    with Ledger(db) as led:
        a = led.see("/srv/cam/a/IMG_1.JPG", 100, t0)
        led.claim(1)
        led.complete(a, deer)
    rc, pkg = _export(tmp_path, db, "--bundle", str(DEMO_BUNDLE))
    assert rc == 0 and validate_camtrapdp(pkg) == []
    obs = {o["observationTags"]: o for o in _rows(pkg, "observations")}
    assert obs["class:red_deer"]["scientificName"] == "Cervus elaphus"
    assert obs["class:wood_mouse"]["scientificName"] == "Apodemus sylvaticus"
    assert obs["class:red_deer"]["classifiedBy"] == "camtrap-cascade demo-1"
    taxa = {t["scientificName"]: t for t in json.loads((pkg / "datapackage.json").read_text())["taxonomic"]}
    assert taxa["Cervus elaphus"]["vernacularNames"] == {"eng": "red deer"}
    assert taxa["Cervus elaphus"]["taxonRank"] == "species"
    capsys.readouterr()
    rc, pkg = _export(tmp_path, db)  # no bundle: no taxon is guessed from a class name
    assert rc == 0 and validate_camtrapdp(pkg) == []
    assert {o["scientificName"] for o in _rows(pkg, "observations")} == {""}
    assert "red_deer, wood_mouse: their scientificName is left empty" in capsys.readouterr().err


@pytest.mark.parametrize(("bad", "says"), [
    (["--timezone", "Mars/Olympus"], "--timezone: unknown time zone 'Mars/Olympus' (e.g. Europe/Madrid)"),
    (["--latitude", "500"], "--latitude: 500 is not a latitude (-90 to 90)"),
    (["--longitude", "-181"], "--longitude: -181 is not a longitude (-180 to 180)"),
    (["--out", "{tmp}/a-file"], "--out: {tmp}/a-file exists and is not a folder"),
    (["--ledger", "{tmp}/a-file"], "{tmp}/a-file: not a ledger (file is not a database)"),
])
def test_export_cli_refuses_bad_arguments_in_one_line(tmp_path, capsys, bad, says):
    """Each used to end in a traceback (ZoneInfoNotFoundError, FileExistsError, sqlite3.DatabaseError)
    or, for a latitude of 500, in a package that fails validation."""
    from edge.cli import main
    from edge.ledger import Ledger

    (tmp_path / "a-file").write_text("not a folder, not a database\n")
    with Ledger(tmp_path / "ledger.sqlite3"):
        pass
    args = {"--ledger": str(tmp_path / "ledger.sqlite3"), "--out": str(tmp_path / "pkg"),
            "--latitude": "37", "--longitude": "-6", "--timezone": "UTC"}
    args[bad[0]] = bad[1].format(tmp=tmp_path)
    rc = main(["export-camtrapdp", *[x for kv in args.items() for x in kv]])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [f"camtrap-edge export-camtrapdp: error: {says.format(tmp=tmp_path)}"]


def test_media_type_is_what_the_bytes_are_not_what_the_name_says(tmp_path):
    """A PNG named .JPG is image/png and a JPEG named .png image/jpeg (the format the reader
    sniffed, stored in the result); without a stored format (unreadable, older results) the
    extension decides, and the package stays valid."""
    from edge.ledger import Ledger

    db = tmp_path / "ledger.sqlite3"
    t0 = datetime(2025, 6, 1, tzinfo=timezone.utc).timestamp()
    cases = {  # path, stored format (None: not stored), expected fileMediatype
        "png_named_jpg": ("/srv/cam/a/IMG_1.JPG", "PNG", "image/png"),
        "jpeg_named_png": ("/srv/cam/a/shot.png", "JPEG", "image/jpeg"),
        "old_png": ("/srv/cam/a/old.PNG", None, "image/png"),
        "old_jpeg": ("/srv/cam/a/old.jpeg", None, "image/jpeg"),
        "no_extension": ("/srv/cam/a/IMG_7", None, "image/jpeg"),
        "junk": ("/srv/cam/a/junk.jpg", "quarantine", "image/jpeg"),
    }
    with Ledger(db) as led:
        ids = {k: led.see(p, 100, t0 + i) for i, (k, (p, _f, _m)) in enumerate(cases.items())}
        led.claim(len(ids))
        for k, (_p, fmt, _m) in cases.items():
            if fmt == "quarantine":
                led.quarantine(ids[k], "not an image")
            else:
                led.complete(ids[k], {"empty": True, "detections": [], **({"format": fmt} if fmt else {})})
    rc, pkg = _export(tmp_path, db)
    assert rc == 0 and validate_camtrapdp(pkg) == []
    media = {r["mediaID"]: r["fileMediatype"] for r in _rows(pkg, "media")}
    assert {k: media[str(ids[k])] for k in cases} == {k: m for k, (_p, _f, m) in cases.items()}


def test_a_merged_animal_keeps_its_other_species_on_its_one_observation(tmp_path):
    """One animal, one box: the cascade merged a wildcat box into the lynx box (Detection.also).
    The observation stays one row (count 1: a second row would count the animal twice), and the
    other species stay on it as alternative: tags and a comment; the package validates."""
    from edge.ledger import Ledger

    db = tmp_path / "ledger.sqlite3"
    t0 = datetime(2025, 6, 1, tzinfo=timezone.utc).timestamp()
    merged = {"empty": False, "width": 1000, "height": 500, "detections": [
        {"species": "lynx", "score": 0.62, "box": [100, 50, 400, 250], "cls": 0, "model": "felids",
         "also": [["wildcat", 0.41], ["odd|name", 0.05]]},
        {"species": "rabbit", "score": 0.5, "box": [600, 300, 700, 400], "cls": 2, "model": "global"}]}
    with Ledger(db) as led:
        i = led.see("/srv/cam/a/IMG_1.JPG", 100, t0)
        led.claim(1)
        led.complete(i, merged)
    rc, pkg = _export(tmp_path, db)
    assert rc == 0 and validate_camtrapdp(pkg) == []
    lynx, rabbit = _rows(pkg, "observations")
    assert (lynx["count"], lynx["classificationProbability"]) == ("1", "0.62")
    assert lynx["observationTags"] == "class:lynx|alternative:wildcat=0.41|alternative:odd%7Cname=0.05"
    assert lynx["observationComments"] == "same box also classified as wildcat 0.41, odd|name 0.05"
    assert (rabbit["observationTags"], rabbit["observationComments"]) == ("class:rabbit", "")
    meta = ProjectMeta(taxa={"lynx": TAXA["Lynx pardinus"], "wildcat": Taxon(scientific_name="Felis silvestris",
                                                                               vernacular_name="wildcat")})
    m = MediaResult("1", "trap-07", datetime(2025, 6, 1, tzinfo=timezone.utc), "a.jpg", "a.jpg",
                    detections=(("lynx", 0.62, None, (("wildcat", 0.41),)),))
    write_camtrapdp(tmp_path / "pure", [DeploymentInfo("trap-07", 37.0, -6.4)], [m], meta)
    assert validate_camtrapdp(tmp_path / "pure") == []
    (obs,) = _rows(tmp_path / "pure", "observations")
    assert obs["observationComments"] == "same box also classified as Felis silvestris (wildcat) 0.41"
