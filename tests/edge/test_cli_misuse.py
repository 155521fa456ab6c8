"""Device commands misused the way a hostile user would: a folder where a file belongs, an
empty file given as a ledger, absurd numbers, a backend this machine lacks. Each must end in one
clear line naming the path or field, a non-zero exit, no traceback, and nothing of the user's
changed or left half-written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from edge.atomic import building
from edge.cli import main
from edge.demo import DEMO_BUNDLE, DEMO_FRAMES, DEMO_KEYS

PUB = str(DEMO_KEYS / "demo.pub")


def _one_clear_line(capsys, rc: int, names: str) -> str:
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert "error:" in last and names in last, err
    return last


@pytest.mark.parametrize("misuse", ["public_key_is_folder", "out_is_folder"])
def test_classify_folder_where_a_file_belongs(tmp_path, capsys, misuse):
    folder = tmp_path / "a folder"
    folder.mkdir()
    out = tmp_path / "out.json"
    argv = ["classify", "--bundle", str(DEMO_BUNDLE), "--out", str(out), "--public-key", PUB, str(DEMO_FRAMES)]
    if misuse == "public_key_is_folder":
        argv[argv.index(PUB)] = str(folder)
    else:
        argv[argv.index(str(out))] = str(folder)
    _one_clear_line(capsys, main(argv), str(folder))
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("batch", ["0", "-5"])
def test_classify_refuses_a_batch_below_one(tmp_path, capsys, batch):
    out = tmp_path / "out.json"
    with pytest.raises(SystemExit) as e:
        main(["classify", "--bundle", str(DEMO_BUNDLE), "--out", str(out), "--public-key", PUB,
              "--batch", batch, str(DEMO_FRAMES)])
    assert e.value.code == 2
    assert "--batch" in capsys.readouterr().err
    assert not out.exists()


def test_classify_keeps_the_previous_results_when_the_bundle_fails(tmp_path, capsys):
    out = tmp_path / "out.json"
    out.write_text('{"images": ["earlier results"]}')
    rc = main(["classify", "--bundle", str(tmp_path / "no-such-bundle"), "--out", str(out),
               "--public-key", PUB, str(DEMO_FRAMES)])
    _one_clear_line(capsys, rc, "no-such-bundle")
    assert out.read_text() == '{"images": ["earlier results"]}'


def test_a_backend_whose_modules_are_missing_is_one_line(monkeypatch, capsys):
    for mod in ("tensorrt", "pycuda", "pycuda.driver"):
        monkeypatch.setitem(sys.modules, mod, None)  # import raises ImportError, as off a Jetson
    rc = main(["compile", "--bundle", str(DEMO_BUNDLE), "--public-key", PUB, "--backend", "tensorrt"])
    _one_clear_line(capsys, rc, "tensorrt")  # names the missing module


def test_export_camtrapdp_refuses_an_empty_file_as_ledger_and_leaves_it_alone(tmp_path, capsys):
    empty = tmp_path / "notes.txt"
    empty.write_bytes(b"")
    rc = main(["export-camtrapdp", "--ledger", str(empty), "--out", str(tmp_path / "dp"),
               "--latitude", "10", "--longitude", "5"])
    _one_clear_line(capsys, rc, str(empty))
    assert empty.read_bytes() == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_building_refuses_to_replace_a_file(tmp_path):
    victim = tmp_path / "results.json"
    victim.write_text("keep me")
    with pytest.raises(ValueError, match="not a folder"), building(victim) as tmp:
        (tmp / "x").write_text("new")
    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_fresh_classify_run_ignores_what_a_killed_run_left_in_its_journal(tmp_path, capsys):
    from edge.records.megadetector import MdBatchWriter

    out = tmp_path / "out.json"
    w = MdBatchWriter(out, "d", "c", ["a"], flush_every=1000)
    w.add("elsewhere/old-run.jpg", failure="from a run killed before its flush")
    journal = w.journal_path
    left = journal.read_bytes()
    w.close()
    journal.write_bytes(left)  # what kill -9 leaves: the results file plus an unflushed journal
    rc = main(["classify", "--bundle", str(DEMO_BUNDLE), "--out", str(out), "--public-key", PUB, str(DEMO_FRAMES)])
    assert rc == 0, capsys.readouterr().err
    files = [im["file"] for im in json.loads(out.read_text())["images"]]
    assert "elsewhere/old-run.jpg" not in files
    assert len(files) == len(list(DEMO_FRAMES.glob("*.JPG")))


@pytest.mark.parametrize(("argv", "option"), [
    (["selftest", "--bundle", str(DEMO_BUNDLE), "--public-key", PUB, "--tolerance", "nan"], "--tolerance"),
    (["selftest", "--bundle", str(DEMO_BUNDLE), "--public-key", PUB, "--iou", "inf"], "--iou"),
    (["selftest", "--bundle", str(DEMO_BUNDLE), "--public-key", PUB, "--tolerance", "-1"], "--tolerance"),
    (["demo", "--interval", "inf"], "--interval"),
    (["demo", "--interval", "-1"], "--interval"),
    (["demo", "--timeout", "nan"], "--timeout"),
])
def test_a_number_option_refuses_nan_infinity_and_out_of_range(capsys, argv, option):
    """nan compares false with everything: a nan tolerance passed any model's self-test."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert option in err and "Traceback" not in err and "selftest: ok" not in err


def _number_fields(model, prefix=()):
    """Every float field of a config model, as a path of keys."""
    import typing

    from pydantic import BaseModel

    for name, f in model.model_fields.items():
        args = typing.get_args(f.annotation) or (f.annotation,)
        for a in args:
            if isinstance(a, type) and issubclass(a, BaseModel):
                yield from _number_fields(a, (*prefix, name))
        if float in args:
            yield (*prefix, name)


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_no_config_number_takes_infinity_or_nan(tmp_path, capsys, value):
    """An infinite settle_s never read a frame that merely appeared, an infinite poll interval
    never polled, an infinite camera height wrote 'Infinity' (not JSON) into Camtrap DP."""
    from edge.config import Config

    paths = list(_number_fields(Config))
    assert len(paths) > 10  # the walk found the config's numbers
    for path in paths:
        cfg: dict = {"device": {"id": "t1"}, "watch": {"folders": [str(tmp_path)]}}
        cur = cfg
        for k in path[:-1]:
            cur = cur.setdefault(k, {})
        cur[path[-1]] = "VALUE"
        f = tmp_path / "config.yaml"
        import yaml

        f.write_text(yaml.safe_dump(cfg).replace("VALUE", value))
        rc = main(["check-config", str(f)])
        out = capsys.readouterr()
        assert rc == 2, (".".join(path), value, out.out)
        assert f"{'.'.join(path)}:" in out.out + out.err, (value, out)


@pytest.mark.parametrize("what", ["folder", "empty file", "empty text"])
def test_decode_names_a_folder_or_an_empty_payload(tmp_path, monkeypatch, capsys, what):
    """A folder's name can read as base64 ('adir' is 3 bytes) and an empty file as an empty
    payload: both were decoded and answered about the wrong problem (too few bytes)."""
    monkeypatch.chdir(tmp_path)  # relative names, as typed
    arg = {"folder": "adir", "empty file": "p.bin", "empty text": ""}[what]
    if what == "folder":
        Path(arg).mkdir()
    elif what == "empty file":
        Path(arg).write_bytes(b"")
    rc = main(["decode", "--species", "a,b", arg])
    line = _one_clear_line(capsys, rc, arg)
    assert line.endswith("give a payload file or the payload itself") if what == "folder" else "empty" in line
