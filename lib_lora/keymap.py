"""Turn the keys of any LoRA file into (kohya module key, tensor role).

kohya/LyCORIS files already use ``lora_unet_<path>.<role>``.  diffusers and PEFT
files use dotted module paths under ``unet.``/``text_encoder.``/``text_encoder_2.``
and their own role names; they are rewritten to the kohya spelling so one lookup
(``ModelMap``) serves every format.
"""
from __future__ import annotations

import re

# PEFT/diffusers role spellings -> kohya role names
_ROLE_ALIASES = (
    (".lora_A.weight", "lora_down.weight"), (".lora_B.weight", "lora_up.weight"),
    (".lora.down.weight", "lora_down.weight"), (".lora.up.weight", "lora_up.weight"),
    (".lora_linear_layer.down.weight", "lora_down.weight"), (".lora_linear_layer.up.weight", "lora_up.weight"),
    ("_lora.down.weight", "lora_down.weight"), ("_lora.up.weight", "lora_up.weight"),
    (".lora_magnitude_vector", "dora_scale"),
    (".lora_A.default.weight", "lora_down.weight"), (".lora_B.default.weight", "lora_up.weight"),
)
# roles that appear after a dotted module path in diffusers-style files
_PLAIN_ROLES = ("alpha", "dora_scale", "lora_down.weight", "lora_up.weight", "lora_mid.weight",
                "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
                "diff", "diff_b", "w_norm", "b_norm", "on_input", "oft_blocks", "oft_diag", "rescale",
                "a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight", "weight", "bias")

_DIFFUSERS_ROOTS = (
    ("unet.", "unet"), ("text_encoder_2.", "te2"), ("text_encoder_3.", "te3"), ("text_encoder.", "te"),
    ("transformer.", "transformer"),  # SD3Transformer2DModel
    ("model.diffusion_model.", "unet_ldm"), ("diffusion_model.", "unet_ldm"),
    ("lora_unet.", "unet"), ("lora_te.", "te"),
)
# old attention-processor names -> module names
_PROC_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_PROC_TE = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}

_KOHYA_PREFIX = re.compile(r"^(lora|lycoris|oft)_(unet|te|te1|te2|te3|transformer)_")
# sd-scripts' networks.oft (``oft_unet_``) clamps its blocks its own way: their role says so
_SD_SCRIPTS_OFT_ROLES = {"oft_blocks": "kohya_oft_blocks"}
# transformers 5 dropped CLIPTextModel's ``text_model`` level: its PEFT keys read ``encoder.layers...``
_HF_TEXT_MODEL_CHILDREN = ("encoder.", "embeddings.", "final_layer_norm.")
_KOHYA_TE_WITHOUT_TEXT_MODEL = re.compile(r"^(lora_te[12]?_)(?=(encoder|embeddings|final_layer_norm)_)")


def split_key(key: str, dual_te: bool) -> tuple[str, str] | None:
    """(module key in kohya spelling, role) or None when the key is not an adapter tensor.

    ``dual_te`` says whether text-encoder keys without an index mean ``te1`` (SDXL)
    or ``te`` (SD1/SD2).
    """
    if key.startswith("base_model.model."):
        key = key[len("base_model.model."):]
    m = _KOHYA_PREFIX.match(key)
    if m and "." in key:
        module, role = key.split(".", 1)
        role = _canonical_role(role)
        if m.group(1) != "lora":
            module = "lora_" + module[len(m.group(1)) + 1:]
        if m.group(1) == "oft":
            role = _SD_SCRIPTS_OFT_ROLES.get(role, role)
        module = _KOHYA_TE_WITHOUT_TEXT_MODEL.sub(r"\1text_model_", module)
        return module, role
    for root, comp in _DIFFUSERS_ROOTS:
        if key.startswith(root):
            rest = key[len(root):]
            break
    else:
        return None
    path, role = _split_role(rest)
    if role is None:
        return None
    if comp == "transformer":  # SD3: module names as they are (``to_out.0`` already has its index)
        return "lora_transformer_" + path.replace(".", "_"), role
    if comp in ("unet", "unet_ldm"):
        path = path.replace(".processor.", ".")
        path = _processor_rename(path, _PROC_UNET)
        return "lora_unet_" + path.replace(".", "_"), role
    path = _processor_rename(path, _PROC_TE)
    if comp != "te3" and path.startswith(_HF_TEXT_MODEL_CHILDREN):  # CLIP only: T5's encoder has no text_model
        path = "text_model." + path
    te = {"te": "te1" if dual_te else "te", "te2": "te2", "te3": "te3"}[comp]
    return f"lora_{te}_" + path.replace(".", "_"), role


def _canonical_role(role: str) -> str:
    for old, new in _ROLE_ALIASES:
        if ("." + role).endswith(old) and ("." + role) == old:
            return new
    return role


def _split_role(rest: str) -> tuple[str, str | None]:
    for old, new in _ROLE_ALIASES:
        if rest.endswith(old):
            return rest[: -len(old)], new
    for role in sorted(_PLAIN_ROLES, key=len, reverse=True):
        if rest.endswith("." + role):
            return rest[: -len(role) - 1], role
    return rest, None


def _processor_rename(path: str, table: dict[str, str]) -> str:
    head, _, last = path.rpartition(".")
    if last in table and head:
        return f"{head}.{table[last]}"
    return path
