"""Reading and writing adapter files safely.

safetensors headers are parsed and checked by hand before any tensor is touched,
so a truncated file or a header that lies about offsets is refused with a clear
message.  Pickle-based files are only opened with ``torch.load(weights_only=True)``,
which refuses to run code.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

SAFETENSORS_EXT = (".safetensors",)
PICKLE_EXT = (".pt", ".ckpt", ".bin", ".pth")
MAX_HEADER = 100 * 1024 * 1024

_DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 1), "F8_E5M2": (getattr(torch, "float8_e5m2", None), 1),
}


class LoraFileError(ValueError):
    """A file that cannot be used; the message names the file and the reason."""


@dataclass
class Header:
    path: Path
    metadata: dict[str, str]
    tensors: dict[str, dict[str, Any]]  # name -> {"dtype", "shape", "data_offsets"}
    data_start: int
    size: int
    shapes: dict[str, tuple[int, ...]] = field(init=False)

    def __post_init__(self) -> None:
        self.shapes = {k: tuple(v["shape"]) for k, v in self.tensors.items()}


def read_header(path: str | os.PathLike) -> Header:
    """Parse and validate a safetensors header without reading tensor data."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise LoraFileError(f"{path.name}: file is truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise LoraFileError(f"{path.name}: not a valid safetensors file (header length {n} exceeds file size {size})")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LoraFileError(f"{path.name}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise LoraFileError(f"{path.name}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise LoraFileError(f"{path.name}: __metadata__ is not an object")
    data_start, data_len = 8 + n, size - 8 - n
    spans = []
    for name, info in header.items():
        try:
            dtype = info["dtype"]
            shape = [int(d) for d in info["shape"]]
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise LoraFileError(f"{path.name}: tensor {name!r} has a malformed header entry") from None
        if dtype not in _DTYPES or _DTYPES[dtype][0] is None:
            raise LoraFileError(f"{path.name}: tensor {name!r} has unsupported dtype {dtype}")
        numel = 1
        for d in shape:
            if d < 0:
                raise LoraFileError(f"{path.name}: tensor {name!r} has a negative dimension")
            numel *= d
        if not (0 <= start <= end <= data_len) or end - start != numel * _DTYPES[dtype][1]:
            raise LoraFileError(
                f"{path.name}: tensor {name!r} claims bytes {start}..{end} for shape {shape} {dtype}, "
                f"but the file has {data_len} data bytes (truncated or corrupt)")
        spans.append((start, end))
    spans.sort()
    for (s0, e0), (s1, _) in zip(spans, spans[1:]):
        if s1 < e0:
            raise LoraFileError(f"{path.name}: tensors overlap in the data section (corrupt header)")
    return Header(path, {str(k): str(v) for k, v in meta.items()}, header, data_start, size)


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors (on CPU) and the metadata of a validated safetensors file."""
    h = read_header(path)
    out: dict[str, Tensor] = {}
    with open(h.path, "rb") as f:
        blob = f.read()
    if len(blob) != h.size:
        raise LoraFileError(f"{h.path.name}: file changed while reading")
    for name, info in h.tensors.items():
        dtype = _DTYPES[info["dtype"]][0]
        start, end = info["data_offsets"]
        buf = bytearray(blob[h.data_start + start:h.data_start + end])
        t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(info["shape"])
    return out, h.metadata


# torch.load as torch ships it, when a host has replaced ``torch.load`` (the WebUI's modules/safe.py
# swaps in a checker that rejects current torch's zip layout and returns None instead of raising).
_torch_load: Callable[..., Any] | None = None


def use_torch_load(loader: Callable[..., Any] | None) -> None:
    """Read pickles with ``loader`` (the host's original torch.load); None: whatever torch.load is now.

    It is always called with ``weights_only=True``, so torch's own unpickler still refuses code.
    """
    global _torch_load
    _torch_load = loader


def load_pickle(path: str | os.PathLike) -> dict[str, Tensor]:
    """Legacy .pt/.ckpt: tensors only, through the loader that never executes code."""
    path = Path(path)
    loader = _torch_load or torch.load
    try:
        sd = loader(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler's own refusal message is what the user needs
        raise LoraFileError(f"{path.name}: refused to load pickle file safely: {str(e).splitlines()[0]}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise LoraFileError(f"{path.name}: pickle file does not hold a flat dict of tensors")
    return {str(k): v for k, v in sd.items()}


def load_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of any supported adapter file."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext in SAFETENSORS_EXT:
        return load_safetensors(path)
    if ext in PICKLE_EXT:
        return load_pickle(path), {}
    raise LoraFileError(f"{path.name}: unsupported file type {ext!r} (use .safetensors; .pt/.ckpt are read tensors-only)")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    path = Path(path)
    return read_header(path).metadata if path.suffix.lower() in SAFETENSORS_EXT else {}


@contextmanager
def atomic_path(path: Path) -> Iterator[str]:
    """Yield a temp file beside ``path``; on success it is fsynced, made world-readable (per umask)
    and renamed over ``path``; on any failure it is removed and ``path`` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs should be as readable as any file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path


def save_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write atomically: a temp file in the same folder, fsync, then rename over the target."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    with atomic_path(path) as tmp:
        contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(contiguous, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
    return path


DTYPE_NAMES = {dt: name for name, (dt, _) in _DTYPES.items() if dt is not None}


class TensorFile:
    """One tensor at a time from a validated safetensors file (seek + read of the checked
    offsets), so a multi-GB checkpoint never sits in memory whole.  A pickle (.ckpt/.pt) has no
    such layout: it is loaded tensors-only, as ``load_pickle`` does, and served from memory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise LoraFileError(f"{self.path}: no such file")
        ext = self.path.suffix.lower()
        self._f = None
        self._sd: dict[str, Tensor] | None = None
        if ext in SAFETENSORS_EXT:
            self.header: Header | None = read_header(self.path)
            self.metadata = dict(self.header.metadata)
            self._f = open(self.path, "rb")
            self._size = os.fstat(self._f.fileno()).st_size
        elif ext in PICKLE_EXT:
            self.header, self.metadata = None, {}
            self._sd = load_pickle(self.path)
        else:
            raise LoraFileError(f"{self.path.name}: unsupported file type {ext!r}")

    def keys(self) -> list[str]:
        return list(self.header.tensors) if self.header is not None else list(self._sd)

    def __contains__(self, key: str) -> bool:
        return key in (self.header.tensors if self.header is not None else self._sd)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.header.shapes[key] if self.header is not None else tuple(self._sd[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        if self.header is None:
            return self._sd[key].dtype
        return _DTYPES[self.header.tensors[key]["dtype"]][0]

    def nbytes(self, key: str) -> int:
        if self.header is None:
            t = self._sd[key]
            return t.numel() * t.element_size()
        start, end = self.header.tensors[key]["data_offsets"]
        return int(end) - int(start)

    def get(self, key: str) -> Tensor:
        """The tensor (CPU, its stored dtype), read from disk now."""
        if self.header is None:
            return self._sd[key]
        info = self.header.tensors[key]
        start, end = (int(x) for x in info["data_offsets"])
        if os.fstat(self._f.fileno()).st_size != self._size:
            raise LoraFileError(f"{self.path.name}: file changed while reading")
        buf = bytearray(end - start)
        self._f.seek(self.header.data_start + start)
        if self._f.readinto(buf) != len(buf):
            raise LoraFileError(f"{self.path.name}: file changed while reading (short read of {key!r})")
        dtype = _DTYPES[info["dtype"]][0]
        t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        return t.reshape(info["shape"])

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        self._sd = None

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
