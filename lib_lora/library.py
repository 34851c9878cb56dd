"""The LoRA files on disk: scanning, name resolution, metadata, and a size-bounded cache.

Names coming from prompts or the API are only ever looked up in the scanned index,
never joined onto a folder, so ``../`` and absolute paths cannot reach other files.
"""
from __future__ import annotations

import os
import re
import stat
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

from . import families, safe_json
from .fileio import (LEGACY_TRAINING_STATE_SUFFIX, SAFETENSORS_EXT, TRAINING_STATE_FORMAT, LoraFileError,
                     read_header)
from .fit import Layout, read_layout
from .hashes import addnet_hash_safetensors, sha256_file
from .network import Network, load_network

EXTENSIONS = SAFETENSORS_EXT + (".pt", ".ckpt")
PREVIEW_EXT = (".png", ".jpg", ".jpeg", ".webp", ".gif")
_HEX = re.compile(r"^[0-9a-fA-F]{8,64}$")
RESCAN_INTERVAL = 2.0   # seconds: the least time between two rescans a missing name triggers


class LoraNotFound(LookupError):
    pass


class HashStore(Protocol):
    """Hashes kept across sessions (the WebUI's hash cache): ``name`` is the file stem, ``addnet`` says
    kohya's tensor-data hash (else the whole file's sha256).  ``get`` answers None for unknown or stale."""

    def get(self, path: Path, name: str, addnet: bool) -> str | None: ...

    def put(self, path: Path, name: str, addnet: bool, value: str, mtime: float) -> None: ...


class AmbiguousName(LookupError):
    pass


@dataclass
class Entry:
    """One file in a LoRA folder."""
    path: Path
    root: Path
    name: str                       # file stem
    relname: str                    # path below its root, '/'-separated, no extension
    mtime: float
    size: int
    metadata: dict[str, str] = field(default_factory=dict)
    header_error: str | None = None
    layout: Layout | None = None    # modules and sizes from the header, kept when the metadata names no family
    # real paths of the library's folders when files outside them are not served (empty: no limit)
    confined_to: tuple[str, ...] = ()
    # where hashes persist between sessions (None: in memory only; also for a stem two files share, since
    # the WebUI's cache, shared with the built-in Lora, keys them by stem)
    store: HashStore | None = field(default=None, repr=False, compare=False)
    hashing: bool = True            # False: a hash not known already is never computed (the WebUI's --no-hashing)
    _hash: str | None = None
    _store_asked: bool = False      # the store is asked once per entry (a new entry follows a changed file)
    _sha256: str | None = None

    @property
    def alias(self) -> str:
        return self.metadata.get("ss_output_name") or self.name

    @property
    def relpath(self) -> str:
        """Path below its LoRA folder, with extension, '/'-separated (never absolute)."""
        return self.path.relative_to(self.root).as_posix()

    @property
    def family(self) -> str | None:
        """From the metadata, else from the key spelling and widths in the header."""
        return families.family_from_metadata(self.metadata) or (self.layout.family if self.layout else None)

    @property
    def _addnet(self) -> bool:
        """Whether the addnet hash is kohya's tensor-data hash (else the whole file's, as the built-in's)."""
        return self.path.suffix.lower() == ".safetensors" and not self.header_error

    def addnet_hash(self) -> str:
        """kohya's tensor-data hash (what the WebUI's infotext uses), computed once and kept in the store;
        "" where it is not known and hashing is off."""
        if self.known_hash() is None:
            if not self.hashing:
                return ""
            self._hash = addnet_hash_safetensors(self.path) if self._addnet else self.sha256()
            if self.store is not None:
                # under the mtime the scan saw: a file changed since is stale in the store, not mislabelled
                self.store.put(self.path, self.name, self._addnet, self._hash, self.mtime)
        return self._hash

    def shorthash(self) -> str:
        return self.addnet_hash()[:12]

    def known_hash(self) -> str | None:
        """The addnet hash if it is known without reading the file (metadata, computed before, or stored)."""
        if self._hash is None:
            given = self.metadata.get("sshs_model_hash", "")
            if _HEX.match(given):  # metadata is untrusted text: accept it only as a hash
                self._hash = given.lower()
            elif self.store is not None and not self._store_asked:
                self._store_asked = True
                stored = self.store.get(self.path, self.name, self._addnet)
                if stored and _HEX.match(stored):
                    self._hash = stored.lower()
        return self._hash

    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        return self._sha256

    def sidecar(self) -> Path:
        return self.path.with_suffix(".json")

    def _beside(self, p: Path) -> bool:
        """``p`` (a file next to this one) exists and is not a link out of the library's folders."""
        if not p.is_file():
            return False
        if not self.confined_to:
            return True
        real = os.path.realpath(p)
        return any(real.startswith(r.rstrip(os.sep) + os.sep) for r in self.confined_to)

    def user_metadata(self) -> dict:
        """The built-in Lora's per-file notes (activation text, preferred weight, ...)."""
        p = self.sidecar()
        if not self._beside(p):
            return {}
        try:
            data = safe_json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise LoraFileError(f"{p.name}: unreadable notes file ({e})") from None
        return data if isinstance(data, dict) else {}

    def preview(self) -> Path | None:
        for ext in PREVIEW_EXT:
            for cand in (self.path.with_suffix(ext), self.path.with_suffix(".preview" + ext)):
                if self._beside(cand):
                    return cand
        return None


MAX_DEPTH = 32  # sub-folder levels below a LoRA folder that are scanned


class Library:
    """The LoRA files below ``roots``.

    ``follow_outside_links``: also index files (and folders) that symlinks inside a root point
    to outside every root.  Off by default, so a link such as ``x.safetensors -> /etc/passwd``
    is not listed, hashed or served over the API.
    """

    def __init__(self, roots: list[str | os.PathLike], cache_bytes: int = 2 << 30,
                 follow_outside_links: bool = False, hash_store: HashStore | None = None,
                 on_outside_links: Callable[[list[str]], None] | None = None, hashing: bool = True):
        self.roots = [Path(r) for r in roots]
        self.follow_outside_links = follow_outside_links
        self.hash_store = hash_store
        self.hashing = hashing      # False: files are never read whole for a hash (only known hashes are used)
        # links in the folders to files or folders outside them, left out by the last scan (paths in the folders)
        self.outside_links: list[str] = []
        self.on_outside_links = on_outside_links   # told the list whenever a scan finds it changed
        self.entries: list[Entry] = []
        self._lock = threading.RLock()
        self._cache: OrderedDict[Path, Network] = OrderedDict()
        self.cache_bytes = cache_bytes
        self._index: tuple[list[Entry], int, list[dict[str, list[Entry]]]] | None = None
        self._scanned_at = 0.0
        self.refresh()

    # -- scanning --------------------------------------------------------------------
    def _inside(self, real: str, reals: list[str]) -> bool:
        return self.follow_outside_links or any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in reals)

    def _walk(self, folder: str, depth: int, visited: set[str], reals: list[str], outside: list[str]) -> Iterator[Path]:
        """Files below ``folder``, files of a folder before its sub-folders, each sorted by name.

        Symlinked folders are followed, each real folder at most once (two links to ``.`` would
        otherwise multiply without end), and no deeper than MAX_DEPTH.
        """
        try:
            with os.scandir(folder) as it:
                items = sorted((d for d in it if not d.name.startswith(".")), key=lambda d: d.name)
        except OSError:  # unreadable, or removed while scanning
            return
        subdirs = []
        for d in items:
            try:
                is_dir = d.is_dir()
            except OSError:
                continue
            if not is_dir:
                yield Path(d.path)
            elif depth < MAX_DEPTH:
                subdirs.append(d.path)
        for sub in subdirs:
            real = os.path.realpath(sub)
            if real in visited:
                continue
            if not self._inside(real, reals):
                outside.append(sub)
                continue
            visited.add(real)
            yield from self._walk(sub, depth + 1, visited, reals, outside)

    def refresh(self) -> None:
        self._scanned_at = time.monotonic()
        outside: list[str] = []     # links to outside every root, left out (their paths in the folders)
        old = {e.path: e for e in self.entries}
        found: list[Entry] = []
        seen: set[str] = set()
        reals = [os.path.realpath(r) for r in self.roots if r.is_dir()]
        visited: set[str] = set()
        for root in self.roots:
            if not root.is_dir():
                continue
            visited.add(os.path.realpath(root))
            for p in self._walk(str(root), 0, visited, reals, outside):
                fn = p.name
                if p.suffix.lower() not in EXTENSIONS or fn.endswith(LEGACY_TRAINING_STATE_SUFFIX):
                    continue  # resumable training state saved beside a LoRA is not a LoRA
                real = os.path.realpath(p)
                if real in seen:
                    continue
                if not self._inside(real, reals):
                    outside.append(str(p))
                    continue
                seen.add(real)
                try:
                    st = p.stat()
                except OSError:  # a dangling symlink, or deleted while scanning: not a LoRA
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue  # a FIFO would block the header read forever; devices are not LoRAs either
                prev = old.get(p)
                if prev is not None and prev.mtime == st.st_mtime and prev.size == st.st_size:
                    found.append(prev)
                    continue
                rel = p.relative_to(root).with_suffix("").as_posix()
                e = Entry(p, root, p.stem, rel, st.st_mtime, st.st_size,
                          confined_to=() if self.follow_outside_links else tuple(reals))
                if p.suffix.lower() in SAFETENSORS_EXT:
                    try:
                        header = read_header(p)
                    except (LoraFileError, OSError) as err:
                        e.header_error = str(err)
                    else:
                        e.metadata = header.metadata
                        if e.metadata.get("format") == TRAINING_STATE_FORMAT:
                            continue  # a state file ("NAME-state.safetensors"); a LoRA may end in -state too
                        if families.family_from_metadata(e.metadata) is None:
                            e.layout = read_layout(header.shapes)
                found.append(e)
        stems = Counter(e.name for e in found)
        for e in found:
            e.store = self.hash_store if stems[e.name] == 1 else None
            e.hashing = self.hashing
        with self._lock:
            self.entries = found
            changed, self.outside_links = outside != self.outside_links, outside
            live = {e.path for e in found}
            for p in [p for p in self._cache if p not in live]:
                del self._cache[p]
        if changed and self.outside_links and self.on_outside_links is not None:
            self.on_outside_links(list(self.outside_links))

    # -- names -----------------------------------------------------------------------
    def _name_tables(self) -> list[dict[str, list[Entry]]]:
        """resolve()'s lookup tables, rebuilt when the entry list changes (a page of cards
        resolves every name, which would otherwise be quadratic in the library size)."""
        entries = self.entries
        cached = self._index
        if cached is not None and cached[0] is entries and cached[1] == len(entries):
            return cached[2]
        tables: list[dict[str, list[Entry]]] = [{} for _ in range(5)]
        for e in entries:
            for table, k in zip(tables, (e.relname, e.name, e.alias, e.relname.lower(), e.name.lower())):
                table.setdefault(k, []).append(e)
        self._index = (entries, len(entries), tables)
        return tables

    def resolve(self, name: str) -> Entry:
        """Find a file by relative path, file stem, or alias (``ss_output_name``)."""
        key = name.strip().replace("\\", "/")
        # in this order: relative path, stem, alias, then case-insensitive path and stem
        for table, k in zip(self._name_tables(), (key, key, key, key.lower(), key.lower())):
            hits = table.get(k, [])
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                paths = ", ".join(h.relname + h.path.suffix for h in hits)
                raise AmbiguousName(f'Lora name "{name}" is ambiguous: {paths} — use the sub-folder path')
        raise LoraNotFound(f"Lora not found: {name}")

    def resolve_fresh(self, name: str) -> Entry:
        """``resolve``, rescanning the folders once when ``name`` is not found (a file copied in since the last
        scan, as the built-in Lora finds it), at most once per ``RESCAN_INTERVAL`` seconds, so that a prompt
        naming a missing file in every batch does not walk the folders each time."""
        try:
            return self.resolve(name)
        except LoraNotFound:
            if time.monotonic() - self._scanned_at < RESCAN_INTERVAL:
                raise
        self.refresh()
        return self.resolve(name)

    def by_hash(self, shorthash: str, compute: bool = True) -> Entry | None:
        """The entry whose addnet hash starts with ``shorthash`` (at least 8 hex digits).

        Hashes already known are tried first; ``compute`` then hashes the remaining files,
        which reads every one of them once per session.
        """
        shorthash = shorthash.strip().lower()
        if len(shorthash) < 8 or not _HEX.match(shorthash):
            return None  # "" or "a" would match an arbitrary file
        entries = list(self.entries)
        for e in entries:
            known = e.known_hash()
            if known is not None and known.startswith(shorthash):
                return e
        if compute:
            for e in entries:
                if e.known_hash() is None:
                    try:
                        if e.addnet_hash().startswith(shorthash):
                            return e
                    except OSError:
                        continue
        return None

    # -- loading -----------------------------------------------------------------------
    def load(self, entry: Entry) -> Network:
        """Parsed network for ``entry``, from the cache unless the file changed."""
        with self._lock:
            st = entry.path.stat()
            net = self._cache.get(entry.path)
            if net is not None and net.mtime == st.st_mtime:
                self._cache.move_to_end(entry.path)
                return net
        net = load_network(entry.path, entry.relname)
        with self._lock:
            self._cache[entry.path] = net
            self._cache.move_to_end(entry.path)
            self._evict()
        return net

    def set_cache_bytes(self, n: int) -> None:
        with self._lock:
            self.cache_bytes = n
            self._evict()

    def _evict(self) -> None:
        total = sum(n.nbytes for n in self._cache.values())
        while len(self._cache) > 1 and total > self.cache_bytes:
            _, n = self._cache.popitem(last=False)
            total -= n.nbytes


def _resolves_to(library: Library, name: str, entry: Entry) -> bool:
    try:
        return library.resolve(name) is entry
    except LookupError:
        return False


_TOKEN_UNSAFE = re.compile(r"[:<>]")


def prompt_name(library: Library, entry: Entry, prefer_filename: bool = False) -> str:
    """The shortest name that a ``<lora:NAME:...>`` token resolves back to exactly this file."""
    candidates = [entry.name, entry.alias] if prefer_filename else [entry.alias, entry.name]
    for c in [*candidates, entry.relname]:
        if c and not _TOKEN_UNSAFE.search(c) and _resolves_to(library, c, entry):
            return c
    return entry.relname
