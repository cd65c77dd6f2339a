"""Integrity of what loradrop writes: a ``loradrop_manifest.json`` with the sha256 of every file in an adapter or
checkpoint folder, written after the folder is complete and verified before the folder is used again (``eval``,
``--resume``). A folder without a manifest (a plain PEFT adapter, or a checkpoint whose manifest was not written
before a crash) still loads; a manifest that does not match stops with the file that differs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import UsageError

MANIFEST = "loradrop_manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))


def write_manifest(folder: str | Path) -> Path:
    """Record the sha256 of every file under `folder` (written atomically, last)."""
    folder = Path(folder)
    manifest = {"algorithm": "sha256",
                "files": {str(p.relative_to(folder)): _sha256(p) for p in _files(folder)}}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(folder / MANIFEST)
    return folder / MANIFEST


def verify_manifest(folder: str | Path) -> bool:
    """Check `folder` against its manifest; False when it has none. Raises `UsageError` naming the first file that
    is missing or differs (a corrupted or edited adapter / checkpoint)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return False
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} is damaged ({type(err).__name__}); the folder cannot be verified") from err
    for name, expected in sorted(files.items()):
        file = folder / name
        if not file.is_file():
            raise UsageError(f"{file} is missing (listed in {MANIFEST}); the folder is incomplete")
        if _sha256(file) != expected:
            raise UsageError(f"{file} does not match its sha256 in {MANIFEST}: the file is corrupted or was changed "
                             "after it was written; restore it or train again")
    return True
