"""`camtrap-edge decode`: read a detection payload (a file, hex, base64 or JSON text) and print
it decoded, naming species from a bundle's manifest. The codecs are edge/messages.py's."""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import re
import sys
from pathlib import Path

from edge.messages import decode_detection_binary, decode_detection_json, wire_lists


def payload_bytes(arg: str) -> bytes:
    """A file path, or the payload itself: JSON text, hex (spaces/0x allowed) or base64."""
    p = Path(arg)
    if arg and p.is_dir():  # a folder name can also read as base64 ('adir' is 3 bytes)
        raise ValueError(f"{arg}: is a folder; give a payload file or the payload itself")
    try:
        if p.is_file():
            data = p.read_bytes()
            if not data:
                raise ValueError(f"{arg}: empty file, no payload in it")
            return data
    except OSError:
        pass
    s = arg.strip()
    if not s:
        raise ValueError("empty payload: give a file, JSON, hex or base64")
    if s.startswith("{"):
        return s.encode()
    h = re.sub(r"\s+|0x", "", s)
    if re.fullmatch(r"(?:[0-9a-fA-F]{2})+", h):
        return bytes.fromhex(h)
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{arg!r}: not a file, JSON, hex or base64 payload") from None


def _bundle_lists(path: str) -> tuple[list[str], list[str], dict[str, str]]:
    """(species, groups) as the binary codec indexes them, and code -> class name."""
    from edge.bundle import read_manifest

    m = read_manifest(path)
    species, groups = wire_lists(m)
    names = {m.code(c): c for c in m.global_model.classes}
    return species, groups, names


def _run_decode(args: argparse.Namespace) -> int:
    data = payload_bytes(args.payload)
    species: list[str] = []
    groups: list[str] = []
    names: dict[str, str] = {}
    if args.bundle:
        species, groups, names = _bundle_lists(args.bundle)
    if args.species:
        species = [s.strip() for s in args.species.split(",") if s.strip()]
    if args.groups:
        groups = [s.strip() for s in args.groups.split(",") if s.strip()]
    if data.lstrip().startswith(b"{"):
        out = decode_detection_json(data)
        out["format"] = "json"
    else:
        if not species:
            raise ValueError("a binary payload needs --species a,b,c or --bundle B to name its species")
        out = decode_detection_binary(data, species, groups)
        out["format"] = f"binary ({len(data)} bytes)"
    if names and out.get("sp") in names:
        out["species"] = names[out["sp"]]
    sys.stdout.write(json.dumps(out, ensure_ascii=False) + "\n")
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("decode", help="decode a detection payload (compact JSON or LoRa binary)",
                       description="Decode a detection payload; JSON or binary is detected automatically.")
    p.add_argument("payload", metavar="PAYLOAD_HEX_OR_FILE",
                   help="a file holding the payload, or the payload as hex, base64 or JSON text")
    p.add_argument("--species", help="comma-separated species list the binary indices point into")
    p.add_argument("--groups", help="comma-separated sorted group names (binary group index)")
    p.add_argument("--bundle", help="bundle folder, manifest.json or bundle .tar: species and groups from it")
    p.set_defaults(func=_run_decode)
