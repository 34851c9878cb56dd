"""Textual-inversion embeddings bundled in a LoRA file (``bundle_emb.NAME.…`` keys), host-agnostic.

The WebUI's built-in Lora reads these layouts, and so do we:
- SD1/SD2: ``bundle_emb.NAME.string_to_param.<one key>``, a ``[vectors, width]`` tensor;
- SDXL: ``bundle_emb.NAME.clip_l`` and ``bundle_emb.NAME.clip_g``, ``[vectors, 768]`` and ``[vectors, 1280]``;
- a diffusers concept: one other ``bundle_emb.NAME.<key>``, ``[vectors, width]`` or a single ``[width]`` vector.
A malformed or non-finite bundle refuses the whole file (as the built-in's loader fails the file); whether an
embedding fits the loaded model is asked per embedding at activation (``misfit``), and a misfit is skipped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .fileio import LoraFileError

PREFIX = "bundle_emb."
PARAM = "string_to_param"
SDXL_PARTS = ("clip_l", "clip_g")


@dataclass(frozen=True)
class BundledEmbedding:
    name: str
    vectors: dict[str, Tensor]  # "" -> [n, width] (SD1/SD2), or "clip_l"/"clip_g" -> [n, width] (SDXL); float32
    source: str = ""  # the LoRA file it came from, where known

    @property
    def count(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def width(self) -> int:
        """The width the WebUI's embedding database compares (SDXL: both encoders' together)."""
        return sum(v.shape[1] for v in self.vectors.values())

    def misfit(self, widths: dict[str, int]) -> str | None:
        """Why this embedding does not fit a model whose token embeddings are ``widths`` wide, or None.

        ``widths`` is ``{"": w}`` for a one-encoder model, ``{"clip_l": w1, "clip_g": w2}`` for SDXL."""
        if set(self.vectors) != set(widths):
            have = "SDXL (clip_l + clip_g)" if "" not in self.vectors else "a one-text-encoder model (SD1/SD2)"
            return f"embedding {self.name!r} is for {have}, not the loaded model"
        for part, t in self.vectors.items():
            if t.shape[1] != widths[part]:
                where = f" {part}" if part else ""
                return (f"embedding {self.name!r}{where} is {t.shape[1]} wide, "
                        f"the loaded model's token embeddings are {widths[part]}")
        return None


def bundle_tensors(name: str, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
    """An embedding's ``bundle_emb.`` tensors as the built-in Lora reads them (``parse_bundle``'s inverse):
    ``vectors`` is ``{"": [n, width]}`` (SD1/SD2) or ``{"clip_l": …, "clip_g": …}`` (SDXL)."""
    if not name or "." in name:
        raise ValueError(f"embedding name {name!r}: must be non-empty and without '.' (bundle_emb.NAME.PART)")
    return {f"{PREFIX}{name}.{PARAM}.*" if part == "" else f"{PREFIX}{name}.{part}": t
            for part, t in vectors.items()}


def token_table(root: nn.Module) -> nn.Embedding | None:
    """The token-embedding table of a text encoder (HF CLIP or OpenCLIP); the WebUI's hijack wraps it in
    ``EmbeddingsWithFixes``, which keeps the table itself in ``.wrapped``."""
    table = getattr(root, "token_embedding", None)                      # OpenCLIP
    if table is None and hasattr(root, "get_input_embeddings"):         # HF CLIPTextModel
        table = root.get_input_embeddings()
    table = getattr(table, "wrapped", table)
    return table if isinstance(table, nn.Embedding) else None


def split_bundle(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(the LoRA's tensors, the ``bundle_emb.`` tensors)."""
    rest = {k: v for k, v in sd.items() if not k.startswith(PREFIX)}
    return rest, {k: v for k, v in sd.items() if k.startswith(PREFIX)}


def parse_bundle(file: str, tensors: dict[str, Tensor], source: str = "") -> dict[str, BundledEmbedding]:
    """The embeddings in a file's ``bundle_emb.`` tensors; LoraFileError naming the file and key if malformed.
    ``source``: the file's path, kept on each embedding."""
    parts: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        name, _, rest = key[len(PREFIX):].partition(".")
        if not name or not rest:
            raise LoraFileError(f"{file}: bundled embedding key {key!r} is not bundle_emb.NAME.PART")
        if rest.startswith(PARAM + ".") and len(rest) > len(PARAM) + 1:
            part = ""
        elif rest in SDXL_PARTS:
            part = rest
        elif rest == PARAM or rest.startswith(PARAM + "."):
            raise LoraFileError(f"{file}: bundled embedding key {key!r} is not bundle_emb.{name}.{PARAM}.KEY")
        else:  # a diffusers concept, one vector allowed as [width]
            part = ""
            t = t.unsqueeze(0) if isinstance(t, Tensor) and t.dim() == 1 else t
        got = parts.setdefault(name, {})
        if part in got:
            raise LoraFileError(f"{file}: bundled embedding {name!r} has more than one tensor for one text "
                                f"encoder ({PARAM}.* or another key)")
        got[part] = _checked(file, key, t)
    out = {}
    for name, got in parts.items():
        if "" in got and len(got) > 1:
            raise LoraFileError(f"{file}: bundled embedding {name!r} mixes {PARAM} and clip_l/clip_g tensors")
        if "" not in got and set(got) != set(SDXL_PARTS):
            raise LoraFileError(f"{file}: bundled SDXL embedding {name!r} needs both clip_l and clip_g")
        if len({t.shape[0] for t in got.values()}) != 1:
            raise LoraFileError(f"{file}: bundled embedding {name!r}: clip_l and clip_g have different vector counts")
        out[name] = BundledEmbedding(name, got, source)
    return out


def _checked(file: str, key: str, t: Tensor) -> Tensor:
    if t.layout != torch.strided or t.is_quantized or not torch.is_floating_point(t):
        raise LoraFileError(f"{file}: bundled embedding tensor {key} is not a dense float tensor")
    if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 1:
        raise LoraFileError(f"{file}: bundled embedding tensor {key} has shape {list(t.shape)}, "
                            "expected [vectors, width]")
    t = t.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise LoraFileError(f"{file}: bundled embedding tensor {key} contains NaN or Inf values")
    return t
