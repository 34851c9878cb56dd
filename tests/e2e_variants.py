"""One small file of each kind LoRA Workshop reads, for the tiny e2e checkpoint (tests/webui_server.py).

Layer names and shapes come from the same module classes and configs the checkpoint is built
from.  The LyCORIS kinds are the lycoris-lora package's own modules wrapped around those layers,
saved as LyCORIS saves them (``lora_unet_<module>.<role>``); the others are spelled as their
producers write them (sd-scripts OFT, an integer-alpha kohya LoRA, a transformers-5 PEFT text
encoder file, a ``torch.save`` .pt).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from webui_server import tiny_modules

META = {"ss_base_model_version": "sd_v1"}
# name -> what it is; every file changes a few of the UNet's cross-attention linears, except peft_te
KINDS = {
    "e2e_diag_oft": "LyCORIS diag-OFT",
    "e2e_boft": "LyCORIS BOFT",
    "e2e_glora": "LyCORIS GLoRA",
    "e2e_loha": "LyCORIS LoHa",
    "e2e_dora": "LyCORIS LoRA with dora_scale",
    "e2e_oft_kohya": "sd-scripts OFT (oft_unet_ keys)",
    "e2e_int_alpha": "kohya LoRA with int64 alphas",
    "e2e_peft_te": "PEFT text encoder, transformers-5 keys",
    "e2e_pt": "kohya LoRA in a torch.save .pt",
}
DORA = "e2e_dora"


def _randomise(module: nn.Module, seed: int, std: float) -> None:
    """Every factor random and non-zero (LyCORIS zero-inits one side); DoRA magnitudes near ||W||."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "dora_scale":
                p.mul_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, std)


def _lycoris(targets, factory, seed: int, std: float) -> dict[str, torch.Tensor]:
    sd = {}
    for i, t in enumerate(targets):
        module = factory(t.key, t.module)
        _randomise(module, seed + i, std)
        sd.update({f"{t.key}.{k}": v.detach().clone().contiguous() for k, v in module.state_dict().items()})
    return sd


def _kohya_lora(targets, g: torch.Generator, alpha) -> dict[str, torch.Tensor]:
    sd = {}
    for t in targets:
        out_f, in_f = t.weight().shape
        sd[f"{t.key}.lora_down.weight"] = torch.randn(4, in_f, generator=g) * 0.3
        sd[f"{t.key}.lora_up.weight"] = torch.randn(out_f, 4, generator=g) * 0.3
        sd[f"{t.key}.alpha"] = alpha.clone()
    return sd


def write_variants(folder: Path) -> dict[str, Path]:
    """Write every file of KINDS into ``folder``; returns name -> path."""
    from lycoris.modules.boft import ButterflyOFTModule
    from lycoris.modules.diag_oft import DiagOFTModule
    from lycoris.modules.glora import GLoRAModule
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from safetensors.torch import save_file

    from lib_lora.modelmap import ModelMap

    unet, _, te = tiny_modules()
    mm = ModelMap.build("sd1", unet, [("te", te)])
    attn2 = [t for t in mm.targets if t.component == "unet" and "attn2" in t.key and isinstance(t.module, nn.Linear)]
    some = attn2[:8]  # the first two transformer blocks' to_q/to_k/to_v/to_out_0
    assert {t.key.rsplit("attn2_", 1)[1] for t in some} == {"to_q", "to_k", "to_v", "to_out_0"}, [t.key for t in some]
    q_projs = [t for t in mm.targets if t.component == "te" and t.key.endswith("self_attn_q_proj")]
    assert len(q_projs) == 12
    g = torch.Generator().manual_seed(21)

    files: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] = {
        "e2e_diag_oft": (_lycoris(some, lambda k, m: DiagOFTModule(k, m, 1.0, lora_dim=4), 30, 0.1), META),
        "e2e_boft": (_lycoris(some, lambda k, m: ButterflyOFTModule(k, m, 1.0, lora_dim=4), 40, 0.1), META),
        "e2e_glora": (_lycoris(some, lambda k, m: GLoRAModule(k, m, 1.0, lora_dim=4, alpha=2), 50, 0.2), META),
        "e2e_loha": (_lycoris(some, lambda k, m: LohaModule(k, m, 1.0, lora_dim=4, alpha=3), 60, 0.3), META),
        DORA: (_lycoris(some, lambda k, m: LoConModule(k, m, 1.0, lora_dim=4, alpha=3, weight_decompose=True),
                        70, 0.2), META),
        "e2e_int_alpha": (_kohya_lora(some, g, torch.tensor(2)), META),  # int64 0-d: scale 2/4, not 2//4
    }
    assert sum(k.endswith(".dora_scale") for k in files[DORA][0]) == len(some)
    assert files["e2e_int_alpha"][0][f"{some[0].key}.alpha"].dtype == torch.int64

    # sd-scripts OFT: per layer, blocks [n, out/n, out/n] and a float alpha (the norm constraint)
    oft = {}
    for t in some:
        n, out_f = 4, t.weight().shape[0]
        short = t.key[len("lora_unet_"):]
        oft[f"oft_unet_{short}.oft_blocks"] = torch.randn(n, out_f // n, out_f // n, generator=g) * 0.05
        oft[f"oft_unet_{short}.alpha"] = torch.tensor(1e-2)
    files["e2e_oft_kohya"] = (oft, META)

    # PEFT/diffusers text encoder in transformers 5 spelling: no "text_model.", alpha in the header
    peft = {}
    for i in range(len(q_projs)):
        pre = f"text_encoder.encoder.layers.{i}.self_attn.q_proj"
        peft[f"{pre}.lora_A.weight"] = torch.randn(4, 768, generator=g) * 0.1
        peft[f"{pre}.lora_B.weight"] = torch.randn(768, 4, generator=g) * 0.1
    files["e2e_peft_te"] = (peft, {"lora_adapter_metadata": json.dumps({"text_encoder.r": 4,
                                                                        "text_encoder.lora_alpha": 8})})

    written = {}
    for name, (sd, meta) in files.items():
        written[name] = folder / f"{name}.safetensors"
        save_file(sd, str(written[name]), metadata=meta)
    # the current (zip) torch.save format; inside the WebUI torch.load is its restricted unpickler
    written["e2e_pt"] = folder / "e2e_pt.pt"
    torch.save(_kohya_lora(some, g, torch.tensor(4.0)), written["e2e_pt"])
    assert set(written) == set(KINDS)
    return written
