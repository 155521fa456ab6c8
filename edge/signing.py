"""Ed25519 signatures over a bundle's manifest.json (pure; `cryptography` only).

The manifest carries the sha256 of every model file, so one signature over its exact bytes
covers the whole bundle. ``manifest.sig`` holds the 64 raw signature bytes. Keys travel as
PEM (PKCS#8 private, SubjectPublicKeyInfo public); a key's id is the first 16 hex digits of
the sha256 of its 32 raw public bytes, short enough for logs and status messages.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE_BYTES = 64

KeySource = bytes | str | Path


class SignatureError(ValueError):
    """The manifest's signature is missing, malformed, or made by no trusted key."""


def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh key pair as (private PEM, public PEM)."""
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return private_pem, public_pem_of(private_pem)


def _pem_bytes(src: KeySource) -> bytes:
    if isinstance(src, Path):
        return src.read_bytes()
    return src.encode() if isinstance(src, str) else bytes(src)


def _private_key(private_pem: KeySource) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(_pem_bytes(private_pem), password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"signing key: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"signing key: expected an Ed25519 key, got {type(key).__name__}")
    return key


def load_public_key(public_pem: KeySource) -> Ed25519PublicKey:
    """Parse one PEM public key; the error names the file when given a Path."""
    where = f"{public_pem}: " if isinstance(public_pem, Path) else ""
    try:
        key = serialization.load_pem_public_key(_pem_bytes(public_pem))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{where}expected an Ed25519 public key, got {type(key).__name__}")
    return key


def public_pem_of(private_pem: KeySource) -> bytes:
    return _private_key(private_pem).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_id(public_key: KeySource | Ed25519PublicKey) -> str:
    """First 16 hex digits of sha256(raw 32-byte public key)."""
    key = public_key if isinstance(public_key, Ed25519PublicKey) else load_public_key(public_key)
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(manifest_bytes: bytes, private_pem: KeySource) -> bytes:
    """The 64-byte signature of ``manifest_bytes`` (write it as manifest.sig)."""
    return _private_key(private_pem).sign(manifest_bytes)


def verify(manifest_bytes: bytes, sig: bytes, public_keys: Iterable[KeySource]) -> str:
    """Check ``sig`` against each trusted key; return the id of the key that made it.

    Raises SignatureError when no key is given, the signature is malformed, or no key matches.
    """
    keys = [load_public_key(k) for k in public_keys]
    if not keys:
        raise SignatureError("no trusted public keys to verify the signature with")
    if len(sig) != SIGNATURE_BYTES:
        raise SignatureError(f"signature is {len(sig)} bytes, an Ed25519 signature is {SIGNATURE_BYTES}")
    for key in keys:
        try:
            key.verify(sig, manifest_bytes)
        except InvalidSignature:
            continue
        return key_id(key)
    ids = ", ".join(key_id(k) for k in keys)
    raise SignatureError(f"signature does not match the manifest under any trusted key ({ids})")
