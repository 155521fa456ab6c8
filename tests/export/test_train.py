"""`train`: data.yaml reading, the imbalance rules (pure), and a real 1-epoch training run."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

pytest.importorskip("torch")
pytest.importorskip("ultralytics")

import fixtures  # tests/export/fixtures.py (pytest puts this folder on sys.path)

from export.train import (
    TINY_YAML,
    class_counts,
    close_mosaic_epochs,
    inverse_frequency_weights,
    label_path,
    oversample_repeats,
    read_data_yaml,
    train,
)

# ---------------------------------------------------------------- pure rules, hand-made counts

def test_weights_inverse_frequency_mean_one():
    w = inverse_frequency_weights([100, 50, 25])
    # raw mean_count/count = 58.3/100, /50, /25 -> proportional to 1 : 2 : 4
    assert w[1] / w[0] == pytest.approx(2) and w[2] / w[0] == pytest.approx(4)
    assert sum(w) / 3 == pytest.approx(1)


def test_weights_clipped_and_absent_class_average():
    # present mean = 401/3; raw 0.446, 1.337, 133.7 -> clipped 0.5, 1.337, 10; absent -> 1
    w = inverse_frequency_weights([300, 100, 1, 0])
    assert sum(w) / 4 == pytest.approx(1)
    assert w[2] / w[0] == pytest.approx(10 / 0.5)  # both clipped: the spread is bounded
    assert w[1] / w[0] == pytest.approx((401 / 3 / 100) / 0.5)
    assert w[3] / w[0] == pytest.approx(1 / 0.5)
    assert inverse_frequency_weights([0, 0]) == [1.0, 1.0]
    assert inverse_frequency_weights([7, 7, 7]) == pytest.approx([1, 1, 1])


def test_oversample_repeats_reach_target_share():
    # class 0 in 10 images, class 1 in 2, class 2 in 1; one empty image; one image with 0 and 2
    imgs = [[0]] * 9 + [[0, 2]] + [[1], [1]] + [[]]
    r = oversample_repeats(imgs, 3, target_share=0.5, max_repeat=10)
    assert r[:9] == [1] * 9
    assert r[9] == 5  # ceil(0.5*10/1): its rare class decides
    assert r[10:12] == [3, 3]  # ceil(5/2)
    assert r[12] == 1  # empty frames never repeat
    after = class_counts(imgs, 3, r)["images"]
    assert after[1] >= 5 and after[2] >= 5
    assert oversample_repeats(imgs, 3, target_share=1.0, max_repeat=4)[9] == 4  # capped
    with pytest.raises(ValueError, match="target_share"):
        oversample_repeats(imgs, 3, target_share=0)


def test_class_counts_instances_images_empty():
    c = class_counts([[0, 0, 1], [], [1]], 2, repeats=[2, 3, 1])
    assert c == {"instances": [4, 3], "images": [2, 3], "empty_images": 3}


# ---------------------------------------------------------------- data.yaml reading and bad input

def test_read_data_yaml_relative_path_and_label_rule(tmp_path):
    data = fixtures.make_dataset(tmp_path / "ds", n_train=4, n_val=2, size=64)
    d = yaml.safe_load(data.read_text())
    d["path"] = "."  # relative to the yaml's folder, whatever the cwd
    data.write_text(yaml.safe_dump(d))
    spec = read_data_yaml(data)
    assert spec.root == (tmp_path / "ds").resolve() and spec.names == ["fox", "lynx", "rabbit", "mouse"]
    img = spec.splits["train"][0] / "a.jpg"
    assert label_path(img) == spec.root / "labels" / "train" / "a.txt"


def test_missing_data_yaml_is_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.yaml not found") as e:
        train(tmp_path / "nope" / "data.yaml", TINY_YAML, tmp_path / "run", epochs=1)
    assert "\n" not in str(e.value)


def test_bad_label_class_names_file_and_line(tmp_path):
    data = fixtures.make_dataset(tmp_path / "ds", n_train=4, n_val=2, size=64)
    lab = tmp_path / "ds" / "labels" / "train" / "train_000.txt"
    lab.write_text("7 0.5 0.5 0.1 0.1\n")
    with pytest.raises(ValueError, match=r"train_000\.txt:1: class 7 outside 0\.\.3"):
        train(data, TINY_YAML, tmp_path / "run", epochs=1)


def test_missing_model_is_clear(tmp_path):
    data = fixtures.make_dataset(tmp_path / "ds", n_train=4, n_val=2, size=64)
    with pytest.raises(FileNotFoundError, match=r"yolov8n\.pt: model not found"):
        train(data, "yolov8n.pt", tmp_path / "run", epochs=1)


def test_classic_yolov5_pickle_gets_the_mdv5_hint(tmp_path, monkeypatch):
    """A classic YOLOv5 pickle (MegaDetector v5's format): its classes live in the yolov5 repo."""
    import types

    import torch

    mods = types.ModuleType("models"), types.ModuleType("models.yolo")

    class Model(torch.nn.Module):
        pass

    Model.__module__, Model.__qualname__ = "models.yolo", "Model"
    mods[1].Model = Model
    monkeypatch.setitem(sys.modules, "models", mods[0])
    monkeypatch.setitem(sys.modules, "models.yolo", mods[1])
    torch.save({"model": Model()}, tmp_path / "md_v5a.0.0.pt")
    monkeypatch.delitem(sys.modules, "models")
    monkeypatch.delitem(sys.modules, "models.yolo")
    data = fixtures.make_dataset(tmp_path / "ds", n_train=4, n_val=2, size=64)
    with pytest.raises(ValueError, match="MegaDetector v6") as e:
        train(data, tmp_path / "md_v5a.0.0.pt", tmp_path / "run", epochs=1)
    assert "\n" not in str(e.value)


def test_cli_bad_input_exit_2(tmp_path, capsys):
    from export.cli import main

    rc = main(["train", "--data", str(tmp_path / "x.yaml"), "--model", "camtrap-tiny.yaml", "--out",
               str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "data.yaml not found" in err[0]


def test_close_mosaic_scales_with_the_epochs_or_is_given():
    assert [close_mosaic_epochs(e) for e in (1, 2, 12, 40, 100, 300)] == [0, 0, 1, 4, 10, 30]
    assert close_mosaic_epochs(12, 3) == 3 and close_mosaic_epochs(2, 5) == 2
    with pytest.raises(ValueError, match="close-mosaic"):
        close_mosaic_epochs(10, -1)


def test_every_help_shows_its_defaults():
    import argparse

    from export.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        text = " ".join(parser.format_help().split())
        for a in parser._actions:
            if a.option_strings and a.nargs != 0 and a.default not in (None, argparse.SUPPRESS):
                help_text = " ".join(parser._get_formatter()._expand_help(a).split())
                assert "default" in help_text and help_text in text, (name, a.dest)
    experts = " ".join(sub.choices["experts"].format_help().split())
    assert "--epochs EPOCHS training epochs (default: the global run's)" in experts
    assert "--imgsz IMGSZ training image size, px (default: the global run's)" in experts


def test_tiny_yaml_loads_with_explicit_scale():
    from export.yolo_env import YOLO

    m = YOLO(TINY_YAML)
    assert m.task == "detect"
    widths = [layer.conv.out_channels for layer in m.model.model[:2]]
    assert widths == [8, 16]  # 64 and 128 at width 0.125: the yaml's own scale, not a guessed letter


# ---------------------------------------------------------------- real training (slow)

@pytest.mark.slow
def test_train_one_epoch_writes_run_json(tmp_path):
    data = fixtures.make_dataset(tmp_path / "ds", n_train=24, n_val=8, size=96)
    lines: list[str] = []
    rec = train(data, TINY_YAML, tmp_path / "run", epochs=1, imgsz=96, batch=8, plots=False, say=lines.append)
    run = tmp_path / "run"
    assert (run / "weights" / "best.pt").is_file() and (run / "weights" / "last.pt").is_file()
    on_disk = json.loads((run / "run.json").read_text())
    assert on_disk == json.loads(json.dumps(rec))
    assert on_disk["names"] == ["fox", "lynx", "rabbit", "mouse"]
    assert on_disk["freeze"] == 0 and on_disk["from_checkpoint"] is False  # yaml: nothing to keep
    assert len(on_disk["dataset_hash"]) == 64
    assert set(on_disk["versions"]) == {"ultralytics", "torch"}
    assert on_disk["metrics"]["mAP50"] is not None and on_disk["metrics"]["epochs_run"] == 1
    ov = on_disk["oversampling"]
    # mouse (rare: 2 of 24 images) is repeated; the train list holds the copies
    assert ov["images_per_class_after"]["mouse"] > ov["images_per_class_before"]["mouse"]
    listed = (run / "train_list.txt").read_text().splitlines()
    assert len(listed) == ov["train_list_lines"] > ov["train_images"]
    # the loss used exactly the documented weights, and ultralytics read exactly the listed boxes
    w = on_disk["class_weights"]
    assert on_disk["metrics"]["loss_class_weights"] == pytest.approx([w[n] for n in on_disk["names"]], abs=1e-5)
    assert on_disk["metrics"]["loaded_instances"] == list(ov["instances_per_class_after"].values())
    assert any("epoch 1/1" in x for x in lines)


@pytest.mark.slow
def test_switches_off_and_freeze_from_checkpoint(tmp_path):
    data = fixtures.make_dataset(tmp_path / "ds", n_train=12, n_val=4, size=96)
    first = train(data, TINY_YAML, tmp_path / "a", epochs=1, imgsz=96, batch=8, plots=False,
                  class_weights=False, oversample=False, say=lambda s: None)
    assert first["class_weights"] is None and first["metrics"]["loss_class_weights"] is None
    assert not (tmp_path / "a" / "train_list.txt").exists()
    assert first["oversampling"]["train_list_lines"] == first["oversampling"]["train_images"]
    second = train(data, tmp_path / "a" / "weights" / "best.pt", tmp_path / "b", epochs=1, imgsz=96, batch=8,
                   plots=False, optimizer="SGD", lr0=0.02, say=lambda s: None)
    assert second["from_checkpoint"] is True and second["freeze"] == 10  # the default from a checkpoint
    # the paper's optimizer reaches ultralytics (its own record of the run's arguments)
    used = yaml.safe_load((tmp_path / "b" / "args.yaml").read_text())
    assert (used["optimizer"], used["lr0"]) == ("SGD", 0.02)
    assert (second["args"]["optimizer"], second["args"]["lr0"]) == ("SGD", 0.02)
    # a 1-epoch run keeps mosaic throughout (ultralytics' own default would close it for 10 epochs)
    assert used["close_mosaic"] == 0 and second["args"]["close_mosaic"] == 0
