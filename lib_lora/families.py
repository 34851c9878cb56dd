"""The base-model families (SD1, SD2, SDXL, SD3): their names, how files spell them, and which one
a LoRA file was made for."""
from __future__ import annotations

FAMILIES = ("sd1", "sd2", "sdxl", "sd3")
# LDM/SGM UNet families: trainable, buildable from a published layout, bakeable (SD3 LoRAs only apply)
UNET_FAMILIES = ("sd1", "sd2", "sdxl")
# what the user reads; also the names of the WebUI's ``SdVersion`` (card filtering by model version)
_DISPLAY = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "sd3": "SD3"}
# kohya's ``ss_base_model_version`` as sd-scripts writes it
SS_BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
# cross-attention context width of each family's UNet (attn2.to_k input features)
_CONTEXT_DIMS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def family_from_metadata(meta: dict[str, str]) -> str | None:
    base = meta.get("ss_base_model_version", "").lower()
    arch = meta.get("modelspec.architecture", "").lower()
    if base.startswith("sd3") or arch.startswith("stable-diffusion-3"):
        return "sd3"
    if base.startswith("sdxl") or arch.startswith("stable-diffusion-xl"):
        return "sdxl"
    if arch.startswith("stable-diffusion-v2") or base.startswith("sd_v2") or base.startswith("sd_2") \
            or meta.get("ss_v2", "").lower() == "true":
        return "sd2"
    if arch.startswith("stable-diffusion-v1") or base.startswith("sd_v1") or meta.get("ss_v2", "").lower() == "false":
        return "sd1"
    return None


def family_from_keys(module_keys: set[str], shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Guess from key spelling and layer widths; ``shapes`` maps 'module.role' to shape."""
    if any(k.startswith(("lora_unet_joint_blocks_", "lora_transformer_", "lora_te3_")) for k in module_keys):
        return "sd3"  # MMDiT paths (kohya), SD3Transformer2DModel paths (diffusers), T5 (only SD3 has one)
    if any(k.startswith("lora_te2_") for k in module_keys):
        return "sdxl"
    # the cross-attention width is the UNet's own; it goes before the spelling, since the built-in
    # also applies SD1/SD2 files spelled the LDM way
    for key, shape in shapes.items():
        if "attn2_to_k" in key and len(shape) >= 2:
            role = key.split(".", 1)[1] if "." in key else ""
            width = shape[1] if role in ("lora_down.weight", "hada_w1_b", "diff") else None
            if width in _CONTEXT_DIMS:
                return _CONTEXT_DIMS[width]
    if any(k.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_"))
           for k in module_keys):
        return "sdxl"  # kohya spells only SDXL UNets the SGM way
    # te1 alone is weaker evidence: diffusers' convert_state_dict_to_kohya writes it for SD1 files too
    if any(k.startswith("lora_te1_") for k in module_keys):
        return "sdxl"
    return None


def detect_family(meta: dict[str, str], module_keys: set[str], shapes: dict[str, tuple[int, ...]]) -> str | None:
    return family_from_keys(module_keys, shapes) or family_from_metadata(meta)


def display(family: str | None, unknown: str = "unknown") -> str:
    """"SD1", "SDXL"…, or ``unknown`` for None or a name we do not know."""
    return _DISPLAY.get(family or "", unknown)


def modelspec_architecture(family: str, prediction: str = "epsilon") -> str:
    """The base model's ``modelspec.architecture`` (SD2 depends on its prediction type)."""
    if family == "sd2":
        return "stable-diffusion-v2-768-v" if prediction == "v" else "stable-diffusion-v2-512"
    return {"sd1": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base"}[family]
