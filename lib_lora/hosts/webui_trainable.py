"""The WebUI's loaded model as the trainer sees it (written against v1.10.1): whether it can be
trained on (``refusal``), and the ``TrainableModel`` over its own modules (``trainable_model``).

Nothing is copied or reloaded: the trainer gets the WebUI's own modules (``sd_model.model
.diffusion_model`` and the text encoders where ``webui_model`` finds them) and the WebUI's own
paths around them:

- captions -> conditioning: SD1/SD2 call ``sd_model.cond_stage_model(captions)`` (the hijacked
  embedder the WebUI prompts through: emphasis, embeddings, >75 tokens) like the WebUI's
  embedding training does, at the run's clip skip (``text_encoding``), not the WebUI's Clip skip
  setting, which stays the user's for generations; SDXL calls ``sd_model.conditioner(batch)`` with per-image
  ``original_size_as_tuple`` / ``crop_coords_top_left`` / ``target_size_as_tuple`` and takes
  ``crossattn`` and ``vector``.  sgm runs embedders without gradients unless ``is_trainable``,
  so that flag (and ``ucg_rate`` = 0) is set for the duration of the call only.
- images -> latents: ``encode_first_stage`` + ``get_first_stage_encoding`` under no_grad, with
  the VAE's sampling noise seeded from the image itself (same latents on a resumed run, and the
  global RNG untouched).
"""
from __future__ import annotations

import sys
import threading
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from modules import shared

from .. import families
from ..params import literal_caption
from ..training.checks import clip_skip_for
from ..training.model import Conditioning, TrainableModel
from .webui_builtin import builtin_networks_module
from .webui_model import model_family, text_encoder_roots, unet_root

_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
             if hasattr(torch, n))


# -- what is loaded ---------------------------------------------------------------------------------


def loaded_model() -> Any:
    """The loaded model without triggering a load: ``shared.sd_model`` loads one on first access."""
    sd_models = sys.modules.get("modules.sd_models")
    data = getattr(sd_models, "model_data", None)
    if data is not None and hasattr(data, "sd_model"):
        return data.sd_model
    return getattr(shared, "sd_model", None)


def is_sdxl_refiner(sd_model: Any) -> bool:
    """The SDXL refiner: OpenCLIP-G only (no CLIP-L) and an aesthetic-score embedder."""
    embedders = getattr(getattr(sd_model, "conditioner", None), "embedders", None) or []
    if any(getattr(e, "input_key", None) == "aesthetic_score" for e in embedders):
        return True
    roots = text_encoder_roots(sd_model, "sdxl")
    return bool(embedders) and not any(prefix == "te1" for prefix, _ in roots)


def uses_fp8(sd_model: Any, family: str) -> bool:
    setting = getattr(shared.opts, "fp8_storage", "Disable")
    if setting is True or setting == "Enable" or (setting == "Enable for SDXL" and family == "sdxl"):
        return True
    unet = unet_root(sd_model)
    return isinstance(unet, torch.nn.Module) and any(p.dtype in _FP8 for p in unet.parameters())


def refusal(sd_model: Any) -> str | None:
    """Why training on ``sd_model`` is refused, or None."""
    if sd_model is None:
        return "no model is loaded: load an SD1, SD2 or SDXL checkpoint first"
    family = model_family(sd_model)
    if family not in families.UNET_FAMILIES:  # SD3 LoRAs can be applied, not trained
        return "the loaded model type cannot be trained on (SD1, SD2 and SDXL checkpoints can)"
    cmd = shared.cmd_opts
    if getattr(cmd, "lowvram", False) or getattr(cmd, "medvram", False) \
            or (getattr(cmd, "medvram_sdxl", False) and family == "sdxl") or getattr(sd_model, "lowvram", False):
        return ("training needs the whole model on the GPU: restart the WebUI without --lowvram / --medvram"
                + (" / --medvram-sdxl" if family == "sdxl" else ""))
    if family == "sdxl" and is_sdxl_refiner(sd_model):
        return "the SDXL refiner is loaded: LoRAs are trained on an SDXL base model; select one as the checkpoint"
    if uses_fp8(sd_model, family):
        return ("the model's weights are stored in FP8 (Settings > Optimizations > FP8 weight): training needs "
                "fp16/bf16/fp32 weights; disable FP8 and reload the checkpoint")
    unet = unet_root(sd_model)
    if not isinstance(unet, torch.nn.Module):
        return "the loaded model has no UNet where the WebUI keeps it (sd_model.model.diffusion_model)"
    if getattr(unet, "in_channels", 4) != 4:
        return (f"the loaded model's UNet takes {unet.in_channels} input channels (inpainting / instruct-pix2pix); "
                "train on a regular checkpoint")
    if not text_encoder_roots(sd_model, family):
        return "the loaded model's text encoder was not found where the WebUI keeps it"
    sd_unet = sys.modules.get("modules.sd_unet")
    if getattr(sd_unet, "current_unet", None) is not None:
        return "an alternative UNet (e.g. TensorRT) is active: set SD Unet to None/Automatic-off in Settings first"
    builtin = builtin_networks_module()
    if builtin is not None and getattr(builtin, "loaded_networks", None):
        return ("the built-in Lora extension has networks applied to the model; generate once without LoRAs "
                "(or disable it) before training")
    return None


def checkpoint_change_pending(sd_model: Any) -> bool:
    """The checkpoint setting names another model (its reload waits for our lock): do not render."""
    info = getattr(sd_model, "sd_checkpoint_info", None)
    wanted = getattr(shared.opts, "sd_model_checkpoint", None)
    if info is None or not wanted:
        return False
    names = {getattr(info, a, None) for a in ("title", "name", "model_name", "short_title")}
    if getattr(info, "shorthash", None):
        names.add(f"{getattr(info, 'name', '')} [{info.shorthash}]")
    return wanted not in names


# -- the model as the trainer sees it ------------------------------------------------------------------


def _param(module: torch.nn.Module) -> torch.Tensor:
    return next(module.parameters())


def _pixel_seed(pixels: torch.Tensor) -> int:
    return zlib.crc32(pixels.detach().float().cpu().numpy().tobytes())


@contextmanager
def _no_embedding_names() -> Iterator[None]:
    """Captions as kohya reads them: a word that happens to name a textual-inversion embedding
    stays that word (the WebUI's tokenizer would swap in the embedding's vectors, which no other
    tool does with this LoRA's trigger words).  Training holds the queue lock, so nothing else
    tokenizes meanwhile."""
    from modules import sd_hijack
    db = sd_hijack.model_hijack.embedding_db
    lookup, db.ids_lookup = db.ids_lookup, {}
    try:
        yield
    finally:
        db.ids_lookup = lookup


# the WebUI's settings its embedders read (modules/sd_hijack_clip.py, v1.10.1)
CLIP_SKIP_OPT, SDXL_CLIP_L_SKIP_OPT = "CLIP_stop_at_last_layers", "sdxl_clip_l_skip"


@contextmanager
def _options(values: dict[str, Any]) -> Iterator[None]:
    """WebUI settings held at ``values`` for the ``with`` block, then given back (even on error).

    Written into ``opts.data`` (what ``opts.X`` reads) without saving or callbacks; a value the
    user changed meanwhile is theirs and stays."""
    data = shared.opts.data
    saved = {k: data[k] for k in values if k in data}
    data.update(values)
    try:
        yield
    finally:
        for k, v in values.items():
            if data.get(k) == v:
                if k in saved:
                    data[k] = saved[k]
                else:
                    data.pop(k, None)


@contextmanager
def text_encoding(sd_model: Any, family: str, clip_skip: int | None) -> Iterator[None]:
    """The WebUI's embedders set to encode as sd-scripts trains, for the ``with`` block only.

    SD1: the Clip skip setting at ``clip_skip`` (unset: 1); the WebUI then takes the hidden state
    that far from the end and applies the final layer norm, as sd-scripts does.  SD2: the WebUI
    ignores its Clip skip setting; its embedder stops ``layer_idx`` blocks before the end
    (penultimate = 1, which is sd-scripts' clip skip 1), so that is set.  SDXL: sd-scripts
    ignores clip skip, so the "Clip skip SDXL" setting is held off (the first text encoder's
    fixed penultimate layer)."""
    if family == "sdxl":
        with _options({SDXL_CLIP_L_SKIP_OPT: False}):
            yield
        return
    if family == "sd1":
        with _options({CLIP_SKIP_OPT: int(clip_skip or 1)}):
            yield
        return
    embedder = getattr(sd_model.cond_stage_model, "wrapped", None)
    if clip_skip is None or getattr(embedder, "layer_idx", None) == clip_skip:
        yield
        return
    if not hasattr(embedder, "layer_idx"):
        raise RuntimeError(f"clip_skip {clip_skip}: the loaded SD2 model's text encoder has no layer_idx to set")
    before = embedder.layer_idx
    embedder.layer_idx = int(clip_skip)
    try:
        yield
    finally:
        embedder.layer_idx = before


def prompt_chunkers(sd_model: Any, family: str) -> list[Any]:
    """The WebUI's hijacked text embedders (``sd_hijack_clip``'s, with ``process_texts`` and ``empty_chunk``)
    that captions go through; empty when the loaded model's embedders are not those."""
    embedders = list(sd_model.conditioner.embedders) if family == "sdxl" else [sd_model.cond_stage_model]
    return [e for e in embedders if hasattr(e, "process_texts") and hasattr(e, "empty_chunk")]


_OLD_EMPHASIS = ("needs the WebUI's prompt chunking, which the \"Use old emphasis implementation\" setting "
                 "(Settings > Compatibility) replaces: turn it off, or leave max_token_length unset")


def _old_emphasis() -> bool:
    return bool(getattr(shared.opts, "use_old_emphasis_implementation", False))


def max_token_length_refusal(sd_model: Any, family: str) -> str | None:
    """Why kohya's ``max_token_length`` cannot be applied to the loaded model's captions (the message after
    "max_token_length: "), or None."""
    if _old_emphasis():
        return _OLD_EMPHASIS
    if not prompt_chunkers(sd_model, family):
        return "the loaded model's text encoder does not chunk prompts as the WebUI's does"
    return None


@contextmanager
def caption_chunks(embedders: list[Any], max_token_length: int | None) -> Iterator[None]:
    """kohya's ``max_token_length`` through the WebUI's own prompt chunking, for the ``with`` block.

    The WebUI cuts a prompt into chunks of 75 tokens (each encoded with its start and end tokens,
    a chunk breaking early at a comma near its end) and joins their outputs; a batch's shorter
    prompts get empty chunks.  With a limit of N tokens every caption gets exactly N / 75 chunks:
    the first ones kept, the rest cut, and empty chunks added to a shorter caption, as sd-scripts
    gives every caption N / 75 chunks.  Each embedder's ``process_texts`` is wrapped on the
    instance for this thread only (the WebUI's img2img token counter calls it without the queue
    lock), and what the instance had comes back after, also on an error.  The "old emphasis"
    setting, which can change between steps, bypasses the chunking: refused at each encoding."""
    if max_token_length is None:
        yield
        return
    if _old_emphasis():
        raise RuntimeError(f"max_token_length: {_OLD_EMPHASIS}")
    owner, saved = threading.get_ident(), []
    try:
        for e in embedders:
            saved.append((e, vars(e).get("process_texts", _ABSENT)))
            chunks = max(1, max_token_length // getattr(e, "chunk_length", 75))
            e.process_texts = _limited(e, e.process_texts, chunks, owner)
        yield
    finally:
        for e, before in reversed(saved):
            if before is _ABSENT:
                vars(e).pop("process_texts", None)
            else:
                vars(e)["process_texts"] = before


_ABSENT = object()


def _limited(embedder: Any, process_texts: Callable, chunks: int, owner: int) -> Callable:
    def limited(texts):
        batch_chunks, token_count = process_texts(texts)
        if threading.get_ident() != owner:  # not the training's encoding: the WebUI's own answer
            return batch_chunks, token_count
        fitted = [list(c[:chunks]) + [embedder.empty_chunk() for _ in range(chunks - len(c))] for c in batch_chunks]
        return fitted, min(token_count, chunks * getattr(embedder, "chunk_length", 75))
    return limited


def clip_skip_note(sd_model: Any, family: str, clip_skip: int | None) -> str | None:
    """A line for the job's log when the WebUI's own setting differs from what training uses."""
    opts = shared.opts
    users = getattr(opts, CLIP_SKIP_OPT, 1)
    if family == "sd1" and users != (clip_skip or 1):
        return (f"captions are encoded at clip skip {clip_skip or 1} (the run's clip_skip; unset = 1, as in "
                f"sd-scripts); the WebUI's Clip skip setting ({users}) stays for generations")
    if family == "sdxl" and getattr(opts, SDXL_CLIP_L_SKIP_OPT, False) is True:
        return ("the WebUI's \"Clip skip SDXL\" setting is on: training encodes without it (SDXL's fixed layers, "
                "as sd-scripts does); it stays on for generations")
    return None


def trainable_model(sd_model: Any, render: Callable[..., list] | None = None, model_map=None,
                    clip_skip: int | None = None, max_token_length: int | None = None) -> TrainableModel:
    """Wrap the WebUI's loaded model (call ``refusal`` first); captions are encoded at ``clip_skip``
    (kohya's; SDXL ignores it: ``training.checks.clip_skip_for``) and, with ``max_token_length``, in
    that many tokens' chunks (``caption_chunks``; ``max_token_length_refusal`` says when it cannot)."""
    family = model_family(sd_model)
    skip = clip_skip_for(family, clip_skip)[0]
    unet = unet_root(sd_model)
    tes = text_encoder_roots(sd_model, family)
    device = _param(unet).device
    unet_dtype = _param(unet).dtype
    v_pred = getattr(sd_model, "parameterization", "eps") == "v"
    chunkers = prompt_chunkers(sd_model, family) if max_token_length is not None else []

    if family == "sdxl":
        resolution = 1024

        def encode_text(captions: list[str], sizes=None) -> Conditioning:
            n = len(captions)
            sizes = sizes or [((resolution, resolution), (0, 0), (resolution, resolution))] * n

            def col(i: int) -> torch.Tensor:
                return torch.tensor([list(s[i]) for s in sizes], dtype=torch.float32, device=device)

            batch = {"txt": [literal_caption(c) for c in captions], "original_size_as_tuple": col(0),
                     "crop_coords_top_left": col(1),
                     "target_size_as_tuple": col(2)}
            embedders = list(sd_model.conditioner.embedders)
            saved = [(e, getattr(e, "is_trainable", False), getattr(e, "ucg_rate", 0.0)) for e in embedders]
            try:
                for e in embedders:
                    e.is_trainable = True   # sgm wraps non-trainable embedders in no_grad; the trainer decides
                    e.ucg_rate = 0.0        # no random caption dropout inside the conditioner
                with _no_embedding_names(), text_encoding(sd_model, family, None), \
                        caption_chunks(chunkers, max_token_length):
                    out = sd_model.conditioner(batch)
            finally:
                for e, trainable, ucg in saved:
                    e.is_trainable, e.ucg_rate = trainable, ucg
            return Conditioning(out["crossattn"].to(unet_dtype), out["vector"].to(unet_dtype))
    else:
        resolution = 768 if (family == "sd2" and v_pred) else 512

        def encode_text(captions: list[str], sizes=None) -> Conditioning:
            with _no_embedding_names(), text_encoding(sd_model, family, skip), \
                    caption_chunks(chunkers, max_token_length):
                context = sd_model.cond_stage_model([literal_caption(c) for c in captions])
            return Conditioning(context.to(unet_dtype))

    def tokenize_word(word: str) -> list[list[int]]:
        # the hijacked embedders' own tokenisers, as the prompt parser uses them
        embedders = ([e for e in sd_model.conditioner.embedders if hasattr(e, "tokenize")] if family == "sdxl"
                     else [sd_model.cond_stage_model])
        try:
            return [list(e.tokenize([word])[0]) for e in embedders]
        except AssertionError as e:   # OpenCLIP's tokenizer asserts that the old emphasis is off
            raise ValueError(f"cannot tokenise {word!r}: {e} (Settings → Stable Diffusion → "
                             "\"Use old emphasis implementation\" must be off)") from None

    vae = sd_model.first_stage_model

    def encode_images(pixels: torch.Tensor) -> torch.Tensor:
        vae_param = _param(vae)
        x = pixels.to(device=vae_param.device, dtype=vae_param.dtype)
        devices = [vae_param.device] if vae_param.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(_pixel_seed(pixels))
            z = sd_model.get_first_stage_encoding(sd_model.encode_first_stage(x))
        return z.float().to(device)

    acp = getattr(sd_model, "alphas_cumprod_original", None)
    if acp is None:
        acp = sd_model.alphas_cumprod
    acp = torch.as_tensor(acp).detach().to("cpu", torch.float32).clone()

    info = getattr(sd_model, "sd_checkpoint_info", None)
    filename = getattr(info, "filename", None)
    model_name = Path(filename).name if filename else (getattr(info, "title", None) or "")
    return TrainableModel(
        family=family, unet=unet, text_encoders=tes, encode_text=encode_text, encode_images=encode_images,
        alphas_cumprod=acp, prediction="v" if v_pred else "epsilon", device=device, model_name=model_name,
        model_hash=getattr(info, "sha256", None) or "", legacy_hash=getattr(info, "hash", None) or "",
        resolution=resolution, model_map=model_map, render=render, clip_skip=skip,
        max_token_length=max_token_length, tokenize_word=tokenize_word)


__all__ = ["loaded_model", "refusal", "checkpoint_change_pending", "trainable_model", "text_encoding",
           "clip_skip_note", "caption_chunks", "prompt_chunkers", "max_token_length_refusal"]
