"""LoRA Block Weight in the real WebUI: two LoRAs for the tiny checkpoint and the prompts that the
e2e suite renders twice, once with LoRA Workshop and once with the built-in Lora extension plus
LBW itself (hako-mikan/sd-webui-lora-block-weight, ``WEBUI_E2E_LBW_DIR``), to compare the pixels.

The LoRAs change every 2-D layer of the tiny UNet (resnet convs and time projections, skip
connections, down/upsampler convs, attention, feed-forward, proj_in/out, ``conv_in``, and
``time_embed``/``out`` outside every block) and every linear layer of the text encoder's
transformer (BASE).  The tiny UNet has one resnet per level, so its layers sit in IN00-IN07,
M00 and OUT00-OUT07.  Their keys are in LDM spelling (``lora_unet_input_blocks_3_1_...``): the
built-in maps diffusers spellings by SD1's layout (two resnets per level), which would put
``down_blocks_1`` on IN04, a layer the tiny UNet lacks, while LDM names mean the same layer to
both extensions and are the names LBW reads its blocks from.
"""
from __future__ import annotations

import re
from pathlib import Path

NAMES = ("lbw_a", "lbw_b")
RANK, ALPHA = 4, 2.0          # scale 1/2: a power of two, exact in either order of multiplication

_LDM_UNET = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks|time_embed|out)_")

# LBW's 26-slot order: BASE IN00-IN11 M00 OUT00-OUT11
_V17_BINARY = "1,1,0,1,0,1,0,1,1,0,1,0,1,1,0,1,0"
_V17_FRACTIONS = "0.3,0.7,0.3,1,0.7,0.3,0.7,0.3,0.7,0.3,1,0.7,0.3,0.7,0.3,0.7,0.3"
_V26_FRACTIONS = ",".join(("0.7", *("0.3", "0.7", "1.3") * 4, "0.3", *("0.7", "-0.3", "0.3") * 4))
_V17_X = "1,X,X+0.25,X-0.25,0,X,1,X+0.25,X,0,X-0.25,X,1,X,X+0.25,0,X"

# (label, prompt, txt2img overrides); the first one has no lbw= and measures the plain LoRA
PROMPTS: list[tuple[str, str, dict]] = [
    ("plain LoRA, no lbw=", "a photo <lora:lbw_a:1>", {}),
    ("preset MIDD", "a photo <lora:lbw_a:1:lbw=MIDD>", {}),
    ("preset OUTD through w=", "a photo <lora:lbw_a:1:w=OUTD>", {}),
    ("17 values, 0/1", f"a photo <lora:lbw_a:1:lbw={_V17_BINARY}>", {}),
    ("17 fractional values, te 0.6 unet 0.9", f"a photo <lora:lbw_a:0.6:0.9:lbw={_V17_FRACTIONS}>", {}),
    ("26 values, fractional and negative", f"a photo <lora:lbw_a:1:lbw={_V26_FRACTIONS}>", {}),
    ("X with x=0.5", f"a photo <lora:lbw_a:1:lbw={_V17_X}:x=0.5>", {}),
    ("two LoRAs, different vectors", f"a photo <lora:lbw_a:1:lbw=OUTD> <lora:lbw_b:0.8:lbw={_V17_FRACTIONS}>", {}),
    ("start=3 of 6 steps", "a photo <lora:lbw_a:1:lbw=MIDD:start=3>", {"steps": 6}),
    ("stop=3 of 6 steps", f"a photo <lora:lbw_b:1:lbw={_V17_FRACTIONS}:stop=3>", {"steps": 6}),
]


def ldm_key(target) -> str | None:
    """The key the built-in and LBW both read as this layer: LDM spelling for the UNet, the
    kohya key of the text encoder's transformer layers; None for layers left out."""
    if target.is_text_encoder:
        return target.key if "_encoder_layers_" in target.key else None
    return next((k for k in (target.key, *target.aliases) if _LDM_UNET.match(k)), None)


def write_lbw_loras(folder: Path) -> dict[str, Path]:
    """``NAMES`` as kohya LoRA files in ``folder`` (other random factors each); each layer's delta
    is 0.3 of its weight's spread, so that every block visibly matters and no image saturates."""
    import torch

    from lib_lora.fileio import save_safetensors
    from lib_lora.modelmap import ModelMap
    from webui_server import tiny_modules

    unet, _, te = tiny_modules()
    mm = ModelMap.build("sd1", unet, [("te", te)])
    out = {}
    for seed, name in enumerate(NAMES, start=11):
        g = torch.Generator().manual_seed(seed)
        sd = {}
        for t in mm.targets:
            w, key = t.weight(), ldm_key(t)
            if key is None or w.dim() < 2:
                continue
            down = torch.randn(RANK, *w.shape[1:], generator=g)
            up = torch.randn(w.shape[0], RANK, *([1] * (w.dim() - 2)), generator=g)
            delta = up.flatten(1) @ down.flatten(1) * (ALPHA / RANK)
            up *= 0.3 * w.float().std() / delta.std()
            sd.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up.contiguous(),
                       f"{key}.alpha": torch.tensor(ALPHA)})
        out[name] = save_safetensors(sd, folder / f"{name}.safetensors", metadata={"ss_base_model_version": "sd_v1"})
    return out


def blocks_touched() -> list[str]:
    """The LBW blocks the LoRAs change (None: layers outside every block)."""
    from lib_lora.blockweights import BLOCK_IDS, target_block
    from lib_lora.modelmap import ModelMap
    from webui_server import tiny_modules

    unet, _, te = tiny_modules()
    mm = ModelMap.build("sd1", unet, [("te", te)])
    found = {target_block([t.key, *t.aliases]) for t in mm.targets if ldm_key(t) and t.weight().dim() >= 2}
    return [b for b in BLOCK_IDS if b in found] + (["outside"] if None in found else [])
