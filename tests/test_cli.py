"""``python -m lib_lora sample`` and ``inspect`` end to end."""
from __future__ import annotations

import hashlib
import json

from lib_lora.cli import main
from lib_lora.fileio import read_header


def test_sample_then_inspect(tmp_path, capsys):
    out = tmp_path / "sample.safetensors"
    assert main(["sample", str(out)]) == 0
    h = read_header(out)
    # real SD1.5 widths: cross-attention keys read the 768-wide CLIP-L context
    assert h.shapes["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"] == (4, 768)
    assert h.shapes["lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_q.lora_up.weight"] == (320, 4)
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    data = out.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert info["family"] == "sd1" and info["algorithms"] == {"lora": 176}
    assert info["ranks"] == [4] and info["alphas"] == [2.0]
    assert (info["text_encoder_modules"], info["unet_modules"]) == (48, 128)
    assert info["sha256"] == hashlib.sha256(data).hexdigest() and info["autov2"] == info["sha256"][:10]
    assert info["sshs_model_hash"] == hashlib.sha256(data[8 + n:]).hexdigest()
    assert main(["sample", str(out)]) == 2  # never overwrites unless asked
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "family      SD1" in text and "lora x176" in text


def test_sample_sdxl(tmp_path, capsys):
    """SDXL's real layout: 70 transformer blocks of 8 attention projections, CLIP-L's 12 layers and
    OpenCLIP-bigG's 32 of 4 each, cross-attention reading the 2048-wide joint context."""
    out = tmp_path / "xl.safetensors"
    assert main(["sample", str(out), "--family", "sdxl"]) == 0
    h = read_header(out)
    assert h.shapes["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight"] == (4, 2048)
    assert h.shapes["lora_unet_middle_block_1_transformer_blocks_9_attn1_to_q.lora_up.weight"] == (1280, 4)
    assert h.shapes["lora_te2_text_model_encoder_layers_31_self_attn_q_proj.lora_down.weight"] == (4, 1280)
    assert h.shapes["lora_te1_text_model_encoder_layers_11_self_attn_out_proj.lora_up.weight"] == (768, 4)
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "sdxl" and info["algorithms"] == {"lora": 736}
    assert (info["text_encoder_modules"], info["unet_modules"]) == (12 * 4 + 32 * 4, 70 * 8)
    assert info["metadata"]["ss_base_model_version"] == "sdxl_base_v1-0"


def test_inspect_lists_bundled_embeddings(tmp_path, capsys):
    """The built-in's two layouts (SD1/SD2's string_to_param, SDXL's clip_l + clip_g), each with its vectors and
    widths."""
    import torch

    from lib_lora.fileio import load_file, save_safetensors

    out = tmp_path / "sample.safetensors"
    assert main(["sample", str(out)]) == 0
    sd, meta = load_file(out)
    sd["bundle_emb.zkx.string_to_param.*"] = torch.zeros(2, 768)
    sd["bundle_emb.qwv.clip_l"], sd["bundle_emb.qwv.clip_g"] = torch.zeros(3, 768), torch.zeros(3, 1280)
    save_safetensors(sd, out, meta, overwrite=True)
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["embeddings"] == {"zkx": {"vectors": 2, "widths": {"": 768}},
                                  "qwv": {"vectors": 3, "widths": {"clip_l": 768, "clip_g": 1280}}}
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "embedding   zkx: 2 vectors, 768 wide (bundled)" in text
    assert "embedding   qwv: 3 vectors, clip_l 768 + clip_g 1280 wide (bundled)" in text
