"""File hashes the ecosystem uses to identify LoRAs.

- sha256 of the whole file; AutoV2 is its first 10 hex digits (Civitai, WebUI infotext).
- kohya's "addnet" hash: sha256 of the safetensors bytes after the header, so that
  editing metadata does not change it (written as ``sshs_model_hash``).
- kohya's legacy hash: sha256 of 64 KiB at offset 1 MiB, first 8 hex (``sshs_legacy_hash``).
"""
from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def autov2(sha256: str) -> str:
    return sha256[:10]


def addnet_hash_safetensors(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n)
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def addnet_hash_legacy(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(0x100000)
        h.update(f.read(0x10000))
    return h.hexdigest()[:8]


def hashes_from_bytes(data: bytes) -> dict[str, str]:
    """The same hashes for an in-memory safetensors blob (used before an atomic write)."""
    (n,) = struct.unpack("<Q", data[:8])
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "sshs_model_hash": hashlib.sha256(data[8 + n:]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
    }


def file_hashes(path: str | os.PathLike) -> dict[str, str]:
    path = Path(path)
    full = sha256_file(path)
    out = {"sha256": full, "autov2": autov2(full)}
    if path.suffix.lower() == ".safetensors":
        out["sshs_model_hash"] = addnet_hash_safetensors(path)
        out["sshs_legacy_hash"] = addnet_hash_legacy(path)
    return out
