"""Names of the host model's patchable layers, as LoRA files spell them.

A ``ModelMap`` walks the real modules once (LDM/SGM UNet, HF CLIP, OpenCLIP) and
indexes every patchable weight under each name a file may use for it:

- kohya SD1/SD2: ``lora_unet_`` + the *diffusers* module path (``down_blocks_0_...``);
- kohya SDXL:    ``lora_unet_`` + the *SGM/LDM* path (``input_blocks_4_1_...``);
- text encoders: ``lora_te_`` (single encoder) or ``lora_te1_``/``lora_te2_`` + the
  HF CLIP path; OpenCLIP's fused ``in_proj`` is exposed as three row slices;
- SD3: ``lora_unet_`` + the MMDiT path (kohya), ``lora_transformer_`` + the diffusers path
  (row thirds of the fused ``qkv``, see sd3_names.py), ``lora_te1_/te2_/te3_`` for
  CLIP-L / CLIP-G / T5-XXL.

Saving uses ``Target.key`` (the kohya spelling for the family), loading accepts all
aliases, so the same map serves training and inference.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .families import FAMILIES
from .sd3_names import is_mmdit, mmdit_diffusers_names


_PATCHABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm, nn.LayerNorm, nn.Embedding)


@dataclass(eq=False)
class Target:
    """One weight (or a row-slice of one) that adapters may change."""
    key: str                      # canonical kohya key, used when saving
    module: nn.Module
    component: str                # "unet" (also SD3's MMDiT), "te", "te1", "te2", "te3"
    weight_name: str = "weight"
    bias_name: str | None = "bias"
    rows: slice | None = None     # q/k/v slice of a fused in_proj
    aliases: list[str] = field(default_factory=list)

    @property
    def is_text_encoder(self) -> bool:
        return self.component != "unet"

    def weight(self) -> torch.Tensor:
        w = getattr(self.module, self.weight_name)
        return w if self.rows is None else w[self.rows]

    def bias(self) -> torch.Tensor | None:
        b = getattr(self.module, self.bias_name, None) if self.bias_name else None
        if b is None:
            return None
        return b if self.rows is None else b[self.rows]


class ModelMap:
    """Index of a model's patchable layers by every spelling a LoRA file may use."""

    def __init__(self, family: str):
        if family not in FAMILIES:
            raise ValueError(f"unknown model family {family!r}")
        self.family = family
        self.targets: list[Target] = []
        self._by_name: dict[str, Target] = {}

    @classmethod
    def build(cls, family: str, unet: nn.Module | None,
              text_encoders: list[tuple[str, nn.Module]]) -> "ModelMap":
        """``text_encoders``: (prefix, root) with prefix "te" (SD1/SD2), "te1"/"te2" (SDXL) or
        "te1"/"te2"/"te3" (SD3: CLIP-L, CLIP-G, T5-XXL, whose roots yield HF-style names).

        The root of an HF encoder yields ``text_model.encoder...`` names; the root of an
        OpenCLIP encoder yields ``transformer.resblocks...`` names.
        """
        mm = cls(family)
        for prefix, root in text_encoders:
            if any(n.startswith("transformer.resblocks.") for n, _ in root.named_modules()):
                mm._add_open_clip(prefix, root)
            else:
                mm._add_hf_clip(prefix, root)
        if unet is not None and family == "sd3":
            mm._add_mmdit(unet)
        elif unet is not None:
            mm._add_unet(unet)
        return mm

    # -- lookup ------------------------------------------------------------------------
    def get(self, name: str) -> Target | None:
        return self._by_name.get(name)

    def __len__(self) -> int:
        return len(self.targets)

    def components(self) -> set[str]:
        return {t.component for t in self.targets}

    # -- construction ------------------------------------------------------------------
    def _add(self, target: Target, *names: str) -> None:
        self.targets.append(target)
        for n in (target.key, *names):
            if n not in self._by_name:
                self._by_name[n] = target
                if n != target.key:
                    target.aliases.append(n)

    def _add_hf_clip(self, prefix: str, root: nn.Module) -> None:
        for name, mod in root.named_modules():
            name = _unwrap(name)
            if isinstance(mod, _PATCHABLE):
                self._add(Target(f"lora_{prefix}_{_u(name)}", mod, prefix), *_single_te_alias(prefix, _u(name)))

    def _add_open_clip(self, prefix: str, root: nn.Module) -> None:
        for name, mod in root.named_modules():
            hf = open_clip_to_hf_name(_unwrap(name))
            if hf is None:
                continue
            if isinstance(mod, nn.MultiheadAttention):
                d = mod.embed_dim
                for i, qkv in enumerate("qkv"):
                    self._add(Target(f"lora_{prefix}_{_u(hf)}_{qkv}_proj", mod, prefix, "in_proj_weight",
                                     "in_proj_bias", slice(i * d, (i + 1) * d)),
                              *_single_te_alias(prefix, f"{_u(hf)}_{qkv}_proj"))
            elif isinstance(mod, _PATCHABLE):
                self._add(Target(f"lora_{prefix}_{_u(hf)}", mod, prefix), *_single_te_alias(prefix, _u(hf)))

    def _add_unet(self, unet: nn.Module) -> None:
        names = ldm_unet_diffusers_names(unet)
        for name, mod in unet.named_modules():
            if not isinstance(mod, _PATCHABLE):
                continue
            ldm_key = f"lora_unet_{_u(name)}"
            diff = names.get(name)
            diff_key = f"lora_unet_{_u(diff)}" if diff else None
            # kohya names SD1/SD2 layers by diffusers paths and SDXL layers by SGM paths
            if self.family == "sdxl" or diff_key is None:
                self._add(Target(ldm_key, mod, "unet"), *([diff_key] if diff_key else []))
            else:
                self._add(Target(diff_key, mod, "unet"), ldm_key)


    def _add_mmdit(self, mmdit: nn.Module) -> None:
        diffusers = mmdit_diffusers_names(mmdit) if is_mmdit(mmdit) else {}
        for name, mod in mmdit.named_modules():
            if not isinstance(mod, _PATCHABLE):
                continue
            diff = diffusers.get(name)
            self._add(Target(f"lora_unet_{_u(name)}", mod, "unet"),
                      *([f"lora_transformer_{_u(diff)}"] if isinstance(diff, str) else []))
            if isinstance(diff, tuple) and isinstance(mod, nn.Linear) and mod.out_features % 3 == 0:
                d = mod.out_features // 3
                for i, part in enumerate(diff):
                    self._add(Target(f"lora_transformer_{_u(part)}", mod, "unet", rows=slice(i * d, (i + 1) * d)))


def _single_te_alias(prefix: str, name: str) -> tuple[str, ...]:
    """A single-encoder model's layers also answer to ``lora_te1_``: diffusers'
    ``convert_state_dict_to_kohya`` writes that prefix for SD1 files, and the built-in Lora applies them."""
    return (f"lora_te1_{name}",) if prefix == "te" else ()


def _unwrap(name: str) -> str:
    """The WebUI wraps token embeddings (``token_embedding.wrapped``); files name the real layer."""
    return name[: -len(".wrapped")] if name.endswith(".wrapped") else name


def _u(path: str) -> str:
    return path.replace(".", "_")


_OPEN_CLIP_RENAMES = (
    ("attn.out_proj", "self_attn.out_proj"), ("attn", "self_attn"),
    ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
)


def open_clip_to_hf_name(name: str) -> str | None:
    """``transformer.resblocks.3.mlp.c_fc`` -> ``text_model.encoder.layers.3.mlp.fc1`` (None if unmapped)."""
    if name == "ln_final":
        return "text_model.final_layer_norm"
    if name == "token_embedding":
        return "text_model.embeddings.token_embedding"
    parts = name.split(".")
    if len(parts) < 4 or parts[:2] != ["transformer", "resblocks"]:
        return None
    rest = ".".join(parts[3:])
    for old, new in _OPEN_CLIP_RENAMES:
        if rest == old:
            return f"text_model.encoder.layers.{parts[2]}.{new}"
    return None


_RESNET_RENAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                   "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_TOP_RENAMES = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
                "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
                "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}


def _block_kind(mod: nn.Module) -> str:
    n = type(mod).__name__
    return {"ResBlock": "res", "SpatialTransformer": "attn", "Downsample": "down", "Upsample": "up"}.get(n, n)


def ldm_unet_diffusers_names(unet: nn.Module) -> dict[str, str]:
    """Map every LDM/SGM UNet module path to the diffusers path of the same layer.

    Derived from the block structure (which blocks hold resnets, transformers,
    down/up-samplers), so it holds for SD1, SD2, SDXL and any tiny variant of them.
    """
    prefixes: dict[str, str] = {}
    level, j = 0, 0
    for idx, block in enumerate(getattr(unet, "input_blocks", [])):
        if idx == 0:
            continue
        kinds = [_block_kind(m) for m in block]
        if kinds[0] == "down":
            prefixes[f"input_blocks.{idx}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            level, j = level + 1, 0
            continue
        prefixes[f"input_blocks.{idx}.0"] = f"down_blocks.{level}.resnets.{j}"
        if "attn" in kinds:
            prefixes[f"input_blocks.{idx}.{kinds.index('attn')}"] = f"down_blocks.{level}.attentions.{j}"
        j += 1
    mid = list(getattr(unet, "middle_block", []))
    r = a = 0
    for i, m in enumerate(mid):
        k = _block_kind(m)
        if k == "res":
            prefixes[f"middle_block.{i}"] = f"mid_block.resnets.{r}"
            r += 1
        elif k == "attn":
            prefixes[f"middle_block.{i}"] = f"mid_block.attentions.{a}"
            a += 1
    level, j = 0, 0
    for idx, block in enumerate(getattr(unet, "output_blocks", [])):
        kinds = [_block_kind(m) for m in block]
        prefixes[f"output_blocks.{idx}.0"] = f"up_blocks.{level}.resnets.{j}"
        if "attn" in kinds:
            prefixes[f"output_blocks.{idx}.{kinds.index('attn')}"] = f"up_blocks.{level}.attentions.{j}"
        j += 1
        if "up" in kinds:
            prefixes[f"output_blocks.{idx}.{kinds.index('up')}.conv"] = f"up_blocks.{level}.upsamplers.0.conv"
            level, j = level + 1, 0
    out: dict[str, str] = {}
    for name, _ in unet.named_modules():
        if name in _TOP_RENAMES:
            out[name] = _TOP_RENAMES[name]
            continue
        for p in sorted(_prefixes_of(name), key=len, reverse=True):
            if p in prefixes:
                rest = name[len(p) + 1:] if len(name) > len(p) else ""
                if ".resnets." in prefixes[p] and rest:
                    rest = _RESNET_RENAMES.get(rest, rest)
                out[name] = prefixes[p] + ("." + rest if rest else "")
                break
    return out


def _prefixes_of(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
