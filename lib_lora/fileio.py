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
# A training run's resume state beside its LoRA (training/state.py owns the schema and naming); defined
# here, below the library that must skip it when scanning, so the runtime never imports the training code.
# It is named after its save as kohya names its state folders ("NAME-state", "NAME-step00001234-state");
# releases before that wrote "NAME.state.safetensors".  A LoRA may end in "-state" too: only the header's
# ``format`` key tells that a file is a state.
TRAINING_STATE_SUFFIX = "-state.safetensors"
LEGACY_TRAINING_STATE_SUFFIX = ".state.safetensors"
TRAINING_STATE_FORMAT = "lora-workshop-train-state/1"
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


MAX_DIMS = 8            # adapter tensors have at most 5 (conv3d); more is a corrupt header
MAX_ELEMENTS = 1 << 48  # far beyond any real layer, and safe from int64 overflow in torch's size arithmetic


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        for s in (k, v):
            if isinstance(s, str):
                s.encode("utf-8")  # UnicodeEncodeError for an escaped lone surrogate, which is not text
        out[k] = v
    return out


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not a JSON value")


def parse_header_json(raw: bytes, name: str) -> Any:
    """The header's JSON, as strictly as the safetensors reference reader takes it."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_not_json)
    except RecursionError:
        raise LoraFileError(f"{name}: safetensors header is nested too deeply") from None
    except (UnicodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise LoraFileError(f"{name}: safetensors header is not valid JSON ({str(e)[:200]})") from None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _tensor_entry(name: str, key: str, info: Any) -> tuple[str, list[int], int, int]:
    """(dtype, shape, start, end) of one header entry, each checked for type and range."""
    bad = f"{name}: tensor {key!r} has a malformed header entry"
    if not isinstance(info, dict):
        raise LoraFileError(f"{bad} (not an object)")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise LoraFileError(f"{bad} (dtype {dtype!r})")
    if dtype not in _DTYPES:
        raise LoraFileError(f"{name}: tensor {key!r} has unsupported dtype {dtype[:32]!r}")
    if _DTYPES[dtype][0] is None:
        raise LoraFileError(f"{name}: tensor {key!r} has dtype {dtype}, which this torch {torch.__version__} cannot read")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(d) for d in shape):
        raise LoraFileError(f"{bad} (shape {str(shape)[:64]})")
    if any(d < 0 for d in shape):
        raise LoraFileError(f"{name}: tensor {key!r} has a negative dimension")
    extent = 1
    for d in shape:
        extent *= max(d, 1)  # zero-sized tensors too: [0, 2**70] would overflow torch's size arithmetic
    if extent > MAX_ELEMENTS:
        raise LoraFileError(f"{name}: tensor {key!r} has an implausible shape {shape}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(x) for x in offsets):
        raise LoraFileError(f"{bad} (data_offsets {str(offsets)[:64]})")
    return dtype, shape, offsets[0], offsets[1]


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
        header = parse_header_json(f.read(n), path.name)
    if not isinstance(header, dict):
        raise LoraFileError(f"{path.name}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise LoraFileError(f"{path.name}: __metadata__ is not an object")
    for k, v in meta.items():
        if not isinstance(v, str):  # the format's metadata is text to text; safetensors itself refuses others
            raise LoraFileError(f"{path.name}: metadata value of {k[:64]!r} is not a string")
    data_start, data_len = 8 + n, size - 8 - n
    spans = []
    for name, info in header.items():
        dtype, shape, start, end = _tensor_entry(path.name, name, info)
        numel = 1
        for d in shape:
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
    return Header(path, meta, header, data_start, size)


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
        try:  # read_header checked sizes and types, so this boundary only guards torch's own refusals
            t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            out[name] = t.reshape(info["shape"])
        except (RuntimeError, ValueError) as e:
            raise LoraFileError(f"{h.path.name}: tensor {name!r} cannot be read ({str(e).splitlines()[0]})") from None
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
