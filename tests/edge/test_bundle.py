"""Bundles: Ed25519 signatures, safe unpacking, sha256 checks, clear refusals (real files, real keys)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from make_onnx import write_test_bundle

from edge import bundle as bundle_mod
from edge.bundle import BundleError, load_bundle
from edge.signing import SignatureError, generate_keypair, key_id, sign, verify


@pytest.fixture(scope="module")
def keys():
    return generate_keypair()


@pytest.fixture
def signed(tmp_path, keys) -> Path:
    return write_test_bundle(tmp_path / "b", sign_key=keys[0])


def _tree(root: Path) -> dict[str, tuple[str, float]]:
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _tar(path: Path, src: Path | None = None, *, arcroot: str = "", extra: list[tarfile.TarInfo] | None = None,
         payload: bytes = b"x") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        if src is not None:
            for p in sorted(src.rglob("*")):
                tar.add(p, arcname=(f"{arcroot}/" if arcroot else "") + p.relative_to(src).as_posix(),
                        recursive=False)
        for info in extra or []:
            tar.addfile(info, io.BytesIO(payload) if info.isreg() else None)
    return path


# --- signing ----------------------------------------------------------------------------------------


def test_sign_verify_and_key_id(keys):
    priv, pub = keys
    sig = sign(b"manifest", priv)
    assert len(sig) == 64
    kid = verify(b"manifest", sig, [pub])
    assert kid == key_id(pub) and len(kid) == 16 and int(kid, 16) >= 0
    other_pub = generate_keypair()[1]
    assert key_id(other_pub) != kid
    assert verify(b"manifest", sig, [other_pub, pub.decode()]) == kid  # any trusted key, PEM as str too


@pytest.mark.parametrize("case", ["tampered", "wrong_key", "short_sig", "no_keys"])
def test_verify_refuses(keys, case):
    priv, pub = keys
    sig = sign(b"manifest", priv)
    other = generate_keypair()[1]
    args = {"tampered": (b"manifesT", sig, [pub]), "wrong_key": (b"manifest", sig, [other]),
            "short_sig": (b"manifest", sig[:63], [pub]), "no_keys": (b"manifest", sig, [])}[case]
    with pytest.raises(SignatureError):
        verify(*args)


def test_bad_key_material_is_a_clear_error(tmp_path):
    f = tmp_path / "k.pub"
    f.write_text("not a key")
    with pytest.raises(ValueError, match=r"k\.pub"):
        verify(b"m", b"0" * 64, [f])


# --- loading folders ---------------------------------------------------------------------------------


def test_load_signed_folder(signed, keys):
    before = _tree(signed)
    b = load_bundle(signed, public_keys=[keys[1]], require_signature=True)
    assert b.key_id == key_id(keys[1])
    assert b.version == "2026.1.0"
    assert b.manifest_sha256 == hashlib.sha256((signed / "manifest.json").read_bytes()).hexdigest()
    assert b.model_path("felids") == signed / "models" / "felids.onnx"
    assert [p.name for p in b.sample_paths()] == ["patch0.png", "patch1.png", "patch2.png", "empty.png"]
    assert all(p.is_file() for p in b.sample_paths())
    with pytest.raises(BundleError, match=r"no model named 'nope'.*global"):
        b.model_path("nope")
    assert _tree(signed) == before  # loading never writes


def test_changed_model_byte_names_the_file(signed, keys):
    p = signed / "models" / "canids.onnx"
    data = bytearray(p.read_bytes())
    data[-5] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"models/canids\.onnx: sha256 mismatch"):
        load_bundle(signed, public_keys=[keys[1]])


def test_changed_manifest_fails_the_signature(signed, keys):
    m = json.loads((signed / "manifest.json").read_text())
    m["cascade"]["route_threshold"] = 0.01  # an attacker lowering a threshold
    (signed / "manifest.json").write_text(json.dumps(m, sort_keys=True, indent=1) + "\n")
    with pytest.raises(BundleError, match=r"manifest\.json: signature does not match"):
        load_bundle(signed, public_keys=[keys[1]])


def test_signature_from_an_untrusted_key(signed):
    with pytest.raises(BundleError, match="signature does not match"):
        load_bundle(signed, public_keys=[generate_keypair()[1]])


def test_unsigned_bundle_policy(tmp_path, keys):
    root = write_test_bundle(tmp_path / "u")
    with pytest.raises(BundleError, match=r"manifest\.sig is missing"):
        load_bundle(root, public_keys=[keys[1]], require_signature=True)
    with pytest.raises(BundleError, match="no trusted public keys"):
        load_bundle(root, require_signature=True)
    assert load_bundle(root, public_keys=[keys[1]]).key_id is None  # allowed, but not marked as verified
    assert load_bundle(root).key_id is None


def test_pickle_file_in_folder_is_refused(signed, keys):
    (signed / "models" / "best.pt").write_bytes(b"\x80\x04")
    with pytest.raises(BundleError, match=r"models/best\.pt: pickle-format"):
        load_bundle(signed, public_keys=[keys[1]])


def test_symlink_in_folder_is_refused(signed, tmp_path):
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(b"x")
    os.symlink(outside, signed / "models" / "link.onnx")
    with pytest.raises(BundleError, match="symlink"):
        load_bundle(signed)


def test_missing_model_and_bad_manifest_are_named(tmp_path):
    root = write_test_bundle(tmp_path / "m", with_samples=False)
    (root / "models" / "global.onnx").unlink()
    with pytest.raises(BundleError, match=r"models/global\.onnx: model 'global' is missing"):
        load_bundle(root)
    m = json.loads((root / "manifest.json").read_text())
    del m["models"][0]["imgsz"]
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"manifest\.json: models\.0\.imgsz: Field required"):
        load_bundle(root)
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not JSON"):
        load_bundle(root)
    with pytest.raises(FileNotFoundError, match="no such bundle"):
        load_bundle(tmp_path / "absent")


def test_model_must_be_onnx(tmp_path):
    root = write_test_bundle(tmp_path / "x", with_samples=False)
    m = json.loads((root / "manifest.json").read_text())
    os.rename(root / "models" / "canids.onnx", root / "models" / "canids.bin")
    m["models"][2]["file"] = "models/canids.bin"
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"models/canids\.bin: model 'canids' must be an \.onnx file"):
        load_bundle(root)


# --- archives ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arcroot", ["", "bundle-2026.1.0"])
def test_archive_round_trip_is_content_addressed(signed, keys, tmp_path, arcroot):
    arc = _tar(tmp_path / "b.tar.gz", signed, arcroot=arcroot)
    dest = tmp_path / "bundles"
    b = load_bundle(arc, public_keys=[keys[1]], require_signature=True, extract_to=dest)
    assert b.root == dest / b.manifest_sha256
    assert b.source == arc and b.key_id == key_id(keys[1])
    assert _tree(b.root).keys() == _tree(signed).keys()
    assert not os.access(b.model_path("global"), os.W_OK) or os.geteuid() == 0  # unpacked read-only
    before = _tree(b.root)
    again = load_bundle(arc, public_keys=[keys[1]], extract_to=dest)
    assert again.root == b.root and _tree(b.root) == before  # reused, untouched
    assert [p.name for p in dest.iterdir()] == [b.manifest_sha256]  # no temp leftovers


def test_tampered_archive_is_refused(signed, keys, tmp_path):
    p = signed / "models" / "global.onnx"
    p.write_bytes(p.read_bytes() + b"\0")
    arc = _tar(tmp_path / "t.tar.gz", signed)
    with pytest.raises(BundleError, match=r"t\.tar\.gz: models/global\.onnx: sha256 mismatch"):
        load_bundle(arc, public_keys=[keys[1]], extract_to=tmp_path / "x")


def _info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 1, linkname: str = "") -> tarfile.TarInfo:
    t = tarfile.TarInfo(name)
    t.type, t.size, t.linkname = kind, (size if kind == tarfile.REGTYPE else 0), linkname
    return t


@pytest.mark.parametrize("member, match", [
    (_info("../evil.onnx"), r"escapes the bundle"),
    (_info("models/../../evil.onnx"), r"escapes the bundle"),
    (_info("/tmp/camtrap-evil.onnx"), r"absolute"),
    (_info("models/link.onnx", tarfile.SYMTYPE, linkname="/etc/passwd"), r"links are not allowed"),
    (_info("models/hard.onnx", tarfile.LNKTYPE, linkname="manifest.json"), r"links are not allowed"),
    (_info("models/fifo", tarfile.FIFOTYPE), r"only regular files"),
    (_info("models/dev", tarfile.CHRTYPE), r"only regular files"),
    (_info("models/weights.pkl"), r"pickle-format"),
    (_info("best.pt"), r"pickle-format"),
])
def test_unsafe_archive_members_are_refused(signed, tmp_path, member, match):
    arc = _tar(tmp_path / "evil.tar.gz", signed, extra=[member])
    dest = tmp_path / "dest"
    with pytest.raises(BundleError, match=match):
        load_bundle(arc, extract_to=dest)
    assert not (tmp_path / "evil.onnx").exists() and not Path("/tmp/camtrap-evil.onnx").exists()
    assert not dest.exists() or not any(dest.iterdir())  # refused before anything was written


def test_huge_member_is_refused(signed, tmp_path, monkeypatch):
    arc = _tar(tmp_path / "big.tar.gz", signed)
    monkeypatch.setattr(bundle_mod, "MAX_MEMBER_BYTES", 1000)
    with pytest.raises(BundleError, match="larger than the 1000 limit"):
        load_bundle(arc, extract_to=tmp_path / "d")


def test_archive_without_manifest_or_not_a_tar(tmp_path):
    arc = _tar(tmp_path / "empty.tar.gz", extra=[_info("models/x.onnx")])
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        load_bundle(arc, extract_to=tmp_path / "d")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"definitely not a tar archive" * 40)
    with pytest.raises(BundleError, match="not a readable tar"):
        load_bundle(junk, extract_to=tmp_path / "d")


def test_files_outside_the_single_folder_are_refused(signed, tmp_path):
    arc = _tar(tmp_path / "mixed.tar.gz", signed, arcroot="bundle", extra=[_info("README.txt")])
    with pytest.raises(BundleError, match=r"no manifest\.json|outside"):
        load_bundle(arc, extract_to=tmp_path / "d")


@pytest.mark.parametrize("imgsz", [60000, [480, 5000], [5000, 5000], 0, [0, 640]])
def test_an_absurd_input_size_is_refused_naming_the_field(tmp_path, imgsz):
    """A manifest's input size is bounded (MAX_INPUT_SIDE): a graph with a dynamic input would be
    warmed up at whatever it says (tens of GB at 60000 px) before anything else could refuse it."""
    root = write_test_bundle(tmp_path / "m", with_samples=False)
    m = json.loads((root / "manifest.json").read_text())
    m["models"][0]["imgsz"] = imgsz
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"manifest\.json: models\.0\.imgsz"):
        load_bundle(root)
