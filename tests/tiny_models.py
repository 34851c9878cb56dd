"""Tiny, randomly initialised SD1 / SD2 / SDXL models for tests (CPU, offline, deterministic).

The UNets are Stability-AI's own ``ldm`` ``UNetModel`` (what the WebUI runs) so module names match
real checkpoints exactly; only the widths are tiny. Text encoders are the real classes the WebUI
holds: HF ``CLIPTextModel`` (SD1, SDXL te1) and an ``open_clip.model.CLIP`` with ``.visual`` deleted
(SD2, SDXL te2), exactly like ``FrozenOpenCLIPEmbedder.model``.

For cross-checking against diffusers, ``to_diffusers_unet`` / ``to_diffusers_text_encoder`` convert
with diffusers' own single-file conversion code, and ``diffusers_fused_weights`` loads + fuses a
kohya-format LoRA through diffusers' pipeline LoRA loader.

Plain functions only; wrap them in pytest fixtures where needed (building is ~0.1-0.5 s each).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import timestep_embedding

from lib_lora.hosts.cli.sdxl_unet import SDXLUNetModel  # the same class the CLI host loads SDXL checkpoints into

if TYPE_CHECKING:
    import diffusers
    import transformers

# SD-family sizes (real values in comments). GroupNorm(32, ch) forces channel multiples of 32.
MODEL_CHANNELS = 32        # real 320
HEAD_CHANNELS = 16         # SD2/SDXL num_head_channels, real 64
SD1_HEADS = 2              # SD1 num_heads, real 8
CLIP_WIDTH = 32            # HF CLIP text width (SD1 te, SDXL te1), real 768
OPENCLIP_WIDTH = 64        # open_clip text width (SD2 te, SDXL te2), real 1024 / 1280
OPENCLIP_EMBED_DIM = 48    # open_clip text_projection out dim; real == width, non-square here to catch .T bugs
TEXT_LAYERS = 2
TEXT_HEADS = 2
VOCAB_SIZE = 49408         # real vocab so open_clip's bundled tokenizer ids fit
CONTEXT_LENGTH = 77
SDXL_TIME_EMBED_DIM = 16   # per-scalar size of SDXL's size/crop time_ids embedding, real 256
SDXL_ADM_IN = OPENCLIP_EMBED_DIM + 6 * SDXL_TIME_EMBED_DIM  # pooled te2 + 6 time ids, real 2816
LATENT_SIZE = 8            # smallest spatial size that survives 3 downsamplings


@dataclass
class TinyModel:
    family: str                                   # "sd1" | "sd2" | "sdxl"
    unet: UNetModel
    text_encoders: list[tuple[str, nn.Module]]    # [(kohya prefix, module)], e.g. [("te1", ...), ("te2", ...)]
    config: dict[str, Any] = field(default_factory=dict)  # ldm/sgm UNet kwargs; rebuild with build_ldm_unet


# ---------------------------------------------------------------------------------------------
# UNet


def _unet_config(family: str) -> dict[str, Any]:
    common = dict(image_size=LATENT_SIZE, in_channels=4, out_channels=4, model_channels=MODEL_CHANNELS,
                  num_res_blocks=2, use_spatial_transformer=True, use_checkpoint=False, legacy=False)
    if family == "sd1":  # v1-inference.yaml
        return dict(common, attention_resolutions=[4, 2, 1], channel_mult=[1, 2, 4, 4], num_heads=SD1_HEADS,
                    transformer_depth=1, context_dim=CLIP_WIDTH)
    if family == "sd2":  # v2-inference.yaml
        return dict(common, attention_resolutions=[4, 2, 1], channel_mult=[1, 2, 4, 4],
                    num_head_channels=HEAD_CHANNELS, transformer_depth=1, context_dim=OPENCLIP_WIDTH,
                    use_linear_in_transformer=True)
    if family == "sdxl":  # sd_xl_base.yaml (attention on levels 1, 2 only)
        return dict(common, attention_resolutions=[4, 2], channel_mult=[1, 2, 4],
                    num_head_channels=HEAD_CHANNELS, transformer_depth=2,
                    context_dim=CLIP_WIDTH + OPENCLIP_WIDTH, use_linear_in_transformer=True,
                    num_classes="sequential", adm_in_channels=SDXL_ADM_IN)
    raise ValueError(family)


def build_ldm_unet(config: dict[str, Any]) -> UNetModel:
    """Build an ldm UNet from a config dict (``TinyModel.config``); weights are NOT randomised here."""
    if config.get("num_classes") == "sequential":
        return SDXLUNetModel(**config)
    return UNetModel(**config)


def _randomize(module: nn.Module) -> None:
    """Make every weight informative: ldm zero-inits out convs / proj_out, and norms start at 1/0,
    which would let wrong key mappings and no-op merges pass unnoticed."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and not m.weight.any():
            m.reset_parameters()
        elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
            with torch.no_grad():
                m.weight.copy_(1 + 0.1 * torch.randn_like(m.weight))
                m.bias.copy_(0.1 * torch.randn_like(m.bias))


# ---------------------------------------------------------------------------------------------
# Text encoders


def _hf_clip_config(width: int, act: str, projection_dim: int | None = None) -> "transformers.CLIPTextConfig":
    import transformers

    # bos/eos/pad = 0/2/1 like the real SD configs: eos_token_id == 2 selects the legacy
    # "argmax of input_ids" pooling, which is also what open_clip does.
    return transformers.CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS, max_position_embeddings=CONTEXT_LENGTH, hidden_act=act,
        projection_dim=projection_dim or width, bos_token_id=0, eos_token_id=2, pad_token_id=1,
        attn_implementation="eager")


def build_hf_clip(width: int = CLIP_WIDTH) -> nn.Module:
    """HF ``CLIPTextModel`` like SD1's / SDXL te1's (quick_gelu); names ``text_model.encoder.layers.N...``."""
    import transformers

    return transformers.CLIPTextModel(_hf_clip_config(width, "quick_gelu")).eval()


def build_open_clip(width: int = OPENCLIP_WIDTH, embed_dim: int = OPENCLIP_EMBED_DIM) -> nn.Module:
    """open_clip ``CLIP`` without ``.visual`` == ``FrozenOpenCLIPEmbedder(2).model`` in the WebUI."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=1, width=32, head_width=16, image_size=8, patch_size=4)  # deleted below
    text = CLIPTextCfg(context_length=CONTEXT_LENGTH, vocab_size=VOCAB_SIZE, width=width, heads=TEXT_HEADS,
                       layers=TEXT_LAYERS)
    model = CLIP(embed_dim, vision, text)
    del model.visual
    return model.eval()


def open_clip_forward(model: nn.Module, tokens: torch.Tensor) -> dict[str, Any]:
    """Run an open_clip text tower the way FrozenOpenCLIPEmbedder does, keeping every layer.

    Returns ``hidden_states`` (embeddings + output of each resblock, like HF ``output_hidden_states``),
    ``last_hidden_state`` (ln_final of the last layer) and ``text_embeds`` (pooled @ text_projection).
    """
    x = model.token_embedding(tokens) + model.positional_embedding
    batch_first = getattr(model.transformer, "batch_first", False)
    hidden = [x]
    for r in model.transformer.resblocks:
        # Older open_clip (the WebUI's) is sequence-first; 3.x defaults to batch-first.
        h = r(x if batch_first else x.permute(1, 0, 2), attn_mask=model.attn_mask)
        x = h if batch_first else h.permute(1, 0, 2)
        hidden.append(x)
    last = model.ln_final(x)
    pooled = last[torch.arange(last.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection
    return {"hidden_states": hidden, "last_hidden_state": last, "text_embeds": pooled}


# ---------------------------------------------------------------------------------------------
# Builders


def _build(family: str, seed: int) -> TinyModel:
    config = _unet_config(family)
    with torch.random.fork_rng(devices=[]):  # deterministic without touching the caller's RNG
        torch.manual_seed(seed)
        unet = build_ldm_unet(config)
        if family == "sd1":
            tes: list[tuple[str, nn.Module]] = [("te", build_hf_clip())]
        elif family == "sd2":
            tes = [("te", build_open_clip())]
        else:
            tes = [("te1", build_hf_clip()), ("te2", build_open_clip())]
        for m in [unet] + [te for _, te in tes]:
            _randomize(m)
    return TinyModel(family, unet.eval(), tes, copy.deepcopy(config))


def build_sd1(seed: int = 0) -> TinyModel:
    return _build("sd1", seed)


def build_sd2(seed: int = 0) -> TinyModel:
    return _build("sd2", seed)


def build_sdxl(seed: int = 0) -> TinyModel:
    return _build("sdxl", seed)


def sdxl_y(text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """sgm's SDXL ``y`` vector: pooled te2 output ++ timestep embeddings of the 6 size/crop ids
    (same as diffusers' ``text_time`` add-embedding input)."""
    t = timestep_embedding(time_ids.flatten(), SDXL_TIME_EMBED_DIM).reshape(time_ids.shape[0], -1)
    return torch.cat([text_embeds, t.to(text_embeds.dtype)], dim=-1)


# ---------------------------------------------------------------------------------------------
# diffusers equivalents


def diffusers_unet_config(tiny: TinyModel) -> dict[str, Any]:
    """UNet2DConditionModel config, made by diffusers' ``create_unet_diffusers_config_from_ldm``."""
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    original = {"model": {"params": {"unet_config": {"params": tiny.config},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    cfg = create_unet_diffusers_config_from_ldm(original, {})
    cfg["sample_size"] = LATENT_SIZE
    if tiny.family == "sdxl":
        # diffusers recognises SDXL only by context_dim in (2048, 1280); set what it would for SDXL.
        cfg.update(class_embed_type=None, addition_embed_type="text_time",
                   addition_time_embed_dim=SDXL_TIME_EMBED_DIM)
    return cfg


def _ldm_unet_checkpoint(tiny: TinyModel) -> dict[str, Any]:
    from diffusers.loaders.single_file_utils import LDM_UNET_KEY  # "model.diffusion_model."

    return {LDM_UNET_KEY + k: v for k, v in tiny.unet.state_dict().items()}


def to_diffusers_unet(tiny: TinyModel) -> "diffusers.UNet2DConditionModel":
    """Equivalent diffusers UNet; weights converted by ``convert_ldm_unet_checkpoint``, loaded strictly."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    cfg = diffusers_unet_config(tiny)
    unet = UNet2DConditionModel(**cfg)
    sd = convert_ldm_unet_checkpoint(_ldm_unet_checkpoint(tiny), cfg)
    unet.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True)
    return unet.eval()


def ldm_name_to_diffusers_map(tiny: TinyModel) -> dict[str, str]:
    """UNet parameter names ldm -> diffusers (e.g. ``input_blocks.1.1.proj_in.weight`` ->
    ``down_blocks.0.attentions.0.proj_in.weight``), obtained by running diffusers' converter on a
    checkpoint whose values are the names themselves. Text encoders are not covered (HF CLIP names
    are identical; open_clip's fused in_proj splits into three, so it is not a 1:1 name map)."""
    from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

    names = {LDM_UNET_KEY + k: k for k in tiny.unet.state_dict()}
    converted = convert_ldm_unet_checkpoint(names, diffusers_unet_config(tiny))
    return {ldm: dif for dif, ldm in converted.items()}


# Checkpoint prefix of each open_clip tower; diffusers' converter behaves differently per prefix
# (SD2's drops text_projection, as diffusers' SD2 text_encoder is a plain CLIPTextModel).
_OPEN_CLIP_PREFIX = {"te": "cond_stage_model.model.", "te2": "conditioner.embedders.1.model."}


def to_diffusers_text_encoder(prefix_module: tuple[str, nn.Module]) -> nn.Module:
    """Equivalent transformers text encoder for one ``TinyModel.text_encoders`` entry.

    HF CLIP -> deepcopy. open_clip -> ``CLIPTextModel`` (SD2 "te") or ``CLIPTextModelWithProjection``
    (SDXL "te2"), converted by diffusers' ``convert_open_clip_checkpoint``. All layers are kept
    (diffusers' real SD2 encoder drops the last one; the tiny one keeps it so LoRAs on it can be
    compared).
    """
    import transformers
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    prefix, module = prefix_module
    if isinstance(module, transformers.PreTrainedModel):
        return copy.deepcopy(module).eval()
    width = module.token_embedding.embedding_dim
    cfg = _hf_clip_config(width, "gelu", projection_dim=module.text_projection.shape[1])
    cls = transformers.CLIPTextModelWithProjection if prefix == "te2" else transformers.CLIPTextModel
    hf = cls(cfg)
    ckpt_prefix = _OPEN_CLIP_PREFIX[prefix]
    ckpt = {ckpt_prefix + k: v for k, v in module.state_dict().items()}
    sd = convert_open_clip_checkpoint(hf, ckpt, prefix=ckpt_prefix)
    hf.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True)
    return hf.eval()


def _tiny_vae() -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), layers_per_block=1, latent_channels=4)


def build_diffusers_pipeline(tiny: TinyModel) -> Any:
    """StableDiffusionPipeline (sd1/sd2) or StableDiffusionXLPipeline (sdxl) assembled offline from the
    converted parts, a tiny random VAE and a default DDIM scheduler. Tokenizers are None (none can be
    loaded offline), so use it for LoRA loading/fusing or call it with ``prompt_embeds``."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    tes = [to_diffusers_text_encoder(pm) for pm in tiny.text_encoders]
    scheduler = DDIMScheduler(clip_sample=False, steps_offset=1)  # explicit: avoids deprecation noise
    parts = dict(vae=_tiny_vae(), unet=to_diffusers_unet(tiny), scheduler=scheduler)
    if tiny.family == "sdxl":
        return StableDiffusionXLPipeline(text_encoder=tes[0], text_encoder_2=tes[1], tokenizer=None,
                                         tokenizer_2=None, add_watermarker=False, **parts)
    return StableDiffusionPipeline(text_encoder=tes[0], tokenizer=None, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False, **parts)


def diffusers_fused_weights(tiny: TinyModel, kohya_state_dict: dict[str, torch.Tensor],
                            scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Weights after diffusers loads and fuses a kohya-format LoRA (``lora_unet_*`` / ``lora_te_*`` /
    ``lora_te1_*`` / ``lora_te2_*`` with ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``).

    Path: ``pipe.load_lora_weights(dict)`` (-> ``lora_state_dict`` -> for SDXL
    ``_maybe_map_sgm_blocks_to_diffusers`` + ``_convert_non_diffusers_lora_to_diffusers`` -> PEFT),
    ``pipe.fuse_lora(lora_scale=scale)``, ``pipe.unload_lora_weights()``.
    Keys: ``unet.<diffusers name>``, ``text_encoder.<HF name>``, ``text_encoder_2.<HF name>``.
    Limitation (diffusers 0.39): a text-encoder LoRA with ``self_attn_{q,k,v}_proj`` keys but no
    ``self_attn_out_proj`` key is mis-detected by ``convert_state_dict_to_diffusers`` (only
    ``to_out_lora`` marks the old format), so its attention keys are silently dropped (or the load
    fails); we raise instead. Real kohya LoRAs always train out_proj too.
    Note diffusers expects kohya SD1/SD2 UNet keys in diffusers naming (``lora_unet_down_blocks_...``,
    as kohya trains those on diffusers) and SDXL ones in sgm naming (``lora_unet_input_blocks_...``).
    """
    _check_te_attention_lora(kohya_state_dict)
    pipe = build_diffusers_pipeline(tiny)
    components = list(pipe._lora_loadable_modules)
    pipe.load_lora_weights({k: v.clone() for k, v in kohya_state_dict.items()})
    pipe.fuse_lora(components=components, lora_scale=scale)
    pipe.unload_lora_weights()  # drops PEFT wrappers; fused base weights stay
    out: dict[str, torch.Tensor] = {}
    for name in components:
        for k, v in getattr(pipe, name).state_dict().items():
            out[f"{name}.{k}"] = v
    return out


def _check_te_attention_lora(kohya_state_dict: dict[str, torch.Tensor]) -> None:
    for prefix in ("lora_te_", "lora_te1_", "lora_te2_"):
        names = {k.split(".")[0] for k in kohya_state_dict if k.startswith(prefix)}
        has_qkv = any(n.endswith(("_self_attn_q_proj", "_self_attn_k_proj", "_self_attn_v_proj")) for n in names)
        if has_qkv and not any(n.endswith("_self_attn_out_proj") for n in names):
            raise ValueError(f"{prefix}* LoRA has self_attn q/k/v but no out_proj: diffusers would drop it "
                             "(see diffusers_fused_weights docstring)")
