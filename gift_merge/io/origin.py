"""Where an input came from, for an output's card and ``gift_merge.json``: a Hub id at a commit, or a local
folder with the size (or, asked, the sha256) of every weight file; and the licence the input declares.

The Hub's own record is the revision: ``huggingface_hub`` keeps a download in
``…/models--ORG--NAME/snapshots/COMMIT/``, so a folder there names its repository and the exact commit it
holds, without asking the network. Any other folder can change under its path, so its weight files are
fingerprinted (:func:`fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

FINGERPRINT_ALGORITHM = "sha256"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
LICENSE_KEYS = ("license", "license_name", "license_link")
"""Front-matter keys that say under what terms a model is published (``license: other`` names its own)."""

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def hub_origin(folder: Path) -> tuple[str, str] | None:
    """``(repo id, commit)`` when ``folder`` is a ``huggingface_hub`` snapshot folder, else ``None``.

    The cache names a repository's folder ``models--ORG--NAME`` (the Hub forbids ``--`` inside a name, so
    the id comes back unambiguously) and each snapshot folder by the commit it was resolved to.
    """
    snapshots = folder.parent
    repo = snapshots.parent.name
    if snapshots.name != "snapshots" or not repo.startswith("models--") or not _COMMIT.match(folder.name):
        return None
    return repo.removeprefix("models--").replace("--", "/"), folder.name


def fingerprint(path: Path, *, content: bool) -> str:
    """``sha256:HEX`` of the file's bytes with ``content`` (the hash the Hub shows for its LFS files, so a
    local copy can be checked against the Hub), else ``bytes:N``, its size.

    The content hash is an option (``run --hash-inputs``) because it is one more read of every input:
    sha256 ran at 0.84 GB/s on the 2-core benchmark machine, as long again as a 0.5B linear merge.
    """
    if not content:
        return f"bytes:{path.stat().st_size}"
    with open(path, "rb") as handle:
        return f"{FINGERPRINT_ALGORITHM}:{hashlib.file_digest(handle, 'sha256').hexdigest()}"


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a model or adapter folder (safetensors shards, pickled ``.bin`` files)."""
    return sorted({p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern) if p.is_file()})


def declared_license(folder: Path) -> dict[str, str]:
    """The licence a model folder declares: its README's front matter, else its ``config.json``; ``{}`` if none.

    Only string values count (``license``, and for ``license: other`` its ``license_name`` and
    ``license_link``): a list or a broken file declares nothing we could repeat.
    """
    readme = folder / "README.md"
    found: Mapping[str, Any] = {}
    if readme.is_file():
        found = front_matter(readme)
    if not isinstance(found.get("license"), str):
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
        found = config if isinstance(config, dict) else {}
    if not isinstance(found.get("license"), str) or not found["license"].strip():
        return {}
    return {key: found[key].strip() for key in LICENSE_KEYS if isinstance(found.get(key), str) and found[key].strip()}


def front_matter(readme: Path) -> dict[str, Any]:
    """The YAML block between the first two ``---`` lines of a model card; ``{}`` when there is none."""
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), None)
    if end is None:
        return {}
    try:
        document = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError:
        return {}
    return document if isinstance(document, dict) else {}


def describe_folder(folder: Path, *, hash_files: bool = False) -> dict[str, Any]:
    """One input folder for ``gift_merge.json``: its path, Hub id and commit or its weight files' sizes (with
    ``hash_files``, their sha256), licence."""
    record: dict[str, Any] = {"path": str(folder)}
    origin = hub_origin(folder)
    if origin is not None:
        record["hub_id"], record["revision"] = origin
    else:
        record["files"] = {p.name: fingerprint(p, content=hash_files) for p in weight_files(folder)}
    record.update(declared_license(folder))
    return record


def upstream_hub_inputs(folder: Path) -> list[dict[str, str | None]]:
    """Hub models behind a gift-merge output used as an input: an earlier stage, or a trained adapter.

    A merged output lists them in its ``gift_merge.json``; an adapter's ``gift.json`` names the models it
    was trained on and scored with, which are Hub inputs when they are Hub ids or snapshot folders (a
    bare id there carries no revision: training did not record one).
    """
    found: list[dict[str, str | None]] = []
    merged = _json(folder / "gift_merge.json")
    for entry in merged.get("hub_inputs") or []:
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            found.append({"id": entry["id"], "revision": entry.get("revision")})
    trained = _json(folder / "gift.json")
    for key in ("base_model", "instruct_model"):
        reference = trained.get(key)
        if not isinstance(reference, str) or not reference:
            continue
        origin = hub_origin(Path(reference))
        if origin is not None:
            found.append({"id": origin[0], "revision": origin[1]})
        elif not Path(reference).exists() and _looks_like_hub_id(reference):
            found.append({"id": reference, "revision": None})
    return found


def agreed_license(records: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """The licence every record declares, when they all declare the same one; ``{}`` otherwise."""
    declared = [{k: r[k] for k in LICENSE_KEYS if k in r} for r in records]
    if not declared or any("license" not in d for d in declared):
        return {}
    first = declared[0]
    return dict(first) if all(d == first for d in declared) else {}


def _json(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


def _looks_like_hub_id(reference: str) -> bool:
    return re.match(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$", reference) is not None
