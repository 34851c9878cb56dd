"""The WebUI's sidecar ``<stem>.yaml`` (ldm ``LatentDiffusion`` / sgm ``DiffusionEngine``), in both directions:
read into the architecture config (``config.py``), and written from it for the WebUI."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from .config import (SCALE_FACTOR, SCHEDULE, SGM_ONLY_UNET_OPTIONS, SIZE_EMBED_DIM, ArchitectureError,
                     default_resolution, infer_family, infer_text_encoders, merge_config)


def _plain(x: Any) -> Any:
    # what safe_dump writes and safe_load reads back the same: str keys, lists for tuples
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def config_from_yaml(doc: dict[str, Any], sd: dict[str, Tensor], where: str = "yaml") -> dict[str, Any]:
    """Config from an ldm (``LatentDiffusion``) or sgm (``DiffusionEngine``) yaml plus the file's shapes.

    The yaml gives UNet, VAE, prediction, scale factor and schedule; text-encoder widths come from
    shapes (ldm yamls name a preset instead), heads from our ``lora_workshop`` section if present.
    """
    try:
        model = doc["model"]
        params = model.get("params") or {}
        sgm = "DiffusionEngine" in str(model.get("target", ""))
        unet = dict(params["network_config" if sgm else "unet_config"]["params"])
        first = params["first_stage_config"]["params"]
        # attn_type (vanilla / vanilla-xformers) picks an implementation, not weights
        vae = {"embed_dim": int(first["embed_dim"]),
               "ddconfig": {k: v for k, v in first["ddconfig"].items() if k != "attn_type"}}
    except (KeyError, TypeError) as e:
        raise ArchitectureError(f"{where}: not an ldm/sgm model config (missing {e})") from None
    family = infer_family(sd.keys())
    # the yaml is authoritative for UNet and VAE, so only the text encoders are read off shapes
    cfg: dict[str, Any] = {"family": family, "text_encoders": infer_text_encoders(sd, family),
                           "schedule": dict(SCHEDULE)}
    if sgm != (family == "sdxl"):
        raise ArchitectureError(f"{where}: {'sgm' if sgm else 'ldm'} config does not fit this {family} checkpoint")
    for k in SGM_ONLY_UNET_OPTIONS:
        unet.pop(k, None)
    unet["use_checkpoint"] = False  # ldm's own checkpointing skips hooked LoRA params; the trainer decides
    if sgm:
        unet.setdefault("use_spatial_transformer", True)  # implied in sgm
        unet.setdefault("image_size", 32)
        scaling = str(((params.get("denoiser_config") or {}).get("params") or {})
                      .get("scaling_config", {}).get("target", ""))
        cfg["prediction"] = "v" if scaling.endswith("VScaling") else "epsilon"
        cfg["size_embed_dim"] = SIZE_EMBED_DIM
        for emb in (params.get("conditioner_config") or {}).get("params", {}).get("emb_models", []):
            if str(emb.get("target", "")).endswith("ConcatTimestepEmbedderND"):
                cfg["size_embed_dim"] = int(emb["params"]["outdim"])
    else:
        cfg["prediction"] = "v" if params.get("parameterization") == "v" else "epsilon"
        cfg["schedule"] = {k: type(v)(params.get(k, v)) for k, v in SCHEDULE.items()}
    cfg["unet"] = _plain(unet)
    cfg["vae"] = _plain(vae)
    cfg["scale_factor"] = float(params.get("scale_factor", SCALE_FACTOR[family]))
    cfg["resolution"] = default_resolution(family, cfg["prediction"])
    ours = doc.get("lora_workshop") or {}
    cfg = merge_config(cfg, _plain({k: v for k, v in ours.items() if k != "version"}))
    return cfg


def webui_yaml(config: dict[str, Any]) -> dict[str, Any]:
    """The sidecar yaml the WebUI needs to load a checkpoint with this config.

    Mirrors v1-inference.yaml / v2-inference(-v).yaml / sd_xl_base.yaml with this model's UNet
    and VAE sizes.  The WebUI builds text encoders from fixed presets, so it needs, offline:
    SD1 / SDXL te1 - ``openai/clip-vit-large-patch14``'s tokenizer and config.json in the HF cache
    (``FrozenCLIPEmbedder`` calls ``from_pretrained``; the weights come from the checkpoint);
    SD2 / SDXL te2 - nothing (open_clip bundles the ViT-H-14 / ViT-bigG-14 configs and the BPE).
    Hence only real-width text encoders load there; toy widths are for this host and tests.  Our
    own ``lora_workshop`` section (ignored by the WebUI) keeps what the presets cannot express.
    """
    family, u, v = config["family"], dict(config["unet"]), config["vae"]
    vae = {"embed_dim": v["embed_dim"], "monitor": "val/rec_loss", "ddconfig": dict(v["ddconfig"]),
           "lossconfig": {"target": "torch.nn.Identity"}}
    ours = {"version": 1, "text_encoders": config["text_encoders"], "resolution": config["resolution"]}
    u["use_checkpoint"] = True  # as the stock yamls; the WebUI and we both override it
    if family == "sdxl":
        ted = config.get("size_embed_dim", SIZE_EMBED_DIM)
        ours["size_embed_dim"] = ted
        for k in ("image_size", "use_spatial_transformer"):  # not sgm UNetModel arguments
            u.pop(k, None)
        u["spatial_transformer_attn_type"] = "softmax-xformers"
        te1 = config["text_encoders"][0]
        scaling = "VScaling" if config["prediction"] == "v" else "EpsScaling"
        size_emb = [{"is_trainable": False, "input_key": key,
                     "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
                     "params": {"outdim": ted}}
                    for key in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")]
        params = {
            "scale_factor": config["scale_factor"], "disable_first_stage_autocast": True,
            "denoiser_config": {"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser", "params": {
                "num_idx": config["schedule"]["timesteps"],
                "scaling_config": {"target": f"sgm.modules.diffusionmodules.denoiser_scaling.{scaling}"},
                "discretization_config": {
                    "target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}}},
            "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": u},
            "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": [
                {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
                 "params": {"layer": "hidden", "layer_idx": te1["layers"] - 1}},  # penultimate: hidden_states[-2]
                {"is_trainable": False, "input_key": "txt",
                 "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
                 "params": {"arch": "ViT-bigG-14", "version": "laion2b_s39b_b160k", "freeze": True,
                            "layer": "penultimate", "always_return_pooled": True, "legacy": False}},
                *size_emb]}},
            "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper",
                                   "params": dict(vae, ddconfig=dict(vae["ddconfig"], attn_type="vanilla-xformers"))},
        }
        return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": params}, "lora_workshop": ours}
    sched = config["schedule"]
    params = {"linear_start": sched["linear_start"], "linear_end": sched["linear_end"], "num_timesteps_cond": 1,
              "log_every_t": 200, "timesteps": sched["timesteps"], "first_stage_key": "jpg", "cond_stage_key": "txt",
              "image_size": 64, "channels": 4, "cond_stage_trainable": False, "conditioning_key": "crossattn",
              "monitor": "val/loss_simple_ema", "scale_factor": config["scale_factor"], "use_ema": False,
              "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": u},
              "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": vae}}
    if config["prediction"] == "v":
        params = {"parameterization": "v", **params}
    if family == "sd1":
        params["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
    else:
        params["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                                       "params": {"freeze": True, "layer": "penultimate"}}
    return {"model": {"base_learning_rate": 1.0e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                      "params": params}, "lora_workshop": ours}


def read_yaml_config(yaml_path: Path, sd: dict[str, Tensor]) -> dict[str, Any]:
    """The config a sidecar yaml file gives, with ``sd``'s shapes for what the yaml leaves out."""
    import yaml

    with open(yaml_path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    if not isinstance(doc, dict):
        raise ArchitectureError(f"{yaml_path.name}: not a yaml mapping")
    return config_from_yaml(doc, sd, yaml_path.name)


def dump_webui_yaml(config: dict[str, Any]) -> str:
    """:func:`webui_yaml` as the text of a ``<stem>.yaml`` file."""
    import yaml

    return yaml.safe_dump(_plain(webui_yaml(config)), sort_keys=False)
