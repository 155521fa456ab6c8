"""`camtrap-edge export-camtrapdp`: a Camtrap DP 1.0.2 package from the device ledger.

The I/O around the pure mapping in edge/records/camtrapdp.py: it reads the device config (for
the deployment, location and project metadata), the ledger (safe while the daemon runs: WAL
readers never block it) and the bundle's manifest (for the taxa of the model's classes), then
writes the package.
"""

from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge.manifest import Taxon
from edge.records.camtrapdp import DeploymentInfo, MediaResult, ProjectMeta, media_results, write_camtrapdp

log = logging.getLogger(__name__)


def media_results_from_ledger(
    db_path: str | os.PathLike[str],
    *,
    deployment_id: str,
    tz: Any = timezone.utc,
    roots: Sequence[str | os.PathLike[str]] = (),
) -> list[MediaResult]:
    """Every capture recorded in the device ledger (edge/ledger.py), oldest first."""
    from edge.ledger import Ledger

    p = Path(db_path)
    if not p.is_file():
        raise FileNotFoundError(f"ledger not found: {p}")
    try:
        # a reader: an empty file or a database without a ledger schema is refused, not given a
        # fresh schema (Ledger() creates one, which would turn any file named here into a ledger)
        probe = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True)
        try:
            version = probe.execute("PRAGMA user_version").fetchone()[0]
        finally:
            probe.close()
        if version == 0:
            raise ValueError(f"{p}: not a ledger (empty, or a database with no ledger schema)")
        with Ledger(p) as ledger:
            rows = ledger.images()
    except sqlite3.DatabaseError as e:  # another file given as --ledger
        raise ValueError(f"{p}: not a ledger ({e})") from None
    return media_results(rows, deployment_id=deployment_id, tz=tz, roots=roots)


def bundle_taxa(bundle: str | os.PathLike[str] | None) -> tuple[dict[str, Taxon], str | None]:
    """(class -> taxon, bundle version) from a bundle's manifest; ({}, None) without a bundle."""
    if bundle is None:
        return {}, None
    from edge.bundle import read_manifest

    m = read_manifest(Path(bundle))
    return dict(m.taxonomy), m.bundle_version


def _export_camtrapdp(args: argparse.Namespace) -> int:
    cfg = None
    if args.config:
        from edge.config import load_config

        cfg = load_config(args.config)
    ledger = args.ledger or (cfg.ledger.path if cfg else None)
    out = args.out or (cfg.records.camtrapdp_dir if cfg else None)
    if ledger is None or out is None:
        raise ValueError("give --ledger and --out, or --config to take them from the device config")
    dev = cfg.device if cfg else None
    deployment_id = args.deployment_id or (dev.deployment_id if dev else None) or "deployment-1"
    lat = args.latitude if args.latitude is not None else (dev.latitude if dev else None)
    lon = args.longitude if args.longitude is not None else (dev.longitude if dev else None)
    if lat is None or lon is None:
        raise ValueError("Camtrap DP needs the deployment's latitude and longitude: set device.latitude/"
                         "longitude in the config or pass --latitude/--longitude")  # fmt: skip
    for name, value, bound in (("latitude", lat, 90), ("longitude", lon, 180)):
        if not -bound <= value <= bound:  # NaN fails too
            raise ValueError(f"--{name}: {value:g} is not a {name} (-{bound} to {bound})")
    tzname = args.timezone or (dev.timezone if dev else "UTC")
    if tzname == "UTC":
        tz: Any = timezone.utc
    else:
        import zoneinfo

        try:
            tz = zoneinfo.ZoneInfo(tzname)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"--timezone: unknown time zone {tzname!r} (e.g. Europe/Madrid)") from None
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out: {out} exists and is not a folder")
    roots = [Path(r) for r in args.root] or (list(cfg.watch.folders) if cfg else [])
    bundle = args.bundle or (cfg.bundle.path if cfg and cfg.bundle.path and cfg.bundle.path.exists() else None)
    taxa, bundle_version = bundle_taxa(bundle)
    media = media_results_from_ledger(ledger, deployment_id=deployment_id, tz=tz, roots=roots)
    dep = DeploymentInfo(
        deployment_id=deployment_id,
        latitude=lat,
        longitude=lon,
        location_id=dev.location_id if dev else None,
        location_name=dev.location_name if dev else None,
        coordinate_uncertainty=dev.coordinate_uncertainty_m if dev else None,
        camera_id=dev.id if dev else None,
        camera_model=dev.camera_model if dev else None,
        camera_height=dev.camera_height_m if dev else None,
        start=datetime.now(tz) if not media else None,
        end=datetime.now(tz) if not media else None,
    )
    classified_by = args.classified_by or (f"camtrap-cascade {bundle_version}" if bundle_version
                                           else "camtrap-cascade")
    meta = ProjectMeta(name=f"camtrap-edge-{deployment_id}", classified_by=classified_by, taxa=taxa)
    if cfg is not None:
        pr = cfg.records.project
        meta = ProjectMeta(
            title=pr.title,
            sampling_design=pr.sampling_design,
            contributors=tuple(c.model_dump(exclude_none=True) for c in pr.contributors),
            data_license=pr.data_license,
            media_license=pr.media_license,
            name=f"camtrap-edge-{deployment_id}",
            classified_by=classified_by,
            taxa=taxa,
        )
    untaxed = sorted({s for m in media for s, *_ in m.detections} - set(taxa))
    if untaxed:
        where = f"bundle {bundle} has no taxonomy for" if bundle else "no bundle (--bundle) to name"
        print(f"export-camtrapdp: {where} {', '.join(untaxed)}: their scientificName is left empty "
              "(the class name is in observationTags)", file=sys.stderr)
    path = write_camtrapdp(out, [dep], media, meta)
    blanks = sum(1 for m in media if not m.detections and not m.failure and not m.gone)
    disposed = sum(1 for m in media if m.disposed)
    gone = sum(1 for m in media if m.gone)
    print(f"{path}: {len(media)} media ({blanks} blank, {disposed} disposed on the device, "
          f"{sum(1 for m in media if m.failure)} unreadable"
          + (f", {gone} gone before processing" if gone else "") + ")")  # fmt: skip
    return 0


def add_cli(sub: Any) -> None:
    p = sub.add_parser("export-camtrapdp", help="write a Camtrap DP 1.0.2 package from the device ledger")
    p.add_argument("--ledger", type=Path, help="ledger SQLite file (default: from --config)")
    p.add_argument("--out", type=Path, help="output folder (default: records.camtrapdp_dir from --config)")
    p.add_argument("--config", type=Path, help="device config: deployment, location, project metadata")
    p.add_argument("--bundle", type=Path,
                   help="bundle (folder, manifest.json or .tar) whose taxonomy names the species "
                        "(default: bundle.path from --config)")
    p.add_argument("--deployment-id", help="Camtrap DP deploymentID (default: device.deployment_id)")
    p.add_argument("--latitude", type=float, help="deployment latitude (default: device.latitude)")
    p.add_argument("--longitude", type=float, help="deployment longitude (default: device.longitude)")
    p.add_argument("--timezone", help="zone of naive camera timestamps (default: device.timezone or UTC)")
    p.add_argument("--root", action="append", default=[], help="watch folder that file paths are relative to")
    p.add_argument("--classified-by",
                   help="classifiedBy value (default: 'camtrap-cascade <bundle version>')")
    p.set_defaults(func=_export_camtrapdp)
