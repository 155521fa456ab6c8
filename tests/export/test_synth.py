"""Synthetic scenes: determinism, planted rarity, empties, infrared, bursts, backgrounds, CLI."""

from __future__ import annotations

import itertools
import json
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import pytest

from export.cli import main
from export.synth import PLANTED_GROUPS, RARE, SPECIES, synthesize

SIZE = (160, 120)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "a"
    path = synthesize(out, seed=7, n_images=200, size=SIZE, n_locations=4)
    return out, json.loads(path.read_text())


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path, scenes):
    a, _ = scenes
    b = tmp_path / "b"
    synthesize(b, seed=7, n_images=200, size=SIZE, n_locations=4)
    ta, tb = _tree(a), _tree(b)
    assert ta.keys() == tb.keys() and len(ta) == 202  # 200 images, coco.json, taxonomy.csv
    assert all(ta[k] == tb[k] for k in ta)
    c = tmp_path / "c"
    synthesize(c, seed=8, n_images=200, size=SIZE, n_locations=4)
    tc = _tree(c)
    assert tc["coco.json"] != ta["coco.json"]
    assert sum(tc.get(k) == v for k, v in ta.items()) < 5


def test_coco_camera_traps_schema(scenes):
    root, coco = scenes
    assert coco["categories"][0] == {"id": 0, "name": "empty"}
    assert [c["name"] for c in coco["categories"][1:]] == SPECIES
    images = {im["id"]: im for im in coco["images"]}
    assert len(images) == len(coco["images"]) == 200
    for im in coco["images"]:
        assert (root / im["file_name"]).is_file()
        assert im["file_name"].startswith(f"images/{im['location']}/")
        assert (im["width"], im["height"]) == SIZE
        datetime.strptime(im["datetime"], "%Y-%m-%d %H:%M:%S")
    per_image = defaultdict(list)
    for a in coco["annotations"]:
        per_image[a["image_id"]].append(a)
    assert per_image.keys() == images.keys()
    for anns in per_image.values():
        cats = [a["category_id"] for a in anns]
        if 0 in cats:
            assert cats == [0] and "bbox" not in anns[0]  # an empty image: one annotation, no box
        for a in anns:
            if a["category_id"]:
                x, y, w, h = a["bbox"]
                assert 0 <= x and 0 <= y and w > 0 and h > 0
                assert x + w <= SIZE[0] and y + h <= SIZE[1]
    # cameras reuse file names, as real ones do
    names = Counter(Path(im["file_name"]).name for im in coco["images"])
    assert names["IMG_0001.JPG"] == 4


def test_planted_groups_rarity_and_empties(scenes):
    _, coco = scenes
    assert len(PLANTED_GROUPS) >= 3
    for species in PLANTED_GROUPS.values():
        assert len(species) >= 2 and len(RARE & set(species)) == 1
    names = {c["id"]: c["name"] for c in coco["categories"]}
    boxes = Counter(names[a["category_id"]] for a in coco["annotations"] if a["category_id"])
    assert set(boxes) == set(SPECIES)  # every species shows up
    common = [boxes[s] for s in SPECIES if s not in RARE]
    rare = [boxes[s] for s in RARE]
    assert min(common) >= 10 * max(rare)
    empty = sum(1 for a in coco["annotations"] if a["category_id"] == 0)
    assert 0.4 <= empty / len(coco["images"]) <= 0.6
    widths = [a["bbox"][2] for a in coco["annotations"] if a["category_id"]]
    assert min(widths) < 0.08 * SIZE[0]  # far, tiny animals exist
    assert max(widths) > 0.25 * SIZE[0]  # and near ones


def test_night_frames_are_grey_day_frames_colour(scenes):
    root, coco = scenes
    spread = {True: [], False: []}
    for im in coco["images"]:
        night = not 6 <= datetime.strptime(im["datetime"], "%Y-%m-%d %H:%M:%S").hour < 20
        assert im["ir"] == night
        img = cv2.imread(str(root / im["file_name"])).astype(int)
        spread[night].append(int(np.abs(img - img.mean(axis=2, keepdims=True)).max()))
    assert spread[True] and spread[False]
    assert max(spread[True]) <= 2
    assert min(spread[False]) > 20


def test_bursts_one_to_five_frames_one_second_apart(scenes):
    _, coco = scenes
    seqs = defaultdict(list)
    for im in coco["images"]:
        seqs[im["seq_id"]].append(im)
    boxes = defaultdict(list)
    for a in coco["annotations"]:
        if a["category_id"]:
            boxes[a["image_id"]].append(a["bbox"])
    lengths, moved, multi = Counter(), 0, 0
    for frames in seqs.values():
        frames.sort(key=lambda im: im["frame_num"])
        n = len(frames)
        lengths[n] += 1
        assert 1 <= n <= 5
        assert [im["frame_num"] for im in frames] == list(range(n))
        assert {im["seq_num_frames"] for im in frames} == {n}
        assert len({im["location"] for im in frames}) == 1
        times = [datetime.strptime(im["datetime"], "%Y-%m-%d %H:%M:%S") for im in frames]
        assert all((b - a).total_seconds() == 1 for a, b in itertools.pairwise(times))
        if n > 1 and boxes[frames[0]["id"]]:
            multi += 1
            moved += boxes[frames[0]["id"]] != boxes[frames[-1]["id"]]
    assert len(lengths) >= 4  # burst lengths vary
    assert multi and moved == multi  # animals move between frames


def test_locations_look_different(scenes):
    root, coco = scenes
    means = defaultdict(list)
    for im in coco["images"]:
        if not im["ir"]:
            img = cv2.imread(str(root / im["file_name"])).astype(np.float32)
            means[im["location"]].append(cv2.resize(img, (16, 12), interpolation=cv2.INTER_AREA))
    prints = {loc: np.mean(v, axis=0) for loc, v in means.items()}
    locs = sorted(prints)
    assert len(locs) == 4
    gaps = [np.abs(prints[a] - prints[b]).mean() for i, a in enumerate(locs) for b in locs[i + 1:]]
    assert min(gaps) > 8


def test_cli_writes_and_refuses_to_clobber(tmp_path, capsys):
    out = tmp_path / "s"
    args = ["synth", str(out), "--seed", "1", "--images", "20", "--size", "128x96", "--locations", "2"]
    assert main(args) == 0
    coco = json.loads((out / "coco.json").read_text())
    assert len(coco["images"]) == 20
    assert main(args) == 2
    assert "exists" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    assert main(["synth", str(tmp_path / "other"), "--images", "5", "--overwrite"]) == 2
    assert (tmp_path / "other" / "keep.txt").is_file()
    assert not list(tmp_path.glob("*.tmp-*"))


def test_building_replaces_only_on_success(tmp_path):
    from edge.atomic import building

    out = tmp_path / "out"
    with building(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), building(out) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("half-way")
    assert (out / "a").read_text() == "1"  # the failed run left the old folder as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # and no temporary folder
