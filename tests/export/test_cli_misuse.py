"""Workstation commands misused the way a hostile user would: --out naming the source bundle, a
folder given as a CA file. Each ends in one clear line naming the path, a non-zero exit, no
traceback, and the user's files as they were."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from export.cli import main

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "edge" / "demo"
PUB = str(DEMO / "keys" / "demo.pub")


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _one_clear_line(capsys, rc: int, names: str) -> None:
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "Traceback" not in err, err
    assert "error:" in err.splitlines()[-1] and names in err.splitlines()[-1], err


@pytest.mark.parametrize("command", ["whole-models", "share-backbone"])
def test_a_conversion_never_writes_over_its_source_bundle(tmp_path, capsys, command):
    src = tmp_path / "bundle"
    shutil.copytree(DEMO / "bundle", src)
    before = _tree(src)
    _one_clear_line(capsys, main([command, "--bundle", str(src), "--out", str(src), "--public-key", PUB]),
                    str(src))
    assert _tree(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_a_conversion_never_replaces_a_file_named_as_out(tmp_path, capsys):
    victim = tmp_path / "notes.txt"
    victim.write_text("keep me")
    _one_clear_line(capsys, main(["whole-models", "--bundle", str(DEMO / "bundle"), "--out", str(victim),
                                  "--public-key", PUB]), str(victim))
    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("ca", ["folder", "garbage"])
def test_update_names_a_bad_ca_file(tmp_path, capsys, ca):
    from edge.signing import generate_keypair

    key = tmp_path / "signing.pem"
    key.write_bytes(generate_keypair()[0])
    bad = tmp_path / "ca"
    if ca == "folder":
        bad.mkdir()
    else:
        bad.write_text("not a certificate\n")
    rc = main(["update", "--device", "box", "--version", "2", "--sign", str(key),
               "--broker", "127.0.0.1:1", "--ca-file", str(bad), "--timeout", "1"])
    _one_clear_line(capsys, rc, str(bad))


@pytest.mark.parametrize(("argv", "option"), [
    (["evaluate", "--bundle", "b", "--data", "d", "--out", "o", "--route-reuse", "nan"], "--route-reuse"),
    (["evaluate", "--bundle", "b", "--data", "d", "--out", "o", "--route-reuse", "7"], "--route-reuse"),
    (["calibrate", "--bundle", "b", "--data", "d", "--max-recall-drop-pp", "nan"], "--max-recall-drop-pp"),
    (["prepare", "--coco", "c.json", "--md-threshold", "nan", "out"], "--md-threshold"),
    (["prepare", "--coco", "c.json", "--val-frac", "inf", "out"], "--val-frac"),
    (["group", "--conf", "nan"], "--conf"),
    (["bundle", "--global", "g", "--experts", "e", "--groups", "x", "--out", "o", "--conf", "nan"], "--conf"),
    (["update", "--device", "x", "--sign", "k", "--broker", "127.0.0.1:1", "--timeout", "inf"], "--timeout"),
])
def test_a_probability_or_share_option_refuses_nan_and_out_of_range(capsys, argv, option):
    """Refused while parsing, before any file is read: nan passes every comparison, so a nan
    route-reuse threshold or confidence silently meant 'never'."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "Traceback" not in err, err
