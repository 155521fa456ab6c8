"""Where trusted bundle-signing keys live, and the one rule the commands apply (pure + a folder read).

Invariants:

- A command that loads a bundle (`camtrap-edge classify`, `camtrap-edge selftest`,
  `camtrap-export evaluate`) requires a valid signature by default. Trusted keys are the
  ``--public-key`` files when given, else every ``*.pub`` in the default places: the device
  config's keys folder (``SYSTEM_KEYS_DIR``, the default of ``bundle.public_keys_dir``) and the
  user's keys folder (``user_keys_dir()``), which `camtrap-export keygen` fills.
- Without trusted keys a bundle is refused, and the message says where keys were looked for and
  which flags to give. ``--allow-unsigned`` accepts an unsigned bundle (or one no trusted key can
  check), and the command says so in its output; a signature that fails against a trusted key is
  refused even then (that bundle was changed after signing).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SYSTEM_KEYS_DIR = Path("/etc/camtrap-edge/keys")
USER_KEYS_ENV = "CAMTRAP_KEYS_DIR"  # overrides the user's keys folder (tests, several users on one box)
KEY_SUFFIX = ".pub"


def user_keys_dir() -> Path:
    """$CAMTRAP_KEYS_DIR, else $XDG_CONFIG_HOME/camtrap/keys, else ~/.config/camtrap/keys."""
    if os.environ.get(USER_KEYS_ENV):
        return Path(os.environ[USER_KEYS_ENV])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "camtrap" / "keys"


def default_key_dirs() -> list[Path]:
    return [SYSTEM_KEYS_DIR, user_keys_dir()]


def keys_in(dirs: Sequence[Path]) -> list[Path]:
    """Every *.pub file in the folders that exist, sorted, each once."""
    found: list[Path] = []
    for d in dirs:
        if d.is_dir():
            found += sorted(p for p in d.glob(f"*{KEY_SUFFIX}") if p.is_file() and p not in found)
    return found


@dataclass(frozen=True)
class Trust:
    """What ``edge.bundle.load_bundle`` is told: which keys, and whether a signature is required."""

    public_keys: list[Path]
    require_signature: bool
    looked_in: tuple[Path, ...] = ()

    def refusal(self) -> str | None:
        """Why no bundle can load under this trust (no keys while a signature is required), or None."""
        if self.require_signature and not self.public_keys:
            where = " or ".join(str(d) for d in self.looked_in) or "the given --public-key files"
            return (f"a signed bundle is required but no trusted public key was found (looked in {where}); "
                    "give --public-key FILE, put the .pub there (`camtrap-export keygen` does), "
                    "or pass --allow-unsigned")
        return None


def trust(public_keys: Sequence[str | Path] | None, allow_unsigned: bool,
          dirs: Sequence[Path] | None = None) -> Trust:
    """The keys and the signature rule for one command (see the module doc)."""
    if public_keys:
        return Trust([Path(k) for k in public_keys], not allow_unsigned)
    dirs = list(default_key_dirs() if dirs is None else dirs)
    return Trust(keys_in(dirs), not allow_unsigned, tuple(dirs))


def add_trust_options(p: argparse.ArgumentParser) -> None:
    """--public-key and --allow-unsigned, the same on every command that loads a bundle."""
    p.add_argument("--public-key", action="append",
                   help=f"trusted Ed25519 public key (PEM file); repeatable (default: every *{KEY_SUFFIX} in "
                   f"{SYSTEM_KEYS_DIR} and the user keys folder, ${USER_KEYS_ENV} or ~/.config/camtrap/keys)")
    p.add_argument("--allow-unsigned", action="store_true",
                   help="accept a bundle without a signature a trusted key can check (default: refuse it)")
    p.add_argument("--require-signature", action="store_true", help=argparse.SUPPRESS)  # the default now


def trust_from_args(args: argparse.Namespace, dirs: Sequence[Path] | None = None,
                    config_requires: bool = True) -> Trust:
    """The command's trust; ``dirs`` replaces the default places (a device config's keys folder),
    ``config_requires=False`` (its ``require_signature: false``) allows unsigned as the flag does."""
    t = trust(args.public_key, args.allow_unsigned or not config_requires, dirs)
    why = t.refusal()
    if why:
        raise ValueError(f"{args.bundle}: {why}")
    return t


def describe(key_id: str | None) -> str:
    """How a command reports the signature check in its output."""
    return f"signed by key {key_id}" if key_id else "signature NOT verified (--allow-unsigned)"
