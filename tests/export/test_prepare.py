"""`prepare`: COCO CT, labels CSV + MegaDetector and YOLO inputs -> split YOLO datasets; bad input rejected."""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from export.cli import main
from export.datasets import dataset_hash, prepare, split_sequences
from export.synth import synthesize

SIZE = (160, 120)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("scenes") / "s"
    path = synthesize(root, seed=11, n_images=240, size=SIZE, n_locations=8)
    return path, json.loads(path.read_text())


def _labels(out: Path) -> dict[str, list[list[float]]]:
    """images/<split>/<name> -> label rows, checking every image has its label file and vice versa."""
    rows = {}
    for split in ("train", "val", "test"):
        imgs = sorted((out / "images" / split).iterdir())
        labs = sorted((out / "labels" / split).iterdir())
        assert [p.stem for p in imgs] == [p.stem for p in labs]
        for img, lab in zip(imgs, labs, strict=True):
            rows[f"images/{split}/{img.name}"] = [[float(v) for v in line.split()]
                                                  for line in lab.read_text().splitlines()]
    return rows


def _check_dataset(out: Path, n_images: int) -> tuple[dict, dict]:
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["path"] == str(out.resolve()) and Path(data["path"]).is_absolute()
    assert (data["train"], data["val"], data["test"]) == ("images/train", "images/val", "images/test")
    names = list(data["names"].values())
    assert list(data["names"]) == list(range(len(names))) and names == sorted(names)
    meta = json.loads((out / "meta.json").read_text())
    rows = _labels(out)
    assert rows.keys() == meta["images"].keys() and len(rows) == n_images
    for key, boxes in rows.items():
        m = meta["images"][key]
        assert key.startswith(f"images/{m['split']}/")
        assert sorted({names[int(b[0])] for b in boxes}) == m["species"]
        for b in boxes:
            assert len(b) == 5 and all(0 <= v <= 1 for v in b[1:]) and b[3] > 0 and b[4] > 0
    splits_of_seq = defaultdict(set)
    for m in meta["images"].values():
        splits_of_seq[m["seq_id"]].add(m["split"])
    assert all(len(s) == 1 for s in splits_of_seq.values())  # no burst cut across splits
    assert dataset_hash(out / "data.yaml") == meta["dataset_hash"]
    return meta, rows


def test_coco_split_by_location(tmp_path, synth):
    path, coco = synth
    out = tmp_path / "ds"
    report = prepare(out, coco=path, test_locations=["L6", "L7"])
    meta, rows = _check_dataset(out, len(coco["images"]))
    assert report["split_by"] == "location"
    assert report["splits"]["test"]["locations"] == ["L6", "L7"]
    for split in ("train", "val"):
        assert report["splits"][split]["images"] > 0
        assert not {"L6", "L7"} & set(report["splits"][split]["locations"])
    assert "L6__IMG_0001.JPG" in {Path(k).name for k in meta["images"]}  # camera's own names, made unique
    # one box checked against the COCO pixels
    ann = next(a for a in coco["annotations"] if a["category_id"])
    im = next(i for i in coco["images"] if i["id"] == ann["image_id"])
    key = next(k for k, m in meta["images"].items() if m["original"] == im["file_name"])
    x, y, w, h = ann["bbox"]
    expect = [(x + w / 2) / SIZE[0], (y + h / 2) / SIZE[1], w / SIZE[0], h / SIZE[1]]
    assert any(all(abs(a - b) < 1e-5 for a, b in zip(r[1:], expect, strict=True)) for r in rows[key])
    empties = {a["image_id"] for a in coco["annotations"] if a["category_id"] == 0}
    n_empty = sum(1 for k, m in meta["images"].items() if not rows[k])
    assert n_empty == len(empties) == sum(report["splits"][s]["empty"] for s in ("train", "val", "test"))
    assert (out / "split_report.md").read_text().startswith("# Split report")
    src = path.parent / im["file_name"]
    assert os.path.samefile(out / key, src)  # hard link by default
    assert not list(tmp_path.glob("*.tmp-*"))


def test_coco_split_by_sequence_is_seeded_and_proportional(tmp_path, synth):
    path, coco = synth
    a = prepare(tmp_path / "a", coco=path, seed=1, link="copy")
    meta_a, _ = _check_dataset(tmp_path / "a", len(coco["images"]))
    assert a["split_by"] == "sequence"
    n = {s: a["splits"][s]["images"] for s in ("train", "val", "test")}
    assert 0.55 <= n["train"] / 240 <= 0.85 and n["val"] > 10 and n["test"] > 10
    k = next(iter(meta_a["images"]))
    assert not os.path.samefile(tmp_path / "a" / k, path.parent / meta_a["images"][k]["original"])  # copied
    prepare(tmp_path / "b", coco=path, seed=1)
    prepare(tmp_path / "c", coco=path, seed=2)
    split = {d: {m["original"]: m["split"] for m in json.loads((tmp_path / d / "meta.json").read_text())
                 ["images"].values()} for d in "abc"}
    assert split["a"] == split["b"] and split["a"] != split["c"]


def test_split_sequences_spreads_a_rare_species():
    seqs = {f"c{i}": (3, ["deer"]) for i in range(40)} | {f"r{i}": (2, ["lynx"]) for i in range(3)}
    seqs |= {f"e{i}": (2, []) for i in range(30)}
    got = split_sequences(seqs, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=0)
    assert {got[f"r{i}"] for i in range(3)} == {"train", "val", "test"}
    deer = [got[f"c{i}"] for i in range(40)]
    assert 24 <= deer.count("train") <= 32 and deer.count("val") >= 4 and deer.count("test") >= 4


def test_coco_without_seq_ids_bursts_from_time_and_relative_boxes(tmp_path, synth):
    path, coco = synth
    c = json.loads(json.dumps(coco))
    for im in c["images"]:
        del im["seq_id"]
    for a in c["annotations"]:
        if "bbox" in a:
            x, y, w, h = a.pop("bbox")
            a["bbox_relative"] = [x / SIZE[0], y / SIZE[1], w / SIZE[0], h / SIZE[1]]
    p = path.parent / "noseq.json"
    p.write_text(json.dumps(c))
    prepare(tmp_path / "ds", coco=p)
    meta, rows = _check_dataset(tmp_path / "ds", len(coco["images"]))
    prepare(tmp_path / "ref", coco=path, link="symlink")
    _, ref_rows = _check_dataset(tmp_path / "ref", len(coco["images"]))
    by_orig = {m["original"]: k for k, m in json.loads((tmp_path / "ref" / "meta.json").read_text())
               ["images"].items()}
    for k, m in meta["images"].items():
        ref = ref_rows[by_orig[m["original"]]]
        assert len(rows[k]) == len(ref)
        assert all(abs(a - b) < 1e-5 for r, q in zip(rows[k], ref, strict=True) for a, b in zip(r, q, strict=True))
    true_seq = {im["file_name"]: im["seq_id"] for im in coco["images"]}
    pairs = {(true_seq[m["original"]], m["seq_id"]) for m in meta["images"].values()}
    assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})  # bursts recovered exactly


def _labels_and_md(tmp_path: Path, synth) -> tuple[Path, Path, dict]:
    """A labels CSV (image-level species) and a MegaDetector JSON made from the synthetic truth."""
    path, coco = synth
    names = {c["id"]: c["name"] for c in coco["categories"]}
    by_image = defaultdict(list)
    for a in coco["annotations"]:
        by_image[a["image_id"]].append(a)
    rows, md_images, expect = [], [], {}
    for n, im in enumerate(coco["images"][:60]):
        anns = by_image[im["id"]]
        species = {names[a["category_id"]] for a in anns if a["category_id"]}
        if len(species) > 1:
            continue
        dets = [{"category": "1", "conf": 0.9,
                 "bbox": [a["bbox"][0] / SIZE[0], a["bbox"][1] / SIZE[1], a["bbox"][2] / SIZE[0],
                          a["bbox"][3] / SIZE[1]]} for a in anns if a["category_id"]]
        dets.append({"category": "1", "conf": 0.1, "bbox": [0.0, 0.0, 0.1, 0.1]})  # below threshold
        if not species:
            dets.append({"category": "1", "conf": 0.8, "bbox": [0.5, 0.5, 0.1, 0.1]})  # MD false alarm
        dets.append({"category": "2", "conf": 0.95, "bbox": [0.2, 0.2, 0.1, 0.3]})  # a person: ignored
        if species and n % 7 == 0:
            dets = [d for d in dets if d["conf"] < 0.2]  # MD missed the animal: image cannot be boxed
            expect[im["file_name"]] = None
        else:
            expect[im["file_name"]] = (sorted(species), len(dets) - 2 - (not species))
        rows.append({"file": im["file_name"], "species": next(iter(species)) if species else "empty"})
        md_images.append({"file": im["file_name"], "detections": dets, "max_detection_conf": 0.9})
    md_images.append({"file": "images/L0/IMG_9999.JPG", "failure": "Failure image access"})
    root = path.parent
    csv_path = tmp_path / "labels.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["file", "species"])
        w.writeheader()
        w.writerows(rows)
    md_path = tmp_path / "md.json"
    md_path.write_text(json.dumps({"info": {"format_version": "1.4", "detector": "md_v5a.0.0.pt"},
                                   "detection_categories": {"1": "animal", "2": "person", "3": "vehicle"},
                                   "images": md_images}))
    return csv_path, md_path, {"root": root, "expect": expect}


def test_labels_csv_plus_megadetector(tmp_path, synth):
    csv_path, md_path, info = _labels_and_md(tmp_path, synth)
    out = tmp_path / "ds"
    report = prepare(out, labels_csv=csv_path, md_json=md_path, images=info["root"], md_threshold=0.2)
    kept = {f: e for f, e in info["expect"].items() if e is not None}
    meta, rows = _check_dataset(out, len(kept))
    assert report["skipped"]["no MegaDetector animal box above threshold"] == len(info["expect"]) - len(kept)
    assert report["skipped"]["in MegaDetector output, not in the labels"] == 1
    for key, m in meta["images"].items():
        species, n_boxes = kept[m["original"]]
        assert m["species"] == species and len(rows[key]) == n_boxes
        assert m["location"] == Path(m["original"]).parent.name  # the camera folder


def test_yolo_pass_through_and_resplit(tmp_path, synth):
    path, coco = synth
    first = tmp_path / "first"
    prepare(first, coco=path, test_locations=["L6", "L7"])
    meta1, rows1 = _check_dataset(first, len(coco["images"]))
    again = tmp_path / "again"
    rep = prepare(again, yolo=first / "data.yaml")
    meta2, rows2 = _check_dataset(again, len(coco["images"]))
    assert rep["split_by"] == "given"
    assert rows1 == rows2 and meta2["dataset_hash"] == meta1["dataset_hash"]
    assert {k: (m["location"], m["seq_id"], m["original"]) for k, m in meta1["images"].items()} == \
           {k: (m["location"], m["seq_id"], m["original"]) for k, m in meta2["images"].items()}
    rep = prepare(tmp_path / "re", yolo=first / "data.yaml", test_locations=["L0"])
    assert rep["splits"]["test"]["locations"] == ["L0"]
    _check_dataset(tmp_path / "re", len(coco["images"]))


def test_data_yaml_is_accepted_by_ultralytics(tmp_path, synth):
    pytest.importorskip("ultralytics")
    from export.yolo_env import ultralytics

    ultralytics()
    from ultralytics.data.utils import check_det_dataset

    prepare(tmp_path / "ds", coco=synth[0], test_locations=["L7"])
    data = check_det_dataset(str(tmp_path / "ds" / "data.yaml"))
    assert data["nc"] == 9 and Path(data["val"]).is_dir()


# ----------------------------------------------------------------------------- bad input
def _mini_coco(tmp_path: Path, synth) -> tuple[Path, dict]:
    """A three-image COCO CT file (copied images) that each bad-input case then breaks one way."""
    path, coco = synth
    coco = json.loads(json.dumps(coco))  # each case breaks its own copy
    root = tmp_path / "in"
    ims = [im for im in coco["images"] if im["location"] == "L0"][:3]
    for im in ims:
        (root / im["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path.parent / im["file_name"], root / im["file_name"])
    ids = {im["id"] for im in ims}
    c = {"images": ims, "categories": coco["categories"],
         "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}
    return root / "coco.json", c


def _break_missing_file(c, root):
    c["images"][1]["file_name"] = "images/L0/NOPE.JPG"
    return FileNotFoundError, ["coco.json", "NOPE.JPG"]


def _break_unknown_category(c, root):
    c["annotations"][0]["category_id"] = 99
    return ValueError, ["coco.json", f"annotation {c['annotations'][0]['id']}", "99"]


def _break_box_outside(c, root):
    c["annotations"].append({"id": 777, "image_id": c["images"][0]["id"], "category_id": 1,
                             "bbox": [150, 10, 40, 30]})
    return ValueError, ["coco.json", "annotation 777", "outside image", c["images"][0]["file_name"], "160x120"]


def _break_unreadable_image(c, root):
    (root / c["images"][2]["file_name"]).write_bytes(b"\xff\xd8 this is not a jpeg")
    return ValueError, ["coco.json", repr(c["images"][2]["id"]), "unreadable"]


def _break_duplicate_image_id(c, root):
    c["images"][1]["id"] = c["images"][0]["id"]
    return ValueError, ["coco.json", repr(c["images"][0]["id"]), "duplicate id"]


def _break_duplicate_annotation_id(c, root):
    c["annotations"][1]["id"] = c["annotations"][0]["id"]
    return ValueError, ["coco.json", f"annotation {c['annotations'][0]['id']}", "duplicate id"]


def _break_size_mismatch(c, root):
    c["images"][0]["width"] = 640
    return ValueError, ["coco.json", "160x120", "640x120"]


def _break_bad_datetime(c, root):
    c["images"][0]["datetime"] = "yesterday"
    return ValueError, ["coco.json", repr(c["images"][0]["id"]), "yesterday"]


@pytest.mark.parametrize("breaker", [_break_missing_file, _break_unknown_category, _break_box_outside,
                                     _break_unreadable_image, _break_duplicate_image_id,
                                     _break_duplicate_annotation_id, _break_size_mismatch, _break_bad_datetime])
def test_bad_coco_named_and_nothing_written(tmp_path, synth, breaker):
    json_path, c = _mini_coco(tmp_path, synth)
    exc, parts = breaker(c, json_path.parent)
    json_path.write_text(json.dumps(c))
    out = tmp_path / "out"
    with pytest.raises(exc) as e:
        prepare(out, coco=json_path, val_frac=0.3, test_frac=0.3)
    msg = str(e.value)
    assert "\n" not in msg
    for part in parts:
        assert part in msg
    assert not out.exists() and not list(tmp_path.glob("out*"))


def test_malformed_json_and_cli_exit(tmp_path, capsys):
    bad = tmp_path / "coco.json"
    bad.write_text('{"images": [')
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"coco\.json: malformed JSON"):
        prepare(out, coco=bad)
    assert main(["prepare", str(out), "--coco", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "malformed JSON" in err and err.count("\n") == 1
    assert not out.exists()


def test_bad_labels_and_megadetector(tmp_path, synth):
    csv_path, md_path, info = _labels_and_md(tmp_path, synth)
    out = tmp_path / "out"
    kw = {"md_json": md_path, "images": info["root"]}
    text = csv_path.read_text()
    csv_path.write_text(text + "images/L3/IMG_0404.JPG,hare\n")
    row = text.count("\n") + 1
    with pytest.raises(ValueError, match=rf"labels\.csv: row {row}: .*IMG_0404\.JPG.*not in the MegaDetector"):
        prepare(out, labels_csv=csv_path, **kw)
    csv_path.write_text("image,label\na.jpg,hare\n")
    with pytest.raises(ValueError, match=r"labels\.csv: header must have columns file,species"):
        prepare(out, labels_csv=csv_path, **kw)
    csv_path.write_text(text)
    md = json.loads(md_path.read_text())
    md["images"][3]["detections"][0]["bbox"] = [0.5, 0.5, "wide", 0.1]
    md_path.write_text(json.dumps(md))
    with pytest.raises(ValueError, match=r"md\.json: image 3 .*detection 0: bbox"):
        prepare(out, labels_csv=csv_path, **kw)
    with pytest.raises(FileNotFoundError, match=r"nothere\.json"):
        prepare(out, labels_csv=csv_path, md_json=tmp_path / "nothere.json")
    assert not out.exists() and not list(tmp_path.glob("out*"))


def test_bad_yolo_and_split_options(tmp_path, synth):
    path, _ = synth
    first = tmp_path / "first"
    prepare(first, coco=path)
    with pytest.raises(ValueError, match=r"test location 'L9' not in the data"):
        prepare(tmp_path / "out", coco=path, test_locations=["L9"])
    with pytest.raises(ValueError, match="exists"):
        prepare(first, coco=path)
    lab = next(p for p in sorted((first / "labels" / "train").iterdir()) if p.read_text())
    lab.write_text("42 0.5 0.5 0.1 0.1\n")
    with pytest.raises(ValueError, match=rf"{lab.name}: line 1: class 42 not in names"):
        prepare(tmp_path / "out", yolo=first / "data.yaml")
    lab.write_text("0 0.5 0.5 0.1\n")
    with pytest.raises(ValueError, match=rf"{lab.name}: line 1: expected 'class cx cy w h'"):
        prepare(tmp_path / "out", yolo=first / "data.yaml")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="exactly one of"):
        prepare(tmp_path / "out", coco=path, yolo=first / "data.yaml")


def test_one_names_reader_refuses_an_empty_class_list(tmp_path, synth):
    """prepare (YOLO input) and training read data.yaml's names the same way: [] is refused."""
    from export.train import read_data_yaml

    path, _ = synth
    first = tmp_path / "first"
    prepare(first, coco=path)
    d = yaml.safe_load((first / "data.yaml").read_text())
    d["names"] = []
    (first / "data.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(ValueError, match=r"data\.yaml: 'names' is empty"):
        prepare(tmp_path / "out", yolo=first / "data.yaml")
    with pytest.raises(ValueError, match=r"data\.yaml: 'names' is empty"):
        read_data_yaml(first / "data.yaml")
    assert not (tmp_path / "out").exists()


def test_dataset_hash_has_one_key_and_old_run_json_still_reads():
    from export.datasets import DATASET_HASH_KEY, recorded_dataset_hash

    assert DATASET_HASH_KEY == "dataset_hash"
    assert recorded_dataset_hash({"dataset_hash": "ab"}) == "ab"
    assert recorded_dataset_hash({"dataset_sha256": "cd"}) == "cd"  # run.json before the key was unified
    assert recorded_dataset_hash({}) is None


def test_coco_images_found_in_the_usual_places_or_the_flag_named(tmp_path, synth, capsys):
    path, coco = synth
    c = json.loads(json.dumps(coco))
    for im in c["images"]:  # file names relative to an images/ folder beside the JSON (a common layout)
        im["file_name"] = im["file_name"].removeprefix("images/")
    beside = path.parent / "coco_in_images.json"
    beside.write_text(json.dumps(c))
    prepare(tmp_path / "a", coco=beside)
    assert len(json.loads((tmp_path / "a" / "meta.json").read_text())["images"]) == len(c["images"])
    # the JSON elsewhere: one line naming the file and the flag to give; with the flag it works
    away = tmp_path / "elsewhere" / "coco.json"
    away.parent.mkdir()
    away.write_text(json.dumps(c))
    assert main(["prepare", str(tmp_path / "b"), "--coco", str(away)]) == 2
    err = capsys.readouterr().err
    assert "--images FOLDER" in err and str(away) in err and len(err.strip().splitlines()) == 1
    prepare(tmp_path / "b", coco=away, images=path.parent / "images")
    assert (tmp_path / "b" / "data.yaml").is_file()
