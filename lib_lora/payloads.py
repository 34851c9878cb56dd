"""The JSON a LoRA file is described by: our API's ``/loras`` items and the built-in's ``/sdapi/v1/loras``."""
from __future__ import annotations

from typing import Any

from .library import Entry
from .metadata import algorithm_info, decoded_metadata, tag_frequency


def entry_json(entry: Entry, detail: bool = False) -> dict[str, Any]:
    """One LoRA for ``/lora-workshop/v1/loras``; ``detail`` adds file hashes, notes and tags."""
    out: dict[str, Any] = {
        "name": entry.name,
        "alias": entry.alias,
        "path": entry.relpath,
        "family": entry.family,
        **algorithm_info(entry.metadata),
        "size": entry.size,
        "mtime": entry.mtime,
        "hashes": {"addnet": entry.known_hash()},
        "metadata": dict(entry.metadata),
    }
    if entry.header_error:
        out["error"] = entry.header_error
    if detail:
        out["hashes"] = {"addnet": entry.addnet_hash(), "shorthash": entry.shorthash(), "sha256": entry.sha256(),
                         "autov2": entry.sha256()[:10]}
        try:
            out["user_metadata"] = entry.user_metadata()
        except Exception as e:  # an unreadable notes file must not hide the LoRA
            out["user_metadata"] = {}
            out["user_metadata_error"] = str(e)
        out["tag_frequency"] = dict(tag_frequency(entry.metadata, top=100))
        preview = entry.preview()
        out["preview"] = preview.relative_to(entry.root).as_posix() if preview else None
    return out


def builtin_json(entry: Entry) -> dict[str, Any]:
    """The built-in Lora extension's ``/sdapi/v1/loras`` item: name, alias, absolute path, metadata."""
    return {"name": entry.name, "alias": entry.alias, "path": str(entry.path), "metadata": decoded_metadata(entry.metadata)}
