"""A safetensors writer that takes one tensor at a time.

The header (names, dtypes, shapes) is fixed up front, so a checkpoint is written while it is
read, holding one tensor.  Tensors are laid out widest dtype first, as the safetensors library
does, so every tensor starts at a multiple of its element size.  The file appears only when every
declared tensor was written (``fileio.atomic_path``); any failure leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor

from ..fileio import DTYPE_NAMES, atomic_path

_PLACEHOLDER = "0" * 64
_SIZES: dict[torch.dtype, int] = {}


def _itemsize(dt: torch.dtype) -> int:
    if dt not in _SIZES:
        _SIZES[dt] = torch.empty((), dtype=dt).element_size()
    return _SIZES[dt]


class StreamWriter:
    """``with StreamWriter(path, specs, meta) as w: for name in w.order: w.write(name, tensor)``.

    ``hash_key``: a metadata key that receives ``0x`` + sha256 of the tensor data (the
    ``modelspec.hash_sha256`` convention), filled in once the data is written.
    """

    def __init__(self, path: str | os.PathLike, specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, overwrite: bool = False, hash_key: str | None = None):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} exists; pass --force to replace it")
        specs = [(str(n), dt, tuple(int(d) for d in s)) for n, dt, s in specs]
        for _, dt, _ in specs:
            if dt not in DTYPE_NAMES:
                raise ValueError(f"safetensors has no dtype {dt}")
        # widest elements first keeps every offset aligned to its element size
        specs.sort(key=lambda s: -_itemsize(s[1]))
        self.order = [n for n, _, _ in specs]
        self._specs = {n: (dt, s) for n, dt, s in specs}
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self.hash_key = hash_key
        if hash_key:
            self.metadata[hash_key] = "0x" + _PLACEHOLDER
        self._next = 0
        self._hash = hashlib.sha256()
        self._stack = contextlib.ExitStack()
        self.data_sha256 = ""

    def _header(self) -> bytes:
        entries: dict[str, object] = {"__metadata__": self.metadata} if self.metadata else {}
        offset = 0
        for n in self.order:
            dt, shape = self._specs[n]
            size = _itemsize(dt)
            for d in shape:
                size *= d
            entries[n] = {"dtype": DTYPE_NAMES[dt], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(entries, separators=(",", ":")).encode("utf-8")
        return raw + b" " * (-len(raw) % 8)  # pad so the data starts 8-aligned

    def __enter__(self) -> "StreamWriter":
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._f = self._stack.enter_context(open(tmp, "wb"))
        header = self._header()
        self._f.write(struct.pack("<Q", len(header)) + header)
        self._header_len = len(header)
        return self

    def write(self, name: str, tensor: Tensor) -> None:
        if self._next >= len(self.order) or self.order[self._next] != name:
            want = self.order[self._next] if self._next < len(self.order) else "nothing"
            raise ValueError(f"stream writer: got {name!r}, expected {want!r}")
        dt, shape = self._specs[name]
        if tensor.dtype != dt or tuple(tensor.shape) != shape:
            raise ValueError(f"stream writer: {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                             f"declared {dt} {shape}")
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        if flat.numel():
            data = flat.view(torch.uint8).numpy()
            self._f.write(data)
            self._hash.update(data)
        self._next += 1

    def _finish(self) -> None:
        if self._next != len(self.order):
            raise ValueError(f"stream writer: {len(self.order) - self._next} declared tensors "
                             f"were not written (first: {self.order[self._next]!r})")
        self.data_sha256 = self._hash.hexdigest()
        if self.hash_key:
            self.metadata[self.hash_key] = "0x" + self.data_sha256
            header = self._header()
            if len(header) != self._header_len:  # a digest replaces a placeholder of its length
                raise ValueError("stream writer: header changed length")
            self._f.seek(8)
            self._f.write(header)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                self._finish()
            except BaseException as e:  # unwinding with the error removes the temp file
                self._stack.__exit__(type(e), e, e.__traceback__)
                raise
        self._stack.__exit__(exc_type, exc, tb)
        return False
