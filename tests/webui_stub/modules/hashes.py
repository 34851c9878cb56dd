"""Stub of modules/hashes.py (WebUI v1.10.1): the hash cache the built-in Lora keeps its file hashes in.

``cache(subsection)`` is a dict here (a diskcache.Cache in the WebUI, kept across restarts); an entry is
``{"mtime": <file mtime>, "sha256": <hex>}`` under a title such as ``lora/NAME``, and is stale once the file's
mtime is newer.  Subsections: "hashes" (whole-file sha256), "hashes-addnet" (kohya's tensor-data hash).
"""
import os

caches = {}


def cache(subsection):
    return caches.setdefault(subsection, {})


def dump_cache():
    pass


def sha256_from_cache(filename, title, use_addnet_hash=False):
    entries = cache("hashes-addnet" if use_addnet_hash else "hashes")
    try:
        mtime = os.path.getmtime(filename)
    except FileNotFoundError:
        return None
    entry = entries.get(title)
    if entry is None or entry.get("sha256") is None or mtime > entry.get("mtime", 0):
        return None
    return entry["sha256"]
