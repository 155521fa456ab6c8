"""MegaDetector batch output 1.6, field by field against megadetector-output-format.md, and the
crash-safety of the appending writer (real files, real fsync, a real second process)."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest

from edge.detection import Detection
from edge.records.common import normalise_box
from edge.records.megadetector import (
    DETECTION_CATEGORIES,
    MdBatchWriter,
    md_document,
    md_image_entry,
    md_info,
    validate_md_output,
)

SPECIES = ["lynx", "wildcat", "rabbit", "person"]
MODEL_CLASSES = {"medium": ["lynx", "wildcat"], "global": SPECIES}


def _lynx(score=0.91, box=(100, 50, 400, 250), scores=(0.91, 0.07)) -> Detection:
    return Detection("lynx", score, box, cls=0, model="medium", scores=scores)


# --- pure pieces ------------------------------------------------------------------------------
def test_normalise_box_is_top_left_relative_and_clipped():
    assert normalise_box((100, 50, 400, 250), 1000, 500) == (0.1, 0.1, 0.3, 0.4)
    assert normalise_box((-20, -10, 1100, 600), 1000, 500) == (0.0, 0.0, 1.0, 1.0)
    assert normalise_box((333.3, 0, 1000, 500), 1000, 500) == (0.3333, 0.0, 0.6667, 1.0)
    assert normalise_box((10, 10, 10, 20), 100, 100) is None  # zero width
    assert normalise_box((2000, 0, 3000, 10), 1000, 500) is None  # entirely outside
    with pytest.raises(ValueError):
        normalise_box((0, 0, 1, 1), 0, 10)


def test_image_entry_with_animal():
    e = md_image_entry("cam1/IMG_0001.JPG", [_lynx()], SPECIES, image_size=(1000, 500), model_classes=MODEL_CLASSES)
    assert e == {
        "file": "cam1/IMG_0001.JPG",
        "detections": [
            {"category": "1", "conf": 0.91, "bbox": [0.1, 0.1, 0.3, 0.4],
             "classifications": [["0", 0.91], ["1", 0.07]]},
        ],
    }  # fmt: skip
    assert isinstance(e["detections"][0]["conf"], float)


def test_classifications_sorted_desc_and_own_species_included():
    # the expert's vector ranks wildcat first? the detection's own label still appears, order is by score
    d = Detection("wildcat", 0.55, (0, 0, 10, 10), model="medium", scores=(0.40, 0.55))
    e = md_image_entry("x.jpg", [d], SPECIES, image_size=(10, 10), model_classes=MODEL_CLASSES)
    assert e["detections"][0]["classifications"] == [["1", 0.55], ["0", 0.4]]
    # without the model's class list only the label itself is listed
    e = md_image_entry("x.jpg", [d], SPECIES, image_size=(10, 10))
    assert e["detections"][0]["classifications"] == [["1", 0.55]]


def test_a_merged_animal_lists_the_other_species_as_ranked_classifications():
    # one animal, one box (edge.cascade.one_box_per_animal): the species merged in are ranked after it
    d = Detection("lynx", 0.84, (0, 0, 10, 10), model="global", also=(("rabbit", 0.27), ("wildcat", 0.2)))
    e = md_image_entry("x.jpg", [d], SPECIES, image_size=(10, 10))
    assert len(e["detections"]) == 1
    assert e["detections"][0]["classifications"] == [["0", 0.84], ["2", 0.27], ["1", 0.2]]


def test_person_is_category_2_without_classifications():
    d = Detection("person", 0.8, (0, 0, 5, 10), model="global")
    e = md_image_entry("p.jpg", [d], SPECIES, image_size=(10, 10))
    assert e["detections"] == [{"category": "2", "conf": 0.8, "bbox": [0.0, 0.0, 0.5, 1.0]}]


def test_empty_and_failure_entries():
    assert md_image_entry("empty.jpg", [], SPECIES) == {"file": "empty.jpg", "detections": []}
    f = md_image_entry("bad.jpg", None, SPECIES, failure="truncated JPEG")
    assert f == {"file": "bad.jpg", "failure": "truncated JPEG", "detections": None}
    with pytest.raises(ValueError, match="failure"):
        md_image_entry("bad.jpg", [_lynx()], SPECIES, image_size=(10, 10), failure="x")
    with pytest.raises(ValueError, match="'fox'"):
        md_image_entry("f.jpg", [Detection("fox", 0.9, (0, 0, 1, 1))], SPECIES, image_size=(10, 10))


def test_full_document_is_valid_including_failure():
    info = md_info("camtrap-cascade global 2026.11.1", "camtrap-cascade experts 2026.11.1",
                   typical_threshold=0.25, conservative_threshold=0.1, typical_classification_threshold=0.5)
    images = [
        md_image_entry("a.jpg", [_lynx()], SPECIES, image_size=(1000, 500), model_classes=MODEL_CLASSES),
        md_image_entry("b.jpg", [], SPECIES),
        md_image_entry("c.jpg", None, SPECIES, failure="Failure image access"),
    ]  # fmt: skip
    doc = md_document(info, SPECIES, images)
    assert validate_md_output(doc) == []
    assert doc["info"]["format_version"] == "1.6"
    assert doc["detection_categories"] == {"1": "animal", "2": "person", "3": "vehicle"} == DETECTION_CATEGORIES
    assert doc["classification_categories"] == {"0": "lynx", "1": "wildcat", "2": "rabbit", "3": "person"}
    assert doc["info"]["detector_metadata"] == {"typical_detection_threshold": 0.25,
                                                "conservative_detection_threshold": 0.1}  # fmt: skip
    assert doc["info"]["classifier_metadata"] == {"typical_classification_threshold": 0.5}
    assert {"detector", "classifier", "detection_completion_time", "classification_completion_time"} <= set(doc["info"])
    json.dumps(doc, allow_nan=False)  # plain JSON


def _valid_doc() -> dict:
    return md_document(
        md_info("d", "c"), SPECIES,
        [md_image_entry("a.jpg", [_lynx()], SPECIES, image_size=(1000, 500), model_classes=MODEL_CLASSES),
         md_image_entry("b.jpg", None, SPECIES, failure="unreadable")],
    )  # fmt: skip


@pytest.mark.parametrize(
    ("mutate", "expect"),
    [
        (lambda d: d["info"].pop("format_version"), "format_version"),
        (lambda d: d["info"].__setitem__("format_version", 1.6), "format_version"),
        (lambda d: d.pop("detection_categories"), "detection_categories"),
        (lambda d: d.pop("images"), "images"),
        (lambda d: d["detection_categories"].__setitem__("x", "animal"), "detection_categories"),
        (lambda d: d["classification_categories"].__setitem__("9", " "), "non-blank"),
        (lambda d: d["images"][0]["detections"][0].__setitem__("category", "7"), "category"),
        (lambda d: d["images"][0]["detections"][0].__setitem__("conf", 1), "conf"),
        (lambda d: d["images"][0]["detections"][0].__setitem__("conf", 1.5), "conf"),
        (lambda d: d["images"][0]["detections"][0].__setitem__("bbox", [10, 10, 50, 50]), "relative"),
        (lambda d: d["images"][0]["detections"][0].__setitem__("bbox", [0.8, 0.1, 0.5, 0.1]), "past the image"),
        (lambda d: d["images"][0]["detections"][0].__setitem__("bbox", [0.1, 0.1, 0.5]), "bbox"),
        (lambda d: d["images"][0]["detections"][0]["classifications"].reverse(), "descending"),
        (lambda d: d["images"][0]["detections"][0]["classifications"].append(["42", 0.01]),
         "classification_categories"),
        (lambda d: d["images"][0]["detections"][0]["classifications"].append([3, 0.01]), "string-formatted"),
        (lambda d: d["images"][1].__setitem__("detections", []), "null or absent"),
        (lambda d: d["images"][1].__setitem__("failure", 3), "failure"),
        (lambda d: d["images"][0].pop("detections"), "required list"),
        (lambda d: d["images"].append(dict(d["images"][0])), "more than once"),
        (lambda d: d["info"].__setitem__("detection_completion_time", "yesterday"), "YYYY-MM-DD"),
        (lambda d: d["info"].__setitem__("detector_metadata", {"typical_detection_threshold": 2}), "[0, 1]"),
        (lambda d: d["images"].append({"file": "v.mp4", "detections": []}), "frame_rate"),
    ],
)
def test_validator_catches_each_rule(mutate, expect):
    doc = _valid_doc()
    assert validate_md_output(doc) == []
    mutate(doc)
    errors = validate_md_output(doc)
    assert any(expect in e for e in errors), errors


def test_validator_accepts_the_format_documents_video_and_null_failure_forms():
    doc = {
        "info": {"format_version": "1.6"},
        "detection_categories": {"1": "animal", "2": "person"},
        "images": [
            {"file": "v.mp4", "frame_rate": 20, "frames_processed": [0, 20],
             "detections": [{"category": "2", "conf": 0.871, "bbox": [0.1, 0.2, 0.3, 0.4], "frame_number": 0}]},
            {"file": "e.jpg", "detections": [], "failure": None},
            {"file": "f.jpg", "failure": "Failure image access"},
        ],
    }  # fmt: skip
    assert validate_md_output(doc) == []


# --- the writer -------------------------------------------------------------------------------
def _writer(path, **kw) -> MdBatchWriter:
    return MdBatchWriter(path, "global-2026.11.1", "cascade-2026.11.1", SPECIES, model_classes=MODEL_CLASSES, **kw)


def test_writer_appends_and_is_valid_json_at_every_step(tmp_path):
    path = tmp_path / "md.json"
    with _writer(path, flush_every=2) as w:
        assert validate_md_output(json.loads(path.read_text())) == []  # created valid and empty
        w.add("a.jpg", [_lynx()], image_size=(1000, 500))
        w.add("b.jpg", [])
        doc = json.loads(path.read_text())  # flushed after 2
        assert [im["file"] for im in doc["images"]] == ["a.jpg", "b.jpg"]
        w.add("c.jpg", failure="truncated JPEG")
        assert len(json.loads(path.read_text())["images"]) == 2  # not flushed yet, but journalled
        assert w.journal_path.read_text().count("\n") == 1
    doc = json.loads(path.read_text())
    assert validate_md_output(doc) == []
    assert [im["file"] for im in doc["images"]] == ["a.jpg", "b.jpg", "c.jpg"]
    assert doc["images"][2] == {"file": "c.jpg", "failure": "truncated JPEG", "detections": None}
    assert w.journal_path.stat().st_size == 0


def _crash_child(path: str, n: int) -> None:
    w = _writer(path, flush_every=1000)
    for i in range(n):
        w.add(f"img{i}.jpg", [_lynx()] if i % 2 else [], image_size=(1000, 500))
    os._exit(0)  # no close, no flush: as if the power went


def test_crash_without_close_loses_nothing(tmp_path):
    path = tmp_path / "md.json"
    p = multiprocessing.get_context("fork").Process(target=_crash_child, args=(str(path), 5))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    assert validate_md_output(json.loads(path.read_text())) == []  # the JSON on disk is valid
    assert json.loads(path.read_text())["images"] == []  # ...but stale
    with open(w_journal := path.with_name("md.json.journal"), "ab") as f:
        f.write(b'{"image": {"file": "torn.jpg", "detec')  # a torn last line, as a crash mid-write leaves
    with _writer(path) as w:
        assert len(w) == 5  # replayed from the journal; the torn line dropped
        w.add("img5.jpg", [])
    doc = json.loads(path.read_text())
    assert validate_md_output(doc) == []
    assert [im["file"] for im in doc["images"]] == [f"img{i}.jpg" for i in range(6)]
    assert w_journal.stat().st_size == 0


def test_reopen_appends_and_redo_replaces(tmp_path):
    path = tmp_path / "md.json"
    with _writer(path) as w:
        w.add("a.jpg", [])
        w.add("b.jpg", [])
    with _writer(path) as w:
        w.add("a.jpg", [_lynx()], image_size=(1000, 500))  # redone after a crash: one result per file
    doc = json.loads(path.read_text())
    assert validate_md_output(doc) == []
    assert [im["file"] for im in doc["images"]] == ["b.jpg", "a.jpg"]
    assert doc["images"][1]["detections"][0]["conf"] == 0.91


def test_new_species_extend_ids_without_renumbering(tmp_path):
    path = tmp_path / "md.json"
    with _writer(path) as w:
        w.add("a.jpg", [Detection("rabbit", 0.7, (0, 0, 5, 5), model="x")], image_size=(10, 10))
    # a new bundle with other species and a different order
    with MdBatchWriter(path, "g2", "c2", ["genet", "rabbit"]) as w:
        w.add("b.jpg", [Detection("genet", 0.6, (0, 0, 5, 5), model="x")], image_size=(10, 10))
        w.add("c.jpg", [Detection("badger", 0.6, (0, 0, 5, 5), model="x")], image_size=(10, 10))
    doc = json.loads(path.read_text())
    assert validate_md_output(doc) == []
    cats = doc["classification_categories"]
    assert cats == {"0": "lynx", "1": "wildcat", "2": "rabbit", "3": "person", "4": "genet", "5": "badger"}
    ids = [im["detections"][0]["classifications"][0][0] for im in doc["images"]]
    assert [cats[i] for i in ids] == ["rabbit", "genet", "badger"]


def test_second_writer_is_refused(tmp_path):
    path = tmp_path / "md.json"
    with _writer(path) as w:
        with pytest.raises(ValueError, match="another process"):
            _writer(path)
        w.add("a.jpg", [])  # the first writer is unharmed
    assert [im["file"] for im in json.loads(path.read_text())["images"]] == ["a.jpg"]


def test_existing_junk_file_is_refused(tmp_path):
    path = tmp_path / "md.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"md\.json: not valid JSON"):
        _writer(path)


def test_a_full_disk_neither_tears_the_journal_nor_keeps_the_lock(tmp_path, monkeypatch):
    """ENOSPC (the daemon then waits and retries): a failed journal line is cut back, so the next
    line is not glued to a torn one, and a writer that failed to open releases its lock."""
    import edge.records.megadetector as md

    path = tmp_path / "md.json"
    real_write = os.write
    w = _writer(path, flush_every=1000)
    w.add("a.jpg", [])

    def full(fd, data):
        real_write(fd, bytes(data)[:7])  # part of the line goes in, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(md.os, "write", full)
    with pytest.raises(OSError):
        w.add("b.jpg", [])
    monkeypatch.setattr(md.os, "write", real_write)
    w.add("c.jpg", [])
    lines = w.journal_path.read_text().splitlines()
    assert [json.loads(line)["image"]["file"] for line in lines] == ["a.jpg", "c.jpg"]
    w.close()

    def no_space(*a, **k):
        raise OSError(28, "No space left on device")

    path.unlink()
    monkeypatch.setattr(md, "atomic_write_bytes", no_space)
    with pytest.raises(OSError) as failed:
        _writer(path)
    monkeypatch.undo()
    assert failed.value.errno == 28
    _writer(path).close()  # the lock went with the failed writer (not "another process is writing")


def test_rewrites_grow_with_the_file_so_each_result_costs_the_same(tmp_path, monkeypatch):
    """A rewrite costs O(images); rewriting every flush_every results made a result's cost grow
    with the file (72 ms per rewrite at 50,000 images). Now at least a tenth of the file must be
    new: rewrites grow geometrically, the journal stays bounded by that tenth."""
    path = tmp_path / "md.json"
    rewrites: list[int] = []
    with _writer(path, flush_every=10) as w:
        real = w.flush
        monkeypatch.setattr(w, "flush", lambda: rewrites.append(len(w)) or real())
        for i in range(2000):
            w.add(f"img{i}.jpg", [])
            assert w._pending <= max(10, 0.1 * len(w)) + 1
    assert len(rewrites) < 50  # every 10 results would be 200
    assert rewrites[:3] == [10, 20, 30] and rewrites[-1] > 1500
    doc = json.loads(path.read_text())
    assert validate_md_output(doc) == [] and len(doc["images"]) == 2000


# --- names that are not text -----------------------------------------------------------------
AWKWARD = {  # raw bytes of a device file name (what the file system holds)
    "latin1": b"/srv/cam/a/caf\xe9 \xff.jpg",  # not UTF-8: os.fsdecode makes lone surrogates
    "newline": b"/srv/cam/a/IMG\n0001.JPG",
    "percent": b"/srv/cam/a/100%25 sure.jpg",
    "plain": "/srv/cam/a/Ñandú.jpg".encode(),
}


def _strict_json(raw: bytes):
    """Parse as a strict reader does: UTF-8 text, and no string holding a lone surrogate
    (Python's json accepts the \\udcff escape; Go, Rust serde, jq and browsers' TextDecoder do not)."""
    doc = json.loads(raw.decode("utf-8", "strict"))

    def walk(v):
        if isinstance(v, str):
            v.encode("utf-8", "strict")  # raises on a lone surrogate
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(k)
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(doc)
    return doc


def test_names_that_are_not_utf8_are_valid_json_and_round_trip(tmp_path):
    """Every file name a camera can write comes out as strict JSON (the document and the
    journal) and decodes back to its exact bytes with the rule Camtrap DP's filePath uses."""
    from urllib.parse import unquote_to_bytes

    from edge.records.camtrapdp import safe_name as camtrapdp_rule

    path = tmp_path / "md.json"
    with _writer(path, flush_every=1000) as w:
        for k, raw in AWKWARD.items():
            if k == "newline":
                w.add(os.fsdecode(raw), failure=f"{os.fsdecode(AWKWARD['latin1'])}: truncated JPEG")
            else:
                w.add(os.fsdecode(raw), [_lynx()], image_size=(1000, 500))
        journal = _strict_json(b"[" + w.journal_path.read_bytes().strip().replace(b"\n", b",") + b"]")
        assert len(journal) == len(AWKWARD)  # one line an image
    doc = _strict_json(path.read_bytes())
    assert validate_md_output(doc) == []
    files = [im["file"] for im in doc["images"]]
    assert [unquote_to_bytes(f) for f in files] == list(AWKWARD.values())
    assert files == [camtrapdp_rule(os.fsdecode(raw)) for raw in AWKWARD.values()]  # one rule
    assert files[-1] == "/srv/cam/a/Ñandú.jpg"  # text that is text stays as it is
    assert doc["images"][1]["failure"] == "/srv/cam/a/caf\\xe9 \\xff.jpg: truncated JPEG"
    with _writer(path) as w:  # a redone image replaces its entry: the key is the encoded name
        w.add(os.fsdecode(AWKWARD["latin1"]), [])
        assert len(w) == len(AWKWARD)


def test_a_file_an_older_writer_left_with_lone_surrogates_is_repaired(tmp_path):
    """Before this rule the writer stored undecodable bytes as lone surrogates (\\udcff in the
    JSON): the validator names it, and opening the file re-encodes those entries."""
    bad = os.fsdecode(AWKWARD["latin1"])
    doc = md_document(md_info("md", None), SPECIES, [{"file": bad, "detections": []},
                                                      {"file": "ok.jpg", "failure": f"{bad} vanished",
                                                       "detections": None}])
    errors = validate_md_output(doc)
    assert any("file: holds a byte that is not UTF-8" in e for e in errors), errors
    assert any(".failure: holds a lone surrogate" in e for e in errors), errors
    path = tmp_path / "md.json"
    path.write_text(json.dumps(doc))  # what the older writer wrote ("\udce9" escapes)
    with _writer(path):
        pass
    fixed = _strict_json(path.read_bytes())
    assert validate_md_output(fixed) == []
    assert [im["file"] for im in fixed["images"]] == ["/srv/cam/a/caf%E9 %FF.jpg", "ok.jpg"]


def test_a_batch_costs_one_fsync_and_a_failed_batch_leaves_nothing(tmp_path, monkeypatch):
    """The daemon records a batch at once: one journal write and ONE fsync (it was one per
    image), or, when the rewrite is due, the rewrite's own (the file and its folder) alone. A
    batch that cannot be written leaves neither a line nor a new class id behind."""
    import edge.atomic
    import edge.records.megadetector as md

    path = tmp_path / "md.json"
    w = _writer(path, flush_every=10)
    syncs: list[int] = []
    real_fsync = os.fsync
    for mod in (md.os, edge.atomic.os):
        monkeypatch.setattr(mod, "fsync", lambda fd: syncs.append(fd) or real_fsync(fd))
    batch = [md.MdResult(f"b{i}.jpg", [_lynx()] if i % 2 else [], (1000, 500)) for i in range(4)]
    entries = w.add_many(batch)
    assert len(syncs) == 1 and [e["file"] for e in entries] == [f"b{i}.jpg" for i in range(4)]
    assert w.journal_path.read_text().count("\n") == 4
    syncs.clear()
    w.add_many([md.MdResult(f"c{i}.jpg", []) for i in range(6)])  # the 10th result: the rewrite is due
    assert len(syncs) == 2 and w.journal_path.stat().st_size == 0  # the JSON and its folder; no journal line
    assert len(json.loads(path.read_text())["images"]) == 10

    def full(fd, data):
        raise OSError(28, "No space left on device")

    real_write = os.write
    monkeypatch.setattr(md.os, "write", full)
    with pytest.raises(OSError):
        w.add_many([md.MdResult("d.jpg", [Detection("badger", 0.6, (0, 0, 5, 5), model="x")], (10, 10))])
    monkeypatch.setattr(md.os, "write", real_write)
    assert "badger" not in w.species and len(w) == 10  # not taken: the next batch's ids stay dense
    w.add_many([md.MdResult("e.jpg", [Detection("genet", 0.6, (0, 0, 5, 5), model="x")], (10, 10))])
    w.close()
    doc = json.loads(path.read_text())
    assert validate_md_output(doc) == [] and doc["classification_categories"][str(len(SPECIES))] == "genet"


def _unsynced_child(path: str) -> None:
    w = _writer(path, flush_every=1000)
    import edge.records.megadetector as md

    w.add_many([md.MdResult(f"u{i}.jpg", []) for i in range(3)], sync=False)
    os._exit(0)  # the process dies before sync(): what it wrote is the kernel's now


def test_unsynced_lines_survive_the_process_dying_and_sync_makes_them_durable(tmp_path, monkeypatch):
    """The daemon writes a batch's records before its ledger commit without an fsync (so the
    messages do not wait for it) and syncs after: a process that dies in between still leaves
    them in the journal; ``sync()`` costs one fsync, or the rewrite when it is due."""
    import edge.records.megadetector as md

    path = tmp_path / "md.json"
    p = multiprocessing.get_context("fork").Process(target=_unsynced_child, args=(str(path),))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    w = _writer(path, flush_every=4)
    assert len(w) == 3  # replayed from the journal (and rewritten into the JSON at the opening)
    syncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(md.os, "fsync", lambda fd: syncs.append(fd) or real_fsync(fd))
    w.add_many([md.MdResult("v.jpg", [])], sync=False)
    assert syncs == []
    w.sync()
    assert len(syncs) == 1
    w.sync()
    assert len(syncs) == 1  # nothing waits
    w.add_many([md.MdResult(f"x{i}.jpg", []) for i in range(3)], sync=False)  # 4 new since the last rewrite
    w.sync()  # the rewrite is due: it replaces the journal's fsync
    assert w.journal_path.stat().st_size == 0 and len(json.loads(path.read_text())["images"]) == 7
    w.close()
