"""The taxonomy CSV: what each model class is, so records and displays name taxa, not labels.

Model classes are short training labels ("red_deer"). Camtrap DP wants a scientific name
(``scientificName``) and likes a vernacular name, a rank and a global identifier (the package's
``taxonomic`` block); people reading `group` and `evaluate` output want the names too. One CSV
says it (docs/taxonomy.md), read here only:

    class,scientific_name,vernacular_name,language,rank,taxon_id
    red_deer,Cervus elaphus,red deer,eng,species,gbif:2440954

``class``, ``scientific_name`` and ``vernacular_name`` are required; ``language`` (ISO 639-3,
default ``eng``), ``rank`` (kingdom ... subspecies) and ``taxon_id`` (``gbif:<key>``,
``itis:<TSN>`` or a URL) may be absent or empty. Rows for classes the dataset does not have are
ignored (one project-wide file serves several datasets); a class of the dataset without a row is
an error. `prepare --taxonomy` stores the checked table in the dataset's meta.json; `bundle`
copies it into the manifest (edge/manifest.py ``Taxon``), signed with the rest.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import ValidationError

from edge.manifest import Taxon

COLUMNS = ("class", "scientific_name", "vernacular_name", "language", "rank", "taxon_id")
REQUIRED = COLUMNS[:3]
META_KEY = "taxonomy"  # where a prepared dataset's meta.json keeps the table


def read_taxonomy_csv(path: str | os.PathLike[str]) -> dict[str, Taxon]:
    """class -> Taxon from a taxonomy CSV; one error line naming the file, the line and the field."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: taxonomy CSV not found")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 ({e.reason} at byte {e.start})") from None
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in reader.fieldnames or []]
    missing = [c for c in REQUIRED if c not in header]
    unknown = [c for c in header if c not in COLUMNS]
    if missing or unknown:
        raise ValueError(f"{p}: header must hold {', '.join(REQUIRED)} (optional: {', '.join(COLUMNS[3:])}); "
                         + (f"missing {', '.join(missing)}" if missing else f"unknown column {', '.join(unknown)}"))
    out: dict[str, Taxon] = {}
    for line, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}
        if not any(row.values()):
            continue
        cls = row.get("class", "")
        if not cls:
            raise ValueError(f"{p}: line {line}: class is empty")
        if cls in out:
            raise ValueError(f"{p}: line {line}: class {cls!r} is listed twice")
        fields = {k: v for k, v in row.items() if k != "class" and v}
        try:
            out[cls] = Taxon(**fields)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err.get("loc", ())) or "row"
            raise ValueError(f"{p}: line {line} ({cls}): {where}: {err.get('msg', '')}") from None
    if not out:
        raise ValueError(f"{p}: no rows")
    return out


def for_classes(taxa: Mapping[str, Taxon], classes: Sequence[str], where: str | os.PathLike[str]) -> dict[str, Taxon]:
    """The taxa of exactly ``classes``, in their order; a class without a taxon is an error."""
    missing = [c for c in classes if c not in taxa]
    if missing:
        raise ValueError(f"{where}: no taxonomy row for class(es) {', '.join(missing)} "
                         f"(the dataset's classes: {', '.join(classes)})")
    return {c: taxa[c] for c in classes}


def to_json(taxa: Mapping[str, Taxon]) -> dict[str, dict]:
    return {c: t.model_dump(mode="json", exclude_none=True) for c, t in taxa.items()}


def dataset_taxonomy(data_yaml: str | os.PathLike[str] | None) -> dict[str, Taxon]:
    """The taxonomy `prepare` stored beside a data.yaml (meta.json); {} when there is none."""
    if data_yaml is None:
        return {}
    p = Path(data_yaml)
    meta_path = (p if p.is_dir() else p.parent) / "meta.json"
    if not meta_path.is_file():
        return {}
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8")).get(META_KEY) or {}
        return {c: Taxon(**t) for c, t in raw.items()}
    except (json.JSONDecodeError, AttributeError, TypeError, ValidationError) as e:
        raise ValueError(f"{meta_path}: bad '{META_KEY}' ({' '.join(str(e).split())[:200]})") from None
