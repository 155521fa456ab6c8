"""`camtrap-export publish`: a content-addressed folder for boxes to fetch from; versions immutable,
unsigned bundles refused, a one-expert change adds one file."""

from __future__ import annotations

import json

import pytest
from update_helpers import DEMO, demo_file, relabel_onnx, variant

from edge.signing import generate_keypair
from export.cli import main
from export.release import publish

KEY, PUB = generate_keypair()
G2 = (DEMO / demo_file("group2")).read_bytes()


def test_publish_lays_files_out_by_hash_and_adds_only_new_ones(tmp_path, capsys):
    v1 = variant(DEMO, tmp_path / "v1", version="demo-1", key=None)
    (tmp_path / "k.key").write_bytes(KEY)
    assert main(["publish", str(v1), "--out", str(tmp_path / "www"), "--sign", str(tmp_path / "k.key")]) == 0
    assert "9 files, 9 new" in capsys.readouterr().out  # 4 heads + the shared backbone + 4 samples
    v2 = variant(DEMO, tmp_path / "v2", version="demo-2", key=KEY, replace={"group2": relabel_onnx(G2, "2")})
    p = publish(v2, tmp_path / "www")
    assert (p.files, p.new_files, p.new_bytes) == (9, 1, len(G2) + 3)
    www = tmp_path / "www"
    assert sorted(x.name for x in (www / "manifests").iterdir()) == ["demo-1.json", "demo-1.sig", "demo-2.json",
                                                                     "demo-2.sig"]
    assert (www / "manifests" / "demo-2.json").read_bytes() == (v2 / "manifest.json").read_bytes()
    assert set(json.loads((www / "index.json").read_text())["versions"]) == {"demo-1", "demo-2"}


def test_a_published_version_is_immutable(tmp_path):
    publish(variant(DEMO, tmp_path / "a", version="demo-2", key=KEY), tmp_path / "www")
    other = variant(DEMO, tmp_path / "b", version="demo-2", key=KEY, replace={"group2": relabel_onnx(G2, "b")})
    with pytest.raises(ValueError, match="already published with other contents"):
        publish(other, tmp_path / "www")


def test_an_unsigned_bundle_is_not_published(tmp_path):
    with pytest.raises(ValueError, match="unsigned bundle"):
        publish(variant(DEMO, tmp_path / "a", version="demo-2", key=None), tmp_path / "www")


def test_a_corrupt_bundle_is_not_published(tmp_path):
    b = variant(DEMO, tmp_path / "a", version="demo-2", key=KEY)
    (b / demo_file("group1")).chmod(0o644)
    (b / demo_file("group1")).write_bytes(b"x")
    with pytest.raises(ValueError, match="sha256 mismatch"):
        publish(b, tmp_path / "www")
    assert not (tmp_path / "www" / "manifests").exists()


@pytest.mark.parametrize(("argv", "says"), [
    (["update", "--device", "trap-1", "--version", "v", "--sign", "{key}", "--broker", "127.0.0.1:{closed}",
      "--timeout", "1"], "MQTT broker 127.0.0.1:{closed}: cannot connect ("),
    (["update", "--device", "trap-1", "--version", "v", "--sign", "{key}", "--broker", "127.0.0.1:99999"],
     "--broker: port 99999 is not 1-65535"),
    (["update", "--device", "trap-1", "--version", "v", "--sign", "{key}", "--broker", "127.0.0.1:abc"],
     "--broker: 'abc' is not a port number"),
    (["publish", str(DEMO), "--out", "{tmp}/a-file"], "--out: {tmp}/a-file exists and is not a folder"),
    (["publish", str(DEMO), "--out", "{tmp}/www", "--serve", "127.0.0.1:99999"],
     "--serve: port 99999 is not 1-65535"),
])
def test_workstation_commands_refuse_bad_places_in_one_line(tmp_path, capsys, argv, says):
    """A broker that is down, a port out of range, an --out that is a file: each ended in a
    traceback (ConnectionRefusedError, OverflowError, NotADirectoryError)."""
    import socket

    (tmp_path / "k.key").write_bytes(KEY)
    (tmp_path / "a-file").write_text("x\n")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    fill = {"key": tmp_path / "k.key", "closed": closed, "tmp": tmp_path}
    rc = main([a.format(**fill) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    [line] = err.strip().splitlines()
    assert says.format(**fill) in line


def test_sign_re_signs_a_bundle_another_key_signed(tmp_path):
    """--sign signs now: the bundle's own manifest.sig (the builder's key) is replaced in the
    published folder, not checked against the publisher's key."""
    other, _ = generate_keypair()
    b = variant(DEMO, tmp_path / "b", version="demo-2", key=other)
    (tmp_path / "ops.key").write_bytes(KEY)
    publish(b, tmp_path / "www", sign_key=tmp_path / "ops.key")
    from edge.signing import verify

    www = tmp_path / "www" / "manifests"
    verify((www / "demo-2.json").read_bytes(), (www / "demo-2.sig").read_bytes(), [PUB])
    assert (b / "manifest.sig").is_file()  # the bundle itself is left as it was
