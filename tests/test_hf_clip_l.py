"""The offline CLIP ViT-L/14 tokenizer snapshot the end-to-end suite gives the WebUI (tests/hf_clip_l.py)."""
import pytest

import hf_clip_l

transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")


def test_snapshot_tokenizes_like_clip(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    hf_clip_l.write_snapshot(hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = hf_clip_l.cached_snapshot(hub)
    assert snap is not None and (hub / "models--openai--clip-vit-large-patch14" / "refs" / "main").is_file()

    tok = transformers.CLIPTokenizer.from_pretrained(str(snap))
    # CLIP's own ids
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    reference = open_clip.get_tokenizer("ViT-L-14")
    for prompt in ("An astronaut riding a horse, 8k!!", "naïve café — 東京 🐱", "<lora:x:0.8> (a:1.2), don't"):
        assert tok(prompt)["input_ids"] == [int(t) for t in reference([prompt])[0] if t != 0], prompt

    cfg = transformers.CLIPTextConfig.from_pretrained(str(snap))
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size,
            cfg.vocab_size, cfg.max_position_embeddings, cfg.hidden_act, cfg.eos_token_id) == \
        (768, 12, 12, 3072, 49408, 77, "quick_gelu", 49407)
