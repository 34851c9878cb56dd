"""The CLI's host: a single-file SD1/SD2/SDXL checkpoint opened without the WebUI, and saved back.

The parts are held as the module classes the WebUI itself runs, so LoRA names, ModelMap and
the patcher behave exactly as inside the WebUI:

- UNet: ldm ``UNetModel`` (SD1/SD2) or :class:`.sdxl_unet.SDXLUNetModel` (SDXL);
- text: HF ``CLIPTextModel`` (SD1, SDXL te1) and open_clip ``CLIP`` without ``.visual``
  (SD2, SDXL te2), i.e. ``FrozenCLIPEmbedder.transformer`` / ``FrozenOpenCLIPEmbedder.model``;
- VAE: diffusers ``AutoencoderKL`` (ldm's autoencoder module needs pytorch_lightning), with
  weights renamed by :mod:`.vae`.

The architecture config (its schema is in :mod:`.config`) comes from the ``config`` argument,
else a sidecar ``<stem>.yaml`` (:mod:`.ldm_yaml`), else tensor shapes; an explicit config may
be partial and then overrides the yaml/inferred values key by key.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

from ... import families, hashes
from ...bundled import BundledEmbedding, token_table
from ...fileio import load_file, save_safetensors, write_text_atomic
from ...training.checks import clip_skip_for
from ...training.model import Conditioning, SizeCond, TrainableModel
from .builders import build_text_encoder, build_unet, build_vae, materialize
from .conditioning import encode_text, tokenize
from .tokenizer import CONTEXT_LENGTH, word_ids
from .config import (SCALE_FACTOR, SCHEDULE, SIZE_EMBED_DIM, TEXT_LAYOUT, UNET_PREFIX, VAE_PREFIX, ArchitectureError,
                     default_resolution, infer_config, merge_config, strip_prefix, text_encoder_state)
from .ldm_yaml import dump_webui_yaml, read_yaml_config
from .sampling import alphas_cumprod, sample
from .vae import diffusers_to_ldm, ldm_to_diffusers, ldm_vae_config


# ---------------------------------------------------------------------------------------------
# The checkpoint


@dataclass(eq=False)
class Checkpoint:
    """A checkpoint's UNet, text encoders and VAE with their config: from :func:`load_checkpoint`,
    or :meth:`from_modules` for modules already in memory."""

    family: str
    unet: nn.Module
    text_encoders: list[tuple[str, nn.Module]]
    vae: nn.Module
    config: dict[str, Any]
    path: Path | None = None
    config_source: str = "explicit"
    _hashes: dict[str, str] = field(default_factory=dict, repr=False)
    # textual inversions the prompts may name (the active LoRAs' bundled ones: ``embeddings_for``), as the
    # WebUI's embedding database holds them
    embeddings: list[BundledEmbedding] = field(default_factory=list, repr=False)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_modules(cls, family: str, unet: nn.Module, text_encoders: list[tuple[str, nn.Module]], vae: nn.Module,
                     prediction: str = "epsilon", scale_factor: float | None = None,
                     size_embed_dim: int | None = None, resolution: int | None = None) -> "Checkpoint":
        """Wrap modules already in memory (tests, conversions); the config is read off the modules."""
        ck = cls(family, unet, list(text_encoders), vae, {"family": family, "vae": ldm_vae_config(vae)})
        cfg = infer_config(ck.state_dict())
        if cfg["family"] != family:
            raise ArchitectureError(f"modules look like {cfg['family']}, not {family}")
        u = cfg["unet"]
        u.pop("num_heads", None)  # the modules know their heads; shapes do not
        u.pop("num_head_channels", None)
        if getattr(unet, "num_head_channels", -1) != -1:
            u["num_head_channels"] = unet.num_head_channels
        else:
            u["num_heads"] = unet.num_heads
        u["image_size"] = getattr(unet, "image_size", 32)
        for tcfg, (_, te) in zip(cfg["text_encoders"], text_encoders):
            if tcfg["kind"] == "hf_clip":
                tcfg["heads"], tcfg["act"] = te.config.num_attention_heads, te.config.hidden_act
            else:
                tcfg["heads"] = te.transformer.resblocks[0].attn.num_heads
        cfg["prediction"] = prediction
        cfg["resolution"] = resolution or default_resolution(family, prediction)
        if scale_factor is not None:
            cfg["scale_factor"] = scale_factor
        if size_embed_dim is not None:
            cfg["size_embed_dim"] = size_embed_dim
        ck.config = cfg
        return ck

    # -- properties ---------------------------------------------------------------------------
    @property
    def prediction(self) -> str:
        return self.config["prediction"]

    @property
    def scale_factor(self) -> float:
        return float(self.config["scale_factor"])

    @property
    def resolution(self) -> int:
        return int(self.config.get("resolution", default_resolution(self.family, self.prediction)))

    @property
    def vae_scale(self) -> int:
        """Pixels per latent along each side (8 for every real SD VAE)."""
        return 2 ** (len(self.config["vae"]["ddconfig"]["ch_mult"]) - 1)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def name(self) -> str:
        return self.path.stem if self.path else f"{self.family}-in-memory"

    def alphas_cumprod(self) -> Tensor:
        return alphas_cumprod(**self.config.get("schedule", SCHEDULE))

    def hashes(self) -> dict[str, str]:
        """sha256 (full file; what kohya writes as ss_new_sd_model_hash) and kohya's legacy hash
        (ss_sd_model_hash), computed once on first use: hashing a 2-7 GB file takes seconds."""
        if self.path is None:
            return {"sha256": "", "legacy": ""}
        if not self._hashes:
            self._hashes = {"sha256": hashes.sha256_file(self.path), "legacy": hashes.addnet_hash_legacy(self.path)}
        return self._hashes

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Checkpoint":
        kw = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for m in self.modules():
            m.to(**kw)
        if dtype is not None:
            self.unet.dtype = dtype  # ldm's forward casts x to unet.dtype
        return self

    def modules(self) -> list[nn.Module]:
        return [self.unet, *(te for _, te in self.text_encoders), self.vae]

    # -- state dict in file layout ------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """All weights under their single-file checkpoint names (VAE in ldm names and shapes)."""
        sd = {UNET_PREFIX + k: v for k, v in self.unet.state_dict().items()}
        for (prefix, te), (p2, file_prefix, kind) in zip(self.text_encoders, TEXT_LAYOUT[self.family]):
            if prefix != p2:
                raise ArchitectureError(f"text encoder {prefix!r} where {self.family} has {p2!r}")
            sd |= {file_prefix + k: v for k, v in te.state_dict().items() if not k.endswith("position_ids")}
        sd |= {VAE_PREFIX + k: v for k, v in diffusers_to_ldm(self.vae.state_dict(), self.config["vae"]).items()}
        return sd

    # -- conditioning -------------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> list[Tensor]:
        """Token ids [B, chunks, context] per text encoder (HF CLIP pads with EOS, OpenCLIP with 0)."""
        return tokenize(self.config["text_encoders"], prompts)

    def encode_text(self, prompts: list[str], size_conds: list[SizeCond] | None = None,
                    clip_skip: int | None = None, max_token_length: int | None = None) -> Conditioning:
        """Cross-attention context (and SDXL's y) as the WebUI computes it with CLIP skip 1, or at
        kohya's ``clip_skip`` (SD1/SD2) and in kohya's ``max_token_length`` chunks (see
        :func:`.conditioning.encode_text`; gradients flow wherever something requires grad)."""
        return encode_text(self.family, self.text_encoders, self.config["text_encoders"], prompts, size_conds,
                           resolution=self.resolution,
                           size_embed_dim=int(self.config.get("size_embed_dim", SIZE_EMBED_DIM)),
                           clip_skip=clip_skip_for(self.family, clip_skip)[0],
                           max_token_length=max_token_length, embeddings=self.embeddings)

    def embeddings_for(self, found: list[tuple[str, BundledEmbedding]]) -> tuple[list[BundledEmbedding], list[str]]:
        """Of the (LoRA, embedding) pairs the runtime found in the active files, those this model can use (the
        first of a name, fitting its text encoders, at most one chunk of vectors) and a message for each other."""
        widths = {"": self.text_encoders[0][1]} if self.family != "sdxl" else \
            {"clip_l": self.text_encoders[0][1], "clip_g": self.text_encoders[1][1]}
        widths = {k: _token_width(te) for k, te in widths.items()}
        usable, messages, names = [], [], set()
        for lora, emb in found:
            if emb.name in names:
                messages.append(f"{lora}: bundled embedding {emb.name!r} is also bundled in another LoRA of this "
                                "prompt — the first one is used")
                continue
            why = emb.misfit(widths) or (f"embedding {emb.name!r} has {emb.count} vectors, more than one chunk of "
                                         f"{CONTEXT_LENGTH - 2}" if emb.count > CONTEXT_LENGTH - 2 else None)
            if why:
                messages.append(f"{lora}: {why} — skipped")
                continue
            names.add(emb.name)
            usable.append(emb)
        return usable, messages

    # -- VAE ----------------------------------------------------------------------------------
    def encode_images(self, pixels: Tensor, sample: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """Pixels in [-1, 1] -> scaled latents; ``sample`` draws from the posterior like kohya, else its mean."""
        p = next(self.vae.parameters())
        with torch.no_grad():  # the VAE is never trained here
            dist = self.vae.encode(pixels.to(p.device, p.dtype)).latent_dist
            z = dist.sample(generator) if sample else dist.mean
        return z * self.scale_factor

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents -> pixels in about [-1, 1]."""
        p = next(self.vae.parameters())
        with torch.no_grad():
            return self.vae.decode(latents.to(p.device, p.dtype) / self.scale_factor).sample

    # -- training -----------------------------------------------------------------------------
    def trainable(self, device: torch.device | str | None = None,
                  latent_sampling: Literal["sample", "mean"] = "sample",
                  clip_skip: int | None = None, max_token_length: int | None = None) -> TrainableModel:
        """A :class:`TrainableModel` over these very modules (moved to ``device`` when given), its
        captions encoded at ``clip_skip`` (kohya's; SDXL ignores it, as sd-scripts does) and cut
        to kohya's ``max_token_length`` (None: no limit)."""
        if latent_sampling not in ("sample", "mean"):
            raise ValueError(f"latent_sampling must be 'sample' or 'mean', not {latent_sampling!r}")
        if device is not None:
            self.to(torch.device(device))
        def encode_images(pixels: Tensor) -> Tensor:
            # the posterior sample draws from the global RNG, which the trainer seeds per image: the
            # same latents whatever order (or process) encodes them in
            return self.encode_images(pixels, latent_sampling == "sample", None)

        skip = clip_skip_for(self.family, clip_skip)[0]

        def encode_text(prompts: list[str], size_conds: list[SizeCond] | None = None) -> Conditioning:
            return self.encode_text(prompts, size_conds, skip, max_token_length)

        h = self.hashes()
        return TrainableModel(
            family=self.family, unet=self.unet, text_encoders=list(self.text_encoders), encode_text=encode_text,
            encode_images=encode_images, alphas_cumprod=self.alphas_cumprod(), prediction=self.prediction,
            device=self.device, model_name=self.name, model_hash=h["sha256"], legacy_hash=h["legacy"],
            resolution=self.resolution, decode_latents=self.decode_latents, clip_skip=skip,
            max_token_length=max_token_length, tokenize_word=lambda w: [word_ids(w)] * len(self.text_encoders),
            render=lambda prompts, **kw: sample(self, prompts, clip_skip=skip, **kw))


# ---------------------------------------------------------------------------------------------
# Load / save


_REQUIRED = ("family", "unet", "text_encoders", "vae")


def resolve_config(sd: dict[str, Tensor], path: Path | None,
                   config: dict[str, Any] | None) -> tuple[dict[str, Any], str]:
    """(config, source) with source "explicit", "yaml" or "inferred" (the base an explicit partial config updates)."""
    if config and all(k in config for k in _REQUIRED):
        family, source = config["family"], "explicit"
        if family not in TEXT_LAYOUT:
            raise ArchitectureError(f"unknown family {family!r} (sd1, sd2, sdxl)")
        base: dict[str, Any] = {"prediction": "epsilon", "scale_factor": SCALE_FACTOR[family],
                                "schedule": dict(SCHEDULE),
                                "resolution": default_resolution(family, config.get("prediction", "epsilon"))}
        if family == "sdxl":
            base["size_embed_dim"] = SIZE_EMBED_DIM
    else:
        yaml_path = path.with_suffix(".yaml") if path is not None else None
        if yaml_path is not None and yaml_path.is_file():
            base, source = read_yaml_config(yaml_path, sd), "yaml"
        else:
            base, source = infer_config(sd), "inferred"
        if config:
            source += "+explicit"
    cfg = merge_config(base, config or {})
    if cfg.get("family") not in TEXT_LAYOUT:
        raise ArchitectureError(f"unknown family {cfg.get('family')!r} (sd1, sd2, sdxl)")
    if cfg["prediction"] not in ("epsilon", "v"):
        raise ArchitectureError(f"unknown prediction type {cfg['prediction']!r} (epsilon, v)")
    return cfg, source


def _detect_v_prediction(unet: nn.Module, context_dim: int) -> bool:
    """The WebUI's test for SD2 files without a yaml (``is_using_v_parameterization_for_sd2``):
    at t=999 an epsilon model returns about the input, a v model about its negative."""
    p = next(unet.parameters())
    with torch.no_grad():
        x = torch.full((1, unet.in_channels, 8, 8), 0.5, dtype=p.dtype, device=p.device)
        ctx = torch.full((1, 2, context_dim), 0.5, dtype=p.dtype, device=p.device)
        out = unet(x, torch.tensor([999], device=p.device), context=ctx)
    return (out.float() - x.float()).mean().item() < -1


def load_checkpoint(path: str | os.PathLike, config: dict[str, Any] | None = None, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype | None = None,
                    progress: Callable[[str], None] | None = None) -> Checkpoint:
    """Open a single-file SD1/SD2/SDXL checkpoint through ``fileio.load_file`` (validated safetensors
    header; a legacy ``.ckpt`` is read tensors-only).  Modules come back frozen and in eval mode.
    ``progress`` is told each stage as it starts ("reading", "UNet", "text encoder", "VAE", ...)."""
    stage = progress or (lambda what: None)
    path = Path(path)
    stage("reading")
    sd, _ = load_file(path)
    cfg, source = resolve_config(sd, path, config)
    family = cfg["family"]
    where = f"{path.name} ({source})"
    with torch.device("meta"):
        unet = build_unet(cfg["unet"])
        tes = [(t["prefix"], build_text_encoder(t)) for t in cfg["text_encoders"]]
        vae = build_vae(cfg["vae"], cfg["scale_factor"])
    if [p for p, _ in tes] != [p for p, _, _ in TEXT_LAYOUT[family]]:
        raise ArchitectureError(f"{where}: text encoders {[p for p, _ in tes]} do not fit {family}")
    stage("UNet")
    materialize(unet, strip_prefix(sd, UNET_PREFIX), dtype, f"{where}: UNet", source)
    unet.dtype = dtype  # ldm's forward casts x to unet.dtype (set from use_fp16 otherwise)
    for i, ((prefix, te), (_, file_prefix, kind)) in enumerate(zip(tes, TEXT_LAYOUT[family])):
        if kind != ("hf_clip" if hasattr(te, "text_model") else "open_clip"):
            raise ArchitectureError(f"{where}: {prefix} must be {kind}")
        stage(f"text encoder {i + 1} of {len(tes)}" if len(tes) > 1 else "text encoder")
        t = text_encoder_state(sd, family, file_prefix)
        optional: dict[str, Callable[[], Tensor]] = {"logit_scale": lambda: torch.tensor(math.log(1 / 0.07))}
        if family == "sd2":  # unused by SD2 conditioning; some files drop it
            optional["text_projection"] = lambda te=te: torch.eye(te.transformer.width, te.text_projection.shape[1])
        t = {k: v for k, v in t.items() if not k.startswith("visual.") and k != "attn_mask"}  # mask is rebuilt
        materialize(te, t, dtype, f"{where}: {prefix}", source, optional if kind == "open_clip" else None)
    stage("VAE")
    vae_sd = strip_prefix(sd, VAE_PREFIX)
    if not vae_sd:
        raise ArchitectureError(f"{where}: no VAE weights (first_stage_model.*)")
    materialize(vae, ldm_to_diffusers(vae_sd, cfg["vae"]), vae_dtype or dtype, f"{where}: VAE", source)
    ck = Checkpoint(family, unet, tes, vae, cfg, path, source)
    for m in ck.modules():  # inference by default; the trainer sets (and restores) what it trains
        m.requires_grad_(False).eval()
    if torch.device(device) != torch.device("cpu"):
        stage(f"moving to {device}")
    ck.to(torch.device(device))
    given = config or {}
    if family == "sd2" and source.startswith("inferred") and "prediction" not in given:
        cfg["prediction"] = "v" if _detect_v_prediction(unet, cfg["unet"]["context_dim"]) else "epsilon"
        cfg["resolution"] = given.get("resolution", default_resolution(family, cfg["prediction"]))
    return ck


def save_checkpoint(checkpoint: Checkpoint, path: str | os.PathLike, dtype: torch.dtype | None = torch.float16,
                    yaml: bool = True, overwrite: bool = False) -> Path:
    """Write the single-file layout atomically (+ ``<stem>.yaml`` for the WebUI when ``yaml``).

    ``dtype`` casts floating tensors (None keeps them as held); fp32 round-trips bit for bit.
    """
    path = Path(path)
    yaml_path = path.with_suffix(".yaml")
    if not overwrite:
        for p in (path, yaml_path) if yaml else (path,):
            if p.exists():
                raise FileExistsError(f"{p} exists; pass overwrite=True to replace it")
    sd = {k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach())
          for k, v in checkpoint.state_dict().items()}
    family = checkpoint.family
    arch = families.modelspec_architecture(family, checkpoint.prediction)
    repo = "generative-models" if family == "sdxl" else "stablediffusion"
    meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": arch,
            "modelspec.implementation": f"https://github.com/Stability-AI/{repo}",
            "modelspec.title": path.stem, "modelspec.prediction_type": checkpoint.prediction}
    save_safetensors(sd, path, meta, overwrite=overwrite)
    if yaml:
        write_text_atomic(yaml_path, dump_webui_yaml(checkpoint.config))
    if checkpoint.path is not None and checkpoint.path.resolve() == path.resolve():
        checkpoint._hashes = {}  # overwrote the file it was loaded from
    return path


def _token_width(te: nn.Module) -> int:
    return token_table(te).weight.shape[1]
